//! The last hop: from the destination zone's gateway to the destination sidecar, an HTTP/2
//! CONNECT to its keyway inbound port carrying a ticket (bound to the destination address and
//! port and to the source identity). Also the plain TCP connection for allowed destinations
//! outside the overlay.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use keyway_policy::Protocol;
use keyway_policy::auth::TicketClaims;
use tokio::net::TcpStream;

use crate::state::{State, now_ms};

/// The header carrying the ticket.
pub const TICKET_HEADER: &str = "x-keyway-ticket";
/// The header carrying a refusal's reason.
pub const DENY_REASON_HEADER: &str = "x-keyway-deny-reason";

/// Why a delivery failed; `reason()` is a fixed label.
#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    /// No usable epoch secret to mint a ticket with.
    #[error("no usable epoch secret to mint a ticket")]
    NoKey,
    /// Minting failed (identity too long).
    #[error("cannot mint a ticket: {0}")]
    Mint(String),
    /// TCP connect failed or timed out.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The HTTP/2 exchange failed.
    #[error("HTTP/2 CONNECT to {addr} failed: {reason}")]
    Http {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The sidecar refused the ticket.
    #[error("sidecar {addr} refused the tunnel with {status} ({reason})")]
    Refused {
        /// The address.
        addr: SocketAddr,
        /// The HTTP status.
        status: u16,
        /// Its `x-keyway-deny-reason`.
        reason: String,
    },
}

impl DeliverError {
    /// A fixed label for metrics and headers.
    pub fn reason(&self) -> &'static str {
        match self {
            DeliverError::NoKey => "no-epoch-secret",
            DeliverError::Mint(_) => "ticket-mint",
            DeliverError::Connect { .. } => "destination-unreachable",
            DeliverError::Http { .. } => "destination-protocol",
            DeliverError::Refused { .. } => "destination-refused",
        }
    }
}

/// The stream to a destination, once connected.
pub type Upstream = TokioIo<hyper::upgrade::Upgraded>;

/// A fresh 12-byte nonce.
pub fn nonce() -> [u8; 12] {
    let mut n = [0u8; 12];
    // A failing system RNG leaves zeros; tickets then still verify but their nonces repeat,
    // which only weakens replay detection at the sidecar. It does not happen on Linux.
    let _ = getrandom::fill(&mut n);
    n
}

/// HTTP/2 connections to destination sidecars, one per sidecar address, shared by the flows to
/// it (each flow is one CONNECT stream): a flow costs no TCP or HTTP/2 handshake once the
/// connection exists.
#[derive(Debug, Default)]
pub struct SidecarPool {
    conns: std::sync::Mutex<std::collections::HashMap<SocketAddr, SendRequest<Empty<Bytes>>>>,
}

impl SidecarPool {
    fn cached(&self, addr: SocketAddr) -> Option<SendRequest<Empty<Bytes>>> {
        let mut g = self.conns.lock().ok()?;
        match g.get(&addr) {
            Some(s) if !s.is_closed() => Some(s.clone()),
            Some(_) => {
                g.remove(&addr);
                None
            }
            None => None,
        }
    }

    fn forget(&self, addr: SocketAddr) {
        if let Ok(mut g) = self.conns.lock() {
            g.remove(&addr);
        }
    }

    async fn connect(&self, addr: SocketAddr) -> Result<SendRequest<Empty<Bytes>>, DeliverError> {
        let tcp = TcpStream::connect(addr).await.map_err(|e| DeliverError::Connect { addr, reason: e.to_string() })?;
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(4 * 1024 * 1024)
            .initial_connection_window_size(16 * 1024 * 1024)
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| DeliverError::Http { addr, reason: e.to_string() })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "sidecar HTTP/2 connection ended");
            }
        });
        if let Ok(mut g) = self.conns.lock() {
            g.insert(addr, sender.clone());
        }
        Ok(sender)
    }
}

/// Opens a ticketed HTTP/2 CONNECT to the sidecar at `sidecar` for the flow to `dst`:`port`.
#[allow(clippy::too_many_arguments)]
pub async fn to_sidecar(
    pool: &SidecarPool,
    state: &State,
    zone: &str,
    sidecar: SocketAddr,
    src: IpAddr,
    src_identity: &str,
    dst: IpAddr,
    port: u16,
    timeout: Duration,
    activation_ms: u64,
) -> Result<Upstream, DeliverError> {
    let now = now_ms();
    let secrets = state.secrets();
    let entry = secrets.sealing(now, activation_ms).ok_or(DeliverError::NoKey)?;
    let key = entry.secret.ticket_key(zone, entry.epoch).map_err(|e| DeliverError::Mint(e.to_string()))?;
    let ticket = TicketClaims {
        epoch: entry.epoch,
        src,
        dst,
        dst_port: port,
        protocol: Protocol::Tcp,
        issued_at_ms: now,
        nonce: nonce(),
        src_identity: src_identity.to_owned(),
    }
    .seal(&key)
    .map_err(|e| DeliverError::Mint(e.to_string()))?;

    let work = async {
        let authority = SocketAddr::new(dst, port).to_string();
        // A pooled connection may have died since it was last used (the sidecar restarted): one
        // more try on a fresh connection.
        let mut fresh = false;
        let resp = loop {
            let mut sender = match pool.cached(sidecar) {
                Some(s) => s,
                None => {
                    fresh = true;
                    pool.connect(sidecar).await?
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
                    pool.forget(sidecar);
                }
                Err(e) => {
                    pool.forget(sidecar);
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
        Ok(TokioIo::new(upgraded))
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(DeliverError::Connect { addr: sidecar, reason: format!("no answer within {timeout:?}") }),
    }
}

/// A plain TCP connection to an allowed destination outside the overlay.
pub async fn to_external(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, DeliverError> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
        Ok(Err(e)) => Err(DeliverError::Connect { addr, reason: e.to_string() }),
        Err(_) => Err(DeliverError::Connect { addr, reason: format!("no answer within {timeout:?}") }),
    }
}
