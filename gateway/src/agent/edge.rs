//! The agent's QUIC connections to the edge gateways of its zone: all of them, kept connected
//! (reconnection with backoff), one picked round robin for each new outbound flow or datagram.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

use super::AgentError;
use super::config::{AgentConfig, Mode, TlsFiles};

/// The ALPN of the edge protocol (agent ↔ gateway).
pub use keyway_policy::wire::EDGE_ALPN;

/// The first wait before reconnecting, doubled up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

fn pem_err<'a>(p: &'a std::path::Path, what: &'static str) -> impl Fn(rustls_pki_types::pem::Error) -> AgentError + 'a {
    move |e| AgentError::Tls(format!("{}: no valid {what} in PEM form: {e}", p.display()))
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, AgentError> {
    std::fs::read(path).map_err(|e| AgentError::Tls(format!("{}: cannot read: {e}", path.display())))
}

/// The QUIC client configuration: the agent's certificate, the overlay CA as the only root, TLS
/// 1.3, ALPN [`EDGE_ALPN`], and the transport settings of `config`.
pub fn client_config(config: &AgentConfig) -> Result<quinn::ClientConfig, AgentError> {
    let TlsFiles { ca, cert, key } = &config.tls;
    let ca_pem = read(ca)?;
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&ca_pem) {
        roots
            .add(c.map_err(pem_err(ca, "certificate"))?)
            .map_err(|e| AgentError::Tls(format!("{}: not a usable CA certificate: {e}", ca.display())))?;
    }
    if roots.is_empty() {
        return Err(AgentError::Tls(format!("{}: expected a \"-----BEGIN CERTIFICATE-----\" block", ca.display())));
    }
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&read(cert)?).collect::<Result<_, _>>().map_err(pem_err(cert, "certificate"))?;
    if chain.is_empty() {
        return Err(AgentError::Tls(format!("{}: expected a \"-----BEGIN CERTIFICATE-----\" block", cert.display())));
    }
    let key_der = PrivateKeyDer::from_pem_slice(&read(key)?).map_err(pem_err(key, "private key"))?;
    let provider = crate::tls::provider();
    let roots = Arc::new(roots);
    // What would otherwise only fail at the first handshake, on the gateway's side: the device
    // certificate does not chain to the CA, or has expired. (A pod's agent presents the pod's
    // mesh certificate, of the mesh CA, and checks its gateways with the overlay CA.)
    if let (Mode::Device, Some((leaf, intermediates))) = (config.mode, chain.split_first()) {
        let check = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| AgentError::Tls(format!("{}: {e}", ca.display())))?;
        check.verify_client_cert(leaf, intermediates, rustls_pki_types::UnixTime::now()).map_err(|e| {
            AgentError::Tls(format!("{}: does not verify against the CA in {}: {e}", cert.display(), ca.display()))
        })?;
    }
    let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| AgentError::Tls(format!("{}: {e}", ca.display())))?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| AgentError::Tls(e.to_string()))?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(chain, key_der)
        .map_err(|e| AgentError::Tls(format!("{} and {}: {e}", cert.display(), key.display())))?;
    tls.alpn_protocols = vec![EDGE_ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| AgentError::Tls(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_millis(config.keepalive_ms)));
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_millis(config.idle_timeout_ms)) {
        t.max_idle_timeout(Some(idle));
    }
    t.initial_rtt(Duration::from_millis(100));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    client.transport_config(Arc::new(t));
    Ok(client)
}

/// The gateways and their live connections.
#[derive(Debug)]
pub struct Gateways {
    slots: Vec<Mutex<Option<quinn::Connection>>>,
    next: AtomicUsize,
}

impl Gateways {
    /// `n` gateways, none connected.
    pub fn new(n: usize) -> Self {
        Gateways { slots: (0..n).map(|_| Mutex::new(None)).collect(), next: AtomicUsize::new(0) }
    }

    /// The connections open now, starting with the next one in round-robin order.
    pub fn connected(&self) -> Vec<quinn::Connection> {
        let n = self.slots.len().max(1);
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        (0..self.slots.len())
            .filter_map(|i| {
                let slot = self.slots.get((start + i) % n)?;
                let c = slot.lock().ok()?.clone()?;
                c.close_reason().is_none().then_some(c)
            })
            .collect()
    }

    fn set(&self, i: usize, c: Option<quinn::Connection>) {
        if let Some(s) = self.slots.get(i)
            && let Ok(mut g) = s.lock()
        {
            *g = c;
        }
    }
}

/// Resolves `host:port` to its first address of a family the endpoint can reach.
async fn resolve(addr: &str, v6_socket: bool) -> Option<SocketAddr> {
    let all = tokio::net::lookup_host(addr).await.ok()?;
    let mut first = None;
    for a in all {
        if a.is_ipv4() || v6_socket {
            first = Some(a);
            break;
        }
    }
    first
}

/// What every gateway's connection task shares: the endpoint, the table of connections, the
/// server name of the zone, and the stop signal.
#[derive(Clone, Debug)]
pub(crate) struct Dialer {
    pub(crate) endpoint: quinn::Endpoint,
    pub(crate) gateways: Arc<Gateways>,
    pub(crate) server_name: String,
    pub(crate) stop: CancellationToken,
    /// The configuration the TLS files are read from again at every connection attempt, so a
    /// reconnection presents the certificate on disk now (a pod's mesh certificate, rotated by
    /// istio-agent in place).
    pub(crate) config: Arc<AgentConfig>,
}

/// Keeps gateway `index` (at `addr`) connected until `stop`: connect, hand the connection to
/// `on_connect` (which serves it until it closes), wait for its end, back off, again.
pub(crate) async fn keep_connected<F, Fut>(d: Dialer, index: usize, addr: String, on_connect: F)
where
    F: Fn(quinn::Connection) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let Dialer { endpoint, gateways, server_name, stop, config } = d;
    let v6 = endpoint.local_addr().is_ok_and(|a| a.is_ipv6());
    let mut backoff = MIN_BACKOFF;
    while !stop.is_cancelled() {
        let attempt = async {
            let target = resolve(&addr, v6).await.ok_or_else(|| format!("{addr}: cannot resolve"))?;
            let client = client_config(&config).map_err(|e| e.to_string())?;
            let connecting = endpoint.connect_with(client, target, &server_name).map_err(|e| e.to_string())?;
            connecting.await.map_err(|e| e.to_string())
        };
        let result = tokio::select! {
            r = attempt => r,
            () = stop.cancelled() => return,
        };
        match result {
            Ok(conn) => {
                backoff = MIN_BACKOFF;
                tracing::info!(gateway = %addr, remote = %conn.remote_address(), "connected to the edge gateway");
                gateways.set(index, Some(conn.clone()));
                tokio::select! {
                    () = on_connect(conn.clone()) => {}
                    () = stop.cancelled() => {}
                }
                gateways.set(index, None);
                let reason = conn.close_reason().map(|r| r.to_string()).unwrap_or_else(|| "stopping".into());
                conn.close(0u32.into(), b"agent stopping");
                tracing::warn!(gateway = %addr, %reason, "edge gateway connection closed");
            }
            Err(e) => {
                tracing::warn!(gateway = %addr, error = %e, retry_ms = backoff.as_millis() as u64, "cannot connect to the edge gateway")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}
