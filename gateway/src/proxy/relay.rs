//! Copying one flow's bytes both ways, counted as they are written, so a relay that ends in an
//! error still reports what it carried.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A byte stream the gateway relays.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A boxed byte stream (a sidecar's upgraded CONNECT, an overlay stream, a TCP connection).
pub type BoxIo = Box<dyn Io>;

/// The relay's buffer per direction.
const RELAY_BUFFER: usize = 16 * 1024;

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Both directions finished.
    Closed,
    /// One side failed (reset, broken pipe).
    Error,
    /// No byte went either way for the idle timeout.
    Idle,
}

/// Copies bytes both ways until both directions end, with half-close: when one side finishes
/// sending, the other side's write half is shut down. `up` counts bytes written to `b` (towards
/// the destination), `down` bytes written to `a`. A flow that carries no byte either way for
/// `idle` (checked every `idle`, so between one and two `idle`s of silence) is closed.
pub async fn relay<A, B>(a: A, b: B, up: &Arc<AtomicU64>, down: &Arc<AtomicU64>, idle: Duration) -> Ended
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut a = Counted { inner: a, written: down.clone() };
    let mut b = Counted { inner: b, written: up.clone() };
    let carried = || up.load(Ordering::Relaxed).wrapping_add(down.load(Ordering::Relaxed));
    let watchdog = async {
        let mut last = carried();
        loop {
            tokio::time::sleep(idle).await;
            let now = carried();
            if now == last {
                return;
            }
            last = now;
        }
    };
    tokio::select! {
        r = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, RELAY_BUFFER, RELAY_BUFFER) => match r {
            Ok(_) => Ended::Closed,
            Err(e) => {
                tracing::debug!(error = %e, "relay ended with an error");
                Ended::Error
            }
        },
        () = watchdog => Ended::Idle,
    }
}

/// A stream that counts the bytes written to it.
struct Counted<S> {
    inner: S,
    written: Arc<AtomicU64>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn bytes_carried_before_an_error_are_counted() {
        let (client, a) = tokio::io::duplex(64);
        let (b, mut server) = tokio::io::duplex(64);
        let (up, down) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (u, d) = (up.clone(), down.clone());
        let relaying = tokio::spawn(async move { relay(a, b, &u, &d, Duration::from_secs(60)).await });
        let mut client = client;
        client.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        server.read_exact(&mut got).await.unwrap();
        server.write_all(b"hi").await.unwrap();
        let mut back = [0u8; 2];
        client.read_exact(&mut back).await.unwrap();
        // The destination vanishes mid-flow, the client is still sending.
        drop(server);
        let _ = client.write_all(&[0u8; 1024]).await;
        drop(client);
        let _ = relaying.await.unwrap();
        assert_eq!(up.load(Ordering::Relaxed), 5);
        assert_eq!(down.load(Ordering::Relaxed), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_flow_is_closed_after_the_idle_timeout_and_a_busy_one_is_not() {
        let (mut client, a) = tokio::io::duplex(64);
        let (b, mut server) = tokio::io::duplex(64);
        let (up, down) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (u, d) = (up.clone(), down.clone());
        let relaying = tokio::spawn(async move { relay(a, b, &u, &d, Duration::from_secs(10)).await });
        // Busy for 30 s: a byte every 5 s keeps it open.
        for _ in 0..6 {
            client.write_all(b"x").await.unwrap();
            let mut one = [0u8; 1];
            server.read_exact(&mut one).await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
            assert!(!relaying.is_finished(), "a busy flow stays open");
        }
        // Then silent: closed within two idle timeouts, and both ends see it end.
        tokio::time::sleep(Duration::from_secs(21)).await;
        assert_eq!(relaying.await.unwrap(), Ended::Idle);
        let mut rest = Vec::new();
        assert_eq!(server.read_to_end(&mut rest).await.unwrap(), 0);
    }
}
