//! The agent's QUIC connections to the edge gateways of its zone: all of them, kept connected
//! (reconnection with backoff), one picked round robin for each new outbound flow or datagram.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
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

/// How often each gateway entry is resolved again: a name for every replica of a zone (a headless
/// Service) changes as the replicas do.
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(5);

/// The connected gateways, by address.
#[derive(Debug, Default)]
pub struct Gateways {
    conns: Mutex<BTreeMap<SocketAddr, quinn::Connection>>,
    next: AtomicUsize,
}

impl Gateways {
    /// None connected.
    pub fn new() -> Self {
        Gateways::default()
    }

    /// The connections open now, starting with the next one in round-robin order.
    pub fn connected(&self) -> Vec<quinn::Connection> {
        let all: Vec<quinn::Connection> = match self.conns.lock() {
            Ok(g) => g.values().filter(|c| c.close_reason().is_none()).cloned().collect(),
            Err(_) => Vec::new(),
        };
        let start = self.next.fetch_add(1, Ordering::Relaxed) % all.len().max(1);
        all.iter().cycle().skip(start).take(all.len()).cloned().collect()
    }

    fn set(&self, at: SocketAddr, c: Option<quinn::Connection>) {
        if let Ok(mut g) = self.conns.lock() {
            match c {
                Some(c) => g.insert(at, c),
                None => g.remove(&at),
            };
        }
    }
}

/// Turns a gateway entry (`host:port`) into the addresses to connect to.
pub type Resolver = Arc<dyn Fn(String) -> Pin<Box<dyn Future<Output = Vec<SocketAddr>> + Send>> + Send + Sync>;

/// The system resolver: every address of `host:port` of a family the endpoint (IPv6 when `v6`)
/// can reach; none when it does not resolve.
pub fn dns(v6: bool) -> Resolver {
    Arc::new(move |addr: String| {
        Box::pin(async move {
            match tokio::net::lookup_host(&addr).await {
                Ok(all) => all.filter(|a| a.is_ipv4() || v6).collect(),
                Err(_) => Vec::new(),
            }
        })
    })
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
    /// Where the connection tasks run.
    pub(crate) tasks: tokio_util::task::TaskTracker,
}

/// Follows gateway entry `addr` until `stop`: keeps a connection to every address it resolves
/// to (one for an address, each replica for a name of them all), resolving it again every
/// [`RESOLVE_INTERVAL`]; an address gone from the answer is left (its connection closed), a new
/// one connected. When the name does not resolve the connections it has stay.
pub(crate) async fn follow<F, Fut>(d: Dialer, addr: String, resolve: Resolver, on_connect: F)
where
    F: Fn(quinn::Connection) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut running: BTreeMap<SocketAddr, CancellationToken> = BTreeMap::new();
    loop {
        let now = resolve(addr.clone()).await;
        if now.is_empty() {
            tracing::warn!(gateway = %addr, "edge gateway address does not resolve; keeping the connections there are");
        } else {
            running.retain(|a, stop| {
                let keep = now.contains(a);
                if !keep {
                    tracing::info!(gateway = %addr, address = %a, "edge gateway no longer in the answer; leaving it");
                    stop.cancel();
                }
                keep
            });
            for a in now {
                if running.contains_key(&a) {
                    continue;
                }
                let stop = d.stop.child_token();
                running.insert(a, stop.clone());
                let one = Dialer { stop, ..d.clone() };
                d.tasks.spawn(keep_connected(one, a, on_connect.clone()));
            }
        }
        tokio::select! {
            () = tokio::time::sleep(RESOLVE_INTERVAL) => {}
            () = d.stop.cancelled() => return,
        }
    }
}

/// Keeps the gateway at `target` connected until `stop`: connect, hand the connection to
/// `on_connect` (which serves it until it closes), wait for its end, back off, again.
async fn keep_connected<F, Fut>(d: Dialer, target: SocketAddr, on_connect: F)
where
    F: Fn(quinn::Connection) -> Fut,
    Fut: Future<Output = ()>,
{
    let Dialer { endpoint, gateways, server_name, stop, config, .. } = d;
    let addr = target;
    let mut backoff = MIN_BACKOFF;
    while !stop.is_cancelled() {
        let attempt = async {
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
                gateways.set(target, Some(conn.clone()));
                tokio::select! {
                    () = on_connect(conn.clone()) => {}
                    () = stop.cancelled() => {}
                }
                gateways.set(target, None);
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
