//! The beds' mesh: a mesh CA issues each sidecar and each gateway replica its workload
//! certificate, as istiod would (`keyway ca issue-workload`), and a client speaks HTTP/2 over
//! mutual TLS as a sidecar does to its gateway (or as a gateway to a sidecar), presenting a mesh
//! certificate, or none, or plain text for the attacks that try.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use keyway_gateway::ca::{Ca, IssuedPaths};
use keyway_gateway::config::MeshFiles;
use keyway_gateway::mesh::{MeshTls, peer_id};

/// The namespace of the gateways' service account.
pub const GATEWAY_NAMESPACE: &str = "keyway-system";
/// The gateways' service account: every replica's mesh certificate names it (each replica has
/// its own key and certificate).
pub const GATEWAY_SERVICE_ACCOUNT: &str = "keyway-gateway";

/// The gateways' mesh identity in trust domain `td`: what a sidecar's keyway inbound listener
/// accepts, and what a sidecar checks its gateway's certificate for.
pub fn gateway_identity(td: &str) -> String {
    format!("spiffe://{td}/ns/{GATEWAY_NAMESPACE}/sa/{GATEWAY_SERVICE_ACCOUNT}")
}

/// Issues the mesh certificate of `namespace`/`service_account` from the mesh CA in `ca_dir`
/// into `out`; returns the files as a gateway's `mesh` section names them.
pub fn issue(ca_dir: &Path, namespace: &str, service_account: &str, out: &Path) -> anyhow::Result<MeshFiles> {
    let ca = Ca::load(ca_dir)?;
    let paths: IssuedPaths = keyway_gateway::ca::issue_workload_with(&ca, namespace, service_account, 30, out)?;
    Ok(MeshFiles { ca: ca_dir.join("ca.pem"), cert: paths.cert, key: paths.key })
}

/// How a client speaks to a tunnel, key service or keyway inbound port.
#[derive(Debug, Clone, Copy)]
pub enum Speak<'a> {
    /// Cleartext HTTP/2 (prior knowledge), as before mutual TLS: refused now.
    Plain,
    /// TLS presenting this mesh certificate.
    As(&'a MeshTls),
}

/// An HTTP/2 connection to `to`, from `from` when given, spoken as `how`; with TLS, the server's
/// SPIFFE id too.
pub async fn h2(
    to: SocketAddr,
    from: Option<IpAddr>,
    how: Speak<'_>,
) -> anyhow::Result<(SendRequest<Empty<Bytes>>, Option<String>)> {
    let sock = if to.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    if let Some(ip) = from {
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    let tcp = tokio::time::timeout(Duration::from_secs(3), sock.connect(to)).await.context("connect timed out")??;
    let _ = tcp.set_nodelay(true);
    match how {
        Speak::Plain => {
            let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
            tokio::spawn(conn);
            Ok((sender, None))
        }
        Speak::As(mesh) => {
            let connector = tokio_rustls::TlsConnector::from(mesh.client_config());
            let name = rustls::pki_types::ServerName::IpAddress(to.ip().into());
            let tls = tokio::time::timeout(Duration::from_secs(3), connector.connect(name, tcp))
                .await
                .context("TLS handshake timed out")?
                .context("TLS handshake")?;
            let server = peer_id(tls.get_ref().1);
            let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
            tokio::spawn(conn);
            Ok((sender, server))
        }
    }
}

/// Loads the mesh certificate of a `mesh` section (panics with the file on error: beds only).
pub fn load(files: &MeshFiles) -> MeshTls {
    MeshTls::load(files).unwrap_or_else(|e| panic!("mesh certificate: {e}"))
}

/// The beds' istiod, with the `keyway` command a user runs: creates the mesh CA of `files`.
pub fn init_ca_cli(keyway: &str, files: &crate::gateway::Files) -> anyhow::Result<()> {
    crate::topology::sh(&[keyway, "ca", "init", "--out", &files.mesh_ca.display().to_string()])?;
    Ok(())
}

fn issue_cli(keyway: &str, files: &crate::gateway::Files, namespace: &str, sa: &str, out: &Path) -> anyhow::Result<()> {
    let (ca, out) = (files.mesh_ca.display().to_string(), out.display().to_string());
    let args =
        [keyway, "ca", "issue-workload", "--ca", &ca, "--namespace", namespace, "--service-account", sa, "--out", &out];
    crate::topology::sh(&args)?;
    Ok(())
}

/// Issues gateway replica `zone`/`name` its own mesh certificate (of the gateways' service
/// account) where its configuration names it ([`crate::gateway::Files::mesh`]).
pub fn issue_gateway_cli(keyway: &str, files: &crate::gateway::Files, zone: &str, name: &str) -> anyhow::Result<()> {
    issue_cli(keyway, files, GATEWAY_NAMESPACE, GATEWAY_SERVICE_ACCOUNT, &files.mesh_dir(zone, name))
}

/// Issues the sidecar of `namespace`/`service_account` its mesh certificate, its key owned by
/// Envoy's user (as istio-agent hands it to Envoy and no one else in the pod).
pub fn issue_sidecar_cli(
    keyway: &str,
    files: &crate::gateway::Files,
    namespace: &str,
    service_account: &str,
) -> anyhow::Result<MeshFiles> {
    issue_cli(keyway, files, namespace, service_account, &files.mesh_certs)?;
    let m = files.workload_mesh(namespace, service_account);
    let uid = crate::envoy::ENVOY_UID;
    std::os::unix::fs::chown(&m.key, Some(uid), Some(uid)).with_context(|| format!("chown {}", m.key.display()))?;
    Ok(m)
}
