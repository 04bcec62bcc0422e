//! TLS of the overlay: gateway identities, the certificate material a gateway runs with, and the
//! QUIC (quinn + rustls, ring provider) configurations of both ends.
//!
//! Trust is the overlay CA and nothing else: the server requires a client certificate and
//! verifies it against a root store holding only the CA certificate(s) of `ca.pem`; the client
//! verifies the server the same way, with the server name [`server_name`]. Both offer only TLS 1.3
//! and the ALPN [`ALPN`].
//!
//! A gateway certificate carries two subject alternative names:
//!
//! * the URI `spiffe://<trust-domain>/zone/<zone>/gateway/<name>` (its [`GatewayIdentity`], what
//!   [`peer_identity`] reads back after a handshake);
//! * the DNS name `<name>.<zone>.gateway.keyway` (see [`server_name`]), which the client's
//!   WebPKI verification checks, since rustls verifies server names as DNS names or IP addresses
//!   and never as URIs.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The ALPN protocol of the overlay.
pub use keyway_policy::wire::{ALPN, EDGE_ALPN};

/// The suffix of every gateway's DNS name.
pub use keyway_policy::wire::SERVER_NAME_SUFFIX;

/// The longest trust domain keyway accepts (SPIFFE: 255 bytes).
const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// The longest zone or gateway name: one DNS label.
const MAX_LABEL_LEN: usize = 63;

/// Why TLS material could not be loaded or used, or a peer's identity could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file holds no PEM block of the kind needed.
    #[error("{path}: no {what} in PEM form found; expected a \"-----BEGIN {label}-----\" block")]
    Missing {
        /// The file.
        path: String,
        /// `certificate` or `private key`.
        what: &'static str,
        /// The PEM label expected.
        label: &'static str,
    },
    /// A PEM block could not be parsed.
    #[error("{path}: invalid PEM: {reason}")]
    Pem {
        /// The file.
        path: String,
        /// The parser's reason.
        reason: String,
    },
    /// A certificate is not valid X.509.
    #[error("{path}: certificate {index} is not valid X.509: {reason}")]
    X509 {
        /// The file.
        path: String,
        /// Its position in the file, from 0.
        index: usize,
        /// The parser's reason.
        reason: String,
    },
    /// A certificate does not carry exactly one SPIFFE URI SAN.
    #[error("{path}: certificate has {found} spiffe:// URI subject alternative names, expected exactly one")]
    NoIdentity {
        /// Where the certificate came from (a file, or `peer certificate`).
        path: String,
        /// How many it has.
        found: usize,
    },
    /// A SPIFFE id is not a gateway identity.
    #[error("{uri:?} is not a gateway identity spiffe://<trust-domain>/zone/<zone>/gateway/<name>: {reason}")]
    BadIdentity {
        /// The text.
        uri: String,
        /// What is wrong.
        reason: String,
    },
    /// The certificate does not verify against the CA (wrong CA, expired, not yet valid, …).
    #[error("{cert}: does not verify against the CA in {ca}: {reason}")]
    NotIssuedByCa {
        /// The certificate file.
        cert: String,
        /// The CA file.
        ca: String,
        /// The verifier's reason.
        reason: String,
    },
    /// The private key is not the key of the certificate, or cannot sign.
    #[error("{key}: not the private key of the certificate in {cert}: {reason}")]
    KeyMismatch {
        /// The certificate file.
        cert: String,
        /// The key file.
        key: String,
        /// Why.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("tls configuration: {0}")]
    Config(#[from] rustls::Error),
    /// A certificate verifier could not be built (an empty or unusable root store).
    #[error("tls verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The TLS configuration cannot be used for QUIC.
    #[error("quic: the tls configuration has no TLS 1.3 cipher suite usable for QUIC: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    /// A QUIC connection has no peer certificate (it was not made with our configurations).
    #[error("peer presented no certificate")]
    NoPeerCertificate,
}

/// The identity of one gateway: `spiffe://<trust_domain>/zone/<zone>/gateway/<name>`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GatewayIdentity {
    /// The SPIFFE trust domain (`cluster.local`).
    pub trust_domain: String,
    /// The zone (a DNS label).
    pub zone: String,
    /// The gateway's name within its zone (a DNS label).
    pub name: String,
}

