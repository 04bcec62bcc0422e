//! UDP: datagrams of a flow (a 5-tuple, both directions one flow) carried in QUIC datagrams
//! ([`keyway_policy::flow::Datagram`]) from an agent to its gateway, between gateways, and to the
//! destination's agent. The first datagram of a flow is decided (egress and ingress, all tiers,
//! protocol UDP) at the source's gateway and again at the destination's; the flow is then
//! tracked, and datagrams the other way are its replies (NetworkPolicy is stateful). A flow that
//! carries nothing for `limits.udp_idle_timeout_ms` is forgotten; its next datagram is decided
//! again. Each gateway sends a flow's datagrams back the way the other direction came, so both
//! directions cross the gateways that hold the flow.
//!
//! The source address of every datagram is checked against who sent it: an agent sends only for
//! its own workload's addresses, a peer gateway only for its own zone's workloads.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use keyway_policy::engine::Peer;
use keyway_policy::flow::Datagram;
use keyway_policy::{Engine, Protocol};

use super::Proxy;
use super::agents::{AgentConn, identity_at, source_of};

/// Who sent a datagram to this gateway.
#[derive(Debug, Clone, Copy)]
enum From<'a> {
    /// A `keyway agent` with this certificate identity.
    Agent(&'a str),
    /// A peer gateway of this zone.
    Peer(&'a str),
}

/// One tracked flow.
#[derive(Debug)]
struct Track {
    /// `None` when allowed, else why not (the datagrams are dropped until it is forgotten).
    refused: Option<&'static str>,
    last: Instant,
    /// Where datagrams towards the responder go, and towards the initiator.
    to_responder: Option<quinn::Connection>,
    to_initiator: Option<quinn::Connection>,
    datagrams: [u64; 2],
}

/// The UDP flows this gateway tracks, keyed by (initiator, responder).
#[derive(Debug, Default)]
pub struct Tracker {
    inner: Mutex<Flows>,
}

#[derive(Debug, Default)]
struct Flows {
    by_key: HashMap<(SocketAddr, SocketAddr), Track>,
    per_source: HashMap<IpAddr, usize>,
}

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Flows> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forgets flows idle for `idle`; returns how many remain.
    fn expire(&self, idle: Duration) -> usize {
        let mut f = self.lock();
        let now = Instant::now();
        let mut gone = Vec::new();
        f.by_key.retain(|k, t| {
            let keep = now.duration_since(t.last) < idle;
            if !keep {
                gone.push((k.0.ip(), *k, t.refused, t.datagrams));
            }
            keep
        });
        for (src, (a, b), refused, n) in gone {
            if let Some(c) = f.per_source.get_mut(&src) {
                *c = c.saturating_sub(1);
                if *c == 0 {
                    f.per_source.remove(&src);
                }
            }
            tracing::info!(target: "keyway::access", protocol = "udp", src = %a, dst = %b,
                verdict = if refused.is_none() { "allow" } else { "deny" }, reason = refused.unwrap_or("allowed"),
                datagrams_up = n[0], datagrams_down = n[1], ended = "idle", "udp flow");
        }
        f.by_key.len()
    }
}

/// Forgets idle flows every second, until the gateway stops.
pub async fn expire(proxy: Arc<Proxy>) {
    let idle = Duration::from_millis(proxy.config.limits.udp_idle_timeout_ms);
    let mut tick = tokio::time::interval(Duration::from_secs(1).min(idle));
    loop {
        tick.tick().await;
        let n = proxy.udp.expire(idle);
        proxy.metrics.udp_flows.set(n as i64);
    }
}

/// Reads an agent's datagrams until its connection closes.
pub async fn from_agent_connection(proxy: Arc<Proxy>, agent: AgentConn) {
    while let Ok(bytes) = agent.conn.read_datagram().await {
        handle(&proxy, From::Agent(&agent.identity), &agent.conn, bytes);
    }
}

/// Reads a peer gateway's datagrams (of its zone `zone`) until the connection closes.
pub async fn from_peer_connection(proxy: Arc<Proxy>, zone: String, conn: quinn::Connection) {
    while let Ok(bytes) = conn.read_datagram().await {
        handle(&proxy, From::Peer(&zone), &conn, bytes);
    }
}

fn count(proxy: &Proxy, outcome: &str) {
    proxy.metrics.udp_datagrams.with_label_values(&[outcome]).inc();
}

