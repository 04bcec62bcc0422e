//! The in-process bed: gateways of several zones running in this process on loopback (real
//! QUIC and TLS, a test CA, real epoch secrets), fake destination sidecars that decide with the
//! filter's own verdict code and echo ([`Sidecar`]), and a client that speaks to a gateway as a
//! sidecar's `tcp_proxy` does. Every sidecar leg is mutual TLS with mesh certificates a mesh CA
//! of the bed issues (as istiod would): each workload its own, each gateway replica its own of
//! the gateways' service account. The gateway's integration tests run on it.
//!
//! Its helpers panic on failure, with a message: they are test steps.

pub mod sidecar;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use keyway_gateway::app::Handle;
use keyway_gateway::clock::ShiftedClock;
use keyway_gateway::config::{Config, DEFAULT_TRUST_DOMAIN, Listen};
use keyway_gateway::secrets::EpochSecrets;
use keyway_policy::wire;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub use crate::credentials::now_ms;
use crate::gateway::{self as gwconfig, Files, ZoneLayout};
use crate::mesh::{GATEWAY_NAMESPACE, GATEWAY_SERVICE_ACCOUNT, Speak};
pub use crate::wait::wait_until_async;
use keyway_gateway::mesh::MeshTls;
pub use sidecar::Sidecar;

/// The trust domain of the bed.
pub const TD: &str = DEFAULT_TRUST_DOMAIN;

/// How long the gateways of a new bed may take to connect to each other.
const MESH_DEADLINE: Duration = Duration::from_secs(60);

