//! The edge: QUIC from `keyway agent`s (ALPN `keyway-edge/1`), on `listen.edge`. An agent is a
//! workload of this zone, a device outside any cluster or a pod's UDP carrier, and proves it with
//! a certificate of the overlay CA (a device's, `keyway ca issue-device`) or of the mesh CA (a
//! pod's own), not revoked (`edge.crls`). Its certificate's SPIFFE id must be the identity of a
//! workload of this zone; every flow and datagram it sends must come from an overlay address of
//! such a workload, and is then decided like a sidecar's flow. TCP travels one flow per stream
//! (the overlay's flow header and status), UDP in datagrams ([`super::udp`]).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use keyway_policy::Protocol;

use super::accesslog::FlowLog;
use super::agents::{AgentConn, source_of};
use super::relay::BoxIo;
use super::stream::{accept_loop, conclude, read_header};
use super::{Entry, Flow, Proxy, Refusal};

/// QUIC close code for an agent this gateway does not take.
const CLOSE_REFUSED: u32 = 3;

/// Accepts agent connections until the endpoint closes.
pub async fn serve(proxy: Arc<Proxy>, endpoint: quinn::Endpoint) {
    accept_loop(proxy, endpoint, |p, conn| async move {
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
                w.zone.as_deref() == Some(p.config.zone.as_str()) && w.has_identity(&p.config.trust_domain, &identity)
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
