//! Building and running one gateway: [`build_from`] takes a configuration and an inventory
//! source, binds every listener, starts every task and returns a [`Handle`] with the bound
//! addresses; [`build`] is the same with the configuration's inventory directory.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::clock::Clock;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::{Proxy, edge, overlay, tunnel};
use crate::routing::Routing;
use crate::source::{FileSource, InventorySource, Sink};
use crate::state::State;
use crate::tls::{GatewayIdentity, TlsMaterial};

/// Each zone's own CA, for the zones that have one.
type ZoneRoots = std::collections::BTreeMap<String, Arc<rustls::RootCertStore>>;

/// How long `kill` and the end of `shutdown` wait for the tasks to end once told to.
const STOP_WAIT: Duration = Duration::from_secs(2);

/// A running gateway.
#[derive(Debug)]
pub struct Handle {
    /// The tunnel listener's address.
    pub tunnel_addr: SocketAddr,
    /// The overlay endpoint's address.
    pub overlay_addr: SocketAddr,
    /// The edge endpoint's address (agents).
    pub edge_addr: SocketAddr,
    /// The admin listener's address.
    pub admin_addr: SocketAddr,
    /// The data path's shared state (for tests and the admin endpoint).
    pub proxy: Arc<Proxy>,
    endpoint: quinn::Endpoint,
    edge_endpoint: quinn::Endpoint,
    admin: Option<crate::admin::AdminHandle>,
    reload: watch::Sender<u64>,
}

impl Handle {
    /// The peer gateways and their health.
    pub fn routing(&self) -> &Routing {
        &self.proxy.routing
    }

    /// Engine, secrets and replay cache.
    pub fn state(&self) -> &Arc<State> {
        &self.proxy.state
    }

    /// Asks the inventory source and the secrets to reload now (SIGHUP).
    pub fn reload(&self) {
        self.reload.send_modify(|n| *n += 1);
    }

    /// Stops accepting new flows, waits for open flows to finish (at most `deadline`), then
    /// ends every task, open flows included.
    pub async fn shutdown(mut self, deadline: Duration) {
        self.proxy.drain();
        if tokio::time::timeout(deadline, self.proxy.flows_ended()).await.is_err() {
            tracing::warn!(open = self.proxy.open_flows(), "drain deadline passed; closing open flows");
        }
        self.stop(0, b"shutdown").await;
        self.endpoint.wait_idle().await;
    }

    /// Stops at once, as a crash would (for failover tests): no drain, every flow and peer
    /// connection dropped. Returns once the overlay socket is released (at most 2 s), as a dead
    /// process would release it.
    pub async fn kill(mut self) {
        self.stop(3, b"killed").await;
        let _ = tokio::time::timeout(STOP_WAIT, self.endpoint.wait_idle()).await;
    }

    /// Ends every task (flows included), closes every peer connection and the overlay endpoint,
    /// with a QUIC close `code` and `reason`, and stops the admin server.
    async fn stop(&mut self, code: u32, reason: &[u8]) {
        self.proxy.drain();
        self.endpoint.set_server_config(None);
        self.edge_endpoint.set_server_config(None);
        self.proxy.routing.close_all();
        self.endpoint.close(quinn::VarInt::from_u32(code), reason);
        self.edge_endpoint.close(quinn::VarInt::from_u32(code), reason);
        let left = self.proxy.tasks.stop(STOP_WAIT).await;
        if left > 0 {
            tracing::warn!(tasks = left, "tasks still running after the stop");
        }
        if let Some(a) = self.admin.take() {
            a.stop();
        }
    }
}

fn transport(config: &Config) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_millis(config.keepalive_ms)));
    // Gateways of one overlay are tens of milliseconds apart at most; the QUIC default (333 ms)
    // makes handshake retransmissions, and the draining of a closed handshake, needlessly slow.
    t.initial_rtt(Duration::from_millis(50));
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_millis(config.peer_idle_timeout_ms)) {
        t.max_idle_timeout(Some(idle));
    }
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(config.limits.max_flows_per_peer));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t.stream_receive_window(quinn::VarInt::from_u32(4 * 1024 * 1024));
    t.receive_window(quinn::VarInt::from_u32(64 * 1024 * 1024));
    t.send_window(64 * 1024 * 1024);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(max_udp_payload(config));
    t.mtu_discovery_config(Some(mtu));
    Arc::new(t)
}

