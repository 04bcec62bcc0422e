//! The admin face, plain HTTP/1 on its own small runtime so a slow scrape never adds latency to
//! flows: `/healthz`, `/readyz`, `/metrics`, `/config_dump`, `/peers`. (The key service is on
//! the tunnel port, over mutual TLS: [`crate::keyservice`].)
//!
//! Health and readiness answer the network (kubelet probes); the others answer only the
//! gateway's own host unless `admin.remote` is set. Open connections are capped
//! (`limits.max_admin_connections`) and each must send its request headers within
//! `limits.header_timeout_ms`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};

use crate::proxy::Proxy;

/// The running admin server.
#[derive(Debug)]
pub struct AdminHandle {
    /// Its address.
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl AdminHandle {
    /// Stops the admin server.
    pub fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Binds the admin listener and serves it on a thread of its own.
pub fn start(ctx: Arc<Proxy>) -> anyhow::Result<AdminHandle> {
    let listener = std::net::TcpListener::bind(ctx.config.listen.admin)
        .map_err(|e| anyhow::anyhow!("admin {}: cannot bind: {e}", ctx.config.listen.admin))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::Builder::new().name("keyway-admin".into()).spawn(move || {
        rt.block_on(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else { return };
            let open = Arc::new(tokio::sync::Semaphore::new(ctx.config.limits.max_admin_connections));
            let header_timeout = Duration::from_millis(ctx.config.limits.header_timeout_ms);
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    accepted = listener.accept() => {
                        let Ok((tcp, peer)) = accepted else { continue };
                        let Ok(permit) = open.clone().try_acquire_owned() else {
                            ctx.metrics.limit_refusals.with_label_values(&["max_admin_connections"]).inc();
                            continue; // dropped: closed at once
                        };
                        let ctx = ctx.clone();
                        tokio::spawn(async move {
                            let _permit = permit;
                            let svc = service_fn(move |req| {
                                let ctx = ctx.clone();
                                async move { Ok::<_, Infallible>(route(&ctx, peer, req)) }
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .timer(TokioTimer::new())
                                .header_read_timeout(header_timeout)
                                .serve_connection(TokioIo::new(tcp), svc)
                                .await;
                        });
                    }
                }
            }
        });
    })?;
    Ok(AdminHandle { addr, stop: Some(stop) })
}

/// A plain-text answer.
pub(crate) fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// A JSON answer.
pub(crate) fn json(status: StatusCode, v: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(serde_json::to_string_pretty(v).unwrap_or_default())));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    r
}

fn route(ctx: &Proxy, peer: SocketAddr, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            if ctx.is_draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }
        "/metrics" | "/config_dump" | "/peers"
            if !ctx.config.admin.remote && !peer.ip().to_canonical().is_loopback() =>
        {
            text(StatusCode::FORBIDDEN, "served to the gateway's own host only (admin.remote: false)\n")
        }
        "/metrics" => {
            let mut r = text(StatusCode::OK, ctx.metrics.render());
            r.headers_mut().insert(header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain; version=0.0.4"));
            r
        }
        "/config_dump" => config_dump(ctx),
        "/peers" => json(StatusCode::OK, &serde_json::to_value(ctx.routing.view()).unwrap_or_default()),
        _ => text(
            StatusCode::NOT_FOUND,
            "not found; try /healthz, /readyz, /metrics, /config_dump, /peers (the key service is on the tunnel port, over mutual TLS)\n",
        ),
    }
}

fn config_dump(ctx: &Proxy) -> Response<Full<Bytes>> {
    let engine = ctx.state.engine();
    let secrets = ctx.state.secrets();
    let now = ctx.now_ms();
    let epochs: Vec<serde_json::Value> = secrets
        .valid_at(now)
        .iter()
        .map(|e| serde_json::json!({"epoch": e.epoch, "created_ms": e.created_ms, "not_after_ms": e.not_after_ms, "secret": "[redacted]"}))
        .collect();
    let p = engine.policies();
    json(
        StatusCode::OK,
        &serde_json::json!({
            "config": &*ctx.config,
            "identity": ctx.identity.spiffe_id(),
            "epochs": epochs,
            "inventory": {
                "namespaces": engine.inventory().namespaces.len(),
                "workloads": engine.inventory().workloads.len(),
                "network_policies": p.network.len(),
                "admin_network_policies": p.admin.len(),
                "baseline_admin_network_policy": p.baseline.is_some(),
                "warnings": engine.warnings().iter().map(ToString::to_string).collect::<Vec<_>>(),
            },
        }),
    )
}
