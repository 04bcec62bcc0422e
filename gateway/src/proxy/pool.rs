//! HTTP/2 over mutual TLS to destination sidecars, one connection per sidecar address and
//! workload identity, shared by the flows to it (each flow is one CONNECT stream): a flow costs
//! no TCP, TLS or HTTP/2 handshake once the connection exists. The gateway presents its mesh
//! certificate (the sidecar's keyway inbound listener accepts only gateways'), and a sidecar
//! whose certificate is not the destination workload's is never sent a ticket.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::refusal::DeliverError;
use crate::mesh::MeshTls;
use crate::tasks::Tasks;

/// A handle to send CONNECT requests on one sidecar connection.
pub type Sender = SendRequest<Empty<Bytes>>;

/// The pool.
#[derive(Debug, Default)]
pub struct SidecarPool {
    conns: Mutex<HashMap<(SocketAddr, String), Sender>>,
}

impl SidecarPool {
    /// The live pooled connection to the sidecar of `identity` at `addr`, if any.
    pub fn cached(&self, addr: SocketAddr, identity: &str) -> Option<Sender> {
        let mut g = self.conns.lock().ok()?;
        let key = (addr, identity.to_owned());
        match g.get(&key) {
            Some(s) if !s.is_closed() => Some(s.clone()),
            Some(_) => {
                g.remove(&key);
                None
            }
            None => None,
        }
    }

    /// Drops the pooled connection to the sidecar of `identity` at `addr`.
    pub fn forget(&self, addr: SocketAddr, identity: &str) {
        if let Ok(mut g) = self.conns.lock() {
            g.remove(&(addr, identity.to_owned()));
        }
    }

    /// A new connection to the sidecar of `identity` at `addr`, made with `mesh` and pooled; its
    /// driver runs in `tasks`. Refused when the sidecar's certificate is not `identity`'s.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        identity: &str,
        mesh: &MeshTls,
        tasks: &Tasks,
    ) -> Result<Sender, DeliverError> {
        let tcp = TcpStream::connect(addr).await.map_err(|e| DeliverError::Connect { addr, reason: e.to_string() })?;
        let _ = tcp.set_nodelay(true);
        let connector = tokio_rustls::TlsConnector::from(mesh.client_config());
        // Mesh certificates name no host; the name is unused by the verifier.
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        let tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| DeliverError::Connect { addr, reason: format!("TLS: {e}") })?;
        let found = crate::mesh::peer_id(tls.get_ref().1).unwrap_or_default();
        if found != identity {
            return Err(DeliverError::WrongIdentity { addr, found, want: identity.to_owned() });
        }
        let (sender, conn) = hyper::client::conn::http2::Builder::new(tasks.clone())
            .initial_stream_window_size(4 * 1024 * 1024)
            .initial_connection_window_size(16 * 1024 * 1024)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| DeliverError::Http { addr, reason: e.to_string() })?;
        tasks.spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "sidecar HTTP/2 connection ended");
            }
        });
        if let Ok(mut g) = self.conns.lock() {
            g.insert((addr, identity.to_owned()), sender.clone());
        }
        Ok(sender)
    }
}
