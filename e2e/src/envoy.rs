//! The sidecar Envoy of a test workload, configured as Istio configures a sidecar with keyway
//! (mirroring `filter/tests/envoy/*.yaml`): outbound capture by iptables REDIRECT to 15001, where
//! the keyway filter seals a token and `tcp_proxy` tunnels to the zone's gateways with it; the
//! keyway inbound CONNECT listener on 15181, where the filter verifies tickets; every other inbound
//! connection redirected to 15006, where the filter closes what is not exempt. Both keyway legs
//! are mutual TLS with the workload's mesh certificate (Istio's SDS `default` and `ROOTCA`): to
//! the gateway's tunnel port (tunnel and key service, HTTP/2), whose certificate must be the
//! gateways' mesh identity, and on 15181, which only that identity may connect to.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use keyway_gateway::config::MeshFiles;
use keyway_policy::wire;

use crate::proc::Proc;
use crate::topology::{ns_get, ns_sh};
use crate::wait::wait_until;

pub mod istio;
pub mod yaml;

/// Envoy runs as this user; iptables leaves its own connections alone (Istio's 1337).
pub const ENVOY_UID: u32 = 1337;
/// Envoy's admin port (on 127.0.0.1 in its pod).
pub const ADMIN_PORT: u16 = 15000;
/// Outbound capture port.
pub const OUTBOUND_PORT: u16 = 15001;
/// Plain inbound capture port.
pub const INBOUND_PLAIN_PORT: u16 = 15006;
/// The keyway inbound CONNECT port.
pub const KEYWAY_INBOUND_PORT: u16 = 15181;
/// The health port every test app serves, exempt from the plain-inbound guard (as kubelet probes).
pub const HEALTH_PORT: u16 = 15021;
/// The DNS port: the one UDP port an enforced pod may send to, on the cluster resolver only.
pub const DNS_PORT: u16 = 53;

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
    /// Gateway tunnel port (the key service too).
    pub tunnel_port: u16,
    /// The workload's mesh certificate, key and the mesh root (readable by Envoy's user).
    pub mesh: MeshFiles,
    /// The gateways' mesh identity (their certificate's SPIFFE id).
    pub gateway_identity: String,
    /// The wasm module.
    pub wasm: String,
}

/// The keyway plugin as a filter of `kind` (`network` or `http`), its lines shifted right by
/// `indent` spaces (six for a network filter, ten for an HTTP filter).
fn wasm_filter(kind: &str, name: &str, wasm: &str, config: &serde_json::Value, indent: usize) -> String {
    let text = format!(
        r#"- name: {name}
  typed_config:
    "@type": type.googleapis.com/envoy.extensions.filters.{kind}.wasm.v3.Wasm
    config:
      name: {name}
      root_id: keyway
      vm_config: {{ vm_id: keyway, runtime: envoy.wasm.runtime.v8, code: {{ local: {{ filename: "{wasm}" }} }} }}
      configuration:
        "@type": type.googleapis.com/google.protobuf.StringValue
        value: '{config}'
"#
    );
    yaml::indent(&text, indent)
}

