//! Copying one flow's bytes both ways, counted as they are written, so a relay that ends in an
//! error still reports what it carried.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A byte stream the gateway relays.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A boxed byte stream (a sidecar's upgraded CONNECT, an overlay stream, a TCP connection).
pub type BoxIo = Box<dyn Io>;

/// How much one read of a relay takes at most. The buffer lives on the stack of the poll: a flow
/// holds memory only for bytes its destination has not taken yet (see [`Half`]).
const READ_CHUNK: usize = 16 * 1024;

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
        r = Both { a: &mut a, b: &mut b, up: Half::default(), down: Half::default() } => match r {
            Ok(_) => Ended::Closed,
            Err(e) => {
                tracing::debug!(error = %e, "relay ended with an error");
                Ended::Error
            }
        },
        () = watchdog => Ended::Idle,
    }
}

/// One direction of a relay. Bytes read are written on at once; only what the writer does not
/// take at once is kept (`pending`), and that allocation is given back as soon as it is written,
/// so an idle flow holds no buffer (with a 16 KiB buffer per direction, open flows cost the
/// gateway 32 MiB per 1000).
#[derive(Default)]
struct Half {
    pending: Vec<u8>,
    written: usize,
    read_done: bool,
    need_flush: bool,
    done: bool,
}

impl Half {
    /// Moves bytes from `r` to `w` until `r` has nothing more for now (`Pending`) or has ended
    /// and `w` is shut down (`Ready(Ok)`).
    fn poll_copy<R, W>(&mut self, cx: &mut Context<'_>, mut r: Pin<&mut R>, mut w: Pin<&mut W>) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            while self.written < self.pending.len() {
                let n = ready!(w.as_mut().poll_write(cx, self.pending.get(self.written..).unwrap_or_default()))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.written += n;
                self.need_flush = true;
            }
            if !self.pending.is_empty() {
                self.pending = Vec::new();
                self.written = 0;
            }
            if self.read_done {
                ready!(w.as_mut().poll_flush(cx))?;
                ready!(w.as_mut().poll_shutdown(cx))?;
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut buf = ReadBuf::uninit(&mut chunk);
            match r.as_mut().poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    if self.need_flush {
                        ready!(w.as_mut().poll_flush(cx))?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
            }
            let data = buf.filled();
            if data.is_empty() {
                self.read_done = true;
                continue;
            }
            let mut at = 0;
            while at < data.len() {
                match w.as_mut().poll_write(cx, data.get(at..).unwrap_or_default()) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(n)) => {
                        at += n;
                        self.need_flush = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        self.pending = data.get(at..).unwrap_or_default().to_vec();
                        return Poll::Pending;
                    }
                }
            }
        }
    }
}

/// Both directions of a relay: done when both are, failed when either fails.
struct Both<'a, A, B> {
    a: &'a mut A,
    b: &'a mut B,
    up: Half,
    down: Half,
}

impl<A, B> Future for Both<'_, A, B>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    type Output = io::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.up.done
            && let Poll::Ready(r) = this.up.poll_copy(cx, Pin::new(&mut *this.a), Pin::new(&mut *this.b))
        {
            r?;
            this.up.done = true;
        }
        if !this.down.done
            && let Poll::Ready(r) = this.down.poll_copy(cx, Pin::new(&mut *this.b), Pin::new(&mut *this.a))
        {
            r?;
            this.down.done = true;
        }
        if this.up.done && this.down.done { Poll::Ready(Ok(())) } else { Poll::Pending }
    }
}

/// A byte stream with something held for as long as it is open (a flow's place under a limit).
pub struct Holding<S, H> {
    /// The stream.
    pub io: S,
    /// What is held.
    pub held: H,
}

impl<S, H> std::fmt::Debug for Holding<S, H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Holding").finish_non_exhaustive()
    }
}

impl<S: AsyncRead + Unpin, H: Unpin> AsyncRead for Holding<S, H> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin, H: Unpin> AsyncWrite for Holding<S, H> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
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

    #[tokio::test]
    async fn a_megabyte_each_way_through_slow_writers_arrives_whole_and_counted() {
        // 1 KiB pipes: nearly every write is partial or pending, so the kept remainder is used.
        let (client, a) = tokio::io::duplex(1024);
        let (b, server) = tokio::io::duplex(1024);
        let (up, down) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (u, d) = (up.clone(), down.clone());
        let relaying = tokio::spawn(async move { relay(a, b, &u, &d, Duration::from_secs(60)).await });
        let data: Vec<u8> = (0..1_048_576u32).map(|i| (i % 251) as u8).collect();
        let (to_server, to_client) = (data.clone(), data.clone());
        // Each end sends its megabyte and shuts down while reading the other's to the end.
        let end = |mut io: tokio::io::DuplexStream, out: Vec<u8>| async move {
            let (mut r, mut w) = tokio::io::split(&mut io);
            let send = async {
                w.write_all(&out).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let mut got = Vec::new();
            let ((), n) = tokio::join!(send, r.read_to_end(&mut got));
            n.unwrap();
            got
        };
        let client_side = tokio::spawn(end(client, to_server));
        let server_side = tokio::spawn(end(server, to_client));
        assert!(client_side.await.unwrap() == data, "the client got the server's megabyte unchanged");
        assert!(server_side.await.unwrap() == data, "the server got the client's megabyte unchanged");
        assert_eq!(relaying.await.unwrap(), Ended::Closed);
        assert_eq!(up.load(Ordering::Relaxed), 1_048_576);
        assert_eq!(down.load(Ordering::Relaxed), 1_048_576);
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
