//! Envoy sidecar configurations of the comparison paths (the keyway path uses the end-to-end
//! harness's own sidecar, `keyway_e2e::envoy::Sidecar`), from the same pieces
//! (`keyway_e2e::envoy::yaml`).
//!
//! * `baseline`: the same capture as keyway's sidecars (outbound to 15001, inbound to 15006), plain
//!   `tcp_proxy` to the original destination both ways, no filter: what the Envoy pair costs.
//! * `hbone`: the shape of Istio's HBONE between two sidecars: the client sidecar tunnels each
//!   captured connection as an HTTP/2 CONNECT over mutual TLS to the server sidecar's port 15008,
//!   which terminates it and connects to the app on 127.0.0.1.

use keyway_e2e::envoy::yaml::{self, ORIGINAL_DST_CLUSTER};
use keyway_e2e::envoy::{INBOUND_PLAIN_PORT, OUTBOUND_PORT};

/// The HBONE port of the server sidecar.
pub const HBONE_PORT: u16 = 15008;

/// The capture listeners: outbound to `outbound_cluster` (tunnelled when `tunnel`), inbound
/// straight through.
fn capture(outbound_cluster: &str, tunnel: bool) -> String {
    let tunneling =
        if tunnel { "          tunneling_config: { hostname: \"%DOWNSTREAM_LOCAL_ADDRESS%\" }\n" } else { "" };
    yaml::capture_listener("outbound", OUTBOUND_PORT, "", outbound_cluster, tunneling)
        + &yaml::capture_listener("inbound", INBOUND_PLAIN_PORT, "", "passthrough", "")
}

fn bootstrap(listeners: &str, clusters: &str) -> String {
    format!("{}static_resources:\n  listeners:\n{listeners}  clusters:\n{clusters}", yaml::admin())
}

/// The plain Envoy sidecar (either side).
pub fn baseline() -> String {
    bootstrap(&capture("passthrough", false), ORIGINAL_DST_CLUSTER)
}

/// A TLS transport socket with the certificates of `dir` (`cert.pem`, `key.pem`, `ca.pem`).
fn tls_context(kind: &str, dir: &str, extra: &str, indent: usize) -> String {
    let (cert, key, ca) = (format!("{dir}/cert.pem"), format!("{dir}/key.pem"), format!("{dir}/ca.pem"));
    yaml::tls_socket(kind, yaml::TlsFiles { cert: &cert, key: &key, ca: &ca, peer: None }, extra, indent)
}

/// The HBONE-shaped client sidecar: captured connections tunnel to `server_ip`:15008.
pub fn hbone_client(server_ip: &str, certs: &str) -> String {
    let hbone = yaml::static_cluster("hbone", &[server_ip], HBONE_PORT, true)
        + &tls_context("UpstreamTlsContext", certs, "", 4);
    bootstrap(&capture("hbone", true), &(ORIGINAL_DST_CLUSTER.to_owned() + &hbone))
}

/// The HBONE-shaped server sidecar: mutual TLS and HTTP/2 CONNECT on 15008 to the app ports.
pub fn hbone_server(app_ports: &[u16], certs: &str) -> String {
    let tls = tls_context("DownstreamTlsContext", certs, "    require_client_certificate: true\n", 6);
    let hbone = yaml::connect_listener("hbone", HBONE_PORT, &yaml::app_routes(app_ports), "", &tls);
    bootstrap(
        &(capture("passthrough", false) + &hbone),
        &(ORIGINAL_DST_CLUSTER.to_owned() + &yaml::app_clusters(app_ports)),
    )
}
