//! HTTP/2 connections to destination sidecars, one per sidecar address, shared by the flows to
//! it (each flow is one CONNECT stream): a flow costs no TCP or HTTP/2 handshake once the
//! connection exists.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::refusal::DeliverError;
use crate::tasks::Tasks;

/// A handle to send CONNECT requests on one sidecar connection.
pub type Sender = SendRequest<Empty<Bytes>>;

/// The pool.
#[derive(Debug, Default)]
pub struct SidecarPool {
    conns: Mutex<HashMap<SocketAddr, Sender>>,
}

impl SidecarPool {
    /// The live pooled connection to `addr`, if any.
    pub fn cached(&self, addr: SocketAddr) -> Option<Sender> {
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

    /// Drops the pooled connection to `addr`.
    pub fn forget(&self, addr: SocketAddr) {
        if let Ok(mut g) = self.conns.lock() {
            g.remove(&addr);
        }
    }

    /// A new connection to `addr`, pooled; its driver runs in `tasks`.
    pub async fn connect(&self, addr: SocketAddr, tasks: &Tasks) -> Result<Sender, DeliverError> {
        let tcp = TcpStream::connect(addr).await.map_err(|e| DeliverError::Connect { addr, reason: e.to_string() })?;
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http2::Builder::new(tasks.clone())
            .initial_stream_window_size(4 * 1024 * 1024)
            .initial_connection_window_size(16 * 1024 * 1024)
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| DeliverError::Http { addr, reason: e.to_string() })?;
        tasks.spawn(async move {
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
