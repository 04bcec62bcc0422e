//! The sample application of every test workload, the probe that tries connections, and the
//! impairment relay: small tokio programs run inside the network namespaces.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// The first line the app writes on every connection: who answered, on which port.
pub fn banner(workload: &str, port: u16) -> String {
    format!("keyway-app {workload} port {port}\n")
}

/// What the app answers to a UDP datagram on `port`: who answered, then the datagram.
pub fn udp_banner(workload: &str, port: u16) -> String {
    format!("keyway-app {workload} udp port {port}: ")
}

/// Serves every port: writes the banner, then echoes every byte until the client half-closes,
/// then half-closes too. A line `GET ` is answered as HTTP/1.1 with the banner as the body. Each
/// port also answers UDP: every datagram comes back after [`udp_banner`].
pub async fn serve(workload: String, ports: Vec<u16>) -> anyhow::Result<()> {
    let mut tasks = Vec::new();
    for port in ports {
        let udp = UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], port))).await?;
        let prefix = udp_banner(&workload, port);
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            loop {
                let Ok((n, from)) = udp.recv_from(&mut buf).await else { continue };
                let mut reply = prefix.clone().into_bytes();
                reply.extend_from_slice(buf.get(..n).unwrap_or_default());
                let _ = udp.send_to(&reply, from).await;
            }
        }));
        let l = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))).await?;
        let workload = workload.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else { continue };
                let b = banner(&workload, port);
                tokio::spawn(async move {
                    let _ = s.set_nodelay(true);
                    if s.write_all(b.as_bytes()).await.is_err() {
                        return;
                    }
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        }));
    }
    // Serve until killed.
    let _tasks = tasks;
    std::future::pending::<()>().await;
    Ok(())
}

/// The outcome of one probe.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ProbeResult {
    /// `ip:port` tried.
    pub target: String,
    /// Whether the app answered with its banner.
    pub connected: bool,
    /// The banner (who answered), when connected.
    pub banner: String,
    /// Bytes sent and echoed back identical.
    pub echoed: u64,
    /// Whether the echo matched byte for byte (FNV-1a checksums compared).
    pub intact: bool,
    /// What happened when not connected, or the transfer error.
    pub error: String,
    /// Milliseconds from connect to banner.
    pub ms: f64,
}