impl Sidecar {
    /// The Envoy bootstrap (YAML).
    pub fn bootstrap(&self) -> String {
        let key_service = serde_json::json!({"cluster": "keyway_keyservice", "timeout_ms": 1000, "retry_ms": 200});
        let (cert, key, ca) = (self.mesh.cert.display(), self.mesh.key.display(), self.mesh.ca.display());
        let (cert, key, ca) = (cert.to_string(), key.to_string(), ca.to_string());
        let files = yaml::TlsFiles { cert: &cert, key: &key, ca: &ca, peer: Some(&self.gateway_identity) };
        let outbound_cfg = serde_json::json!({"mode": "outbound", "key_service": key_service});
        let tunnel_cfg = serde_json::json!({"mode": "inbound_tunnel", "key_service": key_service});
        let plain_cfg = serde_json::json!({"mode": "inbound_plain", "exempt_ports": [HEALTH_PORT]});
        let tunneling = format!(
            r#"          max_connect_attempts: 2
          tunneling_config:
            hostname: "%DOWNSTREAM_LOCAL_ADDRESS%"
            headers_to_add:
            - header: {{ key: {token}, value: "{value}" }}
"#,
            token = wire::TOKEN_HEADER,
            value = wire::TOKEN_HEADER_VALUE,
        );
        let listeners = [
            yaml::capture_listener(
                "outbound",
                OUTBOUND_PORT,
                &wasm_filter("network", "keyway.outbound", &self.wasm, &outbound_cfg, 6),
                "keyway_gateway",
                &tunneling,
            ),
            yaml::connect_listener(
                "keyway_inbound",
                KEYWAY_INBOUND_PORT,
                &yaml::app_routes(&self.app_ports),
                &wasm_filter("http", "keyway.inbound_tunnel", &self.wasm, &tunnel_cfg, 10),
                &yaml::tls_socket("DownstreamTlsContext", files, "    require_client_certificate: true\n", 6),
            ),
            yaml::capture_listener(
                "inbound_plain",
                INBOUND_PLAIN_PORT,
                &wasm_filter("network", "keyway.inbound_plain", &self.wasm, &plain_cfg, 6),
                "health",
                "",
            ),
        ];
        let clusters = [
            yaml::static_cluster("keyway_gateway", &self.gateways, self.tunnel_port, true)
                + &yaml::tls_socket("UpstreamTlsContext", files, "", 4),
            // The key service is on the tunnel port too; its own cluster keeps key fetches off
            // the tunnels' connection pool.
            yaml::static_cluster("keyway_keyservice", &self.gateways, self.tunnel_port, true)
                + &yaml::tls_socket("UpstreamTlsContext", files, "", 4),
            yaml::static_cluster("health", &["127.0.0.1"], HEALTH_PORT, false),
            yaml::app_clusters(&self.app_ports),
        ];
        format!(
            r#"node:
  id: sidecar~{ip}~{sa}.{ns}~{ns}.svc.cluster.local
  cluster: {sa}.{ns}
  metadata:
    NAMESPACE: {ns}
    SERVICE_ACCOUNT: {sa}
    INSTANCE_IPS: "{ip}"
{admin}stats_config:
  stats_tags:
  - {{ tag_name: direction, regex: "(_?direction=\\.=(.*?);\\.;)" }}
  - {{ tag_name: verdict, regex: "(_?verdict=\\.=(.*?);\\.;)" }}
  - {{ tag_name: reason, regex: "(_?reason=\\.=(.*?);\\.;)" }}
  - {{ tag_name: outcome, regex: "(_?outcome=\\.=(.*?);\\.;)" }}
static_resources:
  listeners:
{listeners}  clusters:
{clusters}"#,
            ip = self.overlay_ip,
            sa = self.service_account,
            ns = self.namespace,
            admin = yaml::admin(),
            listeners = listeners.concat(),
            clusters = clusters.concat(),
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

    /// The filter rules that refuse what keyway does not carry yet: every UDP, SCTP and ICMP
    /// packet the pod sends (IPv4 and IPv6), except Envoy's own, the pod's loopback and, when
    /// `resolver` is set, UDP to its port 53 (the cluster resolver). REJECTed, never dropped
    /// silently, so an app fails at once (`sendto`: operation not permitted).
    pub fn non_tcp_rules(resolver: Option<IpAddr>) -> Vec<Vec<String>> {
        let r = |s: &str| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        let mut rules = Vec::new();
        for (tool, icmp, reject) in
            [("iptables", "icmp", "icmp-admin-prohibited"), ("ip6tables", "ipv6-icmp", "icmp6-adm-prohibited")]
        {
            rules.push(r(&format!("{tool} -N KEYWAY_NON_TCP")));
            for proto in ["udp", "sctp", icmp] {
                rules.push(r(&format!("{tool} -A OUTPUT -p {proto} -j KEYWAY_NON_TCP")));
            }
            rules.push(r(&format!("{tool} -A KEYWAY_NON_TCP -m owner --uid-owner {ENVOY_UID} -j RETURN")));
            rules.push(r(&format!("{tool} -A KEYWAY_NON_TCP -o lo -j RETURN")));
            if tool == "ip6tables" {
                // IPv6 needs neighbour discovery (the kernel's own, not the app's).
                for t in ["router-solicitation", "neighbour-solicitation", "neighbour-advertisement"] {
                    rules.push(r(&format!("{tool} -A KEYWAY_NON_TCP -p {icmp} --icmpv6-type {t} -j RETURN")));
                }
            }
            match resolver {
                Some(ip) if ip.is_ipv4() == (tool == "iptables") => {
                    rules.push(r(&format!("{tool} -A KEYWAY_NON_TCP -p udp -d {ip} --dport {DNS_PORT} -j RETURN")));
                }
                _ => {}
            }
            rules.push(r(&format!("{tool} -A KEYWAY_NON_TCP -j REJECT --reject-with {reject}")));
        }
        rules
    }

    /// Applies [`Sidecar::non_tcp_rules`] in the pod `ns`.
    pub fn refuse_non_tcp(ns: &str, resolver: Option<IpAddr>) -> anyhow::Result<()> {
        for rule in Sidecar::non_tcp_rules(resolver) {
            let args: Vec<&str> = rule.iter().map(String::as_str).collect();
            ns_sh(ns, &args)?;
        }
        Ok(())
    }

    /// With a `keyway agent` in the pod (pod mode): the rules inserted ahead of
    /// [`Sidecar::non_tcp_rules`] that let through the app's UDP into the agent's TUN device
    /// (`kw0`; the agent carries it to a gateway, which decides it) and the agent's own QUIC, by
    /// its firewall mark (`socket_mark`, [`DEFAULT_SOCKET_MARK`]), wherever its gateways are:
    /// every replica a name resolves to, as they come and go. Only a process with
    /// `CAP_NET_ADMIN` can set a mark, so the app gains nothing by it. Everything else stays
    /// refused. Each is inserted at the top, so the last one issued comes first.
    ///
    /// [`DEFAULT_SOCKET_MARK`]: keyway_gateway::agent::config::DEFAULT_SOCKET_MARK
    pub fn agent_udp_rules() -> Vec<Vec<String>> {
        let r = |s: &str| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        let mark = keyway_gateway::agent::config::DEFAULT_SOCKET_MARK;
        vec![
            r("iptables -I KEYWAY_NON_TCP 1 -o kw0 -p udp -j RETURN"),
            r(&format!("iptables -I KEYWAY_NON_TCP 1 -m mark --mark {mark:#x} -j RETURN")),
        ]
    }

    /// Applies [`Sidecar::agent_udp_rules`] in the pod `ns`.
    pub fn let_agent_udp_through(ns: &str) -> anyhow::Result<()> {
        for rule in Sidecar::agent_udp_rules() {
            let args: Vec<&str> = rule.iter().map(String::as_str).collect();
            ns_sh(ns, &args)?;
        }
        Ok(())
    }

    /// Applies [`Sidecar::iptables`] in the pod `ns`, then `extra` rules (whitespace-separated).
    pub fn capture(ns: &str, extra: &[&str]) -> anyhow::Result<()> {
        for rule in Sidecar::iptables() {
            let args: Vec<&str> = rule.iter().map(String::as_str).collect();
            ns_sh(ns, &args)?;
        }
        for line in extra {
            ns_sh(ns, &line.split_whitespace().collect::<Vec<_>>())?;
        }
        Ok(())
    }
}

/// Worker threads of every Envoy of the beds.
const WORKERS: u64 = 1;

/// The command line of every Envoy of the beds: [`WORKERS`] workers (the end-to-end sidecars and
/// every benchmark path alike), no hot restart, warnings only.
pub fn command(envoy: &Path, config: &Path) -> Vec<String> {
    let config = config.display().to_string();
    let workers = WORKERS.to_string();
    let args = ["-c", &config, "--concurrency", &workers, "--disable-hot-restart", "-l", "warning"];
    std::iter::once(envoy.display().to_string()).chain(args.map(str::to_owned)).collect()
}

/// When an Envoy of a bed counts as ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ready {
    /// Its admin endpoint says `/ready` (any Envoy).
    Live,
    /// A keyway sidecar: a keyway plugin has fetched its keys from the gateway's key service.
    KeysFetched,
}

impl Ready {
    /// Whether the Envoy in the pod `ns` is ready, asked with `keyway-e2e get` (`e2e`).
    pub fn check(self, ns: &str, e2e: &Path) -> bool {
        match self {
            Ready::Live => matches!(ns_get(ns, e2e, &format!("127.0.0.1:{ADMIN_PORT}/ready")), Ok((200, _))),
            Ready::KeysFetched => ns_get(ns, e2e, &format!("127.0.0.1:{ADMIN_PORT}/stats?filter=key_refreshes"))
                .is_ok_and(|(_, stats)| keys_fetched(&stats)),
        }
    }

