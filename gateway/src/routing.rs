//! Zones, their gateway replicas and their health. Health is the state of the QUIC connection to
//! each peer, kept alive by keep-alives: a replica whose connection closes (idle timeout, reset) is
//! taken out at once and new flows go to the other replicas. Before that, a replica from which no
//! datagram has come for [`SILENT_KEEPALIVES`] keep-alive intervals (a live peer answers every
//! keep-alive within one interval) is *silent*: new flows, and flows waiting for its answer, go
//! to the other replicas, and a zone whose replicas are all silent fails over, without waiting for
//! the idle timeout; it is taken back as soon as a datagram comes again.
//!
//! A peer is a replica listed by name (its certificate must be exactly that gateway's), or a
//! zone's `entry`, one address in front of replicas that are not listed (any gateway certificate of
//! that zone is taken from it). Where a zone has its own CA (`zones[].ca`), a certificate claiming
//! the zone must also chain to it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Serialize;

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::tasks::Tasks;
use crate::tls::{GatewayIdentity, server_name, zone_server_name};

/// The name a zone's entry peer goes by in logs and `/peers`.
pub const ENTRY_NAME: &str = "entry";

/// A gateway of another zone.
#[derive(Debug)]
pub struct PeerGateway {
    /// Its identity (trust domain, zone, name); for a zone's entry, the name is [`ENTRY_NAME`] and
    /// any name of the zone is taken.
    pub id: GatewayIdentity,
    /// Whether this is a zone's entry (replicas behind one address, not listed).
    pub entry: bool,
    /// Its overlay address.
    pub address: SocketAddr,
    conn: RwLock<Option<quinn::Connection>>,
    /// Whether the connection has been silent for too long (see the module's documentation).
    silent: tokio::sync::watch::Sender<bool>,
}

impl PeerGateway {
    /// The server name to dial it with.
    fn server_name(&self) -> String {
        if self.entry { zone_server_name(&self.id.zone) } else { server_name(&self.id) }
    }

    /// Whether a certificate of `presented` may serve as this peer.
    fn takes(&self, presented: &GatewayIdentity) -> bool {
        if self.entry {
            presented.trust_domain == self.id.trust_domain && presented.zone == self.id.zone
        } else {
            *presented == self.id
        }
    }

    /// The live connection, if any.
    pub fn connection(&self) -> Option<quinn::Connection> {
        let g = match self.conn.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        g.as_ref().filter(|c| c.close_reason().is_none()).cloned()
    }

    fn set(&self, c: Option<quinn::Connection>) {
        match self.conn.write() {
            Ok(mut g) => *g = c,
            Err(p) => *p.into_inner() = c,
        }
    }

    /// Whether no datagram has come from the peer for [`SILENT_KEEPALIVES`] keep-alive intervals.
    pub fn is_silent(&self) -> bool {
        *self.silent.borrow()
    }

    /// The live connection, if any, unless the peer is silent: what new flows may use.
    fn usable(&self) -> Option<quinn::Connection> {
        if self.is_silent() { None } else { self.connection() }
    }

    /// Resolves once the peer is silent (at once if it is).
    pub async fn silence(&self) {
        let mut rx = self.silent.subscribe();
        let _ = rx.wait_for(|silent| *silent).await;
    }

    fn set_silent(&self, silent: bool) {
        self.silent.send_if_modified(|s| std::mem::replace(s, silent) != silent);
    }

    /// Takes the peer out until its connection is re-established (after a stream failed on it).
    pub fn mark_down(&self) {
        if let Some(c) = self.connection() {
            c.close(quinn::VarInt::from_u32(1), b"stream failed");
        }
    }
}

/// After how many keep-alive intervals without a datagram a peer is silent.
pub const SILENT_KEEPALIVES: u32 = 3;