fn fnv(data: &[u8], mut h: u64) -> u64 {
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Connects to `target`, waits for the banner, then sends `bytes` of payload and checks the echo.
pub async fn probe(target: SocketAddr, bytes: u64, timeout: Duration) -> ProbeResult {
    probe_held(target, bytes, timeout, Duration::ZERO).await
}

/// As [`probe`], then keeps the connection open for `hold`, sending a numbered line every 200 ms
/// and checking that it comes back.
pub async fn probe_held(target: SocketAddr, bytes: u64, timeout: Duration, hold: Duration) -> ProbeResult {
    let start = std::time::Instant::now();
    let mut res = ProbeResult {
        target: target.to_string(),
        connected: false,
        banner: String::new(),
        echoed: 0,
        intact: false,
        error: String::new(),
        ms: 0.0,
    };
    let s = match tokio::time::timeout(timeout, TcpStream::connect(target)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            res.error = format!("connect: {e}");
            return res;
        }
        Err(_) => {
            res.error = "connect: timeout".into();
            return res;
        }
    };
    let _ = s.set_nodelay(true);
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    let mut line = String::new();
    match tokio::time::timeout(timeout, r.read_line(&mut line)).await {
        Ok(Ok(0)) => {
            res.error = "closed before the banner".into();
            return res;
        }
        Ok(Ok(_)) if line.starts_with("keyway-app ") => {}
        Ok(Ok(_)) => {
            res.error = format!("unexpected first line {line:?}");
            return res;
        }
        Ok(Err(e)) => {
            res.error = format!("read: {e}");
            return res;
        }
        Err(_) => {
            res.error = "no banner within the timeout".into();
            return res;
        }
    }
    res.ms = start.elapsed().as_secs_f64() * 1000.0;
    res.connected = true;
    res.banner = line.trim_end().to_owned();
    if !hold.is_zero() {
        let end = std::time::Instant::now() + hold;
        let mut i = 0u64;
        while std::time::Instant::now() < end {
            let msg = format!("held {i}\n");
            let mut back = String::new();
            let ok = w.write_all(msg.as_bytes()).await.is_ok()
                && matches!(tokio::time::timeout(timeout, r.read_line(&mut back)).await, Ok(Ok(n)) if n > 0)
                && back == msg;
            if !ok {
                res.error = format!("held connection broke at line {i}: got {back:?}");
                return res;
            }
            res.echoed += msg.len() as u64;
            i += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        res.intact = true;
    }
    if bytes == 0 {
        return res;
    }
    let mut seed = [0u8; 8];
    let _ = getrandom::fill(&mut seed);
    let seed = u64::from_le_bytes(seed);
    let sent_sum = Arc::new(AtomicU64::new(0xcbf2_9ce4_8422_2325));
    let sum = sent_sum.clone();
    let writer = tokio::spawn(async move {
        let mut left = bytes;
        let mut i = 0u64;
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        while left > 0 {
            let n = left.min(64 * 1024) as usize;
            let chunk: Vec<u8> = (0..n).map(|k| ((seed >> ((k % 8) * 8)) as u8) ^ ((i + k as u64) as u8)).collect();
            h = fnv(&chunk, h);
            if w.write_all(&chunk).await.is_err() {
                return false;
            }
            i += n as u64;
            left -= n as u64;
        }
        sum.store(h, Ordering::Relaxed);
        w.shutdown().await.is_ok()
    });
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut got = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(timeout * 4, r.read(&mut buf)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => {
                h = fnv(buf.get(..n).unwrap_or_default(), h);
                got += n as u64;
            }
            Ok(Err(e)) => {
                res.error = format!("transfer: {e}");
                break;
            }
            Err(_) => {
                res.error = format!("transfer: stalled after {got} of {bytes} bytes");
                break;
            }
        }
    }
    let wrote = writer.await.unwrap_or(false);
    res.echoed = got;
    res.intact = wrote && got == bytes && h == sent_sum.load(Ordering::Relaxed);
    if !res.intact && res.error.is_empty() {
        res.error =
            format!("echo differs: {got} of {bytes} bytes, checksum match {}", h == sent_sum.load(Ordering::Relaxed));
    }
    res
}

/// Impairment settings, read from the control file: `delay_ms loss_percent`.
#[derive(Debug, Clone, Copy, Default)]
struct Impairment {
    delay_ms: u64,
    loss: f64,
}

/// Where the relay says which control text it applies (see [`applied`]).
pub fn applied(control: &Path) -> PathBuf {
    control.with_extension("applied")
}

/// Reads the control file: the impairment and the text it came from.
fn read_control(path: &Path) -> (Impairment, String) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut it = text.split_whitespace();
    let delay_ms = it.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    let loss = it.next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0).clamp(0.0, 100.0) / 100.0;
    (Impairment { delay_ms, loss }, text)
}