/// The largest UDP payload of the overlay: its MTU (`overlay_mtu`, else the largest MTU of this
/// host's interfaces, [`largest_link_mtu`]) less the IP and UDP headers of the listen address's
/// family. quinn's default stops at 1452 bytes: on jumbo-frame networks (9001 on most clouds'
/// VPCs) six times the packets, and six times the per-packet work, for the same bytes.
fn max_udp_payload(config: &Config) -> u16 {
    let mtu = config.overlay_mtu.unwrap_or_else(largest_link_mtu);
    let headers = if config.listen.overlay.is_ipv4() { 20 + 8 } else { 40 + 8 };
    mtu.max(crate::config::MIN_OVERLAY_MTU).saturating_sub(headers)
}

/// The largest MTU of this host's interfaces other than loopback, from `/sys/class/net`; 1500
/// when none can be read.
fn largest_link_mtu() -> u16 {
    let Ok(dir) = std::fs::read_dir("/sys/class/net") else { return 1500 };
    dir.filter_map(Result::ok)
        .filter(|e| e.file_name() != "lo")
        .filter_map(|e| std::fs::read_to_string(e.path().join("mtu")).ok()?.trim().parse::<u16>().ok())
        .max()
        .unwrap_or(1500)
}

/// The overlay's QUIC endpoint on `config.listen.overlay`, taking datagrams up to the overlay's
/// MTU ([`max_udp_payload`]).
fn overlay_endpoint(config: &Config, server: quinn::ServerConfig) -> anyhow::Result<quinn::Endpoint> {
    udp_endpoint(config, config.listen.overlay, "overlay", server)
}

/// A QUIC endpoint on `addr` (`what` names it in errors), taking datagrams up to the overlay's
/// MTU ([`max_udp_payload`]).
fn udp_endpoint(
    config: &Config,
    addr: SocketAddr,
    what: &str,
    server: quinn::ServerConfig,
) -> anyhow::Result<quinn::Endpoint> {
    let mut endpoint = quinn::EndpointConfig::default();
    endpoint.max_udp_payload_size(max_udp_payload(config))?;
    let socket = std::net::UdpSocket::bind(addr).map_err(|e| anyhow::anyhow!("{what} {addr}: cannot bind: {e}"))?;
    Ok(quinn::Endpoint::new(endpoint, Some(server), socket, Arc::new(quinn::TokioRuntime))?)
}

/// The edge listener's QUIC server configuration: this gateway's overlay certificate, client
/// certificates of the overlay CA or the mesh root, not in `edge.crls`; and its verifier.
fn edge_config(
    config: &Config,
    tls: &TlsMaterial,
    state: &State,
) -> anyhow::Result<(quinn::ServerConfig, Arc<dyn rustls::server::danger::ClientCertVerifier>)> {
    let roots = crate::tls::merged_roots(tls, state.mesh().roots())?;
    let mut crls = Vec::new();
    for path in &config.edge.crls {
        crls.extend(crate::ca::load_crls(path)?);
    }
    let (mut server, verifier) = crate::tls::quic_edge_server_config(tls, roots, crls)?;
    server.transport_config(transport(config));
    Ok((server, verifier))
}

/// Reads the datagrams of every peer connection this gateway dials (those it accepts are read
/// where they are accepted).
async fn read_dialled_peers(proxy: Arc<Proxy>) {
    let mut up = proxy.routing.peers_up();
    while let Some((zone, conn)) = up.recv().await {
        proxy.tasks.spawn(crate::proxy::udp::from_peer_connection(proxy.clone(), zone, conn));
    }
}

