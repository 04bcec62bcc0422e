//! The overlay: QUIC between gateways of different zones (mutual TLS with certificates of the
//! overlay CA only, ALPN `keyway/1`), one long-lived connection per peer gateway and one
//! bidirectional stream per flow. A stream starts with the flow header; the receiving gateway
//! checks that the sender is a gateway of the overlay, re-evaluates the flow, delivers it to the
//! destination sidecar with a ticket and answers with a status before bytes flow both ways.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keyway_policy::engine::Peer;
use keyway_policy::flow::{FlowHeader, StatusCode as FlowStatus};

use super::accesslog::FlowLog;
use super::relay::{BoxIo, Holding};
use super::stream::{HANDSHAKE_TIMEOUT, accept_loop, conclude, exchange, read_header};
use super::{Entry, Flow, Proxy, Refusal, Route, deliver};
use crate::tls::{GatewayIdentity, peer_identity};

/// Opens `flow` to a gateway of `zone`: tries the connected replicas until one answers, so a
/// replica lost a moment ago costs no flow. Returns the stream once the far side is connected.
pub async fn open(proxy: &Proxy, flow: &Flow, zone: &str, log: &mut FlowLog) -> Result<BoxIo, Refusal> {
    let header = FlowHeader {
        flow_id: flow.id,
        src: flow.src,
        dst: flow.dst.ip(),
        dst_port: flow.dst.port(),
        protocol: keyway_policy::Protocol::Tcp,
        identity: flow.identity.clone(),
        src_zone: proxy.config.zone.clone(),
        src_gateway: proxy.config.name.clone(),
        verdict: log.rule.clone(),
    }
    .encode();
    let replicas = proxy.config.zone(zone).map_or(1, |z| z.gateways.len());
    let mut full = false;
    for _ in 0..replicas.max(1) {
        let Some((peer, conn)) = proxy.routing.pick(zone) else { break };
        log.next_hop = format!("{}/{}", peer.id.zone, peer.id.name);
        // One source holds at most its share of a peer connection's streams; and a stream now or
        // never: a connection holding the peer's `max_flows_per_peer` streams would make the flow
        // wait for another flow to end.
        let Some(share) = proxy.admit_to_peer(peer.address, flow.src) else {
            full = true;
            continue;
        };
        let Ok(opened) = tokio::time::timeout(Duration::ZERO, conn.open_bi()).await else {
            full = true;
            continue;
        };
        let attempt = exchange(opened, &header);
        // A replica that goes silent while the flow waits for its answer is left for the next.
        let outcome = tokio::select! {
            r = tokio::time::timeout(HANDSHAKE_TIMEOUT, attempt) => r,
            () = peer.silence() => {
                tracing::warn!(peer = %log.next_hop, "overlay peer went silent before answering; trying another replica");
                continue;
            }
        };
        match outcome {
            Ok(Ok((send, recv, FlowStatus::Connected, _))) => {
                return Ok(Box::new(Holding { io: tokio::io::join(recv, send), held: share }));
            }
            Ok(Ok((_, _, FlowStatus::Denied, reason))) => {
                tracing::info!(peer = %log.next_hop, rule = %reason, "destination zone denied the flow");
                log.rule = format!("{} | destination zone: {reason}", log.rule);
                return Err(Refusal::RemotePolicy { rule: log.rule.clone() });
            }
            Ok(Ok((_, _, FlowStatus::Unreachable, reason))) => {
                tracing::warn!(peer = %log.next_hop, reason = %reason, "destination unreachable from its zone");
                return Err(Refusal::RemoteUnreachable(reason));
            }
            Ok(Ok((_, _, FlowStatus::Overloaded, _))) => continue,
            Ok(Ok((_, _, FlowStatus::Refused, reason))) => {
                tracing::error!(peer = %log.next_hop, reason = %reason, "peer gateway refused the flow header");
                return Err(Refusal::RemoteRefused(reason));
            }
            Ok(Err(e)) => {
                tracing::warn!(peer = %log.next_hop, error = %e, "overlay stream failed; trying another replica");
                peer.mark_down();
            }
            Err(_) => {
                tracing::warn!(peer = %log.next_hop, "overlay stream timed out; trying another replica");
                peer.mark_down();
            }
        }
    }
    Err(if full { Refusal::Limit(super::refusal::Limit::MaxFlowsPerPeer) } else { Refusal::ZoneUnreachable })
}

