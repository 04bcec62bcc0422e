//! Tunnel in: HTTP/2 over mutual TLS from sidecars, each client authenticated by its mesh
//! workload certificate ([`crate::mesh`]). A CONNECT carries a token, which is verified
//! (structure, epoch, key of the identity the inventory gives its source address, that identity
//! being the client certificate's, MAC, clock window, destination binding, replay); the policy
//! decides, and an allowed flow is connected onwards before the CONNECT is answered, so the
//! client sees 200 only for a flow that reaches its destination. A `GET` of the key service path
//! is the key service ([`crate::keyservice`]).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use keyway_policy::Engine;
use keyway_policy::auth::{TokenClaims, decode_token};
use keyway_policy::engine::Peer;
use tokio::net::TcpListener;

use super::accesslog::FlowLog;
use super::relay::{BoxIo, relay};
use super::{Decision, Entry, Flow, FlowPermit, Proxy, Refusal, Route, deliver, overlay};
use keyway_policy::wire::{DENY_REASON_HEADER, RULE_HEADER, TOKEN_HEADER};

type Resp = Response<Full<Bytes>>;

/// HTTP/2 keep-alive on sidecar connections: a ping this often, and the connection is dropped when
/// one goes unanswered this long.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// How many zones a service's flow may fail over through.
const MAX_FAILOVERS: usize = 8;

fn refuse(r: &Refusal) -> Resp {
    let mut resp = Response::new(Full::default());
    *resp.status_mut() = r.http_status();
    resp.headers_mut().insert(DENY_REASON_HEADER, HeaderValue::from_static(r.label()));
    if let Some(rule) = r.rule().and_then(|s| HeaderValue::from_str(s).ok()) {
        resp.headers_mut().insert(RULE_HEADER, rule);
    }
    resp
}

/// Accepts sidecar connections until the gateway stops. A connection that has not finished its
/// TLS handshake and sent a request within `limits.header_timeout_ms` is closed, and so is one
/// whose client certificate carries no SPIFFE id; HTTP/2 keep-alive pings drop peers that
/// vanished without closing.
pub async fn serve(proxy: Arc<Proxy>, listener: TcpListener) {
    let header_timeout = Duration::from_millis(proxy.config.limits.header_timeout_ms);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "tunnel accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let permit = match proxy.admit_tunnel_connection(peer.ip()) {
            Ok(permit) => permit,
            Err(limit) => {
                proxy.metrics.limit_refusals.with_label_values(&[limit]).inc();
                continue; // dropped: closed at once
            }
        };
        let _ = tcp.set_nodelay(true);
        let p = proxy.clone();
        proxy.tasks.spawn(async move {
            let _permit = permit;
            let tasks = p.tasks.clone();
            let acceptor = tokio_rustls::TlsAcceptor::from(p.state.mesh().server_config());
            let tls = match tokio::time::timeout(header_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    p.metrics.limit_refusals.with_label_values(&["tls-handshake"]).inc();
                    tracing::debug!(peer = %peer, error = %e, "tunnel TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer = %peer, "no TLS handshake within the header timeout; closed");
                    return;
                }
            };
            let Some(client) = crate::mesh::peer_id(tls.get_ref().1) else {
                tracing::debug!(peer = %peer, "client certificate without one SPIFFE id; closed");
                return;
            };
            let client: Arc<str> = client.into();
            let requested = Arc::new(AtomicBool::new(false));
            let seen = requested.clone();
            let svc = service_fn(move |req| {
                seen.store(true, Ordering::Release);
                let p = p.clone();
                let client = client.clone();
                async move { Ok::<_, Infallible>(handle(p, peer, &client, req).await) }
            });
            let mut builder = hyper::server::conn::http2::Builder::new(tasks);
            builder
                .initial_stream_window_size(4 * 1024 * 1024)
                .initial_connection_window_size(16 * 1024 * 1024)
                .timer(TokioTimer::new())
                .keep_alive_interval(Some(KEEPALIVE_INTERVAL))
                .keep_alive_timeout(KEEPALIVE_TIMEOUT);
            let conn = builder.serve_connection(TokioIo::new(tls), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!(peer = %peer, error = %e, "tunnel connection ended");
                    }
                    return;
                }
                () = tokio::time::sleep(header_timeout) => {
                    if !requested.load(Ordering::Acquire) {
                        tracing::debug!(peer = %peer, "no request within the header timeout; closed");
                        return;
                    }
                }
            }
            if let Err(e) = conn.await {
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

async fn handle(proxy: Arc<Proxy>, peer: SocketAddr, client: &str, req: Request<Incoming>) -> Resp {
    if req.method() == Method::GET && req.uri().path() == keyway_policy::wire::KEY_SERVICE_PATH {
        return crate::keyservice::answer(&proxy, peer, client, req.uri().query().unwrap_or_default());
    }
    let dst = authority(&req).map_or_else(|| req.uri().to_string(), |d| d.to_string());
    let mut log = FlowLog::new(proxy.metrics.clone(), proxy.flow_id(), Entry::Tunnel, peer.ip().to_string(), dst);
    match open(&proxy, peer, client, req, &mut log).await {
        Ok((client, upstream, permit)) => {
            log.finish(Ok(()));
            log.set_active();
            let idle = proxy.flow_idle_timeout();
            proxy.tasks.spawn(async move {
                let _permit = permit;
                match client.await {
                    Ok(client) => {
                        let (up, down) = (log.bytes_up.clone(), log.bytes_down.clone());
                        log.relayed(relay(TokioIo::new(client), upstream, &up, &down, idle).await);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "client went away before the tunnel opened");
                        log.finish(Err(Refusal::ClientGone));
                    }
                }
            });
            Response::new(Full::default())
        }
        Err(r) => {
            let resp = refuse(&r);
            log.finish(Err(r));
            resp
        }
    }
}

