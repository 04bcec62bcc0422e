//! Tunnel in: HTTP/2 CONNECT from sidecars (cleartext, prior knowledge), each carrying
//! `x-keyway-token`. The token is verified (structure, epoch, key of the identity the inventory
//! gives its source address, MAC, clock window, destination binding, replay), the policy decides,
//! and an allowed flow is connected onwards before the CONNECT is answered, so the client sees
//! 200 only for a flow that reaches its destination.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use keyway_policy::Verdict;
use keyway_policy::auth::decode_token;
use keyway_policy::engine::Peer;
use tokio::net::TcpListener;

use crate::accesslog::FlowLog;
use crate::app::{Ctx, Route, decide, relay};
use crate::deliver::{DENY_REASON_HEADER, to_external, to_sidecar};
use crate::overlay::open_flow;
use crate::state::now_ms;

/// The header carrying the token.
pub const TOKEN_HEADER: &str = "x-keyway-token";
/// The header naming the rule that denied a flow.
pub const RULE_HEADER: &str = "x-keyway-rule";

type Resp = Response<Empty<Bytes>>;

fn refuse(status: StatusCode, reason: &'static str, rule: Option<&str>) -> Resp {
    let mut r = Response::new(Empty::new());
    *r.status_mut() = status;
    r.headers_mut().insert(DENY_REASON_HEADER, HeaderValue::from_static(reason));
    if let Some(rule) = rule.and_then(|s| HeaderValue::from_str(s).ok()) {
        r.headers_mut().insert(RULE_HEADER, rule);
    }
    r
}

/// Accepts sidecar connections until the task is aborted.
pub async fn serve(ctx: Arc<Ctx>, listener: TcpListener) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "tunnel accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let ctx = ctx.clone();
                async move { Ok::<_, Infallible>(handle(ctx, peer, req).await) }
            });
            let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            builder.initial_stream_window_size(4 * 1024 * 1024).initial_connection_window_size(16 * 1024 * 1024);
            if let Err(e) = builder.serve_connection(TokioIo::new(tcp), svc).await {
                tracing::debug!(peer = %peer, error = %e, "tunnel connection ended");
            }
        });
    }
}

fn authority(req: &Request<Incoming>) -> Option<SocketAddr> {
    let a = req.uri().authority()?;
    let host = a.host().trim_start_matches('[').trim_end_matches(']');
    let ip: IpAddr = host.parse().ok()?;
    Some(SocketAddr::new(ip, a.port_u16()?))
}