/// Accepts overlay connections until the endpoint closes (see [`accept_loop`]); each connection
/// must be a configured gateway's, and carries one flow per stream and UDP in datagrams.
pub async fn serve(proxy: Arc<Proxy>, endpoint: quinn::Endpoint) {
    accept_loop(proxy, endpoint, |p, conn| async move {
        let peer = match peer_identity(&conn) {
            Ok(id) if p.routing.accepts(&p.config, &id, &crate::tls::peer_chain(&conn)) => id,
            Ok(id) => {
                tracing::error!(presented = %id.spiffe_id(), remote = %conn.remote_address(),
                    "overlay connection from a certificate that is not a configured gateway; closed");
                conn.close(quinn::VarInt::from_u32(2), b"not a gateway of this overlay");
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, remote = %conn.remote_address(), "overlay peer identity unreadable; closed");
                conn.close(quinn::VarInt::from_u32(2), b"bad identity");
                return;
            }
        };
        p.tasks.spawn(super::udp::from_peer_connection(p.clone(), peer.zone.clone(), conn.clone()));
        while let Ok((send, recv)) = conn.accept_bi().await {
            p.tasks.spawn(handle_stream(p.clone(), peer.clone(), send, recv));
        }
    })
    .await;
}

async fn handle_stream(proxy: Arc<Proxy>, peer: GatewayIdentity, send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let mut log = FlowLog::new(proxy.metrics.clone(), 0, Entry::Overlay, String::new(), String::new());
    log.next_hop = "local".into();
    // Boxed: the decision and delivery are done with once the flow is connected, and a task is as
    // large as its largest state for as long as it runs (8.7 KiB per open flow unboxed).
    let accepted = Box::pin(accept(&proxy, &peer, &mut recv, &mut log)).await;
    conclude(&proxy, log, (send, recv), accepted).await;
}

/// Reads and checks a peer's flow header, decides the flow again and delivers it.
async fn accept(
    proxy: &Proxy,
    peer: &GatewayIdentity,
    recv: &mut quinn::RecvStream,
    log: &mut FlowLog,
) -> Result<(BoxIo, super::FlowPermit), Refusal> {
    let header = read_header(recv).await?;
    let dst = SocketAddr::new(header.dst, header.dst_port);
    log.flow_id = header.flow_id;
    log.src = header.src.to_string();
    log.dst = dst.to_string();
    log.identity.clone_from(&header.identity);
    if header.src_zone != peer.zone || header.src_gateway != peer.name {
        return Err(Refusal::Header("flow-sender-mismatch"));
    }
    let permit = proxy.admit(header.src)?;
    let engine = proxy.state.engine();
    let src = engine.peer_for(header.src);
    let workload = match src {
        Peer::Workload(w) => engine.inventory().workloads.get(w),
        Peer::Ip(_) => None,
    };
    let Some(workload) = workload.filter(|w| w.has_identity(&proxy.config.trust_domain, &header.identity)) else {
        return Err(Refusal::Header("flow-identity-mismatch"));
    };
    // A peer gateway speaks only for the workloads of its own zone: a compromised gateway or a
    // leaked zone certificate impersonates that zone's workloads, no others.
    if workload.zone.as_deref() != Some(peer.zone.as_str()) {
        return Err(Refusal::Header("flow-source-zone"));
    }
    let decided = proxy.decide(&engine, src, dst, &[]);
    log.note_rule(&decided);
    let flow = Flow { id: header.flow_id, src: header.src, identity: header.identity, dst };
    let upstream = match decided?.route {
        Route::Local { sidecar, recipient } => deliver::to_sidecar(proxy, &flow, sidecar, &recipient).await?,
        Route::Agent(_) => {
            log.next_hop = "agent".into();
            super::agents::open_to_agent(proxy, &flow, log).await?
        }
        _ => return Err(Refusal::Unroutable(super::refusal::Unroutable::NotInZone)),
    };
    Ok((upstream, permit))
}
