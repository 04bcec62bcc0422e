//! The last hop: from the destination zone's gateway to the destination sidecar, an HTTP/2
//! CONNECT over mutual TLS (mesh certificates, [`super::pool`]) to its keyway inbound port
//! carrying a ticket (bound to the destination address and
//! port and to the source identity). Also the plain TCP connection for allowed destinations
//! outside the overlay.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use keyway_policy::Protocol;
use keyway_policy::auth::TicketClaims;
use tokio::net::TcpStream;

use super::refusal::{DeliverError, Refusal};
use super::relay::BoxIo;
use super::route::Recipient;
use super::{Flow, Proxy};
use keyway_policy::wire::{DENY_REASON_HEADER, TICKET_HEADER};

/// A fresh 12-byte nonce.
pub fn nonce() -> [u8; 12] {
    let mut n = [0u8; 12];
    // A failing system RNG leaves zeros; tickets then still verify but their nonces repeat,
    // which only weakens replay detection at the sidecar. It does not happen on Linux.
    let _ = getrandom::fill(&mut n);
    n
}

/// Mints the ticket for `flow`, with the ticket key of its recipient (only that workload's bundle
/// verifies it).
fn ticket(proxy: &Proxy, flow: &Flow, to: &Recipient) -> Result<String, DeliverError> {
    let now = proxy.now_ms();
    let secrets = proxy.state.secrets();
    let entry = secrets.sealing(now, proxy.config.activation_ms()).ok_or(DeliverError::NoKey)?;
    let key =
        entry.secret.ticket_key(&to.identity, to.key_ip, entry.epoch).map_err(|e| DeliverError::Mint(e.to_string()))?;
    TicketClaims {
        epoch: entry.epoch,
        src: flow.src,
        dst: flow.dst.ip(),
        dst_port: flow.dst.port(),
        protocol: Protocol::Tcp,
        issued_at_ms: now,
        nonce: nonce(),
        src_identity: flow.identity.clone(),
    }
    .seal(&key)
    .map(|t| t.as_str().to_owned())
    .map_err(|e| DeliverError::Mint(e.to_string()))
}

/// Opens a ticketed HTTP/2 CONNECT for `flow` to the sidecar at `sidecar` of `to`.
pub async fn to_sidecar(proxy: &Proxy, flow: &Flow, sidecar: SocketAddr, to: &Recipient) -> Result<BoxIo, Refusal> {
    let ticket = ticket(proxy, flow, to).map_err(Refusal::Delivery)?;
    let timeout = proxy.connect_timeout();
    let pool = &proxy.sidecars;
    let work = async {
        let authority = flow.dst.to_string();
        // A pooled connection may have died since it was last used (the sidecar restarted): one
        // more try on a fresh connection.
        let mut fresh = false;
        let resp = loop {
            let mut sender = match pool.cached(sidecar, &to.identity) {
                Some(s) => s,
                None => {
                    fresh = true;
                    pool.connect(sidecar, &to.identity, &proxy.state.mesh(), &proxy.tasks).await?
                }
            };
            let req = Request::builder()
                .method(Method::CONNECT)
                .uri(authority.as_str())
                .header(TICKET_HEADER, ticket.as_str())
                .body(Empty::<Bytes>::new())
                .map_err(|e| DeliverError::Http { addr: sidecar, reason: e.to_string() })?;
            let sent = match sender.ready().await {
                Ok(()) => sender.send_request(req).await,
                Err(e) => Err(e),
            };
            match sent {
                Ok(resp) => break resp,
                Err(e) if !fresh => {
                    tracing::debug!(error = %e, sidecar = %sidecar, "pooled sidecar connection failed; reconnecting");
                    pool.forget(sidecar, &to.identity);
                }
                Err(e) => {
                    pool.forget(sidecar, &to.identity);
                    return Err(DeliverError::Http { addr: sidecar, reason: e.to_string() });
                }
            }
        };
        if resp.status() != StatusCode::OK {
            let reason =
                resp.headers().get(DENY_REASON_HEADER).and_then(|v| v.to_str().ok()).unwrap_or("none").to_owned();
            return Err(DeliverError::Refused { addr: sidecar, status: resp.status().as_u16(), reason });
        }
        let upgraded =
            hyper::upgrade::on(resp).await.map_err(|e| DeliverError::Http { addr: sidecar, reason: e.to_string() })?;
        Ok(Box::new(TokioIo::new(upgraded)) as BoxIo)
    };
    let r = match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(DeliverError::Connect { addr: sidecar, reason: format!("no answer within {timeout:?}") }),
    };
    r.map_err(|e| {
        tracing::warn!(error = %e, "delivery to a local sidecar failed");
        Refusal::Delivery(e)
    })
}

/// A plain TCP connection to an allowed destination outside the overlay. A connection that
/// turns out to be to one of the gateway host's own addresses (its local and remote addresses
/// are the same) is closed and refused: the gateway is no proxy to itself.
pub async fn to_external(proxy: &Proxy, addr: SocketAddr) -> Result<BoxIo, Refusal> {
    let timeout = proxy.connect_timeout();
    let e = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let own = s.local_addr().is_ok_and(|l| l.ip().to_canonical() == addr.ip().to_canonical());
            if own && !(addr.ip().is_loopback() && proxy.routing.external_loopback()) {
                return Err(Refusal::ExternalForbidden(addr.ip()));
            }
            let _ = s.set_nodelay(true);
            return Ok(Box::new(s));
        }
        Ok(Err(e)) => DeliverError::Connect { addr, reason: e.to_string() },
        Err(_) => DeliverError::Connect { addr, reason: format!("no answer within {timeout:?}") },
    };
    Err(Refusal::Delivery(e))
}