impl GatewayIdentity {
    /// A checked identity: `trust_domain` in SPIFFE's trust-domain alphabet (lower-case letters,
    /// digits, `.`, `-`, `_`), `zone` and `name` DNS labels (lower-case letters, digits and `-`,
    /// 1 to 63 characters, starting and ending with a letter or digit).
    pub fn new(trust_domain: &str, zone: &str, name: &str) -> Result<Self, TlsError> {
        let id =
            GatewayIdentity { trust_domain: trust_domain.to_owned(), zone: zone.to_owned(), name: name.to_owned() };
        let bad = |reason: String| TlsError::BadIdentity { uri: id.spiffe_id(), reason };
        check_trust_domain(trust_domain).map_err(bad)?;
        check_label("zone", zone).map_err(bad)?;
        check_label("gateway name", name).map_err(bad)?;
        Ok(id)
    }

    /// `spiffe://<trust_domain>/zone/<zone>/gateway/<name>`.
    pub fn spiffe_id(&self) -> String {
        format!("spiffe://{}/zone/{}/gateway/{}", self.trust_domain, self.zone, self.name)
    }

    /// Parses `spiffe://<trust_domain>/zone/<zone>/gateway/<name>`, strictly (no query, no
    /// fragment, no trailing slash, no other path).
    pub fn parse(uri: &str) -> Result<Self, TlsError> {
        let bad = |reason: &str| TlsError::BadIdentity { uri: uri.to_owned(), reason: reason.to_owned() };
        let rest = uri.strip_prefix("spiffe://").ok_or_else(|| bad("it does not start with spiffe://"))?;
        let (td, path) = rest.split_once('/').ok_or_else(|| bad("it has no path"))?;
        let parts: Vec<&str> = path.split('/').collect();
        let [zone_kw, zone, gw_kw, name] = parts.as_slice() else {
            return Err(bad("the path must be /zone/<zone>/gateway/<name>"));
        };
        if *zone_kw != "zone" || *gw_kw != "gateway" {
            return Err(bad("the path must be /zone/<zone>/gateway/<name>"));
        }
        GatewayIdentity::new(td, zone, name).map_err(|e| match e {
            TlsError::BadIdentity { reason, .. } => TlsError::BadIdentity { uri: uri.to_owned(), reason },
            other => other,
        })
    }
}

impl fmt::Display for GatewayIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.spiffe_id())
    }
}

/// The server name a client connects to `id` with, and the DNS SAN every gateway certificate
/// carries beside its URI SAN: `<name>.<zone>.gateway.keyway`.
///
/// rustls checks server names as DNS names (or IP addresses), never as SPIFFE URIs, so the
/// client's WebPKI check of "is this the gateway I dialled" runs on this name; it is a name of
/// the certificate only and is never resolved. The trust domain is not part of it: one overlay
/// CA serves one trust domain.
pub fn server_name(id: &GatewayIdentity) -> String {
    format!("{}.{}.{SERVER_NAME_SUFFIX}", id.name, id.zone)
}

/// A SPIFFE trust domain: 1 to 255 characters of `a-z 0-9 . - _`.
pub(crate) fn check_trust_domain(td: &str) -> Result<(), String> {
    if td.is_empty() || td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(format!("trust domain {td:?} must have 1 to {MAX_TRUST_DOMAIN_LEN} characters"));
    }
    if !td.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')) {
        return Err(format!("trust domain {td:?} may hold only lower-case letters, digits, '.', '-' and '_'"));
    }
    Ok(())
}

