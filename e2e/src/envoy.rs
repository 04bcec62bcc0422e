//! The sidecar Envoy of a test workload, configured as Istio configures a sidecar with keyway
//! (mirroring `filter/tests/envoy/*.yaml`): outbound capture by iptables REDIRECT to 15001, where
//! the keyway filter seals a token and `tcp_proxy` tunnels to the zone's gateways with it; the
//! keyway inbound CONNECT listener on 15181, where the filter verifies tickets; every other inbound
//! connection redirected to 15006, where the filter closes what is not exempt.

use std::fmt::Write as _;

/// Envoy runs as this user; iptables leaves its own connections alone (Istio's 1337).
pub const ENVOY_UID: u32 = 1337;
/// Outbound capture port.
pub const OUTBOUND_PORT: u16 = 15001;
/// Plain inbound capture port.
pub const INBOUND_PLAIN_PORT: u16 = 15006;
/// The keyway inbound CONNECT port.
pub const KEYWAY_INBOUND_PORT: u16 = 15181;
/// The health port every test app serves, exempt from the plain-inbound guard (as kubelet probes).
pub const HEALTH_PORT: u16 = 15021;

/// What one sidecar needs to know.
#[derive(Debug, Clone)]
pub struct Sidecar {
    /// Namespace of the workload.
    pub namespace: String,
    /// Its service account.
    pub service_account: String,
    /// Its overlay address.
    pub overlay_ip: String,
    /// The app's ports (health port excluded).
    pub app_ports: Vec<u16>,
    /// The zone's gateways' underlay addresses.
    pub gateways: Vec<String>,
    /// Gateway tunnel port.
    pub tunnel_port: u16,
    /// Gateway admin port (key service).
    pub admin_port: u16,
    /// The wasm module.
    pub wasm: String,
}

fn endpoints(addrs: &[String], port: u16) -> String {
    addrs
        .iter()
        .map(|a| {
            format!("        - endpoint: {{ address: {{ socket_address: {{ address: {a}, port_value: {port} }} }} }}\n")
        })
        .collect()
}

fn wasm_network(name: &str, wasm: &str, config: &str) -> String {
    format!(
        r#"      - name: {name}
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm
          config:
            name: {name}
            root_id: keyway
            vm_config: {{ vm_id: keyway, runtime: envoy.wasm.runtime.v8, code: {{ local: {{ filename: "{wasm}" }} }} }}
            configuration:
              "@type": type.googleapis.com/google.protobuf.StringValue
              value: '{config}'
"#
    )
}

impl Sidecar {
    /// The Envoy bootstrap (YAML).
    pub fn bootstrap(&self) -> String {
        let ks =
            r#"{"mode":"outbound","key_service":{"cluster":"keyway_keyservice","timeout_ms":1000,"retry_ms":200}}"#;
        let tunnel_cfg = r#"{"mode":"inbound_tunnel","key_service":{"cluster":"keyway_keyservice","timeout_ms":1000,"retry_ms":200}}"#;
        let plain_cfg = format!(r#"{{"mode":"inbound_plain","exempt_ports":[{HEALTH_PORT}]}}"#);
        let mut vhosts = String::new();
        let mut clusters = String::new();
        for p in &self.app_ports {
            let _ = write!(
                vhosts,
                r#"            - name: app_{p}
              domains: ["*:{p}"]
              routes:
              - match: {{ connect_matcher: {{}} }}
                route: {{ cluster: app_{p}, upgrade_configs: [ {{ upgrade_type: CONNECT, connect_config: {{}} }} ] }}
"#
            );
            let _ = write!(
                clusters,
                r#"  - name: app_{p}
    connect_timeout: 1s
    type: STATIC
    load_assignment:
      cluster_name: app_{p}
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {p} }} }} }}
"#
            );
        }
        format!(
            r#"node:
  id: sidecar~{ip}~{sa}.{ns}~{ns}.svc.cluster.local
  cluster: {sa}.{ns}
  metadata:
    NAMESPACE: {ns}
    SERVICE_ACCOUNT: {sa}
    INSTANCE_IPS: "{ip}"
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: 15000 }} }}
stats_config:
  stats_tags:
  - {{ tag_name: direction, regex: "(_?direction=\\.=(.*?);\\.;)" }}
  - {{ tag_name: verdict, regex: "(_?verdict=\\.=(.*?);\\.;)" }}
  - {{ tag_name: reason, regex: "(_?reason=\\.=(.*?);\\.;)" }}
  - {{ tag_name: outcome, regex: "(_?outcome=\\.=(.*?);\\.;)" }}