/// Verifies, decides and connects the flow onwards; returns the client's pending upgrade, the
/// connected upstream and the flow's permit.
async fn open(
    proxy: &Proxy,
    peer: SocketAddr,
    client: &str,
    req: Request<Incoming>,
    log: &mut FlowLog,
) -> Result<(hyper::upgrade::OnUpgrade, BoxIo, FlowPermit), Refusal> {
    if req.method() != Method::CONNECT {
        return Err(Refusal::NotConnect);
    }
    let dst = authority(&req).ok_or(Refusal::BadAuthority)?;
    let permit = proxy.admit(peer.ip())?;
    // One snapshot of the engine for the whole decision: a workload's index is only meaningful in
    // the engine it was looked up in.
    let engine = proxy.state.engine();
    let (claims, src, identity) = verify(proxy, &engine, (peer, client), &req, dst)?;
    log.src = claims.src.to_string();
    log.identity = identity.clone();
    log.epoch = claims.epoch;
    let decided = proxy.decide(&engine, src, dst, &[]);
    log.note_rule(&decided);
    let decided = decided?;
    // The nonce is spent only by a flow that is allowed to go on: a sidecar's tcp_proxy retries a
    // refused CONNECT with the same token, and a replay of a denied token is denied anyway.
    check_replay(proxy, &claims)?;
    let flow = Flow { id: log.flow_id, src: claims.src, identity, dst };
    let upstream = onwards(proxy, &engine, flow, src, decided, log).await?;
    Ok((hyper::upgrade::on(req), upstream, permit))
}