/// A view of one peer for the admin endpoint.
#[derive(Debug, Serialize)]
pub struct PeerView {
    /// Zone.
    pub zone: String,
    /// Name.
    pub name: String,
    /// Overlay address.
    pub address: SocketAddr,
    /// Whether the overlay connection is up.
    pub up: bool,
    /// Whether the peer is silent (up, but nothing heard for several keep-alive intervals).
    pub silent: bool,
    /// Smoothed round-trip time, ms, when up.
    pub rtt_ms: Option<f64>,
    /// The path MTU in use (largest UDP payload QUIC sends), when up.
    pub mtu: Option<u16>,
}

/// Every peer gateway by zone.
#[derive(Debug)]
pub struct Routing {
    my_zone: String,
    trust_domain: String,
    sidecar_port: u16,
    external_loopback: bool,
    zones: BTreeMap<String, Vec<Arc<PeerGateway>>>,
    failover: BTreeMap<String, Vec<String>>,
    /// Zones with a CA of their own: a certificate claiming the zone must chain to it.
    zone_roots: BTreeMap<String, Arc<RootCertStore>>,
    /// The QUIC client configuration new peer connections are made with (replaced when the
    /// overlay certificate is renewed).
    client: RwLock<quinn::ClientConfig>,
    next: AtomicUsize,
    keepalive: Duration,
    /// Told of every peer connection this gateway dials, once up (zone, connection).
    up: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedSender<(String, quinn::Connection)>>>,
}

impl Routing {
    /// The peers named by the configuration (gateways of other zones), with the CAs of the zones
    /// that have their own (`zones[].ca`, [`crate::tls::zone_roots`]).
    pub fn new(
        config: &Config,
        zone_roots: BTreeMap<String, Arc<RootCertStore>>,
        client: quinn::ClientConfig,
    ) -> Routing {
        let mut zones = BTreeMap::new();
        let mut failover = BTreeMap::new();
        for z in &config.zones {
            failover.insert(z.name.clone(), z.failover.clone());
            if z.name == config.zone {
                continue;
            }
            let listed = z.gateways.iter().map(|g| (g.name.clone(), g.address, false));
            let entry = z.entry.map(|a| (ENTRY_NAME.to_owned(), a, true));
            let peers = listed
                .chain(entry)
                .map(|(name, address, entry)| {
                    Arc::new(PeerGateway {
                        id: GatewayIdentity { trust_domain: config.trust_domain.clone(), zone: z.name.clone(), name },
                        entry,
                        address,
                        conn: RwLock::new(None),
                        silent: tokio::sync::watch::Sender::new(false),
                    })
                })
                .collect();
            zones.insert(z.name.clone(), peers);
        }
        Routing {
            my_zone: config.zone.clone(),
            trust_domain: config.trust_domain.clone(),
            sidecar_port: config.delivery.sidecar_port,
            external_loopback: config.delivery.external_loopback,
            zones,
            failover,
            zone_roots,
            client: RwLock::new(client),
            next: AtomicUsize::new(0),
            keepalive: Duration::from_millis(config.keepalive_ms),
            up: std::sync::Mutex::default(),
        }
    }

    /// Makes new peer connections with `client` (a renewed overlay certificate).
    pub fn set_client_config(&self, client: quinn::ClientConfig) {
        match self.client.write() {
            Ok(mut g) => *g = client,
            Err(p) => *p.into_inner() = client,
        }
    }

