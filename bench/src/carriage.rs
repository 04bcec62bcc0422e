//! `keyway-bench udp-carriage`: how UDP packets should ride a QUIC connection (issue 15's
//! "QUIC datagrams (RFC 9221) or one stream per flow: measure and choose").
//!
//! Two quinn endpoints in one process on loopback, as a gateway pair is, carry UDP-sized packets
//! (1000 bytes for throughput, 64 for the echo) either as **one QUIC datagram per packet** or on
//! **one bidirectional stream per flow**, each packet prefixed with its length (u16). Measured in
//! both: the echo round trip at a fixed rate (open loop; a packet with no echo within 1 s is lost)
//! and the one-way goodput when the sender pushes as fast as QUIC lets it. Loss is made in the
//! process (this machine's kernel has no netem): both endpoints' sockets drop that share of the
//! UDP packets they send, each packet independently (a fixed-seed generator; one QUIC packet per
//! send, no GSO batches), so a stream shows head-of-line blocking and retransmission delay where
//! datagrams show loss.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use hdrhistogram::Histogram;
use keyway_e2e::topology::sh;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Bytes of each packet of the goodput runs (a UDP payload that fits QUIC's initial 1200-byte
/// packets in both carriages).
const BULK_BYTES: usize = 1000;
/// Bytes of each echo packet.
const ECHO_BYTES: usize = 64;
/// How long an echo may take before it counts as lost.
const ECHO_TIMEOUT: Duration = Duration::from_secs(1);

/// `keyway-bench udp-carriage`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Measured seconds of each echo run.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Echo packets per second.
    #[arg(long, default_value_t = 1000)]
    pub rate: u32,
    /// Seconds of each goodput run.
    #[arg(long, default_value_t = 5.0)]
    pub throughput_seconds: f64,
    /// Loss rates in percent (each UDP packet either way, dropped by the sending socket).
    #[arg(long, value_delimiter = ',', default_values_t = [0.0, 1.0])]
    pub loss: Vec<f64>,
    /// Rounds of every (loss, carriage) pair; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Also write the JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// How UDP packets ride the QUIC connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Carriage {
    /// One QUIC datagram (RFC 9221) per packet.
    Datagram,
    /// One bidirectional stream per flow, packets length-prefixed.
    Stream,
}

/// One measurement of one carriage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measured {
    /// The carriage.
    pub carriage: Carriage,
    /// Echo round trip, median (ms).
    pub echo_p50_ms: f64,
    /// 99th percentile (ms).
    pub echo_p99_ms: f64,
    /// 99.9th percentile (ms).
    pub echo_p999_ms: f64,
    /// Largest (ms).
    pub echo_max_ms: f64,
    /// Echo packets sent (measured part).
    pub echo_sent: u64,
    /// Echo packets with no echo within 1 s.
    pub echo_lost: u64,
    /// Packets delivered per second of the goodput run, times their size (Mbit/s).
    pub goodput_mbps: f64,
}

/// Runs the subcommand.
pub fn main(args: &Args) -> anyhow::Result<()> {
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut rows = Vec::new();
    for &loss in &args.loss {
        for round in 1..=args.rounds {
            for carriage in [Carriage::Datagram, Carriage::Stream] {
                // A runtime of one thread per measurement, as fresh as the endpoints.
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                let m = rt
                    .block_on(measure(carriage, args, loss, u64::from(round)))
                    .with_context(|| format!("{carriage:?} at {loss} % loss"))?;
                eprintln!(
                    "  loss {loss} % round {round} {:<8} echo p50 {:.3} p99 {:.3} p99.9 {:.3} max {:.1} ms, {} of {} lost; goodput {:.0} Mbit/s",
                    format!("{carriage:?}"),
                    m.echo_p50_ms,
                    m.echo_p99_ms,
                    m.echo_p999_ms,
                    m.echo_max_ms,
                    m.echo_lost,
                    m.echo_sent,
                    m.goodput_mbps
                );
                rows.push(serde_json::json!({"loss_percent": loss, "round": round, "result": m}));
            }
        }
    }
    let summary = summarize(&rows, &args.loss);
    let v = serde_json::json!({
        "date": sh(&["date", "-u", "+%Y-%m-%dT%H:%M:%SZ"])?.trim(),
        "load_before": load_before.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        "load_after": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        "settings": {
            "echo_rate_per_second": args.rate, "echo_bytes": ECHO_BYTES, "echo_seconds": args.seconds,
            "goodput_packet_bytes": BULK_BYTES, "goodput_seconds": args.throughput_seconds, "rounds": args.rounds,
            "how": "two quinn endpoints in one process (one tokio thread) on 127.0.0.1; loss: each UDP packet either way dropped by the sending socket with that probability; medians of rounds",
        },
        "summary": summary,
        "runs": rows,
    });
    let text = serde_json::to_string_pretty(&v)?;
    if let Some(out) = &args.out {
        std::fs::write(out, &text)?;
    }
    println!("{text}");
    Ok(())
}