/// Checks the token of a CONNECT to `dst` from `peer` (its address and its client certificate's
/// SPIFFE id): returns its claims, the source workload and its identity.
fn verify(
    proxy: &Proxy,
    engine: &Engine,
    (peer, client): (SocketAddr, &str),
    req: &Request<Incoming>,
    dst: SocketAddr,
) -> Result<(TokenClaims, Peer, String), Refusal> {
    let text = req.headers().get(TOKEN_HEADER).and_then(|v| v.to_str().ok()).ok_or(Refusal::Token("token-missing"))?;
    let sealed = decode_token(text).map_err(|e| Refusal::Token(e.reason()))?;
    let claims = *sealed.claims();
    let src = engine.peer_for(claims.src);
    let Peer::Workload(w) = src else { return Err(Refusal::Token("token-unknown-source")) };
    let workload = engine.inventory().workloads.get(w).ok_or(Refusal::Token("token-unknown-source"))?;
    let identity = workload.identity(&proxy.config.trust_domain);
    // The certificate says who is asking, the address is the second factor: a token of another
    // workload is refused even from a client that took that workload's address.
    if identity != client {
        return Err(Refusal::Token("token-peer-identity"));
    }
    let known = workload.sidecar_ips.iter().chain(workload.overlay_ips.iter()).map(|ip| ip.to_canonical());
    if !workload.sidecar_ips.is_empty() && !known.clone().any(|a| a == peer.ip().to_canonical()) {
        return Err(Refusal::Token("token-source-address"));
    }
    let now = proxy.now_ms();
    let secrets = proxy.state.secrets();
    let entry = secrets.get(claims.epoch, now).ok_or(Refusal::Token("token-epoch"))?;
    let key = entry.secret.workload_key(&identity, claims.src, claims.epoch).map_err(|e| Refusal::Token(e.reason()))?;
    sealed.verify(&key, now, proxy.config.window_ms).map_err(|e| Refusal::Token(e.reason()))?;
    if claims.dst.to_canonical() != dst.ip().to_canonical() || claims.dst_port != dst.port() {
        return Err(Refusal::Token("token-wrong-destination"));
    }
    Ok((claims, src, identity))
}

/// Connects an allowed flow to its next hop. A service whose chosen zone fails to take the flow is
/// decided again for an endpoint in the next zone of the locality order.
pub(super) async fn onwards(
    proxy: &Proxy,
    engine: &Engine,
    mut flow: Flow,
    src: Peer,
    mut decided: Decision,
    log: &mut FlowLog,
) -> Result<BoxIo, Refusal> {
    let asked = flow.dst;
    let mut avoid: Vec<String> = Vec::new();
    loop {
        flow.dst = decided.dst;
        match &decided.route {
            Route::Local { sidecar, recipient } => {
                log.next_hop = "local".into();
                return deliver::to_sidecar(proxy, &flow, *sidecar, recipient).await;
            }
            Route::Agent(_) => {
                log.next_hop = "agent".into();
                return super::agents::open_to_agent(proxy, &flow, log).await;
            }
            Route::External(addr) => {
                log.next_hop = "external".into();
                return deliver::to_external(proxy, *addr).await;
            }
            Route::Zone(zone) => match overlay::open(proxy, &flow, zone, log).await {
                Err(Refusal::ZoneUnreachable) if decided.service && avoid.len() < MAX_FAILOVERS => {
                    tracing::warn!(zone = %zone, "no gateway of the chosen zone took the flow; trying the next zone");
                    avoid.push(zone.clone());
                    let again = proxy.decide(engine, src, asked, &avoid);
                    log.note_rule(&again);
                    decided = again?;
                }
                other => return other,
            },
        }
    }
}

/// Remembers the token's nonce; a nonce seen before within the window is a replay.
fn check_replay(proxy: &Proxy, claims: &TokenClaims) -> Result<(), Refusal> {
    let Ok(mut cache) = proxy.state.replay.lock() else { return Err(Refusal::Token("replay-cache-unavailable")) };
    let r = cache.check_and_insert(claims.src, claims.nonce, claims.issued_at_ms, proxy.now_ms());
    proxy.metrics.replay_cache_entries.set(cache.len() as i64);
    r.map_err(|e| Refusal::Token(e.reason()))
}
