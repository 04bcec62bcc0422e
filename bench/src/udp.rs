//! UDP echo: the server (`keyway-bench udp-serve`) sends every datagram back to its sender; the
//! pinger (`keyway-bench udp-ping`) sends datagrams at a fixed rate, open loop, each carrying its
//! sequence number, and records each echo's round trip from the moment its datagram was sent.
//! A datagram with no echo within [`ECHO_TIMEOUT`] counts as lost (in `errors`).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use hdrhistogram::Histogram;
use tokio::net::UdpSocket;
use tokio::time::Instant;

use crate::load::LoadResult;

/// How long the pinger waits for the last echoes before counting them lost.
pub const ECHO_TIMEOUT: Duration = Duration::from_secs(1);
/// The smallest datagram (its sequence number).
const MIN_SIZE: usize = 8;

/// Echoes every datagram on `port` back to its sender, until killed.
pub async fn serve(port: u16) -> anyhow::Result<()> {
    echo_on(UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], port))).await?).await
}

async fn echo_on(socket: UdpSocket) -> anyhow::Result<()> {
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, from) = socket.recv_from(&mut buf).await?;
        let _ = socket.send_to(&buf[..n], from).await;
    }
}

/// What one ping run is.
#[derive(Debug, Clone)]
pub struct PingSpec {
    /// The echo server.
    pub target: SocketAddr,
    /// Datagrams per second.
    pub rate: f64,
    /// Bytes per datagram (at least 8).
    pub size: usize,
    /// Measured time.
    pub duration: Duration,
    /// Time at the start whose datagrams are not recorded.
    pub warmup: Duration,
}

/// Sends datagrams at `spec.rate` and returns the round-trip percentiles; `errors` are the
/// recorded datagrams that got no echo.
pub async fn ping(spec: PingSpec) -> anyhow::Result<LoadResult> {
    anyhow::ensure!(spec.rate > 0.0 && spec.size >= MIN_SIZE, "rate must be positive and size at least {MIN_SIZE}");
    let socket = UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 0))).await?;
    socket.connect(spec.target).await?;
    // First, one echo must come back (the path works).
    let mut buf = vec![0u8; 65_536];
    let probe = vec![0xffu8; spec.size];
    let mut answered = false;
    for _ in 0..10 {
        socket.send(&probe).await?;
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(500), socket.recv(&mut buf)).await {
            answered = true;
            break;
        }
    }
    anyhow::ensure!(answered, "no echo from {} to 10 datagrams", spec.target);
    let interval = Duration::from_secs_f64(1.0 / spec.rate);
    let t0 = Instant::now() + Duration::from_millis(20);
    let record_from = t0 + spec.warmup;
    let end = record_from + spec.duration;
    let total = usize::try_from((end - t0).as_nanos() / interval.as_nanos().max(1))?;
    // Send time of each datagram; `None` once answered.
    let mut sent: Vec<Option<Instant>> = vec![None; total];
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut payload = vec![0u8; spec.size];
    let mut next = 0usize;
    let mut recorded = 0u64;
    loop {
        let due = t0 + interval * u32::try_from(next).unwrap_or(u32::MAX);
        let deadline = if next < total { due } else { Instant::now().max(end) + ECHO_TIMEOUT };
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => {
                if next >= total {
                    break;
                }
                payload[..8].copy_from_slice(&(next as u64).to_be_bytes());
                // A full socket buffer is a loss like any other.
                let _ = socket.send(&payload).await;
                sent[next] = Some(Instant::now());
                if due >= record_from {
                    recorded += 1;
                }
                next += 1;
            }
            r = socket.recv(&mut buf) => {
                let n = r.context("udp recv")?;
                let now = Instant::now();
                let Some(seq) = buf.get(..8).filter(|_| n >= 8).and_then(|b| <[u8; 8]>::try_from(b).ok()) else { continue };
                let seq = usize::try_from(u64::from_be_bytes(seq)).unwrap_or(usize::MAX);
                let Some(slot) = sent.get_mut(seq) else { continue };
                if let Some(at) = slot.take()
                    && t0 + interval * u32::try_from(seq).unwrap_or(u32::MAX) >= record_from
                {
                    let us = u64::try_from((now - at).as_micros()).unwrap_or(u64::MAX).max(1);
                    let _ = hist.record(us.min(60_000_000));
                }
            }
        }
    }
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    Ok(LoadResult {
        p50_ms: ms(0.50),
        p90_ms: ms(0.90),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: hist.max() as f64 / 1000.0,
        mean_ms: hist.mean() / 1000.0,
        requests: hist.len(),
        errors: recorded.saturating_sub(hist.len()),
        achieved_rps: hist.len() as f64 / spec.duration.as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_datagram_is_echoed_and_timed() {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let target = socket.local_addr().unwrap();
        let server = tokio::spawn(echo_on(socket));
        let spec = PingSpec {
            target,
            rate: 500.0,
            size: 64,
            duration: Duration::from_millis(500),
            warmup: Duration::from_millis(100),
        };
        let r = ping(spec).await.unwrap();
        server.abort();
        assert_eq!(r.requests, 250, "{r:?}");
        assert_eq!(r.errors, 0, "{r:?}");
        assert!(r.p50_ms > 0.0 && r.p50_ms <= r.p99_ms, "{r:?}");
    }

    #[tokio::test]
    async fn datagrams_without_an_echo_count_as_lost() {
        // A server that answers the first datagrams (the path check) and then none.
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let target = socket.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            let (n, from) = socket.recv_from(&mut buf).await.unwrap();
            socket.send_to(&buf[..n], from).await.unwrap();
            loop {
                let _ = socket.recv_from(&mut buf).await;
            }
        });
        let spec =
            PingSpec { target, rate: 200.0, size: 16, duration: Duration::from_millis(200), warmup: Duration::ZERO };
        let r = ping(spec).await.unwrap();
        server.abort();
        assert_eq!(r.requests, 0, "{r:?}");
        assert_eq!(r.errors, 40, "{r:?}");
    }
}
