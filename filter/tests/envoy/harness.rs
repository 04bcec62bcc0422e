//! What the Envoy tests run against: the real Envoy binary with the real module, a fake keyway
//! gateway (HTTP/2 CONNECT server that records headers and echoes bytes), a fake key service
//! (HTTP/1.1, `GET /v1/keys?ip=…`) and an echo application. Loopback only, free ports, deadlines
//! instead of sleeps, and every Envoy is killed by its drop guard.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream as StdTcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use keyway_policy::wire::{DENY_REASON_HEADER, TICKET_HEADER};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// How long any awaited condition may take.
pub(crate) const DEADLINE: Duration = Duration::from_secs(20);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The Envoy binary: `$KEYWAY_ENVOY`, else what `scripts/install-envoy.sh` installs. Fails
/// loudly (never skips) when neither gives one.
pub(crate) fn envoy_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("KEYWAY_ENVOY") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "KEYWAY_ENVOY={} is not a file", p.display());
        return p;
    }
    let out = Command::new(repo_root().join("scripts/install-envoy.sh"))
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run scripts/install-envoy.sh: {e}"));
    assert!(
        out.status.success(),
        "scripts/install-envoy.sh failed ({}): Envoy is required for these tests",
        out.status
    );
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let p = PathBuf::from(&path);
    assert!(p.is_file(), "scripts/install-envoy.sh printed {path:?}, which is not a file");
    p
}

/// The built module: `$KEYWAY_FILTER_WASM`, else the `wasm-release` build in the target
/// directory. Fails loudly when it is missing: `make wasm` builds it.
pub(crate) fn wasm_module() -> PathBuf {
    let p = match std::env::var_os("KEYWAY_FILTER_WASM") {
        Some(p) => PathBuf::from(p),
        None => {
            let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| repo_root().join("target"), PathBuf::from);
            target.join("wasm32-wasip1/wasm-release/keyway_filter.wasm")
        }
    };
    assert!(
        p.is_file(),
        "the keyway filter module {} is missing: build it with `make wasm` \
         (cargo build -p keyway-filter --target wasm32-wasip1 --profile wasm-release)",
        p.display()
    );
    p.canonicalize().unwrap_or(p)
}

/// A port that was free a moment ago on 127.0.0.1.
pub(crate) fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// Fills `${NAME}` placeholders; refuses a template with one left over.
pub(crate) fn render(template: &str, vars: &BTreeMap<&str, String>) -> String {
    let mut out = template.to_owned();
    for (k, v) in vars {
        out = out.replace(&format!("${{{k}}}"), v);
    }
    // Comments may mention the placeholder syntax; configuration lines may not keep one.
    if let Some(line) = out.lines().find(|l| l.contains("${") && !l.trim_start().starts_with('#')) {
        panic!("unfilled placeholder in envoy template: {line}");
    }
    out
}