/// A DNS label (RFC 1123), lower case: it goes into the server name.
pub(crate) fn check_label(what: &str, s: &str) -> Result<(), String> {
    let ok_chars = s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if s.is_empty() || s.len() > MAX_LABEL_LEN || !ok_chars || s.starts_with('-') || s.ends_with('-') {
        return Err(format!(
            "{what} {s:?} must be a DNS label: 1 to {MAX_LABEL_LEN} lower-case letters, digits or '-', \
             starting and ending with a letter or digit"
        ));
    }
    Ok(())
}

/// What a gateway needs for the overlay: the CA certificate(s) it trusts, its own certificate
/// chain (leaf first) and its private key. `Debug` does not show the key.
pub struct TlsMaterial {
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    identity: GatewayIdentity,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("identity", &self.identity.spiffe_id())
            .field("ca_certificates", &self.ca.len())
            .field("chain_certificates", &self.chain.len())
            .field("key", &"[redacted]")
            .finish()
    }
}

impl TlsMaterial {
    /// Loads the CA certificate(s), the gateway's certificate chain (leaf first) and its private
    /// key from PEM files; every error names the file.
    ///
    /// `ca_cert` may hold several certificates (a trust bundle while the CA is being replaced);
    /// every one of them is trusted. Loading checks what would otherwise only fail at the first
    /// handshake: the leaf verifies against the CA now (issuer, signature, validity period), the
    /// key is the leaf's, and the leaf carries one gateway identity.
    pub fn load(ca_cert: &Path, cert: &Path, key: &Path) -> Result<TlsMaterial, TlsError> {
        let read =
            |p: &Path| std::fs::read(p).map_err(|source| TlsError::Read { path: p.display().to_string(), source });
        let (ca_pem, cert_pem, key_pem) = (read(ca_cert)?, read(cert)?, read(key)?);
        let names = [ca_cert, cert, key].map(|p| p.display().to_string());
        Self::from_pem_named(&ca_pem, &cert_pem, &key_pem, names)
    }

    /// As [`TlsMaterial::load`], from PEM text in memory (errors name `ca.pem`, `cert.pem` and
    /// `key.pem`).
    pub fn from_pem(ca_cert: &[u8], cert: &[u8], key: &[u8]) -> Result<TlsMaterial, TlsError> {
        Self::from_pem_named(ca_cert, cert, key, ["ca.pem", "cert.pem", "key.pem"].map(str::to_owned))
    }

    fn from_pem_named(
        ca_pem: &[u8],
        cert_pem: &[u8],
        key_pem: &[u8],
        [ca_name, cert_name, key_name]: [String; 3],
    ) -> Result<TlsMaterial, TlsError> {
        let (ca, chain, key) = pem_set(ca_pem, cert_pem, key_pem, &ca_name, &cert_name, &key_name)?;
        for (index, c) in ca.iter().chain(chain.iter()).enumerate() {
            let path = if index < ca.len() { &ca_name } else { &cert_name };
            let index = if index < ca.len() { index } else { index - ca.len() };
            X509Certificate::from_der(c).map_err(|e| TlsError::X509 {
                path: path.clone(),
                index,
                reason: e.to_string(),
            })?;
        }
        let (leaf, intermediates) = chain.split_first().ok_or_else(|| TlsError::Missing {
            path: cert_name.clone(),
            what: "certificate",
            label: "CERTIFICATE",
        })?;
        let identity = identity_of(leaf, &cert_name)?;

        let provider = provider();
        let signing_key = provider.key_provider.load_private_key(key.clone_key()).map_err(|e| {
            TlsError::KeyMismatch { cert: cert_name.clone(), key: key_name.clone(), reason: e.to_string() }
        })?;
        rustls::sign::CertifiedKey::new(chain.clone(), signing_key).keys_match().map_err(|e| {
            TlsError::KeyMismatch { cert: cert_name.clone(), key: key_name.clone(), reason: e.to_string() }
        })?;

        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(&ca, &ca_name)?), provider).build()?;
        verifier.verify_client_cert(leaf, intermediates, UnixTime::now()).map_err(|e| TlsError::NotIssuedByCa {
            cert: cert_name.clone(),
            ca: ca_name.clone(),
            reason: e.to_string(),
        })?;
        Ok(TlsMaterial { ca, chain, key, identity })
    }

    /// This gateway's identity, from its certificate's SPIFFE URI SAN.
    pub fn identity(&self) -> Result<GatewayIdentity, TlsError> {
        Ok(self.identity.clone())
    }

    /// The trusted CA certificates.
    pub fn ca_certs(&self) -> &[CertificateDer<'static>] {
        &self.ca
    }

    /// The own certificate chain, leaf first.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    fn roots(&self) -> Result<Arc<RootCertStore>, TlsError> {
        root_store(&self.ca, "ca certificate").map(Arc::new)
    }
}

