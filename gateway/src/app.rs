//! Building and running one gateway: [`build`] binds every listener, starts every task and
//! returns a [`Handle`] with the bound addresses.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use keyway_policy::engine::Peer;
use keyway_policy::{Engine, Protocol, Verdict};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Semaphore, watch};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::routing::Routing;
use crate::state::State;
use crate::tls::{GatewayIdentity, TlsMaterial};

/// Everything a flow handler needs.
#[derive(Debug)]
pub struct Ctx {
    /// The configuration in force.
    pub config: Arc<Config>,
    /// Engine, secrets, replay cache.
    pub state: Arc<State>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Peer gateways.
    pub routing: Arc<Routing>,
    /// This gateway's identity.
    pub identity: GatewayIdentity,
    /// Permits for concurrent flows.
    pub flows: Arc<Semaphore>,
    next_flow: AtomicU64,
    /// Set when draining: no new flows.
    pub draining: watch::Receiver<bool>,
    /// HTTP/2 connections to this zone's sidecars.
    pub sidecars: crate::deliver::SidecarPool,
}

impl Ctx {
    /// A new flow id.
    pub fn flow_id(&self) -> u64 {
        self.next_flow.fetch_add(1, Ordering::Relaxed)
    }

    /// The connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.config.limits.connect_timeout_ms)
    }

    /// Whether the gateway is draining.
    pub fn is_draining(&self) -> bool {
        *self.draining.borrow()
    }
}

/// Where an allowed flow goes next.
#[derive(Debug, Clone)]
pub enum Route {
    /// A workload of this zone: its sidecar.
    Local {
        /// The sidecar's keyway inbound address.
        sidecar: SocketAddr,
    },
    /// A workload of another zone: through one of its gateways.
    Zone(String),
    /// An address outside the overlay: straight out.
    External(SocketAddr),
}

/// A decided flow.
#[derive(Debug)]
pub struct Decided {
    /// Allow or deny.
    pub verdict: Verdict,
    /// The deciding rule, in words (`ANP … → NetworkPolicy …: Allow`).
    pub rule: String,
    /// Where to send it, when allowed.
    pub route: Option<Route>,
    /// A fixed reason label when the flow cannot be routed.
    pub unroutable: Option<&'static str>,
    /// The destination address the flow goes to: the address asked for, or for a service's
    /// overlay address the endpoint chosen by locality.
    pub dst: IpAddr,
    /// Whether the address asked for is a service's (another endpoint may be tried).
    pub service: bool,
}

/// For a service's overlay address, the endpoint to use: in the nearest reachable zone in
/// locality order (this zone, then its configured failover zones), round-robin within a zone.
fn pick_endpoint(ctx: &Ctx, engine: &Engine, dst: IpAddr, avoid: &[String]) -> Option<Result<usize, &'static str>> {
    let inv = engine.inventory();
    let svc = inv.service_for(dst)?;
    let endpoints = inv.endpoints(svc);
    if endpoints.is_empty() {
        return Some(Err("service-no-endpoints"));
    }
    for zone in ctx.routing.failover_order(&ctx.config.zone) {
        if !ctx.routing.zone_up(&zone) || avoid.contains(&zone) {
            continue;
        }
        let here: Vec<usize> = endpoints
            .iter()
            .copied()
            .filter(|&w| {
                inv.workloads
                    .get(w)
                    .is_some_and(|w| w.zone.as_deref() == Some(zone.as_str()) && !w.overlay_ips.is_empty())
            })
            .collect();
        if !here.is_empty() {
            let i = ctx.next_flow.load(Ordering::Relaxed) as usize % here.len();
            return here.get(i).copied().map(Ok);
        }
    }
    Some(Err("service-no-reachable-endpoint"))
}

/// Decides a flow from the workload `src` to `dst`:`port` and finds its route.
pub fn decide(ctx: &Ctx, engine: &Engine, src: Peer, dst: IpAddr, port: u16) -> Decided {
    decide_avoiding(ctx, engine, src, dst, port, &[])
}