fn coin() -> f64 {
    let mut b = [0u8; 8];
    let _ = getrandom::fill(&mut b);
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// A UDP relay that delays and drops datagrams (this kernel has no netem): for each
/// `listen=target` pair it forwards client datagrams to the target from a socket of its own per
/// client, and the answers back, through the impairment of the control file (re-read every
/// 100 ms).
pub async fn relay(pairs: Vec<(SocketAddr, SocketAddr)>, control: PathBuf) -> anyhow::Result<()> {
    let imp = Arc::new(std::sync::RwLock::new(read_control(&control).0));
    let imp2 = imp.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let (now, text) = read_control(&control);
            if let Ok(mut g) = imp2.write() {
                *g = now;
            }
            // Only once it is in force: `Cluster::impair` waits for this.
            let _ = std::fs::write(applied(&control), text);
        }
    });
    let mut tasks = Vec::new();
    for (listen, target) in pairs {
        let front = Arc::new(UdpSocket::bind(listen).await?);
        let imp = imp.clone();
        tasks.push(tokio::spawn(async move {
            let mut backs: std::collections::HashMap<SocketAddr, Arc<UdpSocket>> = std::collections::HashMap::new();
            let mut buf = vec![0u8; 65536];
            loop {
                let Ok((n, client)) = front.recv_from(&mut buf).await else { continue };
                let data = buf.get(..n).unwrap_or_default().to_vec();
                let back = match backs.get(&client) {
                    Some(b) => b.clone(),
                    None => {
                        let Ok(b) = UdpSocket::bind(SocketAddr::new(listen.ip(), 0)).await else { continue };
                        let b = Arc::new(b);
                        backs.insert(client, b.clone());
                        let (front, b2, imp) = (front.clone(), b.clone(), imp.clone());
                        tokio::spawn(async move {
                            let mut buf = vec![0u8; 65536];
                            loop {
                                let Ok((n, _)) = b2.recv_from(&mut buf).await else { continue };
                                let data = buf.get(..n).unwrap_or_default().to_vec();
                                forward(&imp, front.clone(), data, client);
                            }
                        });
                        b
                    }
                };
                forward(&imp, back, data, target);
            }
        }));
    }
    // Serve until killed.
    let _tasks = tasks;
    std::future::pending::<()>().await;
    Ok(())
}

fn forward(imp: &std::sync::RwLock<Impairment>, sock: Arc<UdpSocket>, data: Vec<u8>, to: SocketAddr) {
    let i = imp.read().map(|g| *g).unwrap_or_default();
    if i.loss > 0.0 && coin() < i.loss {
        return;
    }
    if i.delay_ms == 0 {
        let _ = sock.try_send_to(&data, to);
        return;
    }
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(i.delay_ms)).await;
        let _ = sock.send_to(&data, to).await;
    });
}

/// Sends one HTTP/2 CONNECT to `to`, spoken as `how`, with `authority` and `headers`
/// (`name=value`); returns `status <code> reason <x-keyway-deny-reason>` and, on 200,
/// ` banner <first line>`; a connection or handshake that fails is `refused <why>`.
pub async fn connect(
    to: SocketAddr,
    how: crate::mesh::Speak<'_>,
    authority: &str,
    headers: &[String],
) -> anyhow::Result<String> {
    use bytes::Bytes;
    use http_body_util::Empty;
    use hyper_util::rt::TokioIo;
    let mut sender = match crate::mesh::h2(to, None, how).await {
        Ok((sender, _)) => sender,
        Err(e) => return Ok(format!("refused {e:#}")),
    };
    let mut req = http::Request::builder().method(http::Method::CONNECT).uri(authority);
    for h in headers {
        let (k, v) = h.split_once('=').ok_or_else(|| anyhow::anyhow!("{h}: expected name=value"))?;
        req = req.header(k, v);
    }
    let resp = match tokio::time::timeout(Duration::from_secs(5), sender.send_request(req.body(Empty::<Bytes>::new())?))
        .await
    {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => return Ok(format!("refused {e:#}")),
        Err(_) => return Ok("refused no answer within 5 s".to_owned()),
    };
    let status = resp.status().as_u16();
    let reason = resp
        .headers()
        .get(keyway_policy::wire::DENY_REASON_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    let mut out = format!("status {status} reason {reason}");
    if status == 200 {
        let io = hyper::upgrade::on(resp).await?;
        let mut r = BufReader::new(TokioIo::new(io));
        let mut line = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(3), r.read_line(&mut line)).await;
        out.push_str(&format!(" banner {}", line.trim_end()));
    }
    Ok(out)
}