/// One datagram: checked, decided or matched to its flow, sent on.
fn handle(proxy: &Proxy, from: From<'_>, came_on: &quinn::Connection, bytes: Bytes) {
    let (a, b) = match Datagram::addresses(&bytes) {
        Ok((a, b)) => {
            (SocketAddr::new(a.ip().to_canonical(), a.port()), SocketAddr::new(b.ip().to_canonical(), b.port()))
        }
        Err(e) => return count(proxy, e.reason()),
    };
    let engine = proxy.state.engine();
    let src = match from {
        From::Agent(identity) => source_of(proxy, &engine, a.ip(), identity).ok_or("edge-source-address"),
        From::Peer(zone) => peer_source(&engine, a.ip(), zone).ok_or("flow-source-zone"),
    };
    let src = match src {
        Ok(s) => s,
        Err(reason) => {
            tracing::debug!(src = %a, reason, "udp datagram from a source its sender does not speak for; dropped");
            return count(proxy, reason);
        }
    };
    let now = Instant::now();
    let mut flows = proxy.udp.lock();
    // This direction's flow, or the reply of the other direction's.
    let (key, reply) = if flows.by_key.contains_key(&(a, b)) {
        ((a, b), false)
    } else if flows.by_key.get(&(b, a)).is_some_and(|t| t.refused.is_none()) {
        ((b, a), true)
    } else {
        drop(flows);
        let refused = decide(proxy, &engine, src, from, b).err();
        flows = proxy.udp.lock();
        if !flows.by_key.contains_key(&(a, b)) {
            if let Err(limit) = admit(proxy, &mut flows, a.ip()) {
                proxy.metrics.limit_refusals.with_label_values(&[limit]).inc();
                return count(proxy, limit);
            }
            tracing::info!(target: "keyway::access", protocol = "udp", src = %a, dst = %b,
                verdict = if refused.is_none() { "allow" } else { "deny" }, reason = refused.unwrap_or("allowed"),
                "udp flow");
            let track = Track { refused, last: now, to_responder: None, to_initiator: None, datagrams: [0, 0] };
            flows.by_key.insert((a, b), track);
        }
        ((a, b), false)
    };
    let Some(track) = flows.by_key.get_mut(&key) else { return };
    if let Some(reason) = track.refused {
        return count(proxy, reason);
    }
    track.last = now;
    track.datagrams[usize::from(reply)] += 1;
    // Replies go back the way the flow came; the flow's own datagrams keep their first way on.
    let (back, on) = if reply {
        (&mut track.to_responder, &mut track.to_initiator)
    } else {
        (&mut track.to_initiator, &mut track.to_responder)
    };
    *back = Some(came_on.clone());
    let via = match on.as_ref().filter(|c| c.close_reason().is_none()) {
        Some(c) => Ok(c.clone()),
        None => next_hop(proxy, &engine, from, b.ip()),
    };
    match via {
        Ok(conn) => {
            *on = Some(conn.clone());
            drop(flows);
            let outcome = match conn.send_datagram(bytes) {
                Ok(()) => "sent",
                Err(quinn::SendDatagramError::TooLarge) => "too-large",
                Err(_) => "connection-lost",
            };
            count(proxy, outcome);
        }
        Err(reason) => count(proxy, reason),
    }
}

/// The workload at `src`, if it belongs to `zone`: a peer gateway speaks only for its own zone.
fn peer_source(engine: &Engine, src: IpAddr, zone: &str) -> Option<Peer> {
    let peer = engine.peer_for(src);
    let Peer::Workload(w) = peer else { return None };
    (engine.inventory().workloads.get(w)?.zone.as_deref() == Some(zone)).then_some(peer)
}

/// Decides a new flow to `dst`: on the source's side (from an agent) and again on the
/// destination's (from a peer gateway), which must then be this zone.
fn decide(proxy: &Proxy, engine: &Engine, src: Peer, from: From<'_>, dst: SocketAddr) -> Result<(), &'static str> {
    match proxy.decide_protocol(engine, src, (dst, Protocol::Udp), &[]) {
        Ok(d) => match (from, d.route) {
            (From::Peer(_), super::Route::Zone(_)) => Err("not-in-zone"),
            _ => Ok(()),
        },
        Err(r) => Err(r.label()),
    }
}

/// Where a datagram for `dst` goes from here: the agent of a workload of this zone, or a gateway
/// of the destination's zone (only for datagrams from this zone's agents).
fn next_hop(proxy: &Proxy, engine: &Engine, from: From<'_>, dst: IpAddr) -> Result<quinn::Connection, &'static str> {
    let Peer::Workload(w) = engine.peer_for(dst) else { return Err("udp-not-carried") };
    let zone = engine.inventory().workloads.get(w).and_then(|w| w.zone.clone()).ok_or("destination-zone-unknown")?;
    if zone == proxy.config.zone {
        let identity = identity_at(proxy, engine, dst).unwrap_or_default();
        return proxy.agents.get(dst, &identity).ok_or("no-agent");
    }
    if matches!(from, From::Peer(_)) {
        return Err("not-in-zone");
    }
    proxy.routing.pick(&zone).map(|(_, c)| c).ok_or("zone-unreachable")
}

/// A place for a new flow of `source` under `limits.max_udp_flows` and its share.
fn admit(proxy: &Proxy, flows: &mut Flows, source: IpAddr) -> Result<(), &'static str> {
    let limits = &proxy.config.limits;
    if flows.by_key.len() >= limits.max_udp_flows {
        return Err("max_udp_flows");
    }
    let held = flows.per_source.entry(source).or_default();
    if *held >= limits.udp_flows_per_source() {
        return Err("max_udp_flows_per_source");
    }
    *held += 1;
    Ok(())
}
