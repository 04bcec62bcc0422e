//! The data path. [`Proxy`] owns what every flow shares (configuration, state, metrics, peers,
//! limits, the sidecar pool, the clock, the tasks); a [`Flow`] is one connection's source, verified
//! identity and destination. Its faces are children of this module:
//!
//! * [`tunnel`]: HTTP/2 CONNECT from this zone's sidecars, with tokens;
//! * [`overlay`]: QUIC streams to and from the gateways of other zones, with flow headers;
//! * [`edge`]: QUIC from `keyway agent`s (devices, pods' UDP), one flow per stream;
//!   [`agents`]: who is connected there, their source check, flows to a device's agent;
//! * [`udp`]: UDP in QUIC datagrams, from agents, between gateways, to agents; tracked flows;
//! * [`stream`]: what the QUIC faces share (accepting, flow header and status, a flow's end);
//! * [`deliver`]: the last hop to a destination sidecar (with a ticket) or outside the overlay;
//! * [`route`]: the decision and the route, plain functions over the engine and the peers;
//! * [`refusal`]: the one refusal type; [`accesslog`]: one event per flow; [`relay`]: copying
//!   bytes; [`pool`]: sidecar connections.

pub mod accesslog;
pub mod agents;
pub mod deliver;
pub mod edge;
pub mod overlay;
pub mod pool;
pub mod refusal;
pub mod relay;
pub mod route;
pub mod stream;
pub mod tunnel;
pub mod udp;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keyway_policy::Engine;
use keyway_policy::engine::Peer;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::routing::Routing;
use crate::state::State;
use crate::tasks::Tasks;
use crate::tls::GatewayIdentity;

pub use self::refusal::{Entry, Limit, Refusal};
pub use self::route::{Decision, Route};

/// One flow: who sends it (overlay address and verified identity) and where it goes.
#[derive(Debug, Clone)]
pub struct Flow {
    /// The flow id (this gateway's for flows from sidecars, the source gateway's over the overlay).
    pub id: u64,
    /// The source workload's overlay address.
    pub src: IpAddr,
    /// The source workload's verified identity.
    pub identity: String,
    /// The destination (a service's overlay address resolves to the chosen endpoint's).
    pub dst: SocketAddr,
}

/// The permit of one admitted flow: its place in the gateway's limit and in its source's share.
#[derive(Debug)]
pub struct FlowPermit {
    _flow: OwnedSemaphorePermit,
    _share: Share,
}

/// Flows held per source.
#[derive(Debug)]
struct Shares {
    per_source: usize,
    held: Mutex<HashMap<IpAddr, usize>>,
}

impl Shares {
    fn new(per_source: usize) -> Arc<Shares> {
        Arc::new(Shares { per_source, held: Mutex::default() })
    }

    /// A place in `source`'s share, or `None` when it holds all of it.
    fn take(this: &Arc<Shares>, source: IpAddr) -> Option<Share> {
        let mut held = this.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = held.entry(source).or_default();
        if *n >= this.per_source {
            return None;
        }
        *n += 1;
        Some(Share { shares: this.clone(), source })
    }
}

/// One flow's place in its source's share; given back when dropped.
#[derive(Debug)]
struct Share {
    shares: Arc<Shares>,
    source: IpAddr,
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut held = self.shares.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = held.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.source);
            }
        }
    }
}

/// A tunnel connection's place under the connection limits; given back when dropped.
#[derive(Debug)]
pub struct ConnPermit {
    _conn: tokio::sync::OwnedSemaphorePermit,
    _share: Share,
}

/// What every flow shares.
#[derive(Debug)]
pub struct Proxy {
    /// The configuration in force.
    pub config: Arc<Config>,
    /// Engine, secrets, replay cache.
    pub state: Arc<State>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Peer gateways and their health.
    pub routing: Arc<Routing>,
    /// This gateway's identity.
    pub identity: GatewayIdentity,
    /// Wall-clock time (tokens and tickets).
    pub clock: Arc<dyn Clock>,
    /// Every task of the gateway.
    pub tasks: Tasks,
    /// HTTP/2 connections to this zone's sidecars.
    pub sidecars: pool::SidecarPool,
    /// The agents connected to the edge listener.
    pub agents: agents::Agents,
    /// The UDP flows tracked.
    pub udp: udp::Tracker,
    flows: Arc<Semaphore>,
    shares: Arc<Shares>,
    tunnel_conns: Arc<Semaphore>,
    tunnel_shares: Arc<Shares>,
    /// Per peer gateway connection (by peer address), the flows each source holds on it.
    peer_shares: Mutex<HashMap<SocketAddr, Arc<Shares>>>,
    next_flow: AtomicU64,
    draining: CancellationToken,
}

