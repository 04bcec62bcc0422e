//! Pieces of Envoy bootstraps, shared by the keyway sidecar ([`super::Sidecar`]) and the
//! benchmark's comparison sidecars. Each piece is YAML at the indentation of where it goes:
//! listeners and clusters at two spaces (items of `static_resources.listeners`/`.clusters`),
//! network filters at six (items of a filter chain's `filters`), HTTP filters and extra
//! `typed_config` lines at ten.

use std::fmt::Write as _;

use super::ADMIN_PORT;

/// `text` with every line shifted right by `spaces`.
pub fn indent(text: &str, spaces: usize) -> String {
    let pad = " ".repeat(spaces);
    text.lines().map(|l| format!("{pad}{l}\n")).collect()
}

/// The admin endpoint on 127.0.0.1 (top level).
pub fn admin() -> String {
    format!("admin:\n  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {ADMIN_PORT} }} }}\n")
}

/// The start of a listener on `0.0.0.0:port`.
pub fn listener(name: &str, port: u16) -> String {
    format!("  - name: {name}\n    address: {{ socket_address: {{ address: 0.0.0.0, port_value: {port} }} }}\n")
}

/// A listener's filter restoring the original destination of a redirected connection.
pub const ORIGINAL_DST: &str = r#"    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst }
"#;

/// The start of a listener's one filter chain.
pub const FILTER_CHAIN: &str = "    filter_chains:\n    - filters:\n";

/// A `tcp_proxy` network filter to `cluster`, with `extra` lines of its `typed_config`.
pub fn tcp_proxy(stat_prefix: &str, cluster: &str, extra: &str) -> String {
    format!(
        r#"      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: {stat_prefix}
          cluster: {cluster}
{extra}"#
    )
}

/// A listener that redirected connections reach (original destination restored), with the
/// network filters `before` and then `tcp_proxy` to `cluster` (and its `extra` lines).
pub fn capture_listener(name: &str, port: u16, before: &str, cluster: &str, extra: &str) -> String {
    format!("{}{ORIGINAL_DST}{FILTER_CHAIN}{before}{}", listener(name, port), tcp_proxy(name, cluster, extra))
}

/// A listener terminating HTTP/2 CONNECT: the `routes` ([`app_routes`]), the HTTP filters
/// `before` the router, and `transport` lines of the filter chain (a TLS socket) after.
pub fn connect_listener(name: &str, port: u16, routes: &str, before: &str, transport: &str) -> String {
    format!(
        r#"{head}{FILTER_CHAIN}      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          codec_type: HTTP2
          http2_protocol_options: {{ allow_connect: true }}
          upgrade_configs: [ {{ upgrade_type: CONNECT }} ]
          route_config:
            name: {name}
            virtual_hosts:
{routes}          http_filters:
{before}          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
{transport}"#,
        head = listener(name, port),
    )
}

/// The CONNECT routes to the app's `ports` on 127.0.0.1 (virtual hosts of [`connect_listener`]),
/// and their clusters ([`app_clusters`]).
pub fn app_routes(ports: &[u16]) -> String {
    let mut out = String::new();
    for p in ports {
        let _ = write!(
            out,
            r#"            - name: app_{p}
              domains: ["*:{p}"]
              routes:
              - match: {{ connect_matcher: {{}} }}
                route: {{ cluster: app_{p}, upgrade_configs: [ {{ upgrade_type: CONNECT, connect_config: {{}} }} ] }}
"#
        );
    }
    out
}

/// The clusters of [`app_routes`].
pub fn app_clusters(ports: &[u16]) -> String {
    ports.iter().map(|p| static_cluster(&format!("app_{p}"), &["127.0.0.1"], *p, false)).collect()
}

/// A cluster of fixed endpoints `addrs`:`port`; `h2`: upstream HTTP/2 (for CONNECT tunnels).
pub fn static_cluster(name: &str, addrs: &[impl AsRef<str>], port: u16, h2: bool) -> String {
    let h2 = if h2 {
        r#"    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: { http2_protocol_options: {} }
"#
    } else {
        ""
    };
    let mut out = format!(
        "  - name: {name}\n    connect_timeout: 1s\n    type: STATIC\n{h2}    load_assignment:\n      cluster_name: {name}\n      endpoints:\n      - lb_endpoints:\n"
    );
    for a in addrs {
        let _ = writeln!(
            out,
            "        - endpoint: {{ address: {{ socket_address: {{ address: {}, port_value: {port} }} }} }}",
            a.as_ref()
        );
    }
    out
}

/// The cluster of original destinations (plain passthrough).
pub const ORIGINAL_DST_CLUSTER: &str =
    "  - name: passthrough\n    connect_timeout: 1s\n    type: ORIGINAL_DST\n    lb_policy: CLUSTER_PROVIDED\n";

/// The certificate, key and trusted root files of one end of a TLS connection, and the URI SAN
/// the other end's certificate must carry, if any.
#[derive(Debug, Clone, Copy)]
pub struct TlsFiles<'a> {
    /// Certificate chain (PEM).
    pub cert: &'a str,
    /// Private key (PEM).
    pub key: &'a str,
    /// Trusted roots (PEM).
    pub ca: &'a str,
    /// The peer's SPIFFE id, matched exactly.
    pub peer: Option<&'a str>,
}

/// A TLS transport socket (`kind`: `UpstreamTlsContext` of a cluster or `DownstreamTlsContext`
/// of a filter chain) with ALPN h2, its lines shifted right by `indent` spaces (four in a
/// cluster, six in a filter chain); `extra` lines of the context before its common part.
pub fn tls_socket(kind: &str, files: TlsFiles<'_>, extra: &str, spaces: usize) -> String {
    let san = files.peer.map_or_else(String::new, |id| {
        format!(
            "        match_typed_subject_alt_names:\n        - {{ san_type: URI, matcher: {{ exact: \"{id}\" }} }}\n"
        )
    });
    let text = format!(
        r#"transport_socket:
  name: envoy.transport_sockets.tls
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.{kind}
{extra}    common_tls_context:
      alpn_protocols: [h2]
      tls_certificates:
      - certificate_chain: {{ filename: "{cert}" }}
        private_key: {{ filename: "{key}" }}
      validation_context:
        trusted_ca: {{ filename: "{ca}" }}
{san}"#,
        cert = files.cert,
        key = files.key,
        ca = files.ca,
    );
    indent(&text, spaces)
}