/// The one crypto provider of keyway: ring, with AES-128-GCM as the first TLS 1.3 suite (ring's
/// default puts AES-256-GCM first, about a third more work per byte on CPUs with AES
/// instructions; both ends of the overlay and of delivery are keyway's, so they agree on it).
pub(crate) fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

/// The certificates of `ca_pem`, the chain of `cert_pem` and the key of `key_pem`, each parsed
/// from PEM; errors name the file (`*_name`).
pub(crate) fn pem_set(
    ca_pem: &[u8],
    cert_pem: &[u8],
    key_pem: &[u8],
    ca_name: &str,
    cert_name: &str,
    key_name: &str,
) -> Result<(Vec<CertificateDer<'static>>, Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let ca = certs(ca_pem, ca_name)?;
    let chain = certs(cert_pem, cert_name)?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => {
            TlsError::Missing { path: key_name.to_owned(), what: "private key", label: "PRIVATE KEY" }
        }
        other => TlsError::Pem { path: key_name.to_owned(), reason: other.to_string() },
    })?;
    Ok((ca, chain, key))
}

pub(crate) fn certs(pem: &[u8], path: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { path: path.to_owned(), reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::Missing { path: path.to_owned(), what: "certificate", label: "CERTIFICATE" });
    }
    Ok(certs)
}

pub(crate) fn root_store(ca: &[CertificateDer<'static>], path: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for (index, c) in ca.iter().enumerate() {
        roots.add(c.clone()).map_err(|e| TlsError::X509 { path: path.to_owned(), index, reason: e.to_string() })?;
    }
    Ok(roots)
}

/// The one gateway identity in `cert`'s SPIFFE URI SANs.
fn identity_of(cert: &CertificateDer<'_>, path: &str) -> Result<GatewayIdentity, TlsError> {
    let (_, x509) = X509Certificate::from_der(cert).map_err(|e| TlsError::X509 {
        path: path.to_owned(),
        index: 0,
        reason: e.to_string(),
    })?;
    let san = x509.subject_alternative_name().map_err(|e| TlsError::X509 {
        path: path.to_owned(),
        index: 0,
        reason: e.to_string(),
    })?;
    let uris: Vec<&str> = san
        .map(|s| s.value.general_names.iter())
        .into_iter()
        .flatten()
        .filter_map(|n| match n {
            GeneralName::URI(u) if u.starts_with("spiffe://") => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [uri] => GatewayIdentity::parse(uri),
        other => Err(TlsError::NoIdentity { path: path.to_owned(), found: other.len() }),
    }
}

/// The QUIC server configuration of the overlay: TLS 1.3 only, a client certificate required
/// and verified against the overlay CA only, ALPN [`ALPN`] (strict: a client without it is
/// refused). Transport settings are quinn's defaults; the caller may replace them.
pub fn quic_server_config(m: &TlsMaterial) -> Result<quinn::ServerConfig, TlsError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(m.roots()?, provider.clone()).build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(m.chain.clone(), m.key.clone_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(quic)))
}

