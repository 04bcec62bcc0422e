//! The agents connected to this gateway's edge, by the overlay addresses they carry; what checks
//! an agent's source address; and a flow opened to a device's agent.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use keyway_policy::engine::Peer;
use keyway_policy::flow::{FlowHeader, StatusCode as FlowStatus};
use keyway_policy::{Engine, Protocol};

use super::accesslog::FlowLog;
use super::refusal::{DeliverError, Unroutable};
use super::relay::BoxIo;
use super::stream::exchange;
use super::{Flow, Proxy, Refusal};

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

    pub(super) fn add(&self, ips: &[IpAddr], agent: &AgentConn) {
        let mut all = self.lock();
        for ip in ips {
            all.entry(ip.to_canonical()).or_default().push(agent.clone());
        }
    }

    pub(super) fn remove(&self, conn: &quinn::Connection) {
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
    (mine && w.has_identity(&proxy.config.trust_domain, identity)).then_some(peer)
}

/// The identity of the workload at `ip`, if it is one.
pub fn identity_at(proxy: &Proxy, engine: &Engine, ip: IpAddr) -> Option<String> {
    let Peer::Workload(w) = engine.peer_for(ip) else { return None };
    Some(engine.inventory().workloads.get(w)?.identity(&proxy.config.trust_domain))
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
