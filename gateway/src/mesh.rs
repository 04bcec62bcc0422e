//! Mutual TLS of the sidecar legs, with mesh workload certificates: the tunnel and key service a
//! gateway serves to its zone's sidecars, and delivery from a gateway to a sidecar's keyway
//! inbound port. No key, token or ticket crosses a network in cleartext, and identities come
//! from certificates chained to the mesh root, not from addresses.
//!
//! A mesh certificate carries one SPIFFE URI SAN, `spiffe://<trust domain>/ns/<ns>/sa/<sa>` (what
//! istiod issues to every sidecar, and what [`crate::ca::Ca::issue_workload`] issues where there
//! is no istiod). The gateway's own mesh certificate is its service account's; in Istio,
//! istio-agent writes it with `OUTPUT_CERTS` and rotates it, and the gateway re-reads the files
//! when they change (`State::reload_secrets`).
//!
//! Sidecar certificates name no host, so a client here verifies the chain to the mesh root and
//! not a server name; the caller then checks the peer's SPIFFE id against the workload it means
//! to reach ([`peer_id`]).

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::DigitallySignedStruct;
use rustls::RootCertStore;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::MeshFiles;
use crate::tls::{TlsError, pem_set, provider, root_store};

/// The ALPN protocol of the sidecar legs: HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";

/// A mesh identity's certificate, key and the mesh root(s). `Debug` does not show the key.
#[derive(Clone)]
pub struct MeshTls {
    identity: String,
    roots: Arc<RootCertStore>,
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

impl fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshTls").field("identity", &self.identity).field("key", &"[redacted]").finish()
    }
}

/// The one SPIFFE id among `cert`'s URI SANs, if it has exactly one.
pub fn spiffe_id(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, x509) = X509Certificate::from_der(cert).ok()?;
    let san = x509.subject_alternative_name().ok()??;
    let mut ids = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(u) if u.starts_with("spiffe://") => Some((*u).to_owned()),
        _ => None,
    });
    let id = ids.next()?;
    ids.next().is_none().then_some(id)
}

/// The SPIFFE id of the peer of an established TLS connection (its leaf certificate, which the
/// handshake verified against the mesh root).
pub fn peer_id(conn: &rustls::CommonState) -> Option<String> {
    spiffe_id(conn.peer_certificates()?.first()?)
}

impl MeshTls {
    /// Loads the mesh root(s), the certificate chain (leaf first) and the key of `files`; every
    /// error names the file. Checks now what would fail at the first handshake: the leaf chains
    /// to a root, the key is the leaf's, and the leaf carries one SPIFFE id.
    pub fn load(files: &MeshFiles) -> Result<MeshTls, TlsError> {
        let read =
            |p: &Path| std::fs::read(p).map_err(|source| TlsError::Read { path: p.display().to_string(), source });
        let names = [&files.ca, &files.cert, &files.key].map(|p| p.display().to_string());
        Self::from_pem_named(&read(&files.ca)?, &read(&files.cert)?, &read(&files.key)?, names)
    }

    /// As [`MeshTls::load`], from PEM text in memory.
    pub fn from_pem(ca: &[u8], cert: &[u8], key: &[u8]) -> Result<MeshTls, TlsError> {
        Self::from_pem_named(ca, cert, key, ["mesh root", "mesh certificate", "mesh key"].map(str::to_owned))
    }

    fn from_pem_named(
        ca_pem: &[u8],
        cert_pem: &[u8],
        key_pem: &[u8],
        [ca_name, cert_name, key_name]: [String; 3],
    ) -> Result<MeshTls, TlsError> {
        let (ca, chain, key) = pem_set(ca_pem, cert_pem, key_pem, &ca_name, &cert_name, &key_name)?;
        let roots = Arc::new(root_store(&ca, &ca_name)?);
        let (leaf, intermediates) = chain.split_first().ok_or_else(|| TlsError::Missing {
            path: cert_name.clone(),
            what: "certificate",
            label: "CERTIFICATE",
        })?;
        let identity = spiffe_id(leaf).ok_or(TlsError::NoIdentity { path: cert_name.clone(), found: 0 })?;
        let provider = provider();
        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone()).build()?;
        client_verifier.verify_client_cert(leaf, intermediates, UnixTime::now()).map_err(|e| {
            TlsError::NotIssuedByCa { cert: cert_name.clone(), ca: ca_name.clone(), reason: e.to_string() }
        })?;
        let mismatch = |e: rustls::Error| TlsError::KeyMismatch {
            cert: cert_name.clone(),
            key: key_name.clone(),
            reason: e.to_string(),
        };
        let signing_key = provider.key_provider.load_private_key(key.clone_key()).map_err(mismatch)?;
        rustls::sign::CertifiedKey::new(chain.clone(), signing_key).keys_match().map_err(mismatch)?;

        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())?;
        server.alpn_protocols = vec![ALPN_H2.to_vec()];
        let verifier = Arc::new(RootOnly { roots: roots.clone(), provider: provider.clone() });
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(chain, key)?;
        client.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(MeshTls { identity, roots, server: Arc::new(server), client: Arc::new(client) })
    }

    /// Its SPIFFE id.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// The server side: its certificate, a client certificate chained to the mesh root
    /// required, TLS 1.2 or 1.3, ALPN `h2`.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.server.clone()
    }

    /// The client side: its certificate presented, the server's chain verified to the mesh root
    /// (names are the caller's to check, with [`peer_id`]), ALPN `h2`.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.client.clone()
    }

    /// The mesh root(s).
    pub fn roots(&self) -> &Arc<RootCertStore> {
        &self.roots
    }
}

/// A server verifier that checks the chain to the mesh root and nothing of the name: mesh
/// certificates carry a SPIFFE id and no host name, and the caller checks the id after the
/// handshake.
#[derive(Debug)]
struct RootOnly {
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for RootOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;
    use crate::ca::Ca;

    fn issued(ca: &Ca, ns: &str, sa: &str) -> MeshTls {
        let (cert, key) = ca.issue_workload(ns, sa, 1, SystemTime::now()).unwrap();
        MeshTls::from_pem(ca.cert_pem().as_bytes(), cert.as_bytes(), key.as_bytes()).unwrap()
    }

    #[test]
    fn a_workload_certificate_carries_its_spiffe_id_and_chains_to_its_root() {
        let ca = Ca::generate("cluster.local", 2, SystemTime::now()).unwrap();
        let m = issued(&ca, "shop", "cart");
        assert_eq!(m.identity(), "spiffe://cluster.local/ns/shop/sa/cart");
        // Another mesh's root does not take it.
        let other = Ca::generate("cluster.local", 2, SystemTime::now()).unwrap();
        let (cert, key) = ca.issue_workload("shop", "cart", 1, SystemTime::now()).unwrap();
        let err = MeshTls::from_pem(other.cert_pem().as_bytes(), cert.as_bytes(), key.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("does not verify against the CA"), "{err}");
        // A key of another certificate is refused.
        let (_, key2) = ca.issue_workload("shop", "cart", 1, SystemTime::now()).unwrap();
        let err = MeshTls::from_pem(ca.cert_pem().as_bytes(), cert.as_bytes(), key2.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("not the private key"), "{err}");
        assert!(ca.issue_workload("Shop", "cart", 1, SystemTime::now()).is_err(), "not a Kubernetes name");
    }
}