/// As [`decide`], choosing a service's endpoint outside the zones in `avoid` (zones that just
/// failed to take the flow).
pub fn decide_avoiding(ctx: &Ctx, engine: &Engine, src: Peer, dst: IpAddr, port: u16, avoid: &[String]) -> Decided {
    let start = std::time::Instant::now();
    let asked = dst;
    let (dst, dst_peer) = match pick_endpoint(ctx, engine, dst, avoid) {
        None => (dst, engine.peer_for(dst)),
        Some(Ok(w)) => {
            let ip = engine.inventory().workloads.get(w).and_then(|w| w.overlay_ips.first().copied()).unwrap_or(dst);
            (ip, Peer::Workload(w))
        }
        Some(Err(reason)) => {
            return Decided {
                verdict: Verdict::Allow,
                rule: String::new(),
                route: None,
                unroutable: Some(reason),
                dst,
                service: true,
            };
        }
    };
    let d = engine.decide(src, dst_peer, Protocol::Tcp, port);
    ctx.metrics.decision_seconds.observe(start.elapsed().as_secs_f64());
    let rule = engine.describe_decision(&d);
    if d.verdict == Verdict::Deny {
        return Decided { verdict: d.verdict, rule, route: None, unroutable: None, dst, service: false };
    }
    let (route, unroutable) = match dst_peer {
        Peer::Ip(ip) => (Some(Route::External(SocketAddr::new(ip, port))), None),
        Peer::Workload(w) => match engine.inventory().workloads.get(w).and_then(|w| w.zone.clone().map(|z| (w, z))) {
            None => (None, Some("destination-zone-unknown")),
            Some((w, zone)) if zone == ctx.config.zone => {
                let ip = w.sidecar_ips.first().copied().unwrap_or(dst);
                (Some(Route::Local { sidecar: SocketAddr::new(ip, ctx.config.delivery.sidecar_port) }), None)
            }
            Some((_, zone)) => (Some(Route::Zone(zone)), None),
        },
    };
    Decided {
        verdict: d.verdict,
        rule,
        route,
        unroutable,
        dst,
        service: engine.inventory().service_for(asked).is_some(),
    }
}

/// Copies bytes both ways until both directions end, with half-close: when one side finishes
/// sending, the other side's write half is shut down. Buffers are 16 KiB per direction.
pub async fn relay<A, B>(mut a: A, mut b: B, up: &AtomicU64, down: &AtomicU64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, RELAY_BUFFER, RELAY_BUFFER).await {
        Ok((to_b, to_a)) => {
            up.fetch_add(to_b, Ordering::Relaxed);
            down.fetch_add(to_a, Ordering::Relaxed);
        }
        Err(e) => tracing::debug!(error = %e, "relay ended with an error"),
    }
}

/// The relay's buffer per direction.
const RELAY_BUFFER: usize = 16 * 1024;

/// A running gateway.
#[derive(Debug)]
pub struct Handle {
    /// The tunnel listener's address.
    pub tunnel_addr: SocketAddr,
    /// The overlay endpoint's address.
    pub overlay_addr: SocketAddr,
    /// The admin listener's address.
    pub admin_addr: SocketAddr,
    /// Shared context (for tests and the admin endpoint).
    pub ctx: Arc<Ctx>,
    drain: watch::Sender<bool>,
    endpoint: quinn::Endpoint,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    admin: Option<crate::admin::AdminHandle>,
}

impl Handle {
    /// Stops accepting new flows, waits for open flows to finish (at most `deadline`), then
    /// stops everything.
    pub async fn shutdown(mut self, deadline: Duration) {
        let _ = self.drain.send(true);
        let max = self.ctx.config.limits.max_flows;
        let wait = async {
            while self.ctx.flows.available_permits() < max {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        if tokio::time::timeout(deadline, wait).await.is_err() {
            tracing::warn!(
                open = max - self.ctx.flows.available_permits(),
                "drain deadline passed; closing open flows"
            );
        }
        self.close(0, b"shutdown");
        self.endpoint.wait_idle().await;
        if let Some(a) = self.admin.take() {
            a.stop();
        }
    }

    /// Stops every task, closes every peer connection and the overlay endpoint (no new
    /// connections), with a QUIC close `code` and `reason`.
    fn close(&mut self, code: u32, reason: &[u8]) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        self.ctx.routing.close_all();
        self.endpoint.set_server_config(None);
        self.endpoint.close(quinn::VarInt::from_u32(code), reason);
    }

    /// Stops at once, as a crash would (for failover tests): no drain, connections dropped. Returns
    /// once the overlay socket is released (at most 2 s), as a dead process would release it.
    pub async fn kill(mut self) {
        self.close(3, b"killed");
        if let Some(a) = self.admin.take() {
            a.stop();
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
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
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(u32::try_from(config.limits.max_flows).unwrap_or(u32::MAX)));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t.stream_receive_window(quinn::VarInt::from_u32(4 * 1024 * 1024));
    t.receive_window(quinn::VarInt::from_u32(64 * 1024 * 1024));
    t.send_window(64 * 1024 * 1024);
    Arc::new(t)
}

/// Checks a configuration without starting anything: loads the inventory and policies, the
/// secrets and the TLS material, and checks that the certificate is this gateway's. No socket is
/// opened and no peer is contacted.
pub fn check(config: &Config) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new()?);
    let _state = State::load(Arc::new(config.clone()), metrics)?;
    let tls = TlsMaterial::load(&config.tls.ca, &config.tls.cert, &config.tls.key)?;
    check_identity(config, &tls)?;
    Ok(())
}