/// Medians of the rounds for every (loss, carriage).
fn summarize(rows: &[serde_json::Value], losses: &[f64]) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for &loss in losses {
        for carriage in ["datagram", "stream"] {
            let sel: Vec<&serde_json::Value> = rows
                .iter()
                .filter(|r| r["loss_percent"].as_f64() == Some(loss) && r["result"]["carriage"] == carriage)
                .collect();
            let med = |k: &str| {
                let v: Vec<f64> = sel.iter().filter_map(|r| r["result"][k].as_f64()).collect();
                (crate::measure::median(&v) * 1000.0).round() / 1000.0
            };
            let lost: f64 = sel.iter().filter_map(|r| r["result"]["echo_lost"].as_f64()).sum();
            let sent: f64 = sel.iter().filter_map(|r| r["result"]["echo_sent"].as_f64()).sum();
            let lost_fraction = (lost / sent.max(1.0) * 10_000.0).round() / 10_000.0;
            out.push(serde_json::json!({
                "loss_percent": loss, "carriage": carriage,
                "echo_p50_ms": med("echo_p50_ms"), "echo_p99_ms": med("echo_p99_ms"), "echo_p999_ms": med("echo_p999_ms"),
                "echo_max_ms": med("echo_max_ms"), "echo_lost_fraction": lost_fraction,
                "goodput_mbps": med("goodput_mbps"),
            }));
        }
    }
    out
}

/// A UDP socket that drops a share of the packets it sends (each independently), one QUIC
/// packet per send.
#[derive(Debug)]
struct Lossy {
    inner: Arc<dyn quinn::AsyncUdpSocket>,
    /// Drop probability, per 2^32.
    threshold: u64,
    /// xorshift64 state.
    state: AtomicU64,
}

impl Lossy {
    fn bind(loss_percent: f64, seed: u64) -> anyhow::Result<Arc<dyn quinn::AsyncUdpSocket>> {
        use quinn::Runtime as _;
        let socket = std::net::UdpSocket::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let inner = quinn::TokioRuntime.wrap_udp_socket(socket)?;
        let threshold = (loss_percent / 100.0 * 4_294_967_296.0) as u64;
        Ok(Arc::new(Lossy { inner, threshold, state: AtomicU64::new(seed | 1) }))
    }

    fn drop_this(&self) -> bool {
        if self.threshold == 0 {
            return false;
        }
        let mut x = self.state.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.state.store(x, Ordering::Relaxed);
        (x >> 32) < self.threshold
    }
}

impl quinn::AsyncUdpSocket for Lossy {
    fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit<'_>) -> std::io::Result<()> {
        if self.drop_this() { Ok(()) } else { self.inner.try_send(transmit) }
    }

    fn poll_recv(
        &self,
        cx: &mut std::task::Context<'_>,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// A server and a client endpoint on loopback, with a self-signed certificate.
fn endpoints(loss: f64, seed: u64) -> anyhow::Result<(quinn::Endpoint, quinn::Endpoint)> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cert = rcgen::generate_simple_self_signed(vec!["carriage.bench".to_owned()])?;
    let der = cert.cert.der().clone();
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(quinn::IdleTimeout::try_from(Duration::from_secs(10))?));
    let transport = Arc::new(transport);
    let mut server_cfg = quinn::ServerConfig::with_single_cert(vec![der.clone()], key)?;
    server_cfg.transport_config(transport.clone());
    let runtime: Arc<dyn quinn::Runtime> = Arc::new(quinn::TokioRuntime);
    let server = quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        Some(server_cfg),
        Lossy::bind(loss, seed)?,
        runtime.clone(),
    )?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der)?;
    let mut client_cfg = quinn::ClientConfig::with_root_certificates(Arc::new(roots))?;
    client_cfg.transport_config(transport);
    let mut client = quinn::Endpoint::new_with_abstract_socket(
        quinn::EndpointConfig::default(),
        None,
        Lossy::bind(loss, seed.wrapping_mul(0x9e37_79b9_7f4a_7c15))?,
        runtime,
    )?;
    client.set_default_client_config(client_cfg);
    Ok((server, client))
}