static_resources:
  listeners:
  - name: outbound
    address: {{ socket_address: {{ address: 0.0.0.0, port_value: {out} }} }}
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst }}
    filter_chains:
    - filters:
{out_wasm}      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: outbound
          cluster: keyway_gateway
          max_connect_attempts: 2
          tunneling_config:
            hostname: "%DOWNSTREAM_LOCAL_ADDRESS%"
            headers_to_add:
            - header: {{ key: x-keyway-token, value: "%FILTER_STATE(wasm.keyway_token:PLAIN)%" }}
  - name: keyway_inbound
    address: {{ socket_address: {{ address: 0.0.0.0, port_value: {kin} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: keyway_inbound
          codec_type: HTTP2
          http2_protocol_options: {{ allow_connect: true }}
          upgrade_configs: [ {{ upgrade_type: CONNECT }} ]
          route_config:
            name: keyway_inbound
            virtual_hosts:
{vhosts}          http_filters:
          - name: keyway.inbound_tunnel
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: keyway.inbound_tunnel
                root_id: keyway
                vm_config: {{ vm_id: keyway, runtime: envoy.wasm.runtime.v8, code: {{ local: {{ filename: "{wasm}" }} }} }}
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: '{tunnel_cfg}'
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  - name: inbound_plain
    address: {{ socket_address: {{ address: 0.0.0.0, port_value: {plain} }} }}
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst }}
    filter_chains:
    - filters:
{plain_wasm}      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: inbound_plain
          cluster: health
  clusters:
  - name: keyway_gateway
    connect_timeout: 1s
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: keyway_gateway
      endpoints:
      - lb_endpoints:
{gw_eps}  - name: keyway_keyservice
    connect_timeout: 1s
    type: STATIC
    load_assignment:
      cluster_name: keyway_keyservice
      endpoints:
      - lb_endpoints:
{ks_eps}  - name: health
    connect_timeout: 1s
    type: STATIC
    load_assignment:
      cluster_name: health
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {HEALTH_PORT} }} }} }}
{clusters}"#,
            ip = self.overlay_ip,
            sa = self.service_account,
            ns = self.namespace,
            out = OUTBOUND_PORT,
            kin = KEYWAY_INBOUND_PORT,
            plain = INBOUND_PLAIN_PORT,
            wasm = self.wasm,
            out_wasm = wasm_network("keyway.outbound", &self.wasm, ks),
            plain_wasm = wasm_network("keyway.inbound_plain", &self.wasm, &plain_cfg),
            gw_eps = endpoints(&self.gateways, self.tunnel_port),
            ks_eps = endpoints(&self.gateways, self.admin_port),
        )
    }

    /// The iptables rules of Istio's init container, keyway's ports: outbound TCP of everyone but
    /// Envoy to 15001; inbound TCP except the keyway inbound port to 15006.
    pub fn iptables() -> Vec<Vec<String>> {
        let r = |s: &str| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        vec![
            r("iptables -t nat -N KEYWAY_OUTPUT"),
            r("iptables -t nat -A OUTPUT -p tcp -j KEYWAY_OUTPUT"),
            r(&format!("iptables -t nat -A KEYWAY_OUTPUT -m owner --uid-owner {ENVOY_UID} -j RETURN")),
            r("iptables -t nat -A KEYWAY_OUTPUT -d 127.0.0.0/8 -j RETURN"),
            r(&format!("iptables -t nat -A KEYWAY_OUTPUT -p tcp -j REDIRECT --to-ports {OUTBOUND_PORT}")),
            r("iptables -t nat -N KEYWAY_INBOUND"),
            r("iptables -t nat -A PREROUTING -p tcp -j KEYWAY_INBOUND"),
            r(&format!("iptables -t nat -A KEYWAY_INBOUND -p tcp --dport {KEYWAY_INBOUND_PORT} -j RETURN")),
            r(&format!("iptables -t nat -A KEYWAY_INBOUND -p tcp -j REDIRECT --to-ports {INBOUND_PLAIN_PORT}")),
        ]
    }
}
