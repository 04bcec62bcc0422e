//! The overlay: QUIC between gateways of different zones (mutual TLS with certificates of the
//! overlay CA only, ALPN `keyway/1`), one long-lived connection per peer gateway and one
//! bidirectional stream per flow. A stream starts with the flow header; the receiving gateway
//! checks that the sender is a gateway of the overlay, re-evaluates the flow, delivers it to the
//! destination sidecar with a ticket and answers with a status before bytes flow both ways.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use keyway_policy::Verdict;
use keyway_policy::engine::Peer;
use tokio::io::Join;

use crate::accesslog::FlowLog;
use crate::app::{Ctx, Route, decide, relay};
use crate::deliver::to_sidecar;
use crate::flow::{FlowHeader, Status, StatusCode as FlowStatus};
use crate::tls::{GatewayIdentity, peer_identity};

/// One flow's overlay stream as a single byte stream.
pub type OverlayStream = Join<quinn::RecvStream, quinn::SendStream>;

/// How long the first bytes of a stream (header, status) may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens a flow to a gateway of `zone`: tries the connected replicas until one answers, so a
/// replica lost a moment ago costs no flow. Returns the stream once the far side is connected,
/// or the HTTP status and reason label to answer the sidecar with.
pub async fn open_flow(
    ctx: &Ctx,
    zone: &str,
    log: &mut FlowLog,
    src: IpAddr,
    identity: &str,
    dst: SocketAddr,
    rule: &str,
) -> Result<OverlayStream, (StatusCode, &'static str)> {
    let header = FlowHeader {
        flow_id: log.flow_id,
        src,
        dst: dst.ip(),
        dst_port: dst.port(),
        protocol: keyway_policy::Protocol::Tcp,
        identity: identity.to_owned(),
        src_zone: ctx.config.zone.clone(),
        src_gateway: ctx.config.name.clone(),
        verdict: rule.to_owned(),
    }
    .encode();
    let replicas = ctx.config.zone(zone).map_or(1, |z| z.gateways.len());
    for _ in 0..replicas.max(1) {
        let Some((peer, conn)) = ctx.routing.pick(zone) else { break };
        log.next_hop = format!("{}/{}", peer.id.zone, peer.id.name);
        let attempt = async {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            send.write_all(&header).await.map_err(|e| e.to_string())?;
            let mut prefix = [0u8; 6];
            recv.read_exact(&mut prefix).await.map_err(|e| e.to_string())?;
            let (code, n) = Status::decode_prefix(&prefix).map_err(|e| e.to_string())?;
            let mut reason = vec![0u8; n];
            recv.read_exact(&mut reason).await.map_err(|e| e.to_string())?;
            Ok::<_, String>((send, recv, code, String::from_utf8_lossy(&reason).into_owned()))
        };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, attempt).await {
            Ok(Ok((send, recv, FlowStatus::Connected, _))) => return Ok(tokio::io::join(recv, send)),
            Ok(Ok((_, _, FlowStatus::Denied, reason))) => {
                tracing::info!(peer = %log.next_hop, rule = %reason, "destination zone denied the flow");
                log.rule = format!("{} | destination zone: {reason}", log.rule);
                return Err((StatusCode::FORBIDDEN, "policy-denied-remote"));
            }
            Ok(Ok((_, _, FlowStatus::Unreachable, reason))) => {
                tracing::warn!(peer = %log.next_hop, reason = %reason, "destination unreachable from its zone");
                return Err((StatusCode::BAD_GATEWAY, "destination-unreachable"));
            }
            Ok(Ok((_, _, FlowStatus::Overloaded, _))) => continue,
            Ok(Ok((_, _, FlowStatus::Refused, reason))) => {
                tracing::error!(peer = %log.next_hop, reason = %reason, "peer gateway refused the flow header");
                return Err((StatusCode::BAD_GATEWAY, "overlay-refused"));
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
    Err((StatusCode::SERVICE_UNAVAILABLE, "zone-unreachable"))
}

/// Accepts overlay connections until the endpoint closes.
pub async fn serve(ctx: Arc<Ctx>, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "overlay handshake failed");
                    return;
                }
            };
            let peer = match peer_identity(&conn) {
                Ok(id) if is_overlay_gateway(&ctx, &id) => id,
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
            while let Ok((send, recv)) = conn.accept_bi().await {
                tokio::spawn(handle_stream(ctx.clone(), peer.clone(), send, recv));
            }
        });
    }
}

fn is_overlay_gateway(ctx: &Ctx, id: &GatewayIdentity) -> bool {
    id.trust_domain == ctx.config.trust_domain
        && ctx.config.zone(&id.zone).is_some_and(|z| z.gateways.iter().any(|g| g.name == id.name))
}