async fn connect(
    server: &quinn::Endpoint,
    client: &quinn::Endpoint,
) -> anyhow::Result<(quinn::Connection, quinn::Connection)> {
    let addr = server.local_addr()?;
    let (c, s) =
        tokio::join!(async { client.connect(addr, "carriage.bench")?.await.map_err(anyhow::Error::from) }, async {
            let incoming = server.accept().await.context("no connection")?;
            incoming.await.map_err(anyhow::Error::from)
        });
    Ok((c?, s?))
}

/// Echo round trips, then goodput, of one carriage.
async fn measure(carriage: Carriage, args: &Args, loss: f64, seed: u64) -> anyhow::Result<Measured> {
    let (server, client) = endpoints(loss, seed)?;
    let (c, s) = connect(&server, &client).await?;
    let (hist, sent, lost) =
        echo(carriage, &c, &s, f64::from(args.rate), Duration::from_secs_f64(args.seconds)).await?;
    c.close(0u32.into(), b"done");
    let (c, s) = connect(&server, &client).await?;
    let goodput = goodput(carriage, &c, &s, Duration::from_secs_f64(args.throughput_seconds)).await?;
    c.close(0u32.into(), b"done");
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    Ok(Measured {
        carriage,
        echo_p50_ms: ms(0.5),
        echo_p99_ms: ms(0.99),
        echo_p999_ms: ms(0.999),
        echo_max_ms: hist.max() as f64 / 1000.0,
        echo_sent: sent,
        echo_lost: lost,
        goodput_mbps: goodput,
    })
}

/// Reads one length-prefixed packet; `None` at the end of the stream.
async fn read_frame(recv: &mut quinn::RecvStream, buf: &mut Vec<u8>) -> anyhow::Result<Option<()>> {
    let mut len = [0u8; 2];
    match recv.read_exact(&mut len).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    buf.resize(usize::from(u16::from_be_bytes(len)), 0);
    recv.read_exact(buf).await?;
    Ok(Some(()))
}

fn frame(payload: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut f = Vec::with_capacity(payload.len() + 2);
    f.extend_from_slice(&u16::try_from(payload.len())?.to_be_bytes());
    f.extend_from_slice(payload);
    Ok(f)
}