/// Rebuilds the edge listener's TLS when the overlay certificate, the mesh root or a revocation
/// list changes (checked every `interval`, and on request), and closes the connections of agents
/// whose certificate is no longer accepted. A change that does not load is rejected (metric,
/// error log) and the running configuration stays.
async fn reload_edge_tls(
    proxy: Arc<Proxy>,
    endpoint: quinn::Endpoint,
    interval: Duration,
    requests: watch::Receiver<u64>,
) {
    let config = proxy.config.clone();
    let mut paths =
        vec![config.tls.ca.clone(), config.tls.cert.clone(), config.tls.key.clone(), config.mesh.ca.clone()];
    paths.extend(config.edge.crls.iter().cloned());
    on_change(paths, interval, requests, |_| {
        let loaded = TlsMaterial::load(&config.tls.ca, &config.tls.cert, &config.tls.key)
            .map_err(anyhow::Error::from)
            .and_then(|tls| edge_config(&config, &tls, &proxy.state));
        match loaded {
            Ok((server, verifier)) => {
                endpoint.set_server_config(Some(server));
                crate::proxy::edge::recheck(&proxy, verifier.as_ref());
                proxy.metrics.reloads.with_label_values(&["edge-tls", "ok"]).inc();
                tracing::info!("edge certificates and revocation lists loaded");
            }
            Err(e) => {
                proxy.metrics.reloads.with_label_values(&["edge-tls", "rejected"]).inc();
                tracing::error!(error = %format!("{e:#}"), "edge TLS change rejected; the running configuration stays");
            }
        }
    })
    .await;
}

/// Checks a configuration without starting anything: loads the inventory and policies, the
/// secrets, the mesh and overlay TLS material and the zones' own CAs, and checks that the
/// certificate is this gateway's. No socket is opened and no peer is contacted.
pub fn check(config: &Config) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new()?);
    let engine = FileSource::new(config).load()?;
    let _state = State::load(Arc::new(config.clone()), metrics, engine)?;
    let tls = TlsMaterial::load(&config.tls.ca, &config.tls.cert, &config.tls.key)?;
    check_identity(config, &tls)?;
    check_own_zone_ca(config, &tls, &crate::tls::zone_roots(config)?)?;
    Ok(())
}

/// When this gateway's zone has its own CA (`zones[].ca`), its certificate must chain to it, or
/// every peer would refuse it.
fn check_own_zone_ca(config: &Config, tls: &TlsMaterial, roots: &ZoneRoots) -> anyhow::Result<()> {
    if let Some(zone_roots) = roots.get(&config.zone)
        && !crate::tls::chains_to(tls.chain(), zone_roots)
    {
        anyhow::bail!(
            "{}: the certificate does not chain to this zone's own CA ({}), so no peer would take it",
            config.tls.cert.display(),
            config.my_zone().and_then(|z| z.ca.as_ref()).map_or_else(String::new, |p| p.display().to_string())
        );
    }
    Ok(())
}

/// How long a starting gateway waits for its mesh certificate files to appear: istio-agent writes
/// them once istiod has signed its certificate, which may be after the gateway container starts.
const MESH_FILES_WAIT: Duration = Duration::from_secs(120);

