//! The HTTP server (1 KiB answers) and the open-loop load generator.
//!
//! The load generator keeps a fixed request rate whatever the latency (open loop, as wrk2 does):
//! request `k` of connection `i` is due at `t0 + (k·C + i) / rate`. When a connection is still busy
//! with an earlier request at that time, the latency counts from the due time (coordinated
//! omission corrected); when it is idle, from the moment the request is actually written, so that
//! tokio's millisecond timer does not count as latency.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// Size of every answer.
pub const BODY_BYTES: usize = 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `GET` on `port` with a 1 KiB body, HTTP/1.1 keep-alive, until killed.
pub async fn serve(port: u16) -> anyhow::Result<()> {
    let listener = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))).await?;
    let body = Bytes::from(vec![b'k'; BODY_BYTES]);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                let body = body.clone();
                async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

/// What one load run is.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// The server.
    pub target: SocketAddr,
    /// Requests per second, over all connections.
    pub rate: f64,
    /// Concurrent connections.
    pub connections: usize,
    /// Measured time (after the warm-up).
    pub duration: Duration,
    /// Time at the start whose requests are not recorded.
    pub warmup: Duration,
    /// A new TCP connection for every request instead of keep-alive.
    pub new_connection: bool,
}

/// Latency percentiles and counts of one run.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct LoadResult {
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest.
    pub max_ms: f64,
    /// Mean.
    pub mean_ms: f64,
    /// Requests recorded.
    pub requests: u64,
    /// Requests that failed (error or timeout).
    pub errors: u64,
    /// Recorded requests per second of measured time.
    pub achieved_rps: f64,
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connect(target: SocketAddr) -> anyhow::Result<Sender> {
    let stream = TcpStream::connect(target).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

async fn request(sender: &mut Sender, target: SocketAddr, close: bool) -> anyhow::Result<()> {
    let mut req = Request::get("/").header(http::header::HOST, target.to_string());
    if close {
        req = req.header(http::header::CONNECTION, "close");
    }
    sender.ready().await?;
    let resp = sender.send_request(req.body(Empty::new())?).await?;
    anyhow::ensure!(resp.status().is_success(), "status {}", resp.status());
    let body = resp.into_body().collect().await?.to_bytes();
    anyhow::ensure!(body.len() == BODY_BYTES, "body of {} bytes", body.len());
    Ok(())
}

/// One request on a fresh connection (the connection is closed afterwards).
async fn one_shot(target: SocketAddr) -> anyhow::Result<()> {
    let mut s = connect(target).await?;
    request(&mut s, target, true).await
}

async fn connection_loop(spec: LoadSpec, index: usize, t0: Instant) -> anyhow::Result<(Histogram<u64>, u64)> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut errors = 0;
    let interval = Duration::from_secs_f64(spec.connections as f64 / spec.rate);
    let offset = Duration::from_secs_f64(index as f64 / spec.rate);
    let record_from = t0 + spec.warmup;
    let end = record_from + spec.duration;
    let mut sender: Option<Sender> = None;
    let mut k: u32 = 0;
    loop {
        let due = t0 + offset + interval * k;
        k += 1;
        if due >= end {
            break;
        }
        let start = if Instant::now() < due {
            tokio::time::sleep_until(due).await;
            Instant::now()
        } else {
            due
        };
        let outcome = if spec.new_connection {
            tokio::time::timeout(REQUEST_TIMEOUT, one_shot(spec.target)).await
        } else {
            tokio::time::timeout(REQUEST_TIMEOUT, async {
                if sender.as_ref().is_none_or(Sender::is_closed) {
                    sender = Some(connect(spec.target).await?);
                }
                match sender.as_mut() {
                    Some(s) => request(s, spec.target, false).await,
                    None => anyhow::bail!("no connection"),
                }
            })
            .await
        };
        let done = Instant::now();
        match outcome {
            Ok(Ok(())) => {
                if due >= record_from {
                    let us = u64::try_from((done - start).as_micros()).unwrap_or(u64::MAX).max(1);
                    let _ = hist.record(us.min(60_000_000));
                }
            }
            _ => {
                sender = None;
                if due >= record_from {
                    errors += 1;
                }
            }
        }
    }
    Ok((hist, errors))
}

/// Runs the load and returns the percentiles.
pub async fn run(spec: LoadSpec) -> anyhow::Result<LoadResult> {
    anyhow::ensure!(spec.rate > 0.0 && spec.connections > 0, "rate and connections must be positive");
    // First, one request must go through (the path works).
    tokio::time::timeout(REQUEST_TIMEOUT, one_shot(spec.target))
        .await
        .context("first request timed out")?
        .with_context(|| format!("first request to {}", spec.target))?;
    let t0 = Instant::now() + Duration::from_millis(20);
    let tasks: Vec<_> = (0..spec.connections).map(|i| tokio::spawn(connection_loop(spec.clone(), i, t0))).collect();
    let mut all = Histogram::<u64>::new(3)?;
    let mut errors = 0;
    for t in tasks {
        let (h, e) = t.await??;
        all.add(&h)?;
        errors += e;
    }
    let ms = |q: f64| all.value_at_quantile(q) as f64 / 1000.0;
    Ok(LoadResult {
        p50_ms: ms(0.50),
        p90_ms: ms(0.90),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: all.max() as f64 / 1000.0,
        mean_ms: all.mean() / 1000.0,
        requests: all.len(),
        errors,
        achieved_rps: all.len() as f64 / spec.duration.as_secs_f64(),
    })
}

/// Opens `n` keep-alive connections, makes one request on each, prints `held N`, and keeps them
/// open for `hold`.
pub async fn hold(target: SocketAddr, n: usize, hold: Duration) -> anyhow::Result<()> {
    let mut senders = Vec::with_capacity(n);
    for chunk in 0..n.div_ceil(50) {
        let mut batch = Vec::new();
        for _ in 0..50.min(n - chunk * 50) {
            batch.push(tokio::spawn(async move {
                let mut s = connect(target).await?;
                request(&mut s, target, false).await?;
                anyhow::Ok(s)
            }));
        }
        for b in batch {
            senders.push(b.await??);
        }
    }
    println!("held {}", senders.len());
    tokio::time::sleep(hold).await;
    drop(senders);
    Ok(())
}