    fn client_config(&self) -> quinn::ClientConfig {
        match self.client.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Whether a peer certificate's `presented` identity, with its `chain` (leaf first), is a
    /// gateway of this overlay: of the trust domain, of a configured zone, listed by name or
    /// behind the zone's entry, and chained to the zone's own CA where it has one.
    pub fn accepts(&self, config: &Config, presented: &GatewayIdentity, chain: &[CertificateDer<'_>]) -> bool {
        let Some(zone) = config.zone(&presented.zone) else { return false };
        let named = zone.entry.is_some() || zone.gateways.iter().any(|g| g.name == presented.name);
        presented.trust_domain == self.trust_domain && named && self.issued_for_zone(&presented.zone, chain)
    }

    /// Whether `chain` chains to the CA of `zone`, when the zone has its own.
    pub fn issued_for_zone(&self, zone: &str, chain: &[CertificateDer<'_>]) -> bool {
        self.zone_roots.get(zone).is_none_or(|roots| crate::tls::chains_to(chain, roots))
    }

    /// This gateway's zone.
    pub fn my_zone(&self) -> &str {
        &self.my_zone
    }

    /// The overlay's trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Whether external flows may go to loopback addresses (`delivery.external_loopback`).
    pub fn external_loopback(&self) -> bool {
        self.external_loopback
    }

    /// The keyway inbound port of this zone's sidecars.
    pub fn sidecar_port(&self) -> u16 {
        self.sidecar_port
    }

    /// Whether a zone is reachable: this zone always is; another zone when one of its gateways is
    /// connected and not silent.
    pub fn zone_up(&self, zone: &str) -> bool {
        zone == self.my_zone || self.zones.get(zone).is_some_and(|ps| ps.iter().any(|p| p.usable().is_some()))
    }

    /// The zones to try for a destination in `zone`, in locality order: the zone itself, then its
    /// configured failover zones.
    pub fn failover_order(&self, zone: &str) -> Vec<String> {
        let mut out = vec![zone.to_owned()];
        out.extend(self.failover.get(zone).into_iter().flatten().cloned());
        out
    }

    /// A connected gateway of `zone` that is not silent, round-robin over the healthy replicas.
    pub fn pick(&self, zone: &str) -> Option<(Arc<PeerGateway>, quinn::Connection)> {
        let peers = self.zones.get(zone)?;
        let healthy: Vec<(Arc<PeerGateway>, quinn::Connection)> =
            peers.iter().filter_map(|p| p.usable().map(|c| (p.clone(), c))).collect();
        if healthy.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % healthy.len();
        healthy.into_iter().nth(i)
    }

    /// Every peer with its state.
    pub fn view(&self) -> Vec<PeerView> {
        self.zones
            .values()
            .flatten()
            .map(|p| {
                let c = p.connection();
                let name = c
                    .as_ref()
                    .and_then(|c| crate::tls::peer_identity(c).ok())
                    .map_or_else(|| p.id.name.clone(), |id| id.name);
                PeerView {
                    zone: p.id.zone.clone(),
                    name,
                    address: p.address,
                    up: c.is_some(),
                    silent: p.is_silent(),
                    rtt_ms: c.as_ref().map(|c| c.rtt().as_secs_f64() * 1000.0),
                    mtu: c.map(|c| c.stats().path.current_mtu),
                }
            })
            .collect()
    }

    /// Keeps a connection to every peer: connects, waits for it to close, reconnects with backoff.
    pub fn spawn_connectors(self: &Arc<Self>, endpoint: &quinn::Endpoint, metrics: &Arc<Metrics>, tasks: &Tasks) {
        for p in self.zones.values().flatten() {
            tasks.spawn(maintain(self.clone(), p.clone(), endpoint.clone(), metrics.clone()));
        }
    }

    /// The peer connections this gateway dials, each once it is up (its zone and itself): for
    /// reading what the peer sends besides the answers to this gateway's streams.
    pub fn peers_up(&self) -> tokio::sync::mpsc::UnboundedReceiver<(String, quinn::Connection)> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        *self.up.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(tx);
        rx
    }

    fn announce(&self, zone: &str, conn: &quinn::Connection) {
        if let Some(tx) = self.up.lock().unwrap_or_else(std::sync::PoisonError::into_inner).as_ref() {
            let _ = tx.send((zone.to_owned(), conn.clone()));
        }
    }

    /// Closes every peer connection (on shutdown).
    pub fn close_all(&self) {
        for p in self.zones.values().flatten() {
            if let Some(c) = p.connection() {
                c.close(quinn::VarInt::from_u32(0), b"shutdown");
            }
            p.set(None);
        }
    }
}

async fn maintain(routing: Arc<Routing>, peer: Arc<PeerGateway>, endpoint: quinn::Endpoint, metrics: Arc<Metrics>) {
    let mut backoff = Duration::from_millis(100);
    let gauge = metrics.peers_up.with_label_values(&[peer.id.zone.as_str()]);
    loop {
        let attempt = match endpoint.connect_with(routing.client_config(), peer.address, &peer.server_name()) {
            Ok(connecting) => tokio::time::timeout(Duration::from_secs(3), connecting).await,
            Err(e) => {
                tracing::error!(peer = %peer.id.spiffe_id(), error = %e, "cannot start an overlay connection");
                return;
            }
        };
        match attempt {
            Ok(Ok(conn)) => match crate::tls::peer_identity(&conn) {
                Ok(id) if !routing.issued_for_zone(&id.zone, &crate::tls::peer_chain(&conn)) => {
                    tracing::error!(peer = %peer.id.spiffe_id(), presented = %id.spiffe_id(),
                        "overlay peer's certificate is not of its zone's CA; not used");
                    conn.close(quinn::VarInt::from_u32(2), b"not issued for the zone");
                }
                Ok(id) if peer.takes(&id) => {
                    tracing::info!(peer = %peer.id.spiffe_id(), presented = %id.spiffe_id(), address = %peer.address, "overlay peer up");
                    peer.set(Some(conn.clone()));
                    routing.announce(&id.zone, &conn);
                    gauge.inc();
                    backoff = Duration::from_millis(100);
                    let reason = watch_silence(&peer, &conn, routing.keepalive).await;
                    peer.set_silent(false);
                    peer.set(None);
                    gauge.dec();
                    tracing::warn!(peer = %peer.id.spiffe_id(), reason = %reason, "overlay peer down");
                }
                Ok(other) => {
                    tracing::error!(peer = %peer.id.spiffe_id(), presented = %other.spiffe_id(),
                        "overlay peer presented another gateway's certificate; not used");
                    conn.close(quinn::VarInt::from_u32(2), b"unexpected identity");
                }
                Err(e) => {
                    tracing::error!(peer = %peer.id.spiffe_id(), error = %e, "overlay peer identity unreadable");
                    conn.close(quinn::VarInt::from_u32(2), b"bad identity");
                }
            },
            Ok(Err(e)) => tracing::debug!(peer = %peer.id.spiffe_id(), error = %e, "overlay connect failed"),
            Err(_) => tracing::debug!(peer = %peer.id.spiffe_id(), "overlay connect timed out"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Watches `conn` until it closes, marking `peer` silent while no datagram has come from it for
/// [`SILENT_KEEPALIVES`] keep-alive intervals; returns why it closed.
async fn watch_silence(peer: &PeerGateway, conn: &quinn::Connection, keepalive: Duration) -> quinn::ConnectionError {
    let limit = keepalive * SILENT_KEEPALIVES;
    let mut tick = tokio::time::interval(keepalive / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heard = conn.stats().udp_rx.datagrams;
    let mut heard_at = tokio::time::Instant::now();
    loop {
        tokio::select! {
            reason = conn.closed() => return reason,
            _ = tick.tick() => {
                let now = conn.stats().udp_rx.datagrams;
                if now != heard {
                    heard = now;
                    heard_at = tokio::time::Instant::now();
                    if peer.is_silent() {
                        tracing::info!(peer = %peer.id.spiffe_id(), "overlay peer heard again; taken back");
                        peer.set_silent(false);
                    }
                } else if !peer.is_silent() && heard_at.elapsed() >= limit {
                    tracing::warn!(peer = %peer.id.spiffe_id(), silent_ms = heard_at.elapsed().as_millis() as u64,
                        "overlay peer silent; new flows go to other replicas or zones");
                    peer.set_silent(true);
                }
            }
        }
    }
}