async fn answer(send: &mut quinn::SendStream, code: FlowStatus, reason: &str) {
    let _ = send.write_all(&Status { code, reason: reason.to_owned() }.encode()).await;
}

async fn handle_stream(ctx: Arc<Ctx>, peer: GatewayIdentity, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let read_header = async {
        let mut prefix = [0u8; 6];
        recv.read_exact(&mut prefix).await.map_err(|_| "flow-length")?;
        let n = FlowHeader::body_len(&prefix).map_err(|e| e.reason())?;
        let mut all = prefix.to_vec();
        all.resize(6 + n, 0);
        recv.read_exact(all.get_mut(6..).unwrap_or_default()).await.map_err(|_| "flow-length")?;
        FlowHeader::decode(&all).map_err(|e| e.reason())
    };
    let header = match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_header).await {
        Ok(Ok(h)) => h,
        Ok(Err(reason)) => {
            ctx.metrics.overlay_streams.with_label_values(&[reason]).inc();
            answer(&mut send, FlowStatus::Refused, reason).await;
            let _ = send.finish();
            return;
        }
        Err(_) => {
            ctx.metrics.overlay_streams.with_label_values(&["header-timeout"]).inc();
            return;
        }
    };
    let mut log = FlowLog::new(
        ctx.metrics.clone(),
        header.flow_id,
        "overlay",
        header.src.to_string(),
        SocketAddr::new(header.dst, header.dst_port).to_string(),
    );
    log.identity = header.identity.clone();
    log.next_hop = "local".into();
    let refuse = |log: &mut FlowLog, verdict: &'static str, reason: &'static str| {
        ctx.metrics.overlay_streams.with_label_values(&[reason]).inc();
        log.outcome(verdict, reason);
    };
    if header.src_zone != peer.zone || header.src_gateway != peer.name {
        refuse(&mut log, "error", "flow-sender-mismatch");
        answer(&mut send, FlowStatus::Refused, "flow-sender-mismatch").await;
        let _ = send.finish();
        return;
    }
    if ctx.is_draining() {
        refuse(&mut log, "error", "draining");
        answer(&mut send, FlowStatus::Overloaded, "draining").await;
        let _ = send.finish();
        return;
    }
    let Ok(permit) = ctx.flows.clone().try_acquire_owned() else {
        ctx.metrics.limit_refusals.with_label_values(&["max_flows"]).inc();
        refuse(&mut log, "error", "max-flows");
        answer(&mut send, FlowStatus::Overloaded, "max-flows").await;
        let _ = send.finish();
        return;
    };
    let engine = ctx.state.engine();
    let src = engine.peer_for(header.src);
    let identity_ok = match src {
        Peer::Workload(w) => {
            engine.inventory().workloads.get(w).is_some_and(|w| w.identity(&ctx.config.trust_domain) == header.identity)
        }
        Peer::Ip(_) => false,
    };
    if !identity_ok {
        refuse(&mut log, "deny", "flow-identity-mismatch");
        answer(&mut send, FlowStatus::Refused, "flow-identity-mismatch").await;
        let _ = send.finish();
        return;
    }
    let decided = decide(&ctx, &engine, src, header.dst, header.dst_port);
    drop(engine);
    log.rule = decided.rule.clone();
    if decided.verdict == Verdict::Deny {
        refuse(&mut log, "deny", "policy-denied");
        answer(&mut send, FlowStatus::Denied, &decided.rule).await;
        let _ = send.finish();
        return;
    }
    let Some(Route::Local { sidecar }) = decided.route else {
        refuse(&mut log, "error", "not-in-zone");
        answer(&mut send, FlowStatus::Unreachable, "not-in-zone").await;
        let _ = send.finish();
        return;
    };
    let upstream = match to_sidecar(
        &ctx.sidecars,
        &ctx.state,
        &ctx.config.zone,
        sidecar,
        header.src,
        &header.identity,
        header.dst,
        header.dst_port,
        ctx.connect_timeout(),
        ctx.config.activation_ms(),
    )
    .await
    {
        Ok(u) => u,
        Err(e) => {
            tracing::warn!(error = %e, "delivery to a local sidecar failed");
            refuse(&mut log, "error", e.reason());
            answer(&mut send, FlowStatus::Unreachable, e.reason()).await;
            let _ = send.finish();
            return;
        }
    };
    answer(&mut send, FlowStatus::Connected, "").await;
    ctx.metrics.overlay_streams.with_label_values(&["connected"]).inc();
    log.outcome("allow", "allowed");
    log.set_active();
    let (up, down) = (log.bytes_up.clone(), log.bytes_down.clone());
    relay(tokio::io::join(recv, send), upstream, &up, &down).await;
    drop(permit);
}
