//! A test overlay on loopback: a CA, epoch secrets, an inventory, several zones of in-process
//! gateways, fake destination sidecars (HTTP/2 CONNECT servers that verify tickets and echo) and a
//! client that speaks to a gateway as a sidecar's tcp_proxy does.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use keyway_gateway::app::Handle;
use keyway_gateway::config::Config;
use keyway_gateway::secrets::EpochSecrets;
use keyway_policy::Protocol;
use keyway_policy::auth::{TokenClaims, decode_ticket};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const TD: &str = "cluster.local";

/// A unique scratch directory, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("keyway-gw-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn now_ms() -> u64 {
    keyway_gateway::clock::Clock::now_ms(&keyway_gateway::clock::SystemClock)
}

/// A free UDP port on 127.0.0.1.
pub fn free_udp() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A free TCP port on 127.0.0.1.
pub fn free_tcp() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Waits for `cond` with a deadline.
pub async fn wait_for(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + deadline;
    while !cond() {
        if tokio::time::Instant::now() > end {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A fake destination sidecar: verifies tickets like the keyway filter and echoes bytes.
pub struct Sidecar {
    pub addr: SocketAddr,
    pub overlay_ip: IpAddr,
    /// Identities of accepted tickets.
    pub accepted: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Sidecar {
    pub async fn start(ip: IpAddr, port: u16, overlay_ip: IpAddr, zone: String, secrets: PathBuf) -> Sidecar {
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(ip, port)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let acc = accepted.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let (zone, secrets, acc) = (zone.clone(), secrets.clone(), acc.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
                        let (zone, secrets, acc) = (zone.clone(), secrets.clone(), acc.clone());
                        async move {
                            let refuse = |reason: &'static str| {
                                let mut r = Response::new(Empty::<Bytes>::new());
                                *r.status_mut() = StatusCode::FORBIDDEN;
                                r.headers_mut().insert("x-keyway-deny-reason", reason.parse().unwrap());
                                Ok::<_, std::convert::Infallible>(r)
                            };
                            let Some(t) = req.headers().get("x-keyway-ticket").and_then(|v| v.to_str().ok()) else {
                                return refuse("ticket-missing");
                            };
                            let Ok(sealed) = decode_ticket(t) else { return refuse("ticket-malformed") };
                            let s = EpochSecrets::load(&secrets).unwrap();
                            let Some(e) = s.get(sealed.claims().epoch, now_ms()) else { return refuse("ticket-epoch") };
                            let key = e.secret.ticket_key(&zone, e.epoch).unwrap();
                            let port = req.uri().port_u16().unwrap_or(0);
                            match sealed.verify(&key, now_ms(), 30_000, overlay_ip, port) {
                                Ok(c) => acc.lock().unwrap().push(c.src_identity),
                                Err(e) => return refuse(e.reason()),
                            }
                            let up = hyper::upgrade::on(&mut req);
                            tokio::spawn(async move {
                                if let Ok(io) = up.await {
                                    let mut io = TokioIo::new(io);
                                    let mut buf = vec![0u8; 64 * 1024];
                                    loop {
                                        match io.read(&mut buf).await {
                                            Ok(0) | Err(_) => break,
                                            Ok(n) => {
                                                if io.write_all(&buf[..n]).await.is_err() {
                                                    return;
                                                }
                                            }
                                        }
                                    }
                                    let _ = io.shutdown().await;
                                }
                            });
                            Ok(Response::new(Empty::<Bytes>::new()))
                        }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Sidecar { addr, overlay_ip, accepted, task }
    }
}

/// A test workload.
#[derive(Clone, Debug)]
pub struct W {
    pub ns: &'static str,
    pub name: &'static str,
    pub app: &'static str,
    pub zone: &'static str,
    pub overlay: IpAddr,
    pub sidecar: IpAddr,
}

impl W {
    pub fn identity(&self) -> String {
        format!("spiffe://{TD}/ns/{}/sa/{}", self.ns, self.name)
    }
}

pub fn w(
    ns: &'static str,
    name: &'static str,
    app: &'static str,
    zone: &'static str,
    overlay: &str,
    sidecar: &str,
) -> W {
    W { ns, name, app, zone, overlay: overlay.parse().unwrap(), sidecar: sidecar.parse().unwrap() }
}

pub fn workload_yaml(w: &W) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  template:\n    metadata:\n      labels: {{app: {app}}}\n      annotations: {{keyway.io/zone: {zone}, keyway.io/overlay-ips: \"{ov}\", keyway.io/sidecar-ips: \"{sc}\"}}\n    spec:\n      serviceAccountName: {name}\n      containers: [{{name: c, ports: [{{name: http, containerPort: 8080}}]}}]\n",
        name = w.name,
        ns = w.ns,
        app = w.app,
        zone = w.zone,
        ov = w.overlay,
        sc = w.sidecar
    )
}

/// The whole test overlay.
pub struct Overlay {
    pub scratch: Scratch,
    pub secrets: PathBuf,
    pub inventory: PathBuf,
    pub sidecar_port: u16,
    pub configs: BTreeMap<(String, String), Config>,
    pub gateways: BTreeMap<(String, String), Handle>,
    pub sidecars: Vec<Sidecar>,
    pub workloads: Vec<W>,
}

impl Overlay {
    /// Zones as (zone, [gateway names], failover order); workloads; extra manifests.
    pub async fn start(name: &str, zones: &[(&str, &[&str], &[&str])], workloads: Vec<W>, policies: &str) -> Overlay {
        let scratch = Scratch::new(name);
        let root = scratch.0.clone();
        let ca = root.join("ca");
        keyway_gateway::ca::init_ca(&ca, TD).unwrap();
        let secrets = root.join("epochs.json");
        EpochSecrets::generate(now_ms()).unwrap().save(&secrets).unwrap();
        let inventory = root.join("manifests");
        std::fs::create_dir_all(&inventory).unwrap();
        let mut yaml = String::new();
        for w in &workloads {
            yaml.push_str(&workload_yaml(w));
            yaml.push_str("---\n");
        }
        std::fs::write(inventory.join("workloads.yaml"), yaml).unwrap();
        std::fs::write(inventory.join("policies.yaml"), policies).unwrap();

        let sidecar_port = free_tcp();
        let mut overlay_ports = BTreeMap::new();
        for (zone, names, _) in zones {
            for n in *names {
                overlay_ports.insert((zone.to_string(), n.to_string()), free_udp());
            }
        }
        let zones_yaml: String = zones
            .iter()
            .map(|(zone, names, failover)| {
                let gws: Vec<String> = names
                    .iter()
                    .map(|n| {
                        format!(
                            "{{name: {n}, address: \"127.0.0.1:{}\"}}",
                            overlay_ports[&(zone.to_string(), n.to_string())]
                        )
                    })
                    .collect();
                format!("- name: {zone}\n  gateways: [{}]\n  failover: [{}]\n", gws.join(", "), failover.join(", "))
            })
            .collect();
        let mut configs = BTreeMap::new();
        let mut gateways = BTreeMap::new();
        for (zone, names, _) in zones {
            for n in *names {
                let certs = root.join("certs");
                let issued = keyway_gateway::ca::issue_gateway(&ca, TD, zone, n, &certs).unwrap();
                let text = format!(
                    "zone: {zone}\nname: {n}\nlisten: {{tunnel: \"127.0.0.1:0\", overlay: \"127.0.0.1:{port}\", admin: \"127.0.0.1:0\"}}\ntls: {{ca: {ca}, cert: {cert}, key: {key}}}\nsecrets: {secrets}\ninventory: {inv}\ndelivery: {{sidecar_port: {sidecar_port}}}\nkeepalive_ms: 200\npeer_idle_timeout_ms: 3000\nreload_interval_ms: 100\nlimits: {{connect_timeout_ms: 3000}}\nzones:\n{zones_yaml}",
                    port = overlay_ports[&(zone.to_string(), n.to_string())],
                    ca = ca.join("ca.pem").display(),
                    cert = issued.cert.display(),
                    key = issued.key.display(),
                    secrets = secrets.display(),
                    inv = inventory.display(),
                );
                let config = Config::parse(&text, "test.yaml").unwrap();
                configs.insert((zone.to_string(), n.to_string()), config.clone());
                let h = keyway_gateway::app::build(config).await.unwrap();
                gateways.insert((zone.to_string(), n.to_string()), h);
            }
        }
        let mut sidecars = Vec::new();
        for w in &workloads {
            sidecars
                .push(Sidecar::start(w.sidecar, sidecar_port, w.overlay, w.zone.to_string(), secrets.clone()).await);
        }
        let o = Overlay { scratch, secrets, inventory, sidecar_port, configs, gateways, sidecars, workloads };
        o.wait_mesh().await;
        o
    }

    /// Waits until every gateway is connected to every gateway of the other zones.
    pub async fn wait_mesh(&self) {
        let zones: std::collections::BTreeSet<String> = self.gateways.keys().map(|k| k.0.clone()).collect();
        for ((zone, _), h) in &self.gateways {
            let h = &h.proxy;
            wait_for("overlay mesh", Duration::from_secs(60), || {
                zones.iter().filter(|z| *z != zone).all(|z| {
                    let expected = self.gateways.keys().filter(|k| &k.0 == z).count();
                    h.routing.view().iter().filter(|p| &p.zone == z && p.up).count() == expected
                })
            })
            .await;
        }
    }

    pub fn gw(&self, zone: &str, name: &str) -> &Handle {
        &self.gateways[&(zone.to_string(), name.to_string())]
    }

    pub fn workload(&self, name: &str) -> &W {
        self.workloads.iter().find(|w| w.name == name).unwrap()
    }

    /// A token for `src` to `dst`:`port`, sealed with the current epoch (or `epoch`).
    pub fn token(&self, src: &W, dst: IpAddr, port: u16, epoch: Option<u32>, issued_at_ms: u64) -> String {
        let s = EpochSecrets::load(&self.secrets).unwrap();
        let e = match epoch {
            Some(ep) => s.valid_at(now_ms()).into_iter().find(|x| x.epoch == ep).expect("epoch"),
            None => s.current(now_ms()).unwrap(),
        };
        let key = e.secret.workload_key(&src.identity(), src.overlay, e.epoch).unwrap();
        let mut nonce = [0u8; 12];
        getrandom_fill(&mut nonce);
        TokenClaims {
            epoch: e.epoch,
            src: src.overlay,
            dst,
            dst_port: port,
            protocol: Protocol::Tcp,
            issued_at_ms,
            nonce,
        }
        .seal(&key)
    }
}

pub fn getrandom_fill(b: &mut [u8]) {
    getrandom::fill(b).unwrap();
}

/// The result of a CONNECT through a gateway.
pub enum Connect {
    Open(TokioIo<hyper::upgrade::Upgraded>),
    Refused { status: u16, reason: String, rule: String },
}

impl Connect {
    pub fn refused(self) -> (u16, String, String) {
        match self {
            Connect::Refused { status, reason, rule } => (status, reason, rule),
            Connect::Open(_) => panic!("expected a refusal, the tunnel opened"),
        }
    }

    pub fn open(self) -> TokioIo<hyper::upgrade::Upgraded> {
        match self {
            Connect::Open(io) => io,
            Connect::Refused { status, reason, rule } => {
                panic!("expected an open tunnel, got {status} {reason} {rule}")
            }
        }
    }
}

/// Opens an HTTP/2 CONNECT to a gateway's tunnel from `from` (a sidecar address), as Envoy's
/// tcp_proxy tunnelling does, with an optional token.
pub async fn connect(gateway: SocketAddr, from: IpAddr, dst: SocketAddr, token: Option<&str>) -> Connect {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(from, 0)).unwrap();
    let tcp = sock.connect(gateway).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await.unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder().method(Method::CONNECT).uri(dst.to_string());
    if let Some(t) = token {
        req = req.header("x-keyway-token", t);
    }
    let resp = sender.send_request(req.body(Empty::<Bytes>::new()).unwrap()).await.unwrap();
    if resp.status() != StatusCode::OK {
        let h = |n: &str| resp.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        return Connect::Refused {
            status: resp.status().as_u16(),
            reason: h("x-keyway-deny-reason"),
            rule: h("x-keyway-rule"),
        };
    }
    Connect::Open(TokioIo::new(hyper::upgrade::on(resp).await.unwrap()))
}

/// Sends `data`, half-closes, reads everything back; returns what came back.
pub async fn echo(mut io: TokioIo<hyper::upgrade::Upgraded>, data: &[u8]) -> Vec<u8> {
    let (mut r, mut w) = tokio::io::split(&mut io);
    let send = async {
        w.write_all(data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let recv = async {
        let mut out = Vec::new();
        r.read_to_end(&mut out).await.unwrap();
        out
    };
    let ((), out) = tokio::join!(send, recv);
    out
}

/// Reads a metric's value from a gateway's /metrics (sum over the label sets that contain every
/// comma-separated `key="value"` of `labels`, in any order).
pub async fn metric(admin: SocketAddr, name: &str, labels: &str) -> f64 {
    let body = http_get(admin, "/metrics").await.1;
    let want: Vec<&str> = labels.split(',').filter(|s| !s.is_empty()).collect();
    body.lines()
        .filter(|l| l.starts_with(name) && want.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A plain HTTP/1.1 GET.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_get_from(addr, IpAddr::from([127, 0, 0, 1]), path).await
}

/// A plain HTTP/1.1 GET from a given source address.
pub async fn http_get_from(addr: SocketAddr, from: IpAddr, path: &str) -> (u16, String) {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::new(from, 0)).unwrap();
    let mut tcp = sock.connect(addr).await.unwrap();
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tcp.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|x| x.1.to_owned()).unwrap_or_default();
    (status, body)
}

pub fn path(p: &Path) -> String {
    p.display().to_string()
}