impl Proxy {
    /// The shared state of a new gateway.
    pub fn new(
        config: Arc<Config>,
        state: Arc<State>,
        metrics: Arc<Metrics>,
        identity: GatewayIdentity,
        routing: Routing,
        clock: Arc<dyn Clock>,
    ) -> Proxy {
        Proxy {
            routing: Arc::new(routing),
            flows: Arc::new(Semaphore::new(config.limits.max_flows)),
            shares: Shares::new(config.limits.flows_per_source()),
            tunnel_conns: Arc::new(Semaphore::new(config.limits.max_tunnel_connections)),
            tunnel_shares: Shares::new(config.limits.max_tunnel_connections_per_source),
            peer_shares: Mutex::default(),
            config,
            state,
            metrics,
            identity,
            clock,
            tasks: Tasks::new(),
            sidecars: pool::SidecarPool::default(),
            agents: agents::Agents::default(),
            udp: udp::Tracker::default(),
            next_flow: AtomicU64::new(1),
            draining: CancellationToken::new(),
        }
    }

    /// A new flow id.
    pub fn flow_id(&self) -> u64 {
        self.next_flow.fetch_add(1, Ordering::Relaxed)
    }

    /// The time now, Unix milliseconds.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// The connect timeout.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.config.limits.connect_timeout_ms)
    }

    /// How long a flow may carry nothing before it is closed.
    pub fn flow_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.config.limits.flow_idle_timeout_ms)
    }

    /// Whether the gateway is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// Starts draining: no new flows.
    pub fn drain(&self) {
        self.draining.cancel();
    }

    /// Admits a new flow from `source` under the limits (the gateway's and the source's share);
    /// the permit is held for the flow's life.
    pub fn admit(&self, source: IpAddr) -> Result<FlowPermit, Refusal> {
        if self.is_draining() {
            return Err(Refusal::Draining);
        }
        let share =
            Shares::take(&self.shares, source.to_canonical()).ok_or(Refusal::Limit(Limit::MaxFlowsPerSource))?;
        let flow = self.flows.clone().try_acquire_owned().map_err(|_| Refusal::Limit(Limit::MaxFlows))?;
        Ok(FlowPermit { _flow: flow, _share: share })
    }

    /// Admits a new tunnel connection from `source` under `limits.max_tunnel_connections` and
    /// its per-source share; `None`: close it at once (the limit's name for the metric).
    pub fn admit_tunnel_connection(&self, source: IpAddr) -> Result<ConnPermit, &'static str> {
        let share =
            Shares::take(&self.tunnel_shares, source.to_canonical()).ok_or("max_tunnel_connections_per_source")?;
        let conn = self.tunnel_conns.clone().try_acquire_owned().map_err(|_| "max_tunnel_connections")?;
        Ok(ConnPermit { _conn: conn, _share: share })
    }

    /// A place for a flow of `source` on the connection with the peer gateway at `peer`, held
    /// for the flow's life; `None` when the source holds its share of that connection's streams
    /// ([`crate::config::Limits::peer_flows_per_source`]).
    fn admit_to_peer(&self, peer: SocketAddr, source: IpAddr) -> Option<Share> {
        let shares = {
            let mut all = self.peer_shares.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            all.entry(peer).or_insert_with(|| Shares::new(self.config.limits.peer_flows_per_source())).clone()
        };
        Shares::take(&shares, source.to_canonical())
    }

    /// Waits until every admitted flow has ended.
    pub async fn flows_ended(&self) {
        let all = u32::try_from(self.config.limits.max_flows).unwrap_or(u32::MAX);
        let _ = self.flows.acquire_many(all).await;
    }

    /// Flows open now.
    pub fn open_flows(&self) -> usize {
        self.config.limits.max_flows.saturating_sub(self.flows.available_permits())
    }

    /// Decides the flow from `src` (a peer of `engine`, the snapshot it was looked up in) to `dst`
    /// and finds its route, choosing a service's endpoint outside the zones in `avoid`.
    pub fn decide(&self, engine: &Engine, src: Peer, dst: SocketAddr, avoid: &[String]) -> Result<Decision, Refusal> {
        self.decide_protocol(engine, src, (dst, keyway_policy::Protocol::Tcp), avoid)
    }

    /// As [`Proxy::decide`], for a flow of any protocol.
    pub fn decide_protocol(
        &self,
        engine: &Engine,
        src: Peer,
        dst: (SocketAddr, keyway_policy::Protocol),
        avoid: &[String],
    ) -> Result<Decision, Refusal> {
        let start = std::time::Instant::now();
        let turn = self.next_flow.load(Ordering::Relaxed) as usize;
        let d = route::decide(engine, &self.routing, src, dst, avoid, turn);
        self.metrics.decision_seconds.observe(start.elapsed().as_secs_f64());
        d
    }
}