    /// Waits until `envoy`, running in the pod `ns`, is ready; fails at once if it exits, and
    /// shows the end of its log when it fails.
    pub fn wait(self, ns: &str, e2e: &Path, deadline: Duration, envoy: &mut Proc) -> anyhow::Result<()> {
        let mut exited = false;
        let r = wait_until(deadline, &format!("the Envoy in {ns}"), || {
            exited = !envoy.running();
            exited || self.check(ns, e2e)
        });
        match r {
            Ok(_) if !exited => Ok(()),
            Ok(_) => anyhow::bail!("the Envoy in {ns} exited:\n{}", envoy.tail(20)),
            Err(e) => Err(e).with_context(|| format!("the end of its log:\n{}", envoy.tail(20))),
        }
    }
}

/// The keyway plugins of a sidecar that fetch keys from the key service (outbound and inbound
/// tunnel).
const KEYED_PLUGINS: u64 = 2;

/// Whether Envoy stats (`/stats?filter=key_refreshes`) show that the sidecar's keyway plugins have
/// their keys: every plugin keeps its keys per VM, and Envoy runs a VM on each worker and on the
/// main thread, so as many successful fetches as plugins times threads (one fetch is not enough:
/// the outbound plugin closes every connection of a worker until that worker has its keys).
fn keys_fetched(stats: &str) -> bool {
    stats
        .lines()
        .filter(|l| l.contains("outcome=.=ok"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum::<u64>()
        >= KEYED_PLUGINS * (WORKERS + 1)
}