async fn handle(ctx: Arc<Ctx>, peer: SocketAddr, req: Request<Incoming>) -> Resp {
    let dst = authority(&req);
    let mut log = FlowLog::new(
        ctx.metrics.clone(),
        ctx.flow_id(),
        "tunnel",
        peer.ip().to_string(),
        dst.map(|d| d.to_string()).unwrap_or_else(|| req.uri().to_string()),
    );
    if req.method() != Method::CONNECT {
        log.outcome("error", "not-connect");
        return refuse(StatusCode::METHOD_NOT_ALLOWED, "not-connect", None);
    }
    let Some(dst) = dst else {
        log.outcome("error", "bad-authority");
        return refuse(StatusCode::BAD_REQUEST, "bad-authority", None);
    };
    if ctx.is_draining() {
        log.outcome("error", "draining");
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "draining", None);
    }
    let Ok(permit) = ctx.flows.clone().try_acquire_owned() else {
        ctx.metrics.limit_refusals.with_label_values(&["max_flows"]).inc();
        log.outcome("error", "max-flows");
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "max-flows", None);
    };

    // The token.
    let deny_token = |log: &mut FlowLog, reason: &'static str| {
        ctx.metrics.token_failures.with_label_values(&[reason]).inc();
        log.outcome("deny", reason);
        refuse(StatusCode::FORBIDDEN, reason, None)
    };
    let Some(text) = req.headers().get(crate::tunnel::TOKEN_HEADER).and_then(|v| v.to_str().ok()) else {
        return deny_token(&mut log, "token-missing");
    };
    let sealed = match decode_token(text) {
        Ok(s) => s,
        Err(e) => return deny_token(&mut log, e.reason()),
    };
    let claims = *sealed.claims();
    log.src = claims.src.to_string();
    let engine = ctx.state.engine();
    let src = engine.peer_for(claims.src);
    let Peer::Workload(w) = src else { return deny_token(&mut log, "token-unknown-source") };
    let Some(workload) = engine.inventory().workloads.get(w) else {
        return deny_token(&mut log, "token-unknown-source");
    };
    let identity = workload.identity(&ctx.config.trust_domain);
    let known_addrs: Vec<IpAddr> =
        workload.sidecar_ips.iter().chain(workload.overlay_ips.iter()).map(|ip| ip.to_canonical()).collect();
    if !workload.sidecar_ips.is_empty() && !known_addrs.contains(&peer.ip().to_canonical()) {
        return deny_token(&mut log, "token-source-address");
    }
    let now = now_ms();
    let secrets = ctx.state.secrets();
    let Some(entry) = secrets.get(claims.epoch, now) else { return deny_token(&mut log, "token-epoch") };
    let key = match entry.secret.workload_key(&identity, claims.src, claims.epoch) {
        Ok(k) => k,
        Err(e) => return deny_token(&mut log, e.reason()),
    };
    if let Err(e) = sealed.verify(&key, now, ctx.config.window_ms) {
        return deny_token(&mut log, e.reason());
    }
    if claims.dst.to_canonical() != dst.ip().to_canonical() || claims.dst_port != dst.port() {
        return deny_token(&mut log, "token-wrong-destination");
    }
    log.identity = identity.clone();
    log.epoch = claims.epoch;

    // The decision.
    let decided = decide(&ctx, &engine, src, dst.ip(), dst.port());
    log.rule = decided.rule.clone();
    if decided.verdict == Verdict::Deny {
        log.outcome("deny", "policy-denied");
        return refuse(StatusCode::FORBIDDEN, "policy-denied", Some(&decided.rule));
    }
    let Some(route) = decided.route.clone() else {
        let reason = decided.unroutable.unwrap_or("unroutable");
        log.outcome("error", reason);
        return refuse(StatusCode::BAD_GATEWAY, reason, None);
    };
    drop(engine);
    // The nonce is spent only by a flow that is allowed to go on: a sidecar's tcp_proxy retries a
    // refused CONNECT with the same token, and a replay of a denied token is denied anyway.
    if let Err(reason) = check_replay(&ctx, &claims, now) {
        return deny_token(&mut log, reason);
    }

    // Onwards, then answer. A service whose chosen zone fails to take the flow is decided again
    // for an endpoint in the next zone of the locality order.
    let timeout = ctx.connect_timeout();
    let upgrade = hyper::upgrade::on(req);
    let mut decided = decided;
    let mut route = route;
    let mut avoid: Vec<String> = Vec::new();
    loop {
        match route {
            Route::Local { sidecar } => {
                log.next_hop = "local".into();
                let delivered = to_sidecar(
                    &ctx.sidecars,
                    &ctx.state,
                    &ctx.config.zone,
                    sidecar,
                    claims.src,
                    &identity,
                    decided.dst,
                    dst.port(),
                    timeout,
                    ctx.config.activation_ms(),
                )
                .await;
                return match delivered {
                    Ok(up) => spawn_relay(ctx.clone(), log, permit, upgrade, up),
                    Err(e) => {
                        tracing::warn!(error = %e, "delivery to a local sidecar failed");
                        log.outcome("error", e.reason());
                        refuse(StatusCode::BAD_GATEWAY, e.reason(), None)
                    }
                };
            }
            Route::External(addr) => {
                log.next_hop = "external".into();
                return match to_external(addr, timeout).await {
                    Ok(up) => spawn_relay(ctx.clone(), log, permit, upgrade, up),
                    Err(e) => {
                        log.outcome("error", e.reason());
                        refuse(StatusCode::BAD_GATEWAY, e.reason(), None)
                    }
                };
            }
            Route::Zone(zone) => {
                let to = SocketAddr::new(decided.dst, dst.port());
                match open_flow(&ctx, &zone, &mut log, claims.src, &identity, to, &decided.rule).await {
                    Ok(stream) => return spawn_relay(ctx.clone(), log, permit, upgrade, stream),
                    Err((StatusCode::SERVICE_UNAVAILABLE, "zone-unreachable"))
                        if decided.service && avoid.len() < 8 =>
                    {
                        tracing::warn!(zone = %zone, "no gateway of the chosen zone took the flow; trying the next zone");
                        avoid.push(zone);
                        let engine = ctx.state.engine();
                        decided = crate::app::decide_avoiding(&ctx, &engine, src, dst.ip(), dst.port(), &avoid);
                        log.rule = decided.rule.clone();
                        if decided.verdict == Verdict::Deny {
                            log.outcome("deny", "policy-denied");
                            return refuse(StatusCode::FORBIDDEN, "policy-denied", Some(&decided.rule));
                        }
                        let Some(next) = decided.route.clone() else {
                            let reason = decided.unroutable.unwrap_or("unroutable");
                            log.outcome("error", reason);
                            return refuse(StatusCode::SERVICE_UNAVAILABLE, reason, None);
                        };
                        route = next;
                    }
                    Err((status, reason)) => {
                        log.outcome(if status == StatusCode::FORBIDDEN { "deny" } else { "error" }, reason);
                        return refuse(status, reason, None);
                    }
                }
            }
        }
    }
}

fn spawn_relay<S>(
    ctx: Arc<Ctx>,
    mut log: FlowLog,
    permit: tokio::sync::OwnedSemaphorePermit,
    upgrade: hyper::upgrade::OnUpgrade,
    upstream: S,
) -> Resp
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    log.outcome("allow", "allowed");
    log.set_active();
    tokio::spawn(async move {
        let _permit = permit;
        match upgrade.await {
            Ok(client) => {
                let (up, down) = (log.bytes_up.clone(), log.bytes_down.clone());
                relay(TokioIo::new(client), upstream, &up, &down).await;
            }
            Err(e) => {
                tracing::debug!(error = %e, "client went away before the tunnel opened");
                log.outcome("error", "client-gone");
            }
        }
        drop(ctx);
        drop(log);
    });
    Response::new(Empty::new())
}

/// Remembers the token's nonce; a nonce seen before within the window is a replay.
fn check_replay(ctx: &Ctx, claims: &keyway_policy::auth::TokenClaims, now: u64) -> Result<(), &'static str> {
    let Ok(mut cache) = ctx.state.replay.lock() else { return Err("replay-cache-unavailable") };
    let r = cache.check_and_insert(claims.src, claims.nonce, claims.issued_at_ms, now);
    ctx.metrics.replay_cache_entries.set(cache.len() as i64);
    r.map_err(|e| e.reason())
}
