//! The edge: QUIC from `keyway agent`s (ALPN `keyway-edge/1`), on `listen.edge`. An agent is a
//! workload of this zone, a device outside any cluster or a pod's UDP carrier, and proves it with
//! a certificate of the overlay CA (a device's, `keyway ca issue-device`) or of the mesh CA (a
//! pod's own), not revoked (`edge.crls`). Its certificate's SPIFFE id must be the identity of a
//! workload of this zone; every flow and datagram it sends must come from an overlay address of
//! such a workload, and is then decided like a sidecar's flow. TCP travels one flow per stream
//! (the overlay's flow header and status), UDP in datagrams ([`super::udp`]).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use keyway_policy::engine::Peer;
use keyway_policy::flow::{FlowHeader, StatusCode as FlowStatus};
use keyway_policy::{Engine, Protocol};

use super::accesslog::FlowLog;
use super::overlay::{conclude, exchange, read_header};
use super::refusal::{DeliverError, Unroutable};
use super::relay::BoxIo;
use super::{Entry, Flow, Proxy, Refusal};

/// QUIC close code for an agent this gateway does not take.
const CLOSE_REFUSED: u32 = 3;

/// One agent connection: who it is (the SPIFFE id of its certificate).
#[derive(Debug, Clone)]
pub struct AgentConn {
    /// The connection.
    pub conn: quinn::Connection,
    /// Its certificate's SPIFFE id.
    pub identity: String,
}

/// The agents connected to this gateway, by the overlay addresses they carry.
#[derive(Debug, Default)]
pub struct Agents {
    by_ip: Mutex<HashMap<IpAddr, Vec<AgentConn>>>,
}

impl Agents {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Vec<AgentConn>>> {
        self.by_ip.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn add(&self, ips: &[IpAddr], agent: &AgentConn) {
        let mut all = self.lock();
        for ip in ips {
            all.entry(ip.to_canonical()).or_default().push(agent.clone());
        }
    }

    fn remove(&self, conn: &quinn::Connection) {
        let id = conn.stable_id();
        self.lock().retain(|_, v| {
            v.retain(|a| a.conn.stable_id() != id);
            !v.is_empty()
        });
    }

    /// The newest open connection of an agent of `identity` carrying `ip`.
    pub fn get(&self, ip: IpAddr, identity: &str) -> Option<quinn::Connection> {
        let all = self.lock();
        all.get(&ip.to_canonical())?
            .iter()
            .rev()
            .find(|a| a.identity == identity && a.conn.close_reason().is_none())
            .map(|a| a.conn.clone())
    }