/// Sends `ECHO_BYTES` packets at `rate` for `duration` (after a 1 s warm-up), the server side
/// echoes them; returns the round trips, the packets sent in the measured part and those lost.
async fn echo(
    carriage: Carriage,
    c: &quinn::Connection,
    s: &quinn::Connection,
    rate: f64,
    duration: Duration,
) -> anyhow::Result<(Histogram<u64>, u64, u64)> {
    // The server: echo everything.
    let s = s.clone();
    let server = tokio::spawn(async move {
        match carriage {
            Carriage::Datagram => {
                while let Ok(d) = s.read_datagram().await {
                    let _ = s.send_datagram(d);
                }
            }
            Carriage::Stream => {
                let Ok((mut send, mut recv)) = s.accept_bi().await else { return };
                let mut buf = Vec::new();
                while let Ok(Some(())) = read_frame(&mut recv, &mut buf).await {
                    let Ok(f) = frame(&buf) else { return };
                    if send.write_all(&f).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let warmup = Duration::from_secs(1);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let t0 = Instant::now() + Duration::from_millis(20);
    let record_from = t0 + warmup;
    let end = record_from + duration;
    let total = usize::try_from((end - t0).as_nanos() / interval.as_nanos().max(1))?;
    let sent_at: Arc<std::sync::Mutex<Vec<Option<Instant>>>> = Arc::new(std::sync::Mutex::new(vec![None; total]));
    let (mut send, recv) = match carriage {
        Carriage::Stream => {
            let (s, r) = c.open_bi().await?;
            (Some(s), Some(r))
        }
        Carriage::Datagram => (None, None),
    };
    // The receiver: records each echo's round trip.
    let receiver = tokio::spawn({
        let c = c.clone();
        let sent_at = sent_at.clone();
        async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            let mut on_echo = |payload: &[u8]| {
                let now = Instant::now();
                let Some(seq) = payload.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) else { return };
                let seq = usize::try_from(u64::from_be_bytes(seq)).unwrap_or(usize::MAX);
                let at = sent_at.lock().ok().and_then(|mut v| v.get_mut(seq).and_then(Option::take));
                if let Some(at) = at
                    && t0 + interval * u32::try_from(seq).unwrap_or(u32::MAX) >= record_from
                {
                    let _ = hist.record(u64::try_from((now - at).as_micros()).unwrap_or(u64::MAX).clamp(1, 60_000_000));
                }
            };
            let stop = tokio::time::sleep_until(end + ECHO_TIMEOUT);
            tokio::pin!(stop);
            match recv {
                None => loop {
                    tokio::select! {
                        () = &mut stop => break,
                        d = c.read_datagram() => match d { Ok(d) => on_echo(&d), Err(_) => break },
                    }
                },
                Some(mut recv) => {
                    let mut buf = Vec::new();
                    loop {
                        tokio::select! {
                            () = &mut stop => break,
                            f = read_frame(&mut recv, &mut buf) => match f { Ok(Some(())) => on_echo(&buf), _ => break },
                        }
                    }
                }
            }
            anyhow::Ok(hist)
        }
    });
    let mut payload = vec![0u8; ECHO_BYTES];
    let mut recorded = 0u64;
    for seq in 0..total {
        let due = t0 + interval * u32::try_from(seq)?;
        tokio::time::sleep_until(due).await;
        payload[..8].copy_from_slice(&(seq as u64).to_be_bytes());
        if let Ok(mut v) = sent_at.lock()
            && let Some(slot) = v.get_mut(seq)
        {
            *slot = Some(Instant::now());
        }
        match send.as_mut() {
            None => {
                let _ = c.send_datagram(Bytes::copy_from_slice(&payload));
            }
            Some(s) => s.write_all(&frame(&payload)?).await?,
        }
        if due >= record_from {
            recorded += 1;
        }
    }
    let hist = receiver.await??;
    server.abort();
    let lost = recorded.saturating_sub(hist.len());
    Ok((hist, recorded, lost))
}

/// The sender pushes `BULK_BYTES` packets as fast as QUIC takes them for `duration`; returns the
/// packets the server received in that time, as Mbit/s.
async fn goodput(
    carriage: Carriage,
    c: &quinn::Connection,
    s: &quinn::Connection,
    duration: Duration,
) -> anyhow::Result<f64> {
    let received = Arc::new(AtomicU64::new(0));
    let server = {
        let s = s.clone();
        let received = received.clone();
        tokio::spawn(async move {
            match carriage {
                Carriage::Datagram => {
                    while let Ok(d) = s.read_datagram().await {
                        received.fetch_add(d.len() as u64, Ordering::Relaxed);
                    }
                }
                Carriage::Stream => {
                    let Ok(mut recv) = s.accept_uni().await else { return };
                    let mut buf = Vec::new();
                    while let Ok(Some(())) = read_frame(&mut recv, &mut buf).await {
                        received.fetch_add(buf.len() as u64, Ordering::Relaxed);
                    }
                }
            }
        })
    };
    let payload = Bytes::from(vec![0x6bu8; BULK_BYTES]);
    let framed = frame(&payload)?;
    let mut send = match carriage {
        Carriage::Stream => Some(c.open_uni().await?),
        Carriage::Datagram => None,
    };
    // A second of warm-up (congestion window), then the measured part.
    let warm_end = Instant::now() + Duration::from_secs(1);
    let end = warm_end + duration;
    let mut start_bytes = None;
    while Instant::now() < end {
        if start_bytes.is_none() && Instant::now() >= warm_end {
            start_bytes = Some(received.load(Ordering::Relaxed));
        }
        match send.as_mut() {
            None => c.send_datagram_wait(payload.clone()).await?,
            Some(s) => s.write_all(&framed).await?,
        }
    }
    let bytes = received.load(Ordering::Relaxed) - start_bytes.unwrap_or(0);
    server.abort();
    Ok(bytes as f64 * 8.0 / duration.as_secs_f64() / 1e6)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> Args {
        Args { seconds: 1.0, rate: 1000, throughput_seconds: 0.5, loss: Vec::new(), rounds: 1, out: None }
    }

    fn run(carriage: Carriage, loss: f64) -> Measured {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(measure(carriage, &args(), loss, 7)).unwrap()
    }

    #[test]
    fn both_carriages_echo_every_packet_and_carry_bulk_without_loss() {
        for carriage in [Carriage::Datagram, Carriage::Stream] {
            let m = run(carriage, 0.0);
            assert_eq!(m.echo_sent, 1000, "{carriage:?}");
            assert_eq!(m.echo_lost, 0, "{carriage:?}");
            assert!(m.goodput_mbps > 0.0, "{carriage:?}: {m:?}");
        }
    }

    #[test]
    fn with_loss_datagrams_lose_packets_and_the_stream_delivers_them_all() {
        let d = run(Carriage::Datagram, 2.0);
        assert!(d.echo_lost > 0, "{d:?}");
        let s = run(Carriage::Stream, 2.0);
        assert_eq!(s.echo_lost, 0, "{s:?}");
        assert_eq!(s.echo_sent, 1000);
    }
}
