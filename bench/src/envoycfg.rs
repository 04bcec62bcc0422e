//! Envoy sidecar configurations of the comparison paths (the keyway path uses the end-to-end
//! harness's own sidecar, `keyway_e2e::envoy::Sidecar`).
//!
//! * `baseline`: the same capture as keyway's sidecars (outbound to 15001, inbound to 15006), plain
//!   `tcp_proxy` to the original destination both ways, no filter: what the Envoy pair costs.
//! * `hbone`: the shape of Istio's HBONE between two sidecars: the client sidecar tunnels each
//!   captured connection as an HTTP/2 CONNECT over mutual TLS to the server sidecar's port 15008,
//!   which terminates it and connects to the app on 127.0.0.1.

/// The HBONE port of the server sidecar.
pub const HBONE_PORT: u16 = 15008;

fn admin() -> &'static str {
    "admin:\n  address: { socket_address: { address: 127.0.0.1, port_value: 15000 } }\n"
}

fn passthrough_listener(name: &str, port: u16, cluster: &str, tunnel: bool) -> String {
    let tunneling =
        if tunnel { "          tunneling_config: { hostname: \"%DOWNSTREAM_LOCAL_ADDRESS%\" }\n" } else { "" };
    format!(
        r#"  - name: {name}
    address: {{ socket_address: {{ address: 0.0.0.0, port_value: {port} }} }}
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {name}
          cluster: {cluster}
{tunneling}"#
    )
}

const ORIGINAL_DST_CLUSTER: &str = r#"  - name: passthrough
    connect_timeout: 1s
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
"#;

/// The plain Envoy sidecar (either side).
pub fn baseline() -> String {
    format!(
        "{admin}static_resources:\n  listeners:\n{out}{inb}  clusters:\n{od}",
        admin = admin(),
        out = passthrough_listener("outbound", 15001, "passthrough", false),
        inb = passthrough_listener("inbound", 15006, "passthrough", false),
        od = ORIGINAL_DST_CLUSTER,
    )
}

/// A TLS transport socket, its lines shifted right by `indent` spaces.
fn tls_context(kind: &str, dir: &str, extra: &str, indent: usize) -> String {
    let text = format!(
        r#"transport_socket:
  name: envoy.transport_sockets.tls
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.{kind}
{extra}    common_tls_context:
      alpn_protocols: [h2]
      tls_certificates:
      - certificate_chain: {{ filename: "{dir}/cert.pem" }}
        private_key: {{ filename: "{dir}/key.pem" }}
      validation_context:
        trusted_ca: {{ filename: "{dir}/ca.pem" }}
"#
    );
    let pad = " ".repeat(indent);
    text.lines().map(|l| format!("{pad}{l}\n")).collect()
}

/// The HBONE-shaped client sidecar: captured connections tunnel to `server_ip`:15008.
pub fn hbone_client(server_ip: &str, certs: &str) -> String {
    let tls = tls_context("UpstreamTlsContext", certs, "", 4);
    format!(
        r#"{admin}static_resources:
  listeners:
{out}{inb}  clusters:
{od}  - name: hbone
    connect_timeout: 1s
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: hbone
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: {server_ip}, port_value: {HBONE_PORT} }} }} }}
{tls}"#,
        admin = admin(),
        out = passthrough_listener("outbound", 15001, "hbone", true),
        inb = passthrough_listener("inbound", 15006, "passthrough", false),
        od = ORIGINAL_DST_CLUSTER,
    )
}

/// The HBONE-shaped server sidecar: mutual TLS and HTTP/2 CONNECT on 15008 to the app ports.
pub fn hbone_server(app_ports: &[u16], certs: &str) -> String {
    let mut vhosts = String::new();
    let mut clusters = String::new();
    for p in app_ports {
        vhosts.push_str(&format!(
            r#"            - name: app_{p}
              domains: ["*:{p}"]
              routes:
              - match: {{ connect_matcher: {{}} }}
                route: {{ cluster: app_{p}, upgrade_configs: [ {{ upgrade_type: CONNECT, connect_config: {{}} }} ] }}
"#
        ));
        clusters.push_str(&format!(
            r#"  - name: app_{p}
    connect_timeout: 1s
    type: STATIC
    load_assignment:
      cluster_name: app_{p}
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {p} }} }} }}
"#
        ));
    }
    let tls = tls_context("DownstreamTlsContext", certs, "    require_client_certificate: true\n", 6);
    format!(
        r#"{admin}static_resources:
  listeners:
{out}{inb}  - name: hbone
    address: {{ socket_address: {{ address: 0.0.0.0, port_value: {HBONE_PORT} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: hbone
          codec_type: HTTP2
          http2_protocol_options: {{ allow_connect: true }}
          upgrade_configs: [ {{ upgrade_type: CONNECT }} ]
          route_config:
            name: hbone
            virtual_hosts:
{vhosts}          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
{tls}  clusters:
{od}{clusters}"#,
        admin = admin(),
        out = passthrough_listener("outbound", 15001, "passthrough", false),
        inb = passthrough_listener("inbound", 15006, "passthrough", false),
        od = ORIGINAL_DST_CLUSTER,
    )
}