    /// Every connected agent, once each.
    pub fn all(&self) -> Vec<AgentConn> {
        let mut seen = std::collections::HashSet::new();
        self.lock().values().flatten().filter(|a| seen.insert(a.conn.stable_id())).cloned().collect()
    }
}

/// The workload of this zone that owns overlay address `src`, if its identity is `identity`:
/// the source check of everything an agent sends.
pub fn source_of(proxy: &Proxy, engine: &Engine, src: IpAddr, identity: &str) -> Option<Peer> {
    let peer = engine.peer_for(src);
    let Peer::Workload(w) = peer else { return None };
    let w = engine.inventory().workloads.get(w)?;
    let mine = w.zone.as_deref() == Some(proxy.config.zone.as_str());
    (mine && w.identity(&proxy.config.trust_domain) == identity).then_some(peer)
}

/// The identity of the workload at `ip`, if it is one.
pub fn identity_at(proxy: &Proxy, engine: &Engine, ip: IpAddr) -> Option<String> {
    let Peer::Workload(w) = engine.peer_for(ip) else { return None };
    Some(engine.inventory().workloads.get(w)?.identity(&proxy.config.trust_domain))
}

/// Accepts agent connections until the endpoint closes.
pub async fn serve(proxy: Arc<Proxy>, endpoint: quinn::Endpoint) {
    super::overlay::accept_loop(proxy, endpoint, |p, conn| async move {
        // Agents count against the tunnel's connection limits (an agent is one connection per
        // gateway; a source opening more is flooding).
        let _permit = match p.admit_tunnel_connection(conn.remote_address().ip()) {
            Ok(permit) => permit,
            Err(limit) => {
                p.metrics.limit_refusals.with_label_values(&[limit]).inc();
                conn.close(quinn::VarInt::from_u32(CLOSE_REFUSED), b"too many connections");
                return;
            }
        };
        let chain = crate::tls::peer_chain(&conn);
        // A device's certificate (of the overlay CA) must be of this zone's own CA when the zone
        // has one: another zone's issuer speaks for its own zone's devices only.
        let mesh = crate::tls::chains_to(&chain, p.state.mesh().roots());
        if !mesh && !p.routing.issued_for_zone(&p.config.zone, &chain) {
            tracing::error!(remote = %conn.remote_address(), "agent certificate not of this zone's CA; closed");
            p.metrics.udp_datagrams.with_label_values(&["agent-not-of-zone-ca"]).inc();
            conn.close(quinn::VarInt::from_u32(CLOSE_REFUSED), b"not of this zone's CA");
            return;
        }
        let identity = chain.first().and_then(crate::mesh::spiffe_id).unwrap_or_default();
        let engine = p.state.engine();
        let ips: Vec<IpAddr> = engine
            .inventory()
            .workloads
            .iter()
            .filter(|w| {
                w.zone.as_deref() == Some(p.config.zone.as_str()) && w.identity(&p.config.trust_domain) == identity
            })
            .flat_map(|w| w.overlay_ips.iter().copied())
            .collect();
        if ips.is_empty() {
            tracing::error!(presented = %identity, remote = %conn.remote_address(),
                "agent certificate names no workload of this zone; closed");
            p.metrics.udp_datagrams.with_label_values(&["agent-unknown"]).inc();
            conn.close(quinn::VarInt::from_u32(CLOSE_REFUSED), b"not a workload of this zone");
            return;
        }
        drop(engine);
        let agent = AgentConn { conn: conn.clone(), identity };
        tracing::info!(identity = %agent.identity, remote = %conn.remote_address(), addresses = ?ips, "agent connected");
        p.agents.add(&ips, &agent);
        p.metrics.agents.inc();
        p.tasks.spawn(super::udp::from_agent_connection(p.clone(), agent.clone()));
        while let Ok((send, recv)) = conn.accept_bi().await {
            p.tasks.spawn(agent_stream(p.clone(), agent.identity.clone(), send, recv));
        }
        p.agents.remove(&conn);
        p.metrics.agents.dec();
        tracing::info!(identity = %agent.identity, reason = ?conn.close_reason(), "agent disconnected");
    })
    .await;
}

/// One TCP flow of an agent: checked, decided and sent on like a sidecar's.
async fn agent_stream(proxy: Arc<Proxy>, identity: String, send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let mut log = FlowLog::new(proxy.metrics.clone(), proxy.flow_id(), Entry::Edge, String::new(), String::new());
    log.identity.clone_from(&identity);
    let accepted = Box::pin(accept(&proxy, &identity, &mut recv, &mut log)).await;
    conclude(&proxy, log, (send, recv), accepted).await;
}

async fn accept(
    proxy: &Proxy,
    identity: &str,
    recv: &mut quinn::RecvStream,
    log: &mut FlowLog,
) -> Result<(BoxIo, super::FlowPermit), Refusal> {
    let header = read_header(recv).await?;
    let dst = SocketAddr::new(header.dst, header.dst_port);
    log.src = header.src.to_string();
    log.dst = dst.to_string();
    if header.protocol != Protocol::Tcp {
        return Err(Refusal::Header("flow-protocol"));
    }
    let engine = proxy.state.engine();
    // The agent is not trusted with its source address: it must be one of its own workload's.
    let src = source_of(proxy, &engine, header.src, identity).ok_or(Refusal::Header("edge-source-address"))?;
    let permit = proxy.admit(header.src)?;
    let decided = proxy.decide(&engine, src, dst, &[]);
    log.note_rule(&decided);
    let decided = decided?;
    let flow = Flow { id: log.flow_id, src: header.src, identity: identity.to_owned(), dst };
    let upstream = super::tunnel::onwards(proxy, &engine, flow, src, decided, log).await?;
    Ok((upstream, permit))
}

/// Opens `flow` to the agent of its destination (a device of this zone), over the agent's
/// connection: the flow header, then its answer. Returns the stream once the agent connected it.
pub async fn open_to_agent(proxy: &Proxy, flow: &Flow, log: &mut FlowLog) -> Result<BoxIo, Refusal> {
    let identity = identity_at(proxy, &proxy.state.engine(), flow.dst.ip()).unwrap_or_default();
    let conn = proxy.agents.get(flow.dst.ip(), &identity).ok_or(Refusal::Unroutable(Unroutable::NoAgent))?;
    let header = FlowHeader {
        flow_id: flow.id,
        src: flow.src,
        dst: flow.dst.ip(),
        dst_port: flow.dst.port(),
        protocol: Protocol::Tcp,
        identity: flow.identity.clone(),
        src_zone: proxy.config.zone.clone(),
        src_gateway: proxy.config.name.clone(),
        verdict: log.rule.clone(),
    }
    .encode();
    let timeout = proxy.connect_timeout();
    let addr = flow.dst;
    let attempt = async {
        let opened = conn.open_bi().await;
        exchange(opened, &header).await
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok((send, recv, FlowStatus::Connected, _))) => Ok(Box::new(tokio::io::join(recv, send))),
        Ok(Ok((_, _, code, reason))) => {
            Err(Refusal::Delivery(DeliverError::Refused { addr, status: code as u16, reason }))
        }
        Ok(Err(reason)) => Err(Refusal::Delivery(DeliverError::Connect { addr, reason })),
        Err(_) => Err(Refusal::Delivery(DeliverError::Connect {
            addr,
            reason: format!("the agent did not answer within {timeout:?}"),
        })),
    }
}

/// Closes the connections of agents whose certificate `verifier` no longer takes (revoked since,
/// or its CA no longer trusted).
pub fn recheck(proxy: &Proxy, verifier: &dyn rustls::server::danger::ClientCertVerifier) {
    let now = rustls_pki_types::UnixTime::now();
    for agent in proxy.agents.all() {
        let chain = crate::tls::peer_chain(&agent.conn);
        let ok = chain.split_first().is_some_and(|(leaf, rest)| verifier.verify_client_cert(leaf, rest, now).is_ok());
        if !ok {
            tracing::warn!(identity = %agent.identity, "agent certificate no longer accepted (revoked?); closed");
            agent.conn.close(quinn::VarInt::from_u32(CLOSE_REFUSED), b"certificate revoked");
        }
    }
}