/// A fresh directory for one Envoy's files.
pub(crate) fn scratch_dir(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("keyway-filter-test-{}-{name}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Runs `envoy --mode validate` on a configuration: (success, output).
pub(crate) fn validate(yaml: &str, name: &str) -> (bool, String) {
    let dir = scratch_dir(name);
    let config = dir.join("envoy.yaml");
    std::fs::write(&config, yaml).expect("write config");
    let out = Command::new(envoy_bin())
        .args(["--mode", "validate", "--disable-hot-restart", "--log-level", "warn", "-c"])
        .arg(&config)
        .output()
        .expect("run envoy --mode validate");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// A running Envoy; killed on drop.
pub(crate) struct Envoy {
    child: Child,
    /// Its admin port.
    pub(crate) admin: u16,
    log: PathBuf,
}

impl Envoy {
    /// Starts Envoy (one worker thread) and waits until its admin port says it is ready.
    pub(crate) fn start(yaml: &str, admin: u16, name: &str) -> Result<Envoy> {
        Envoy::start_workers(yaml, admin, name, 1)
    }

    /// Starts Envoy with `workers` worker threads (`--concurrency`) and waits until it is ready.
    pub(crate) fn start_workers(yaml: &str, admin: u16, name: &str, workers: u32) -> Result<Envoy> {
        let (child, log) = spawn_workers(yaml, name, workers)?;
        let envoy = Envoy { child, admin, log };
        envoy.wait_ready()?;
        Ok(envoy)
    }

    fn wait_ready(&self) -> Result<()> {
        let until = Instant::now() + DEADLINE;
        loop {
            if let Ok((200, body)) = http_get(self.admin, "/ready")
                && body.trim() == "LIVE"
            {
                return Ok(());
            }
            if Instant::now() > until {
                bail!("envoy did not become ready within {DEADLINE:?}; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Everything Envoy logged so far.
    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The value of one stat (exact name as in `/stats`), 0 when absent.
    pub(crate) fn stat(&self, name: &str) -> u64 {
        self.stats().get(name).copied().unwrap_or(0)
    }

    /// Every counter and gauge in `/stats`.
    pub(crate) fn stats(&self) -> BTreeMap<String, u64> {
        let (_, body) = http_get(self.admin, "/stats").unwrap_or((0, String::new()));
        body.lines()
            .filter_map(|l| l.rsplit_once(": "))
            .filter_map(|(k, v)| Some((k.to_owned(), v.trim().parse().ok()?)))
            .collect()
    }

    /// `/stats/prometheus`.
    pub(crate) fn prometheus(&self) -> String {
        http_get(self.admin, "/stats/prometheus").map(|r| r.1).unwrap_or_default()
    }

    /// Waits until `f` holds, or fails with `what` and the log.
    pub(crate) fn wait_until(&self, what: &str, mut f: impl FnMut() -> bool) -> Result<()> {
        let until = Instant::now() + DEADLINE;
        while !f() {
            if Instant::now() > until {
                bail!("timed out waiting for {what}; envoy log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts Envoy without waiting for it (for configurations it must refuse).
pub(crate) fn spawn(yaml: &str, name: &str) -> Result<(Child, PathBuf)> {
    spawn_workers(yaml, name, 1)
}

fn spawn_workers(yaml: &str, name: &str, workers: u32) -> Result<(Child, PathBuf)> {
    let dir = scratch_dir(name);
    let config = dir.join("envoy.yaml");
    let log = dir.join("envoy.log");
    std::fs::write(&config, yaml)?;
    let child = Command::new(envoy_bin())
        .args(["--disable-hot-restart", "--concurrency", &workers.to_string(), "--log-level", "info", "-c"])
        .arg(&config)
        .arg("--log-path")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn envoy")?;
    Ok((child, log))
}

/// A blocking HTTP/1.1 GET on 127.0.0.1 (the admin port): (status, body).
pub(crate) fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    let mut s = StdTcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_owned() };
    Ok((status, body))
}

/// The body of a chunked HTTP/1.1 response.
fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// One CONNECT the fake gateway received.
#[derive(Clone, Debug)]
pub(crate) struct Connect {
    /// `:authority`.
    pub(crate) authority: String,
    /// Every header.
    pub(crate) headers: HeaderMap,
}

/// A fake keyway gateway: accepts HTTP/2 CONNECTs, records them, answers 200 and echoes bytes.
pub(crate) struct FakeGateway {
    /// Its port on 127.0.0.1.
    pub(crate) port: u16,
    /// CONNECT requests seen.
    pub(crate) connects: Arc<AtomicUsize>,
    rx: mpsc::UnboundedReceiver<Connect>,
}

impl FakeGateway {
    /// Starts it on a free port.
    pub(crate) async fn start() -> Result<FakeGateway> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let connects = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::unbounded_channel();
        let count = connects.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let tx = tx.clone();
                let count = count.clone();
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(sock).await else { return };
                    while let Some(Ok((req, respond))) = conn.accept().await {
                        count.fetch_add(1, Ordering::SeqCst);
                        let authority = req.uri().authority().map(|a| a.to_string()).unwrap_or_default();
                        let _ = tx.send(Connect { authority, headers: req.headers().clone() });
                        tokio::spawn(echo_stream(req, respond));
                    }
                });
            }
        });
        Ok(FakeGateway { port, connects, rx })
    }

    /// The next CONNECT, within the deadline.
    pub(crate) async fn next_connect(&mut self) -> Result<Connect> {
        tokio::time::timeout(DEADLINE, self.rx.recv()).await?.context("gateway channel closed")
    }
}

async fn echo_stream(req: Request<h2::RecvStream>, mut respond: h2::server::SendResponse<Bytes>) {
    let Ok(mut send) = respond.send_response(Response::new(()), false) else { return };
    let mut body = req.into_body();
    while let Some(Ok(data)) = body.data().await {
        let _ = body.flow_control().release_capacity(data.len());
        if send.send_data(data, false).is_err() {
            return;
        }
    }
    let _ = send.send_data(Bytes::new(), true);
}

/// An echo application; counts its connections.
pub(crate) struct EchoApp {
    /// Its port on 127.0.0.1.
    pub(crate) port: u16,
    /// Connections accepted.
    pub(crate) accepted: Arc<AtomicUsize>,
}

impl EchoApp {
    /// Starts it on a free port.
    pub(crate) async fn start() -> Result<EchoApp> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = sock.read(&mut buf).await {
                        if n == 0 || sock.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Ok(EchoApp { port, accepted })
    }
}

/// A fake key service: answers `GET /v1/keys?ip=…` with whatever status and body it is set to.
pub(crate) struct FakeKeyService {
    /// Its port on 127.0.0.1.
    pub(crate) port: u16,
    reply: Arc<Mutex<(u16, String)>>,
    /// Request paths seen.
    pub(crate) paths: Arc<Mutex<Vec<String>>>,
}

impl FakeKeyService {
    /// Starts it on a free port answering 503 until told otherwise.
    pub(crate) async fn start() -> Result<FakeKeyService> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let reply = Arc::new(Mutex::new((503u16, String::from("not yet"))));
        let paths = Arc::new(Mutex::new(Vec::new()));
        let (r, p) = (reply.clone(), paths.clone());
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let (r, p) = (r.clone(), p.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    // One request per connection (keep-alive requests are answered in turn).
                    loop {
                        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                            match sock.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => head.extend_from_slice(&buf[..n]),
                            }
                        }
                        let end = head.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(0) + 4;
                        let text = String::from_utf8_lossy(&head[..end]).to_string();
                        head.drain(..end);
                        let path = text.split(' ').nth(1).unwrap_or("").to_owned();
                        p.lock().unwrap().push(path);
                        let (status, body) = r.lock().unwrap().clone();
                        let resp = format!(
                            "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if sock.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Ok(FakeKeyService { port, reply, paths })
    }

    /// Sets the reply.
    pub(crate) fn set(&self, status: u16, body: String) {
        *self.reply.lock().unwrap() = (status, body);
    }
}

/// Opens a plain TCP connection, sends `msg` and returns what comes back before EOF or the
/// echo completes: `Ok(echo)` or `Err` when the peer closed or reset without echoing.
pub(crate) async fn echo_through(port: u16, msg: &[u8]) -> Result<Vec<u8>> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    echo_on(&mut s, msg).await
}

/// Sends `msg` on `s` and reads until as many bytes came back.
pub(crate) async fn echo_on(s: &mut TcpStream, msg: &[u8]) -> Result<Vec<u8>> {
    s.write_all(msg).await?;
    let mut got = vec![0u8; msg.len()];
    let mut n = 0;
    while n < got.len() {
        let r = tokio::time::timeout(DEADLINE, s.read(&mut got[n..])).await??;
        if r == 0 {
            bail!("connection closed after {n} bytes");
        }
        n += r;
    }
    Ok(got)
}

/// Whether the server closes (EOF or reset) the connection without sending anything.
pub(crate) async fn closed_without_data(port: u16, from: Option<&str>) -> Result<bool> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    if let Some(ip) = from {
        socket.bind(format!("{ip}:0").parse()?)?;
    }
    let mut s = socket.connect(format!("127.0.0.1:{port}").parse()?).await?;
    let _ = s.write_all(b"hello").await;
    let mut buf = [0u8; 16];
    match tokio::time::timeout(DEADLINE, s.read(&mut buf)).await? {
        Ok(0) | Err(_) => Ok(true),
        Ok(_) => Ok(false),
    }
}

/// The answer to one CONNECT through the inbound tunnel.
#[derive(Debug)]
pub(crate) struct TunnelReply {
    /// The status.
    pub(crate) status: StatusCode,
    /// The response headers.
    pub(crate) headers: HeaderMap,
    /// What came back for `ping` when the tunnel was accepted.
    pub(crate) echo: Option<Vec<u8>>,
}

impl TunnelReply {
    /// The `x-keyway-deny-reason` header.
    pub(crate) fn reason(&self) -> Option<&str> {
        self.headers.get(DENY_REASON_HEADER).and_then(|v| v.to_str().ok())
    }
}

/// Opens an HTTP/2 CONNECT to `authority` on `port` with an optional ticket; when accepted,
/// sends `ping` through the tunnel and reads the echo.
pub(crate) async fn connect_tunnel(port: u16, authority: &str, ticket: Option<&str>) -> Result<TunnelReply> {
    Ok(connect_tunnel_held(port, authority, ticket).await?.0)
}

/// What keeps a tunnel's HTTP/2 connection open: the connection closes when it is dropped.
pub(crate) struct HeldTunnel {
    _client: h2::client::SendRequest<Bytes>,
    _send: h2::SendStream<Bytes>,
    _body: Option<h2::RecvStream>,
}

/// [`connect_tunnel`], keeping the connection open until the returned [`HeldTunnel`] is dropped.
pub(crate) async fn connect_tunnel_held(
    port: u16,
    authority: &str,
    ticket: Option<&str>,
) -> Result<(TunnelReply, HeldTunnel)> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    // No Nagle: the HTTP/2 frames go out at once (the tunnel benchmark times this function).
    tcp.set_nodelay(true)?;
    let (client, conn) = h2::client::handshake(tcp).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut client = client.ready().await?;
    let held_client = client.clone();
    let mut req = Request::builder().method(Method::CONNECT).uri(authority);
    if let Some(t) = ticket {
        req = req.header(TICKET_HEADER, t);
    }
    let (resp, mut send) = client.send_request(req.body(())?, false)?;
    let resp = tokio::time::timeout(DEADLINE, resp).await??;
    let status = resp.status();
    let headers = resp.headers().clone();
    let mut echo = None;
    let mut held_body = None;
    if status == StatusCode::OK {
        send.send_data(Bytes::from_static(b"ping"), false)?;
        let mut body = resp.into_body();
        let mut got = Vec::new();
        while got.len() < 4 {
            match tokio::time::timeout(DEADLINE, body.data()).await? {
                Some(Ok(d)) => {
                    let _ = body.flow_control().release_capacity(d.len());
                    got.extend_from_slice(&d);
                }
                _ => break,
            }
        }
        echo = Some(got);
        held_body = Some(body);
    }
    Ok((TunnelReply { status, headers, echo }, HeldTunnel { _client: held_client, _send: send, _body: held_body }))
}