/// Waits until the files of the `mesh` section exist, at most [`MESH_FILES_WAIT`]; loading them
/// afterwards says which one is missing if they never came.
async fn wait_for_mesh_files(config: &Config) {
    let files = [&config.mesh.ca, &config.mesh.cert, &config.mesh.key];
    let deadline = tokio::time::Instant::now() + MESH_FILES_WAIT;
    let mut told = false;
    while let Some(missing) = files.iter().find(|f| !f.exists()) {
        if tokio::time::Instant::now() >= deadline {
            return;
        }
        if !told {
            tracing::warn!(file = %missing.display(), wait_s = MESH_FILES_WAIT.as_secs(), "waiting for the mesh certificate files");
            told = true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// This gateway's identity from its certificate, which must be of the configured trust domain
/// and zone and, when the configuration names the gateway, of that name.
fn check_identity(config: &Config, tls: &TlsMaterial) -> anyhow::Result<GatewayIdentity> {
    let identity = tls.identity()?;
    let name = if config.name.is_empty() { identity.name.clone() } else { config.name.clone() };
    let expected = GatewayIdentity { trust_domain: config.trust_domain.clone(), zone: config.zone.clone(), name };
    if identity != expected {
        anyhow::bail!(
            "{}: the certificate is for {} but the configuration says this gateway is {}",
            config.tls.cert.display(),
            identity.spiffe_id(),
            expected.spiffe_id()
        );
    }
    Ok(identity)
}

/// The QUIC server and client configurations of the overlay with `tls`.
fn quic_configs(config: &Config, tls: &TlsMaterial) -> anyhow::Result<(quinn::ServerConfig, quinn::ClientConfig)> {
    let mut server = crate::tls::quic_server_config(tls)?;
    server.transport_config(transport(config));
    let mut client = crate::tls::quic_client_config(tls)?;
    client.transport_config(transport(config));
    Ok((server, client))
}

/// Starts a gateway with the inventory directory of its configuration (a [`FileSource`]) and
/// the system clock.
pub async fn build(config: Config) -> anyhow::Result<Handle> {
    let source = FileSource::new(&config);
    build_from(config, source, crate::clock::system()).await
}

/// Starts a gateway: takes the first engine from `source`, loads the secrets and TLS material,
/// binds the tunnel, overlay and admin listeners, and starts the tasks (the source's among them).
/// Must run inside a tokio runtime.
pub async fn build_from<S: InventorySource>(
    config: Config,
    mut source: S,
    clock: Arc<dyn Clock>,
) -> anyhow::Result<Handle> {
    let mut config = config;
    let tls = TlsMaterial::load(&config.tls.ca, &config.tls.cert, &config.tls.key)?;
    let identity = check_identity(&config, &tls)?;
    // A zone behind an entry leaves the name to the certificate: one certificate per replica.
    config.name.clone_from(&identity.name);
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new()?);
    let zone_roots = crate::tls::zone_roots(&config)?;
    check_own_zone_ca(&config, &tls, &zone_roots)?;
    let engine = source.first().await?;
    wait_for_mesh_files(&config).await;
    let state = Arc::new(State::load(config.clone(), metrics.clone(), engine)?);
    let (server, client) = quic_configs(&config, &tls)?;
    // Peers are dialled with Routing's client configuration, which a renewed certificate replaces.
    let routing = Routing::new(&config, zone_roots, client);
    let endpoint = overlay_endpoint(&config, server)?;
    let overlay_addr = endpoint.local_addr()?;
    let listener = tokio::net::TcpListener::bind(config.listen.tunnel)
        .await
        .map_err(|e| anyhow::anyhow!("tunnel {}: cannot bind: {e}", config.listen.tunnel))?;
    let tunnel_addr = listener.local_addr()?;
    let (edge_server, _) = edge_config(&config, &tls, &state)?;
    let edge_endpoint = udp_endpoint(&config, config.listen.edge, "edge", edge_server)?;
    let edge_addr = edge_endpoint.local_addr()?;

    let proxy = Arc::new(Proxy::new(config.clone(), state.clone(), metrics.clone(), identity, routing, clock));
    let admin = crate::admin::start(proxy.clone())?;
    let admin_addr = admin.addr;
    let (reload, reloads) = watch::channel(0u64);
    let interval = Duration::from_millis(config.reload_interval_ms.max(1));

    let tasks = &proxy.tasks;
    tasks.spawn(tunnel::serve(proxy.clone(), listener));
    tasks.spawn(overlay::serve(proxy.clone(), endpoint.clone()));
    tasks.spawn(read_dialled_peers(proxy.clone()));
    proxy.routing.spawn_connectors(&endpoint, &metrics, tasks);
    tasks.spawn(edge::serve(proxy.clone(), edge_endpoint.clone()));
    tasks.spawn(crate::proxy::udp::expire(proxy.clone()));
    tasks.spawn(reload_edge_tls(proxy.clone(), edge_endpoint.clone(), interval, reloads.clone()));
    tasks.spawn(source.run(Sink { state: state.clone(), metrics: metrics.clone(), reload: reloads.clone() }));
    tasks.spawn(reload_overlay_tls(proxy.clone(), endpoint.clone(), interval, reloads.clone()));
    tasks.spawn(reload_secrets(state, interval, reloads));
    tracing::info!(
        zone = %config.zone, name = %config.name, tunnel = %tunnel_addr, overlay = %overlay_addr, edge = %edge_addr,
        admin = %admin_addr,
        config = %serde_json::to_string(&*config).unwrap_or_default(),
        "keyway gateway started"
    );
    Ok(Handle {
        tunnel_addr,
        overlay_addr,
        edge_addr,
        admin_addr,
        proxy,
        endpoint,
        edge_endpoint,
        admin: Some(admin),
        reload,
    })
}

/// Waits for the next look at changed files: `Some(false)` after `interval`, `Some(true)` on a
/// reload request (SIGHUP: load now), `None` once the gateway stops.
async fn next_check(interval: Duration, requests: &mut watch::Receiver<u64>) -> Option<bool> {
    tokio::select! {
        _ = tokio::time::sleep(interval) => Some(false),
        r = requests.changed() => r.is_ok().then_some(true),
    }
}

/// Reloads the epoch secrets when their file changed (checked every `interval`) and on request.
async fn reload_secrets(state: Arc<State>, interval: Duration, mut requests: watch::Receiver<u64>) {
    requests.borrow_and_update();
    loop {
        let Some(force) = next_check(interval, &mut requests).await else { return };
        let s = state.clone();
        let _ = tokio::task::spawn_blocking(move || s.reload_secrets(force)).await;
    }
}

/// Reloads the overlay certificate when its files changed and settled (checked every `interval`)
/// and on request: new handshakes, both ways, use the new one; open connections keep theirs. A
/// certificate that does not load, or names another gateway, is rejected (metric, error log) and
/// the running one stays.
async fn reload_overlay_tls(
    proxy: Arc<Proxy>,
    endpoint: quinn::Endpoint,
    interval: Duration,
    requests: watch::Receiver<u64>,
) {
    let config = proxy.config.clone();
    let paths = vec![config.tls.ca.clone(), config.tls.cert.clone(), config.tls.key.clone()];
    on_change(paths, interval, requests, |force| {
        let loaded = TlsMaterial::load(&config.tls.ca, &config.tls.cert, &config.tls.key)
            .map_err(anyhow::Error::from)
            .and_then(|tls| {
                let id = check_identity(&config, &tls)?;
                anyhow::ensure!(
                    id == proxy.identity,
                    "the new certificate is for {}, not this gateway",
                    id.spiffe_id()
                );
                quic_configs(&config, &tls)
            });
        match loaded {
            Ok((server, client)) => {
                endpoint.set_server_config(Some(server));
                proxy.routing.set_client_config(client);
                proxy.metrics.reloads.with_label_values(&["overlay-tls", "ok"]).inc();
                if !force {
                    tracing::info!("overlay certificate reloaded");
                }
            }
            Err(e) => {
                proxy.metrics.reloads.with_label_values(&["overlay-tls", "rejected"]).inc();
                tracing::error!(error = %format!("{e:#}"), "new overlay certificate rejected; the running one stays in force");
            }
        }
    })
    .await;
}

/// Runs `changed(force)` whenever the files at `paths` changed and settled (checked every
/// `interval`; `force` on a reload request, SIGHUP, which runs it whether they changed or not),
/// until the gateway stops.
async fn on_change(
    paths: Vec<std::path::PathBuf>,
    interval: Duration,
    mut requests: watch::Receiver<u64>,
    mut changed: impl FnMut(bool),
) {
    let watch = crate::state::FileWatch::new(crate::state::fingerprint(&paths));
    requests.borrow_and_update();
    loop {
        let Some(force) = next_check(interval, &mut requests).await else { return };
        if watch.due(crate::state::fingerprint(&paths), force) {
            changed(force);
        }
    }
}
