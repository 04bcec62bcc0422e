//! A stand-in for a destination sidecar in the in-process bed: an HTTP/2 CONNECT server over
//! mutual TLS (its workload's mesh certificate; only the gateways' mesh identity may connect, as
//! the keyway inbound listener's TLS context says) that decides with the keyway filter's own inbound-tunnel verdict (`keyway_filter::verdict`, with a
//! replay cache as the filter keeps one) over the keys the gateway's key service would hand it,
//! and echoes the bytes of every accepted tunnel.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use keyway_filter::config::DEFAULT_REPLAY_CACHE_CAPACITY;
use keyway_filter::keystate::KeyState;
use keyway_filter::verdict::{Action, TunnelCheck, inbound_tunnel};
use keyway_gateway::secrets::{EpochSecrets, Holder, key_bundle};
use keyway_policy::auth::{DEFAULT_WINDOW_MS, Kind, ReplayCache};
use keyway_policy::keyservice::DEFAULT_REFRESH_MS;
use keyway_policy::wire;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use keyway_gateway::mesh::{MeshTls, peer_id};

use super::{TD, W};
use crate::credentials::now_ms;
use crate::mesh::gateway_identity;

/// A fake destination sidecar, serving until dropped.
#[derive(Debug)]
pub struct Sidecar {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its workload's overlay address.
    pub overlay_ip: IpAddr,
    /// Identities of accepted tickets.
    pub accepted: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What every connection of one sidecar shares.
struct Shared {
    workload: W,
    secrets: PathBuf,
    replay: Mutex<ReplayCache>,
    accepted: Arc<Mutex<Vec<String>>>,
}

impl Shared {
    /// The filter's decision on a CONNECT, with the keys of this instant (as if just refreshed
    /// from the key service, so a rotation is seen at once).
    fn decide(&self, req: &Request<hyper::body::Incoming>) -> Result<(), &'static str> {
        let now = now_ms();
        let w = &self.workload;
        let keys = EpochSecrets::load(&self.secrets)
            .ok()
            .and_then(|s| {
                let holder = Holder { identity: &w.identity(), overlay_ip: w.overlay, key_ip: w.overlay, zone: w.zone };
                key_bundle(&s, now, holder, DEFAULT_REFRESH_MS).ok()
            })
            .map(KeyState::fixed)
            .ok_or("no-key")?;
        let check = TunnelCheck { overlay_ip: w.overlay, window_ms: DEFAULT_WINDOW_MS, fail_open: false };
        let ticket = req.headers().get(wire::TICKET_HEADER).and_then(|v| v.to_str().ok());
        let authority = req.uri().authority().map(|a| a.as_str());
        let mut replay = self.replay.lock().map_err(|_| "replay-cache-poisoned")?;
        match inbound_tunnel(&check, &keys, Some(&mut replay), ticket, authority, now) {
            Action::Allow(claims) => {
                if let Ok(mut a) = self.accepted.lock() {
                    a.push(claims.src_identity);
                }
                Ok(())
            }
            Action::Deny(d) | Action::FailOpen(d) => Err(d.reason),
        }
    }
}

impl Sidecar {
    /// Serves the sidecar of `workload` on its sidecar address and `port`, with the keys of the
    /// epoch secrets file `secrets` (its zone's).
    pub async fn start(workload: &W, port: u16, secrets: PathBuf, mesh: Arc<MeshTls>) -> anyhow::Result<Sidecar> {
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(workload.sidecar, port)).await?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let shared = Arc::new(Shared {
            workload: workload.clone(),
            secrets,
            replay: Mutex::new(ReplayCache::new(Kind::Ticket, DEFAULT_REPLAY_CACHE_CAPACITY, DEFAULT_WINDOW_MS)),
            accepted: accepted.clone(),
        });
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let shared = shared.clone();
                let acceptor = tokio_rustls::TlsAcceptor::from(mesh.server_config());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    // Only gateways deliver.
                    if peer_id(tls.get_ref().1).as_deref() != Some(gateway_identity(TD).as_str()) {
                        return;
                    }
                    let svc = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, std::convert::Infallible>(serve(&shared, req)) }
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Ok(Sidecar { addr, overlay_ip: workload.overlay, accepted, task })
    }
}

/// Refuses with the filter's 403 and reason, or accepts and echoes the tunnel's bytes.
fn serve(shared: &Shared, mut req: Request<hyper::body::Incoming>) -> Response<Empty<Bytes>> {
    let mut resp = Response::new(Empty::<Bytes>::new());
    if let Err(reason) = shared.decide(&req) {
        *resp.status_mut() = StatusCode::FORBIDDEN;
        resp.headers_mut().insert(wire::DENY_REASON_HEADER, http::HeaderValue::from_static(reason));
        return resp;
    }
    let up = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(io) = up.await else { return };
        let mut io = TokioIo::new(io);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if io.write_all(buf.get(..n).unwrap_or_default()).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = io.shutdown().await;
    });
    resp
}