/// The QUIC server configuration of the edge listener: the gateway's overlay certificate, TLS
/// 1.3 only, ALPN [`EDGE_ALPN`], and a client certificate required that chains to one of `roots`
/// (the overlay CA for devices, the mesh CA for pods) and is not listed in `crls` (only the
/// end entity is checked; a certificate of a CA without a list is not revoked). Returns the
/// client verifier too, to check open connections again when the lists change.
pub fn quic_edge_server_config(
    m: &TlsMaterial,
    roots: Arc<RootCertStore>,
    crls: Vec<rustls_pki_types::CertificateRevocationListDer<'static>>,
) -> Result<(quinn::ServerConfig, Arc<dyn rustls::server::danger::ClientCertVerifier>), TlsError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .with_crls(crls)
        .only_check_end_entity_revocation()
        .allow_unknown_revocation_status()
        .build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier.clone())
        .with_single_cert(m.chain.clone(), m.key.clone_key())?;
    tls.alpn_protocols = vec![EDGE_ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    Ok((quinn::ServerConfig::with_crypto(Arc::new(quic)), verifier))
}

/// The overlay CA's certificates of `m` and the certificates of `more` in one root store.
pub fn merged_roots(m: &TlsMaterial, more: &RootCertStore) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = root_store(&m.ca, "ca certificate")?;
    store.roots.extend(more.roots.iter().cloned());
    Ok(Arc::new(store))
}

/// The QUIC client configuration of the overlay: presents the gateway's certificate, verifies
/// the server against the overlay CA only (connect with [`server_name`] of the gateway dialled),
/// TLS 1.3 only, ALPN [`ALPN`].
pub fn quic_client_config(m: &TlsMaterial) -> Result<quinn::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = WebPkiServerVerifier::builder_with_provider(m.roots()?, provider.clone()).build()?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(m.chain.clone(), m.key.clone_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    Ok(quinn::ClientConfig::new(Arc::new(quic)))
}

/// The certificate chain (leaf first) the peer of an established connection presented; empty when
/// none.
pub fn peer_chain(conn: &quinn::Connection) -> Vec<CertificateDer<'static>> {
    conn.peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .map(|c| *c)
        .unwrap_or_default()
}

/// Whether `chain` (leaf first, then intermediates) chains to one of `roots`, now.
pub fn chains_to(chain: &[CertificateDer<'_>], roots: &Arc<RootCertStore>) -> bool {
    let Some((leaf, intermediates)) = chain.split_first() else { return false };
    let Ok(verifier) = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider()).build() else {
        return false;
    };
    verifier.verify_client_cert(leaf, intermediates, UnixTime::now()).is_ok()
}

/// The CA of each zone that has its own (`zones[].ca`), loaded; errors name the file.
pub fn zone_roots(
    config: &crate::config::Config,
) -> Result<std::collections::BTreeMap<String, Arc<RootCertStore>>, TlsError> {
    let mut out = std::collections::BTreeMap::new();
    for z in &config.zones {
        let Some(path) = &z.ca else { continue };
        let name = path.display().to_string();
        let pem = std::fs::read(path).map_err(|source| TlsError::Read { path: name.clone(), source })?;
        out.insert(z.name.clone(), Arc::new(root_store(&certs(&pem, &name)?, &name)?));
    }
    Ok(out)
}

/// The server name every gateway of `zone` answers to besides its own (`<zone>.gateway.keyway`,
/// the second DNS SAN of a gateway certificate): dialled through a zone's `entry`.
pub fn zone_server_name(zone: &str) -> String {
    format!("{zone}.{SERVER_NAME_SUFFIX}")
}