fn check_identity(config: &Config, tls: &TlsMaterial) -> anyhow::Result<GatewayIdentity> {
    let identity = tls.identity()?;
    let expected = GatewayIdentity {
        trust_domain: config.trust_domain.clone(),
        zone: config.zone.clone(),
        name: config.name.clone(),
    };
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

/// Starts a gateway: loads state and TLS material, binds the tunnel, overlay and admin
/// listeners, and starts the tasks. Must run inside a tokio runtime.
pub async fn build(config: Config) -> anyhow::Result<Handle> {
    let config = Arc::new(config);
    let metrics = Arc::new(Metrics::new()?);
    let state = Arc::new(State::load(config.clone(), metrics.clone())?);
    let tls = TlsMaterial::load(&config.tls.ca, &config.tls.cert, &config.tls.key)?;
    let identity = check_identity(&config, &tls)?;
    let mut server = crate::tls::quic_server_config(&tls)?;
    server.transport_config(transport(&config));
    let mut client = crate::tls::quic_client_config(&tls)?;
    client.transport_config(transport(&config));
    let mut endpoint = quinn::Endpoint::server(server, config.listen.overlay)
        .map_err(|e| anyhow::anyhow!("overlay {}: cannot bind: {e}", config.listen.overlay))?;
    endpoint.set_default_client_config(client);
    let overlay_addr = endpoint.local_addr()?;
    let tunnel = tokio::net::TcpListener::bind(config.listen.tunnel)
        .await
        .map_err(|e| anyhow::anyhow!("tunnel {}: cannot bind: {e}", config.listen.tunnel))?;
    let tunnel_addr = tunnel.local_addr()?;

    let routing = Arc::new(Routing::new(&config));
    let (drain, draining) = watch::channel(false);
    let ctx = Arc::new(Ctx {
        config: config.clone(),
        state: state.clone(),
        metrics: metrics.clone(),
        routing: routing.clone(),
        identity,
        flows: Arc::new(Semaphore::new(config.limits.max_flows)),
        next_flow: AtomicU64::new(1),
        draining,
        sidecars: crate::deliver::SidecarPool::default(),
    });
    let admin = crate::admin::start(ctx.clone())?;
    let admin_addr = admin.addr;

    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(crate::tunnel::serve(ctx.clone(), tunnel)));
    tasks.push(tokio::spawn(crate::overlay::serve(ctx.clone(), endpoint.clone())));
    tasks.extend(routing.spawn_connectors(endpoint.clone(), metrics.clone()));
    let reload_state = state.clone();
    let interval = Duration::from_millis(config.reload_interval_ms);
    tasks.push(tokio::spawn(async move {
        loop {
            tokio::time::sleep(interval).await;
            let s = reload_state.clone();
            let _ = tokio::task::spawn_blocking(move || s.reload(false)).await;
        }
    }));
    tracing::info!(
        zone = %config.zone, name = %config.name, tunnel = %tunnel_addr, overlay = %overlay_addr, admin = %admin_addr,
        config = %serde_json::to_string(&*config).unwrap_or_default(),
        "keyway gateway started"
    );
    Ok(Handle { tunnel_addr, overlay_addr, admin_addr, ctx, drain, endpoint, tasks, admin: Some(admin) })
}