/// A unique scratch directory, removed on drop.
#[derive(Debug)]
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// `keyway-gw-<name>-<pid>` in the temporary directory, empty.
    pub fn new(name: &str) -> anyhow::Result<Scratch> {
        let dir = std::env::temp_dir().join(format!("keyway-gw-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A free UDP port on 127.0.0.1.
pub fn free_udp() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A free TCP port on 127.0.0.1.
pub fn free_tcp() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A test workload.
#[derive(Clone, Debug)]
pub struct W {
    /// Namespace.
    pub ns: &'static str,
    /// Name, and its service account.
    pub name: &'static str,
    /// `app` label.
    pub app: &'static str,
    /// Zone.
    pub zone: &'static str,
    /// Overlay address.
    pub overlay: IpAddr,
    /// Its sidecar's address (on loopback).
    pub sidecar: IpAddr,
}

impl W {
    /// Its SPIFFE identity.
    pub fn identity(&self) -> String {
        format!("spiffe://{TD}/ns/{}/sa/{}", self.ns, self.name)
    }

    /// Its Deployment, with the keyway annotations.
    pub fn manifest(&self) -> String {
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  template:\n    metadata:\n      labels: {{app: {app}}}\n      annotations: {{keyway.io/zone: {zone}, keyway.io/overlay-ips: \"{ov}\", keyway.io/sidecar-ips: \"{sc}\"}}\n    spec:\n      serviceAccountName: {name}\n      containers: [{{name: c, ports: [{{name: http, containerPort: 8080}}]}}]\n",
            name = self.name,
            ns = self.ns,
            app = self.app,
            zone = self.zone,
            ov = self.overlay,
            sc = self.sidecar
        )
    }
}

/// A workload (panics on a malformed address).
pub fn w(
    ns: &'static str,
    name: &'static str,
    app: &'static str,
    zone: &'static str,
    overlay: &str,
    sidecar: &str,
) -> W {
    let ip = |s: &str| s.parse().unwrap_or_else(|e| panic!("address {s}: {e}"));
    W { ns, name, app, zone, overlay: ip(overlay), sidecar: ip(sidecar) }
}

/// The whole in-process overlay.
pub struct Overlay {
    /// Its directory (CA, certificates, secrets, manifests).
    pub scratch: Scratch,
    /// Its gateways' files (each zone's epoch secrets: [`Overlay::secrets`]).
    pub files: Files,
    /// The manifest directory the gateways watch.
    pub inventory: PathBuf,
    /// The port every fake sidecar listens on.
    pub sidecar_port: u16,
    /// Each gateway's configuration, by (zone, name).
    pub configs: BTreeMap<(String, String), Config>,
    /// The running gateways, by (zone, name).
    pub gateways: BTreeMap<(String, String), Handle>,
    /// The fake sidecars.
    pub sidecars: Vec<Sidecar>,
    /// The workloads.
    pub workloads: Vec<W>,
    /// The gateways' clock: the system's, moved forward when a test says so.
    pub clock: Arc<ShiftedClock>,
    /// Each workload's mesh certificate (its sidecar's), by workload name.
    pub mesh: BTreeMap<String, Arc<MeshTls>>,
}

impl std::fmt::Debug for Overlay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Overlay").field("dir", &self.scratch.0).field("gateways", &self.gateways.keys()).finish()
    }
}

/// The configuration of an in-process gateway: loopback, short timers so failures show fast.
fn gateway_config(
    zone: &str,
    name: &str,
    overlay_port: u16,
    files: &Files,
    zones: &[keyway_gateway::config::Zone],
) -> anyhow::Result<Config> {
    let loopback = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let listen = Listen { tunnel: loopback(0), overlay: loopback(overlay_port), admin: loopback(0), edge: loopback(0) };
    let mut c = gwconfig::config(zone, name, listen, files, zones)?;
    c.keepalive_ms = 200;
    c.peer_idle_timeout_ms = 3000;
    c.reload_interval_ms = 100;
    c.limits.connect_timeout_ms = 3000;
    // Everything of this bed is on loopback, its "outside" destinations too.
    c.delivery.external_loopback = true;
    Ok(c)
}

impl Overlay {
    /// Starts the gateways of `zones`, a fake sidecar per workload, with the manifests of the
    /// workloads and `policies`; returns once every gateway is connected to every other zone's.
    pub async fn start(name: &str, zones: &[ZoneLayout<'_>], workloads: Vec<W>, policies: &str) -> Overlay {
        Overlay::start_with(name, zones, workloads, policies, |_| {}).await
    }

    /// As [`Overlay::start`], with `tweak` applied to every gateway's configuration.
    pub async fn start_with(
        name: &str,
        zones: &[ZoneLayout<'_>],
        workloads: Vec<W>,
        policies: &str,
        tweak: impl Fn(&mut Config),
    ) -> Overlay {
        Overlay::try_start(name, zones, workloads, policies, &tweak)
            .await
            .unwrap_or_else(|e| panic!("in-process overlay {name}: {e:#}"))
    }

    async fn try_start(
        name: &str,
        zones: &[ZoneLayout<'_>],
        workloads: Vec<W>,
        policies: &str,
        tweak: &dyn Fn(&mut Config),
    ) -> anyhow::Result<Overlay> {
        let scratch = Scratch::new(name)?;
        let files = Files::in_dir(&scratch.0);
        keyway_gateway::ca::init_ca(&files.ca, TD)?;
        keyway_gateway::ca::init_ca(&files.mesh_ca, TD)?;
        let mut workload_mesh = BTreeMap::new();
        for w in &workloads {
            let m = crate::mesh::issue(&files.mesh_ca, w.ns, w.name, &files.mesh_certs)?;
            workload_mesh.insert(w.name.to_owned(), Arc::new(MeshTls::load(&m)?));
        }
        // Each zone its own epoch secrets, as `keyway keys init` per zone makes them.
        std::fs::create_dir_all(&files.secrets_dir)?;
        for z in zones {
            EpochSecrets::generate(now_ms())?.save(&files.secrets(z.name))?;
        }
        std::fs::create_dir_all(&files.inventory)?;
        let manifests: Vec<String> = workloads.iter().map(W::manifest).collect();
        std::fs::write(files.inventory.join("workloads.yaml"), manifests.join("---\n"))?;
        std::fs::write(files.inventory.join("policies.yaml"), policies)?;

        let sidecar_port = free_tcp()?;
        let mut overlay_ports = BTreeMap::new();
        for z in zones {
            for n in z.gateways {
                overlay_ports.insert((z.name.to_owned(), (*n).to_owned()), free_udp()?);
            }
        }
        let port_of = |zone: &str, name: &str| overlay_ports.get(&(zone.to_owned(), name.to_owned())).copied();
        let mesh = gwconfig::zones(zones, |z, n| SocketAddr::from(([127, 0, 0, 1], port_of(z, n).unwrap_or(0))));
        let mut configs = BTreeMap::new();
        let mut gateways = BTreeMap::new();
        let clock = ShiftedClock::new();
        for z in zones {
            for n in z.gateways {
                keyway_gateway::ca::issue_gateway(&files.ca, TD, z.name, n, &files.certs)?;
                crate::mesh::issue(
                    &files.mesh_ca,
                    GATEWAY_NAMESPACE,
                    GATEWAY_SERVICE_ACCOUNT,
                    &files.mesh_dir(z.name, n),
                )?;
                let port = port_of(z.name, n).context("overlay port")?;
                let mut config = gateway_config(z.name, n, port, &files, &mesh)?;
                config.delivery.sidecar_port = sidecar_port;
                tweak(&mut config);
                // What the gateway gets is what it would read from the file.
                gwconfig::to_yaml(&config)?;
                let key = (z.name.to_owned(), (*n).to_owned());
                configs.insert(key.clone(), config.clone());
                let source = keyway_gateway::source::FileSource::new(&config);
                gateways.insert(key, keyway_gateway::app::build_from(config, source, clock.clone()).await?);
            }
        }
        let mut sidecars = Vec::new();
        for w in &workloads {
            let m = workload_mesh.get(w.name).context("mesh certificate")?.clone();
            sidecars.push(Sidecar::start(w, sidecar_port, files.secrets(w.zone), m).await?);
        }
        let o = Overlay {
            scratch,
            inventory: files.inventory.clone(),
            files,
            sidecar_port,
            configs,
            gateways,
            sidecars,
            workloads,
            clock,
            mesh: workload_mesh,
        };
        o.wait_mesh().await?;
        Ok(o)
    }

    /// Waits until every gateway is connected to every peer its configuration names in the other
    /// zones (each listed gateway, and a zone's `entry`).
    async fn wait_mesh(&self) -> anyhow::Result<()> {
        let zones: BTreeSet<&str> = self.gateways.keys().map(|k| k.0.as_str()).collect();
        for (key, h) in &self.gateways {
            let zone = &key.0;
            let config = self.configs.get(key).context("configuration")?;
            wait_until_async(MESH_DEADLINE, "the overlay mesh", || async {
                for z in zones.iter().filter(|z| **z != zone) {
                    let expected = config.zone(z).map_or(0, |c| c.gateways.len() + usize::from(c.entry.is_some()));
                    if peers_up(h.admin_addr, z).await != expected {
                        return false;
                    }
                }
                true
            })
            .await?;
        }
        Ok(())
    }

    /// The gateway `zone`/`name`.
    pub fn gw(&self, zone: &str, name: &str) -> &Handle {
        self.gateways.get(&(zone.to_owned(), name.to_owned())).unwrap_or_else(|| panic!("no gateway {zone}/{name}"))
    }

    /// The workload called `name`.
    pub fn workload(&self, name: &str) -> &W {
        self.workloads.iter().find(|w| w.name == name).unwrap_or_else(|| panic!("no workload {name}"))
    }

    /// The fake sidecar of `workload`.
    pub fn sidecar(&self, workload: &str) -> &Sidecar {
        let ip = self.workload(workload).overlay;
        self.sidecars.iter().find(|s| s.overlay_ip == ip).unwrap_or_else(|| panic!("no sidecar of {workload}"))
    }

    /// The mesh certificate of the workload called `name` (its sidecar's).
    pub fn mesh_of(&self, name: &str) -> &MeshTls {
        self.mesh.get(name).unwrap_or_else(|| panic!("no mesh certificate of {name}"))
    }

    /// Opens an HTTP/2 CONNECT to a gateway's tunnel as `src`'s sidecar does: from its address,
    /// with its mesh certificate, with an optional token.
    pub async fn connect(&self, gateway: SocketAddr, src: &W, dst: SocketAddr, token: Option<&str>) -> Connect {
        connect_speaking(gateway, src.sidecar, Speak::As(self.mesh_of(src.name)), dst, token).await
    }

    /// Asks a gateway's key service for the keys of `ip` as `src`'s sidecar does (from its
    /// address, with its mesh certificate): status and body.
    pub async fn keys(&self, gateway: SocketAddr, src: &W, ip: IpAddr) -> (u16, String) {
        keys_speaking(gateway, Some(src.sidecar), Speak::As(self.mesh_of(src.name)), ip)
            .await
            .unwrap_or_else(|e| panic!("GET keys of {ip} from {gateway}: {e:#}"))
    }

    /// The epoch secrets file of `zone` (its gateways' only).
    pub fn secrets(&self, zone: &str) -> PathBuf {
        self.files.secrets(zone)
    }

    /// A token for `src` to `dst`:`port`, sealed with the current epoch (or `epoch`) of the
    /// secrets of `src`'s zone, as its sidecar's filter seals it.
    pub fn token(&self, src: &W, dst: IpAddr, port: u16, epoch: Option<u32>, issued_at_ms: u64) -> String {
        crate::credentials::token(
            &self.secrets(src.zone),
            &src.identity(),
            src.overlay,
            SocketAddr::new(dst, port),
            epoch,
            issued_at_ms,
        )
        .unwrap_or_else(|e| panic!("token: {e:#}"))
    }
}

/// How many gateways of `zone` the gateway with admin endpoint `admin` sees up (its `/peers`).
pub async fn peers_up(admin: SocketAddr, zone: &str) -> usize {
    let (status, body) = http_get(admin, "/peers").await;
    assert_eq!(status, 200, "/peers: {body}");
    gwconfig::peers_up(&body, zone).len()
}

/// The result of a CONNECT through a gateway.
#[derive(Debug)]
pub enum Connect {
    /// The tunnel is open.
    Open(TokioIo<hyper::upgrade::Upgraded>),
    /// Refused: status, `x-keyway-deny-reason`, `x-keyway-rule`.
    Refused {
        /// HTTP status.
        status: u16,
        /// The refusal's reason.
        reason: String,
        /// The deciding rule, for policy denials.
        rule: String,
    },
}

impl Connect {
    /// The refusal (panics if the tunnel opened).
    pub fn refused(self) -> (u16, String, String) {
        match self {
            Connect::Refused { status, reason, rule } => (status, reason, rule),
            Connect::Open(_) => panic!("expected a refusal, the tunnel opened"),
        }
    }

    /// The open tunnel (panics if refused).
    pub fn open(self) -> TokioIo<hyper::upgrade::Upgraded> {
        match self {
            Connect::Open(io) => io,
            Connect::Refused { status, reason, rule } => {
                panic!("expected an open tunnel, got {status} {reason} {rule}")
            }
        }
    }
}

/// Opens an HTTP/2 CONNECT to a gateway's tunnel from `from` (a sidecar address), spoken as
/// `how`, as Envoy's tcp_proxy tunnelling does, with an optional token.
pub async fn connect_speaking(
    gateway: SocketAddr,
    from: IpAddr,
    how: Speak<'_>,
    dst: SocketAddr,
    token: Option<&str>,
) -> Connect {
    try_connect(gateway, from, how, dst, token).await.unwrap_or_else(|e| panic!("CONNECT {dst} via {gateway}: {e:#}"))
}

/// Asks a gateway's key service (on its tunnel port) for the keys of `ip`, from `from`, spoken as
/// `how`: status and body.
pub async fn keys_speaking(
    gateway: SocketAddr,
    from: Option<IpAddr>,
    how: Speak<'_>,
    ip: IpAddr,
) -> anyhow::Result<(u16, String)> {
    use http_body_util::BodyExt as _;
    let (mut sender, _) = crate::mesh::h2(gateway, from, how).await?;
    let uri = format!("https://{gateway}{}?{}={ip}", wire::KEY_SERVICE_PATH, wire::KEY_SERVICE_IP_PARAM);
    let resp = sender.send_request(Request::get(uri).body(Empty::<Bytes>::new())?).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

async fn try_connect(
    gateway: SocketAddr,
    from: IpAddr,
    how: Speak<'_>,
    dst: SocketAddr,
    token: Option<&str>,
) -> anyhow::Result<Connect> {
    let (mut sender, server) = crate::mesh::h2(gateway, Some(from), how).await?;
    if matches!(how, Speak::As(_)) {
        // As the sidecar's cluster matches the gateway's SAN.
        let want = crate::mesh::gateway_identity(TD);
        anyhow::ensure!(server.as_deref() == Some(want.as_str()), "the tunnel's certificate is {server:?}, not {want}");
    }
    let mut req = Request::builder().method(Method::CONNECT).uri(dst.to_string());
    if let Some(t) = token {
        req = req.header(wire::TOKEN_HEADER, t);
    }
    let resp = sender.send_request(req.body(Empty::<Bytes>::new())?).await?;
    if resp.status() != StatusCode::OK {
        let h = |n: &str| resp.headers().get(n).and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        return Ok(Connect::Refused {
            status: resp.status().as_u16(),
            reason: h(wire::DENY_REASON_HEADER),
            rule: h(wire::RULE_HEADER),
        });
    }
    Ok(Connect::Open(TokioIo::new(hyper::upgrade::on(resp).await?)))
}

/// Sends `data`, half-closes, reads everything back; returns what came back.
pub async fn echo(mut io: TokioIo<hyper::upgrade::Upgraded>, data: &[u8]) -> Vec<u8> {
    let (mut r, mut w) = tokio::io::split(&mut io);
    let send = async {
        w.write_all(data).await?;
        w.shutdown().await
    };
    let recv = async {
        let mut out = Vec::new();
        r.read_to_end(&mut out).await.map(|_| out)
    };
    let (sent, got) = tokio::join!(send, recv);
    sent.unwrap_or_else(|e| panic!("echo: sending: {e}"));
    got.unwrap_or_else(|e| panic!("echo: receiving: {e}"))
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
    try_get(addr, from, path).await.unwrap_or_else(|e| panic!("GET {addr}{path}: {e}"))
}

async fn try_get(addr: SocketAddr, from: IpAddr, path: &str) -> std::io::Result<(u16, String)> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(from, 0))?;
    let mut tcp = sock.connect(addr).await?;
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes()).await?;
    let mut buf = Vec::new();
    tcp.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|x| x.1.to_owned()).unwrap_or_default();
    Ok((status, body))
}