/// The identity of the gateway at the other end of an established connection, from the SPIFFE
/// URI SAN of the leaf certificate it presented (which the handshake verified against the
/// overlay CA).
pub fn peer_identity(conn: &quinn::Connection) -> Result<GatewayIdentity, TlsError> {
    let any = conn.peer_identity().ok_or(TlsError::NoPeerCertificate)?;
    let certs = any.downcast::<Vec<CertificateDer<'static>>>().map_err(|_| TlsError::NoPeerCertificate)?;
    let leaf = certs.first().ok_or(TlsError::NoPeerCertificate)?;
    identity_of(leaf, "peer certificate")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::Ca;
    use std::time::{Duration, SystemTime};

    fn material(ca: &Ca, zone: &str, name: &str) -> TlsMaterial {
        let issued = ca.issue(zone, name, 1, SystemTime::now()).unwrap();
        TlsMaterial::from_pem(ca.cert_pem().as_bytes(), issued.cert_pem.as_bytes(), issued.key_pem().as_bytes())
            .unwrap()
    }

    /// One handshake and one echoed stream between a server with `server_m` and a client with
    /// `client_m` dialling `sni`: (what the server saw of the client, what the client saw of the
    /// server), each an identity or the error text.
    async fn exchange(
        server_m: &TlsMaterial,
        client_m: &TlsMaterial,
        sni: &str,
    ) -> (Result<GatewayIdentity, String>, Result<GatewayIdentity, String>) {
        let server =
            quinn::Endpoint::server(quic_server_config(server_m).unwrap(), "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = server.local_addr().unwrap();
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        client.set_default_client_config(quic_client_config(client_m).unwrap());
        let accept = async {
            let conn = server.accept().await.ok_or("endpoint closed")?.await.map_err(|e| e.to_string())?;
            let id = peer_identity(&conn).map_err(|e| e.to_string())?;
            let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| e.to_string())?;
            let data = recv.read_to_end(64).await.map_err(|e| e.to_string())?;
            send.write_all(&data).await.map_err(|e| e.to_string())?;
            send.finish().map_err(|e| e.to_string())?;
            conn.closed().await;
            Ok::<_, String>(id)
        };
        let connect = async {
            let conn = client.connect(addr, sni).map_err(|e| e.to_string())?.await.map_err(|e| e.to_string())?;
            let id = peer_identity(&conn).map_err(|e| e.to_string())?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            send.write_all(b"ping").await.map_err(|e| e.to_string())?;
            send.finish().map_err(|e| e.to_string())?;
            let echo = recv.read_to_end(64).await.map_err(|e| e.to_string())?;
            assert_eq!(echo, b"ping");
            conn.close(0u32.into(), b"done");
            Ok::<_, String>(id)
        };
        tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(accept, connect) })
            .await
            .expect("the exchange ends within the deadline")
    }

    #[test]
    fn identity_round_trip_and_server_name() {
        let id = GatewayIdentity::new("cluster.local", "zone-a", "gw-1").unwrap();
        assert_eq!(id.spiffe_id(), "spiffe://cluster.local/zone/zone-a/gateway/gw-1");
        assert_eq!(id.to_string(), id.spiffe_id());
        assert_eq!(GatewayIdentity::parse(&id.spiffe_id()).unwrap(), id);
        assert_eq!(server_name(&id), "gw-1.zone-a.gateway.keyway");
        assert!(rustls_pki_types::ServerName::try_from(server_name(&id)).is_ok());
    }

    #[test]
    fn identity_parse_is_strict() {
        for bad in [
            "",
            "https://td/zone/a/gateway/b",
            "spiffe://td",
            "spiffe://td/",
            "spiffe:///zone/a/gateway/b",
            "spiffe://td/zone/a/gateway/b/",
            "spiffe://td/zone/a/gateway",
            "spiffe://td/ns/a/sa/b",
            "spiffe://td/zone/a/gw/b",
            "spiffe://td/zone//gateway/b",
            "spiffe://TD/zone/a/gateway/b",
            "spiffe://td/zone/A/gateway/b",
            "spiffe://td/zone/a/gateway/b?x=1",
            "spiffe://td/zone/a/gateway/b.c",
            "spiffe://td:8080/zone/a/gateway/b",
        ] {
            let err = GatewayIdentity::parse(bad).unwrap_err();
            assert!(matches!(err, TlsError::BadIdentity { ref uri, .. } if uri == bad), "{bad}: {err}");
        }
    }

    #[test]
    fn load_errors_name_the_file() {
        let ca = Ca::generate("td", 10, SystemTime::now()).unwrap();
        let other = Ca::generate("td", 10, SystemTime::now()).unwrap();
        let issued = ca.issue("z", "g", 1, SystemTime::now()).unwrap();
        let foreign = other.issue("z", "g", 1, SystemTime::now()).unwrap();
        let (cap, cert, key) = (ca.cert_pem().as_bytes(), issued.cert_pem.as_bytes(), issued.key_pem().as_bytes());
        let err = |r: Result<TlsMaterial, TlsError>| r.unwrap_err().to_string();
        assert!(err(TlsMaterial::from_pem(b"", cert, key)).starts_with("ca.pem: no certificate"));
        assert!(err(TlsMaterial::from_pem(cap, b"junk", key)).starts_with("cert.pem: no certificate"));
        assert!(err(TlsMaterial::from_pem(cap, cert, b"")).starts_with("key.pem: no private key"));
        let e = err(TlsMaterial::from_pem(cap, cert, foreign.key_pem().as_bytes()));
        assert!(e.starts_with("key.pem: not the private key of the certificate in cert.pem"), "{e}");
        let e = err(TlsMaterial::from_pem(cap, foreign.cert_pem.as_bytes(), foreign.key_pem().as_bytes()));
        assert!(e.starts_with("cert.pem: does not verify against the CA in ca.pem"), "{e}");
        // A CA certificate is not a gateway certificate.
        assert!(TlsMaterial::from_pem(cap, cap, key).is_err());
        let dir = std::env::temp_dir().join(format!("keyway-tls-{}", std::process::id()));
        let e = err(TlsMaterial::load(&dir.join("ca.pem"), &dir.join("c.pem"), &dir.join("k.pem")));
        assert!(e.contains("ca.pem: cannot read"), "{e}");
        // A trust bundle of two CAs accepts certificates of either.
        let bundle = format!("{}{}", other.cert_pem(), ca.cert_pem());
        let m = TlsMaterial::from_pem(bundle.as_bytes(), cert, key).unwrap();
        assert_eq!(m.ca_certs().len(), 2);
        assert!(format!("{m:?}").contains("[redacted]"));
    }

    #[tokio::test]
    async fn mutual_tls_gives_each_side_the_others_identity() {
        let ca = Ca::generate("cluster.local", 10, SystemTime::now()).unwrap();
        let a = material(&ca, "zone-a", "gw-1");
        let b = material(&ca, "zone-b", "gw-2");
        let (seen_by_server, seen_by_client) = exchange(&a, &b, &server_name(&a.identity().unwrap())).await;
        assert_eq!(seen_by_server.unwrap(), b.identity().unwrap());
        assert_eq!(seen_by_client.unwrap(), a.identity().unwrap());
    }

    #[tokio::test]
    async fn foreign_ca_and_wrong_server_name_are_refused() {
        let ca = Ca::generate("cluster.local", 10, SystemTime::now()).unwrap();
        let other = Ca::generate("cluster.local", 10, SystemTime::now()).unwrap();
        let a = material(&ca, "zone-a", "gw-1");
        let b = material(&ca, "zone-b", "gw-1");
        let intruder = material(&other, "zone-b", "gw-1");
        let sni = server_name(&a.identity().unwrap());
        let (server, client) = exchange(&a, &intruder, &sni).await;
        assert!(server.is_err() && client.is_err(), "{server:?} {client:?}");
        let (server, client) = exchange(&intruder, &a, &server_name(&intruder.identity().unwrap())).await;
        assert!(server.is_err() && client.is_err(), "{server:?} {client:?}");
        // A gateway of our CA answering for another gateway's name is refused by the client.
        let (server, client) = exchange(&a, &b, "gw-9.zone-a.gateway.keyway").await;
        let client = client.unwrap_err();
        assert!(client.contains("NotValidForName") || client.contains("not valid for name"), "{client}");
        assert!(server.is_err(), "{server:?}");
    }
}
