//! The agent's admin listener (loopback only): `/healthz` (200 while at least one gateway is
//! connected, else 503), `/metrics` (Prometheus text) and `/config_dump` (the effective
//! configuration). Served as a task of the agent's runtime: the agent's data path is light.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use super::AgentError;
use super::metrics::AgentMetrics;

fn answer(metrics: &AgentMetrics, config_json: &str, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, kind, body) = match req.uri().path() {
        "/healthz" => {
            let n = metrics.gateways_connected.load(Ordering::Relaxed);
            if n > 0 {
                (StatusCode::OK, "text/plain", format!("ok: {n} gateway(s) connected\n"))
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, "text/plain", "no gateway connected\n".to_owned())
            }
        }
        "/metrics" => (StatusCode::OK, "text/plain; version=0.0.4", metrics.render()),
        "/config_dump" => (StatusCode::OK, "application/json", config_json.to_owned()),
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found: try /healthz, /metrics, /config_dump\n".to_owned()),
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(kind) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

/// Binds `addr` and serves until `stop`; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<AgentMetrics>,
    config_json: String,
    stop: CancellationToken,
) -> Result<SocketAddr, AgentError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| AgentError::Io { what: format!("admin {addr}"), source })?;
    let bound = listener.local_addr().map_err(|source| AgentError::Io { what: "admin".into(), source })?;
    let config_json = Arc::new(config_json);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                () = stop.cancelled() => return,
            };
            let Ok((tcp, _)) = accepted else { continue };
            let (m, c) = (metrics.clone(), config_json.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let r = answer(&m, &c, &req);
                    async move { Ok::<_, Infallible>(r) }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
            });
        }
    });
    Ok(bound)
}
