//! The gateway's configuration: one YAML file, strict (`deny_unknown_fields`), defaults as named
//! constants. A bad file is rejected whole with the path and the field at fault.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Default tunnel port (HTTP/2 CONNECT from sidecars).
pub const DEFAULT_TUNNEL_PORT: u16 = 15180;
/// Default overlay port (QUIC between gateways).
pub const DEFAULT_OVERLAY_PORT: u16 = 15443;
/// Default edge port (UDP): QUIC from `keyway agent`s (devices, pods' UDP).
pub const DEFAULT_EDGE_PORT: u16 = 15444;
/// Default `limits.max_udp_flows`.
pub const DEFAULT_MAX_UDP_FLOWS: usize = 16_384;
/// Default time a UDP flow may carry no datagram either way before it is forgotten (ms): a new
/// datagram is decided again. Linux conntrack's timeout for UDP flows that saw a reply.
pub const DEFAULT_UDP_IDLE_TIMEOUT_MS: u64 = 30_000;
/// Default admin port.
pub const DEFAULT_ADMIN_PORT: u16 = 15190;
/// Default port of the sidecars' keyway inbound CONNECT listener.
pub const DEFAULT_SIDECAR_INBOUND_PORT: u16 = 15181;
/// Default trust domain.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Default token/ticket clock window (± ms).
pub const DEFAULT_WINDOW_MS: u64 = 30_000;
/// Default replay-cache capacity (nonces).
pub const DEFAULT_REPLAY_CAPACITY: usize = 1_000_000;
/// Default limit of concurrent flows.
pub const DEFAULT_MAX_FLOWS: usize = 100_000;
/// Default limit of concurrent flows on one QUIC connection to a peer gateway.
pub const DEFAULT_MAX_FLOWS_PER_PEER: u32 = 4096;
/// Default timeout to connect onwards (ms).
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5_000;
/// Default QUIC keep-alive interval (ms).
pub const DEFAULT_KEEPALIVE_MS: u64 = 200;
/// The smallest `overlay_mtu`: a 1200-byte QUIC datagram in IPv6 and UDP headers.
pub const MIN_OVERLAY_MTU: u16 = 1280;
/// Default QUIC idle timeout (ms): a peer silent this long is down.
pub const DEFAULT_PEER_IDLE_TIMEOUT_MS: u64 = 2_000;
/// Default interval between checks of the inventory and secrets for changes (ms).
pub const DEFAULT_RELOAD_INTERVAL_MS: u64 = 1_000;
/// Default drain deadline on SIGTERM (ms).
pub const DEFAULT_DRAIN_MS: u64 = 10_000;
/// Default key refresh interval suggested to filters (ms).
pub const DEFAULT_KEY_REFRESH_MS: u64 = 10_000;
/// Default time an open flow may carry no byte either way before it is closed (ms): Envoy's
/// tcp_proxy default.
pub const DEFAULT_FLOW_IDLE_TIMEOUT_MS: u64 = 3_600_000;
/// Default limit of QUIC handshakes in progress at once.
pub const DEFAULT_MAX_HANDSHAKES: usize = 64;
/// Default limit of open connections to the admin listener (health, key service, metrics).
pub const DEFAULT_MAX_ADMIN_CONNECTIONS: usize = 256;
/// Default `limits.max_tunnel_connections`.
pub const DEFAULT_MAX_TUNNEL_CONNECTIONS: usize = 16_384;
/// Default `limits.max_tunnel_connections_per_source`: a sidecar holds a few HTTP/2 connections
/// per Envoy worker (tunnel and key service clusters).
pub const DEFAULT_MAX_TUNNEL_CONNECTIONS_PER_SOURCE: usize = 64;
/// Default time a new connection (tunnel, admin) may take to send its first request (ms).
pub const DEFAULT_HEADER_TIMEOUT_MS: u64 = 10_000;

/// Where the gateway listens.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// Tunnel (TCP): HTTP/2 CONNECT from sidecars.
    #[serde(default = "default_tunnel")]
    pub tunnel: SocketAddr,
    /// Overlay (UDP): QUIC from other gateways.
    #[serde(default = "default_overlay")]
    pub overlay: SocketAddr,
    /// Admin (TCP): health, metrics, config dump, peers, key service.
    #[serde(default = "default_admin")]
    pub admin: SocketAddr,
    /// Edge (UDP): QUIC from `keyway agent`s: devices outside the clusters and pods' UDP.
    #[serde(default = "default_edge")]
    pub edge: SocketAddr,
}

fn default_edge() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], DEFAULT_EDGE_PORT))
}

fn default_tunnel() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], DEFAULT_TUNNEL_PORT))
}
fn default_overlay() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], DEFAULT_OVERLAY_PORT))
}
fn default_admin() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], DEFAULT_ADMIN_PORT))
}

impl Default for Listen {
    fn default() -> Self {
        Listen { tunnel: default_tunnel(), overlay: default_overlay(), admin: default_admin(), edge: default_edge() }
    }
}

/// TLS material of the overlay (PEM files); a gateway's `tls` section and a `keyway agent`'s.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The overlay CA certificate(s).
    pub ca: PathBuf,
    /// The certificate chain, leaf first: a gateway's (from `keyway ca issue`); an agent's (a
    /// device's from `keyway ca issue-device`, or a pod's mesh certificate).
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// The gateway's mesh workload certificate (PEM files), for the legs to and from sidecars: the
/// tunnel and key service it serves, and delivery to sidecars' keyway inbound port. In Istio,
/// the files istio-agent writes with `OUTPUT_CERTS` (`root-cert.pem`, `cert-chain.pem`,
/// `key.pem`); re-read when they change.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MeshFiles {
    /// The mesh root certificate(s): sidecars' certificates must chain to one of them.
    pub ca: PathBuf,
    /// This gateway's mesh certificate chain, leaf first (a SPIFFE URI SAN,
    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`).
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
}

/// A gateway replica of a zone.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GatewayPeer {
    /// Its name (as in its certificate).
    pub name: String,
    /// Its overlay address (UDP).
    pub address: SocketAddr,
}

/// A zone of the overlay.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Zone {
    /// Its name (`keyway.io/zone` of its workloads).
    pub name: String,
    /// Its gateway replicas, each by name and overlay address.
    #[serde(default)]
    pub gateways: Vec<GatewayPeer>,
    /// One overlay address in front of the zone's replicas (a UDP load balancer), for replicas
    /// that are not listed by name (a Deployment scaled by an autoscaler): dialled with the server
    /// name `<zone>.gateway.keyway`, and any gateway certificate of this zone is accepted from it
    /// (and from any replica of this zone that connects).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<SocketAddr>,
    /// This zone's own CA certificate(s) (PEM): when set, a peer claiming this zone must chain to
    /// it, not merely to `tls.ca` (a CA of one zone, held by that zone's issuer, then issues
    /// nothing another zone accepts for a third).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// Zones to fail over to, in order, when every gateway of this zone is gone (Istio's
    /// locality failover). Used for services with endpoints in several zones.
    #[serde(default)]
    pub failover: Vec<String>,
}

/// Limits: every queue and table is bounded.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Concurrent flows through this gateway; more are refused with 503 (and counted).
    #[serde(default = "default_max_flows")]
    pub max_flows: usize,
    /// Nonces remembered for replay detection; when full of unexpired nonces new tokens are refused.
    #[serde(default = "default_replay")]
    pub replay_cache: usize,
    /// Concurrent flows on the QUIC connection with one peer gateway (QUIC's stream limit). quinn
    /// keeps an entry for every stream a peer may open, from the moment the connection opens
    /// (about 110 bytes each: 0.45 MiB per peer at the default); a flow that finds its peer's
    /// connection full goes to another replica of the zone, or is refused `max-flows-per-peer`.
    #[serde(default = "default_max_flows_per_peer")]
    pub max_flows_per_peer: u32,
    /// Flows one source may hold on one peer gateway connection; default a quarter of
    /// `max_flows_per_peer`, so one workload's flood cannot take a zone's streams from the others.
    #[serde(default)]
    pub max_flows_per_peer_per_source: Option<u32>,
    /// Timeout to connect onwards (peer stream, sidecar, external address), ms.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// Concurrent flows one source may hold (a sidecar's address on the tunnel, a source
    /// workload's overlay address over the overlay); default a quarter of `max_flows`. One
    /// workload flooding genuine flows fills its share, not the gateway.
    #[serde(default)]
    pub max_flows_per_source: Option<usize>,
    /// Replay-cache nonces one source address may hold; default a quarter of `replay_cache`.
    #[serde(default)]
    pub replay_per_source: Option<usize>,
    /// An open flow carrying no byte either way this long is closed, ms.
    #[serde(default = "default_flow_idle")]
    pub flow_idle_timeout_ms: u64,
    /// QUIC handshakes in progress at once; more are refused (peers retry). Handshakes are served
    /// only to addresses that proved reachability (a QUIC Retry round trip) first.
    #[serde(default = "default_max_handshakes")]
    pub max_handshakes: usize,
    /// Open connections to the admin listener; more are closed at once.
    #[serde(default = "default_max_admin")]
    pub max_admin_connections: usize,
    /// Open connections to the tunnel listener (tunnel and key service); more are closed at once.
    #[serde(default = "default_max_tunnel")]
    pub max_tunnel_connections: usize,
    /// Open tunnel connections from one source address; more from it are closed at once.
    #[serde(default = "default_max_tunnel_per_source")]
    pub max_tunnel_connections_per_source: usize,
    /// Time a new tunnel or admin connection may take to send its first request, ms; the admin
    /// listener's HTTP/1 header read timeout.
    #[serde(default = "default_header_timeout")]
    pub header_timeout_ms: u64,
    /// UDP flows (5-tuples, both directions one flow) the gateway tracks at once; a new flow
    /// beyond it is dropped (`max_udp_flows`).
    #[serde(default = "default_max_udp_flows")]
    pub max_udp_flows: usize,
    /// UDP flows one source may hold; default a quarter of `max_udp_flows`.
    #[serde(default)]
    pub max_udp_flows_per_source: Option<usize>,
    /// Time a UDP flow may carry no datagram before it is forgotten (ms).
    #[serde(default = "default_udp_idle")]
    pub udp_idle_timeout_ms: u64,
}

fn default_max_udp_flows() -> usize {
    DEFAULT_MAX_UDP_FLOWS
}
fn default_udp_idle() -> u64 {
    DEFAULT_UDP_IDLE_TIMEOUT_MS
}

fn default_max_flows_per_peer() -> u32 {
    DEFAULT_MAX_FLOWS_PER_PEER
}
fn default_flow_idle() -> u64 {
    DEFAULT_FLOW_IDLE_TIMEOUT_MS
}
fn default_max_handshakes() -> usize {
    DEFAULT_MAX_HANDSHAKES
}
fn default_max_admin() -> usize {
    DEFAULT_MAX_ADMIN_CONNECTIONS
}
fn default_max_tunnel() -> usize {
    DEFAULT_MAX_TUNNEL_CONNECTIONS
}
fn default_max_tunnel_per_source() -> usize {
    DEFAULT_MAX_TUNNEL_CONNECTIONS_PER_SOURCE
}
fn default_header_timeout() -> u64 {
    DEFAULT_HEADER_TIMEOUT_MS
}

impl Limits {
    /// The flows one source may hold on one peer gateway connection
    /// (`max_flows_per_peer_per_source`, default a quarter of `max_flows_per_peer`).
    pub fn peer_flows_per_source(&self) -> usize {
        let n = self.max_flows_per_peer_per_source.unwrap_or(self.max_flows_per_peer / SOURCE_SHARE_DIVISOR as u32);
        usize::try_from(n.max(1)).unwrap_or(usize::MAX)
    }

    /// The flows one source may hold through this gateway.
    pub fn flows_per_source(&self) -> usize {
        self.max_flows_per_source.unwrap_or(self.max_flows / SOURCE_SHARE_DIVISOR).max(1)
    }

    /// The UDP flows one source may hold.
    pub fn udp_flows_per_source(&self) -> usize {
        self.max_udp_flows_per_source.unwrap_or(self.max_udp_flows / SOURCE_SHARE_DIVISOR).max(1)
    }

    /// The replay-cache nonces one source may hold.
    pub fn replay_share(&self) -> usize {
        self.replay_per_source.unwrap_or(self.replay_cache / SOURCE_SHARE_DIVISOR).max(1)
    }
}

/// A source's default share of a limit: one part in this many.
pub const SOURCE_SHARE_DIVISOR: usize = 4;

fn default_max_flows() -> usize {
    DEFAULT_MAX_FLOWS
}
fn default_replay() -> usize {
    DEFAULT_REPLAY_CAPACITY
}
fn default_connect_timeout() -> u64 {
    DEFAULT_CONNECT_TIMEOUT_MS
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_flows: DEFAULT_MAX_FLOWS,
            replay_cache: DEFAULT_REPLAY_CAPACITY,
            max_flows_per_peer: DEFAULT_MAX_FLOWS_PER_PEER,
            max_flows_per_peer_per_source: None,
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            max_flows_per_source: None,
            replay_per_source: None,
            flow_idle_timeout_ms: DEFAULT_FLOW_IDLE_TIMEOUT_MS,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            max_admin_connections: DEFAULT_MAX_ADMIN_CONNECTIONS,
            max_tunnel_connections: DEFAULT_MAX_TUNNEL_CONNECTIONS,
            max_tunnel_connections_per_source: DEFAULT_MAX_TUNNEL_CONNECTIONS_PER_SOURCE,
            header_timeout_ms: DEFAULT_HEADER_TIMEOUT_MS,
            max_udp_flows: DEFAULT_MAX_UDP_FLOWS,
            max_udp_flows_per_source: None,
            udp_idle_timeout_ms: DEFAULT_UDP_IDLE_TIMEOUT_MS,
        }
    }
}

/// How to reach destination sidecars.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Delivery {
    /// The sidecars' keyway inbound CONNECT port.
    #[serde(default = "default_sidecar_port")]
    pub sidecar_port: u16,
    /// Let allowed flows to addresses outside the overlay go to loopback addresses. Off by
    /// default and meant for single-host test beds only: with it on, a workload allowed to reach
    /// "anything" reaches the gateway host's own loopback services. Link-local, unspecified and
    /// multicast addresses and the gateway's own addresses stay refused either way.
    #[serde(default)]
    pub external_loopback: bool,
}

fn default_sidecar_port() -> u16 {
    DEFAULT_SIDECAR_INBOUND_PORT
}

impl Default for Delivery {
    fn default() -> Self {
        Delivery { sidecar_port: DEFAULT_SIDECAR_INBOUND_PORT, external_loopback: false }
    }
}

/// Who the admin endpoints answer. `/healthz`, `/readyz` and the key service answer the network
/// (probes, sidecars); `/metrics`, `/config_dump` and `/peers` answer only the gateway's own host
/// (loopback) unless `remote` is set.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    /// Serve `/metrics`, `/config_dump` and `/peers` to other hosts too (a Prometheus that scrapes
    /// over the pod network); restrict who reaches the admin port with a NetworkPolicy then.
    #[serde(default)]
    pub remote: bool,
}

/// The edge listener (`listen.edge`): QUIC from `keyway agent`s, each presenting a certificate
/// of the overlay CA (a device's, from `keyway ca issue-device`) or of the mesh CA (a pod's own).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct Edge {
    /// Certificate revocation lists (PEM, from `keyway ca revoke`): a certificate they list is
    /// refused at the handshake, and an open connection with it is closed when the file changes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub crls: Vec<PathBuf>,
}

/// Who may fetch keys from the key service.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KeyService {
    /// Serve a workload's keys only to requests from its own addresses (overlay or sidecar).
    /// `true` turns that check off: for tests and single-host trials only.
    #[serde(default)]
    pub allow_any_source: bool,
    /// Refresh interval suggested to filters, ms.
    #[serde(default = "default_key_refresh")]
    pub refresh_ms: u64,
    /// How long after its creation a new epoch starts sealing tokens and tickets, ms; default
    /// twice `refresh_ms` plus twice `reload_interval_ms`, so every filter and gateway has loaded
    /// it first. A rotation's overlap must exceed it.
    #[serde(default)]
    pub activation_ms: Option<u64>,
}

fn default_key_refresh() -> u64 {
    DEFAULT_KEY_REFRESH_MS
}

impl Default for KeyService {
    fn default() -> Self {
        KeyService { allow_any_source: false, refresh_ms: DEFAULT_KEY_REFRESH_MS, activation_ms: None }
    }
}

/// Default namespace of the overlay address record (the gateway's own namespace).
pub const DEFAULT_KUBERNETES_NAMESPACE: &str = "keyway-system";
/// Default name of the ConfigMap that records the overlay address given to each pod.
pub const DEFAULT_KUBERNETES_RECORD: &str = "keyway-overlay-addresses";
/// Default quiet time after a change in the cluster before the engine is rebuilt (ms).
pub const DEFAULT_KUBERNETES_DEBOUNCE_MS: u64 = 250;
/// Default time to wait at start for the first complete list of every kind (ms).
pub const DEFAULT_KUBERNETES_SYNC_TIMEOUT_MS: u64 = 60_000;

/// The Kubernetes source (`keyway gateway --source kubernetes`): where this zone's overlay
/// addresses come from and where they are recorded.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Kubernetes {
    /// The zone's overlay prefix (CIDR): pods of this zone without `keyway.io/overlay-ips` get an
    /// address from it.
    pub prefix: String,
    /// The namespace of the address record (the gateway's namespace).
    #[serde(default = "default_kube_namespace")]
    pub namespace: String,
    /// The name of the address record (a ConfigMap).
    #[serde(default = "default_kube_record")]
    pub record: String,
    /// Quiet time after a change before the engine is rebuilt, ms.
    #[serde(default = "default_kube_debounce")]
    pub debounce_ms: u64,
    /// How long to wait at start for the first complete list of every kind, ms.
    #[serde(default = "default_kube_sync_timeout")]
    pub sync_timeout_ms: u64,
}

fn default_kube_namespace() -> String {
    DEFAULT_KUBERNETES_NAMESPACE.to_owned()
}
fn default_kube_record() -> String {
    DEFAULT_KUBERNETES_RECORD.to_owned()
}
fn default_kube_debounce() -> u64 {
    DEFAULT_KUBERNETES_DEBOUNCE_MS
}
fn default_kube_sync_timeout() -> u64 {
    DEFAULT_KUBERNETES_SYNC_TIMEOUT_MS
}

impl Kubernetes {
    /// The overlay prefix, parsed.
    pub fn prefix_cidr(&self) -> Result<keyway_policy::ip::Cidr, String> {
        keyway_policy::ip::parse_cidr(&self.prefix)
    }
}

/// Whether `s` is a DNS label (RFC 1123: a namespace name).
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// The whole configuration of one gateway.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// SPIFFE trust domain of workload identities and gateway certificates.
    #[serde(default = "default_td")]
    pub trust_domain: String,
    /// This gateway's zone.
    pub zone: String,
    /// This gateway's name (unique within the zone). Left out when its zone has an `entry`: the
    /// overlay certificate then names the gateway (one certificate per replica).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Listening addresses.
    #[serde(default)]
    pub listen: Listen,
    /// Overlay TLS files.
    pub tls: TlsFiles,
    /// Mesh TLS files: the sidecar legs are mutual TLS with mesh workload certificates.
    pub mesh: MeshFiles,
    /// The epoch secrets file (`keyway keys init`).
    pub secrets: PathBuf,
    /// The directory of manifests: inventory and policies.
    pub inventory: PathBuf,
    /// Every zone of the overlay with its gateways (this gateway's zone included).
    pub zones: Vec<Zone>,
    /// Token and ticket clock window, ± ms.
    #[serde(default = "default_window")]
    pub window_ms: u64,
    /// Limits.
    #[serde(default)]
    pub limits: Limits,
    /// Delivery to sidecars.
    #[serde(default)]
    pub delivery: Delivery,
    /// Key service.
    #[serde(default)]
    pub key_service: KeyService,
    /// Who the admin endpoints answer.
    #[serde(default)]
    pub admin: Admin,
    /// The edge listener: `keyway agent`s of this zone.
    #[serde(default)]
    pub edge: Edge,
    /// QUIC keep-alive interval, ms.
    #[serde(default = "default_keepalive")]
    pub keepalive_ms: u64,
    /// A peer gateway silent this long is down, ms.
    #[serde(default = "default_idle")]
    pub peer_idle_timeout_ms: u64,
    /// The largest IP packet the overlay network carries between gateways (its MTU). QUIC's path
    /// MTU discovery probes up to it; unset, the largest MTU of this host's interfaces is taken
    /// (a probe the path does not carry is lost and discovery settles lower).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay_mtu: Option<u16>,
    /// How often the inventory directory and the secrets file are checked for changes, ms.
    #[serde(default = "default_reload")]
    pub reload_interval_ms: u64,
    /// How long open flows may finish after SIGTERM, ms.
    #[serde(default = "default_drain")]
    pub drain_ms: u64,
    /// The Kubernetes source; needed by `--source kubernetes` only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<Kubernetes>,
}

fn default_td() -> String {
    DEFAULT_TRUST_DOMAIN.to_owned()
}
fn default_window() -> u64 {
    DEFAULT_WINDOW_MS
}
fn default_keepalive() -> u64 {
    DEFAULT_KEEPALIVE_MS
}
fn default_idle() -> u64 {
    DEFAULT_PEER_IDLE_TIMEOUT_MS
}
fn default_reload() -> u64 {
    DEFAULT_RELOAD_INTERVAL_MS
}
fn default_drain() -> u64 {
    DEFAULT_DRAIN_MS
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read: {reason}")]
    Read {
        /// Path.
        path: String,
        /// Why.
        reason: String,
    },
    /// The YAML is malformed or a field is unknown or of the wrong type.
    #[error("{path}: {reason}")]
    Parse {
        /// Path.
        path: String,
        /// The parser's message (with line and column).
        reason: String,
    },
    /// The values do not fit together.
    #[error("{path}: {field}: {reason}")]
    Invalid {
        /// Path.
        path: String,
        /// The field.
        field: String,
        /// What is expected.
        reason: String,
    },
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Read { path: path.display().to_string(), reason: e.to_string() })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses and validates configuration text; `path` is for messages. Relative paths in the
    /// file stay as written.
    pub fn parse(text: &str, path: &str) -> Result<Config, ConfigError> {
        let cfg: Config = serde_yaml_ng::from_str(text)
            .map_err(|e| ConfigError::Parse { path: path.to_owned(), reason: e.to_string() })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &str) -> Result<(), ConfigError> {
        let bad = |field: &str, reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            field: field.to_owned(),
            reason,
        };
        let Some(me) = self.zones.iter().find(|z| z.name == self.zone) else {
            return Err(bad("zone", format!("{:?} is not one of `zones`", self.zone)));
        };
        if self.name.is_empty() && me.entry.is_none() {
            return Err(bad(
                "name",
                format!("required unless zone {:?} has an `entry` (then the certificate names the gateway)", self.zone),
            ));
        }
        if !self.name.is_empty() && me.entry.is_none() && !me.gateways.iter().any(|g| g.name == self.name) {
            return Err(bad("name", format!("{:?} is not a gateway of zone {:?} in `zones`", self.name, self.zone)));
        }
        for (i, z) in self.zones.iter().enumerate() {
            if self.zones.iter().filter(|o| o.name == z.name).count() > 1 {
                return Err(bad(&format!("zones[{i}].name"), format!("zone {:?} is listed twice", z.name)));
            }
            if z.gateways.is_empty() && z.entry.is_none() {
                return Err(bad(
                    &format!("zones[{i}].gateways"),
                    "a zone needs at least one gateway, or an `entry` address".to_owned(),
                ));
            }
            for (j, f) in z.failover.iter().enumerate() {
                if !self.zones.iter().any(|o| &o.name == f) || f == &z.name {
                    return Err(bad(
                        &format!("zones[{i}].failover[{j}]"),
                        format!("{f:?} is not another zone of `zones`"),
                    ));
                }
            }
        }
        if self.window_ms == 0 {
            return Err(bad("window_ms", "must be positive".to_owned()));
        }
        if self.limits.max_flows == 0 || self.limits.replay_cache == 0 {
            return Err(bad("limits", "max_flows and replay_cache must be positive".to_owned()));
        }
        let l = &self.limits;
        if l.max_udp_flows == 0 || l.udp_idle_timeout_ms == 0 {
            return Err(bad("limits", "max_udp_flows and udp_idle_timeout_ms must be positive".to_owned()));
        }
        if l.max_udp_flows_per_source.is_some_and(|n| n == 0 || n > l.max_udp_flows) {
            return Err(bad(
                "limits.max_udp_flows_per_source",
                format!("must be between 1 and limits.max_udp_flows ({})", l.max_udp_flows),
            ));
        }
        if l.max_flows_per_source.is_some_and(|n| n == 0 || n > l.max_flows) {
            return Err(bad(
                "limits.max_flows_per_source",
                format!("must be between 1 and max_flows ({})", l.max_flows),
            ));
        }
        if l.max_flows_per_peer == 0 {
            return Err(bad("limits.max_flows_per_peer", "must be positive".to_owned()));
        }
        if l.max_flows_per_peer_per_source.is_some_and(|n| n == 0 || n > l.max_flows_per_peer) {
            return Err(bad(
                "limits.max_flows_per_peer_per_source",
                format!("must be between 1 and max_flows_per_peer ({})", l.max_flows_per_peer),
            ));
        }
        if l.flow_idle_timeout_ms == 0
            || l.header_timeout_ms == 0
            || l.max_handshakes == 0
            || l.max_admin_connections == 0
        {
            return Err(bad(
                "limits",
                "flow_idle_timeout_ms, header_timeout_ms, max_handshakes and max_admin_connections must be positive"
                    .to_owned(),
            ));
        }
        if l.max_tunnel_connections == 0
            || l.max_tunnel_connections_per_source == 0
            || l.max_tunnel_connections_per_source > l.max_tunnel_connections
        {
            return Err(bad(
                "limits.max_tunnel_connections_per_source",
                format!(
                    "max_tunnel_connections and max_tunnel_connections_per_source must be positive, the second at most the first ({})",
                    l.max_tunnel_connections
                ),
            ));
        }
        if l.replay_per_source.is_some_and(|n| n == 0 || n > l.replay_cache) {
            return Err(bad(
                "limits.replay_per_source",
                format!("must be between 1 and replay_cache ({})", l.replay_cache),
            ));
        }
        if self.overlay_mtu.is_some_and(|m| m < MIN_OVERLAY_MTU) {
            return Err(bad("overlay_mtu", format!("must be at least {MIN_OVERLAY_MTU} (QUIC's smallest)")));
        }
        if self.keepalive_ms == 0 || self.peer_idle_timeout_ms <= self.keepalive_ms {
            return Err(bad(
                "peer_idle_timeout_ms",
                "must be greater than keepalive_ms (and both positive)".to_owned(),
            ));
        }
        if let Some(k) = &self.kubernetes {
            let cidr = k.prefix_cidr().map_err(|e| bad("kubernetes.prefix", e))?;
            if cidr.range.last - cidr.range.first < 3 {
                return Err(bad(
                    "kubernetes.prefix",
                    format!("{:?} is too small: give at least 4 addresses", k.prefix),
                ));
            }
            if !is_dns_label(&k.namespace) {
                return Err(bad("kubernetes.namespace", format!("{:?} is not a namespace name", k.namespace)));
            }
            if k.record.is_empty() || k.record.len() > 253 || !k.record.split('.').all(is_dns_label) {
                return Err(bad("kubernetes.record", format!("{:?} is not a ConfigMap name", k.record)));
            }
            if k.sync_timeout_ms == 0 {
                return Err(bad("kubernetes.sync_timeout_ms", "must be positive".to_owned()));
            }
        }
        Ok(())
    }

    /// When a new epoch starts sealing (see [`KeyService::activation_ms`]).
    pub fn activation_ms(&self) -> u64 {
        self.key_service.activation_ms.unwrap_or(2 * self.key_service.refresh_ms + 2 * self.reload_interval_ms)
    }

    /// This gateway's zone.
    pub fn my_zone(&self) -> Option<&Zone> {
        self.zones.iter().find(|z| z.name == self.zone)
    }

    /// The zone called `name`.
    pub fn zone(&self, name: &str) -> Option<&Zone> {
        self.zones.iter().find(|z| z.name == name)
    }

    /// Whether `ip` is a loopback or unspecified address (for messages about listening).
    pub fn is_local(ip: IpAddr) -> bool {
        ip.is_loopback() || ip.is_unspecified()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
zone: zone-a
name: gw-1
tls: {ca: ca.pem, cert: gw.pem, key: gw-key.pem}
mesh: {ca: mesh-ca.pem, cert: mesh.pem, key: mesh-key.pem}
secrets: epochs.json
inventory: manifests/
zones:
- name: zone-a
  gateways: [{name: gw-1, address: "127.0.0.1:15443"}, {name: gw-2, address: "127.0.0.2:15443"}]
- name: zone-b
  gateways: [{name: gw-1, address: "127.0.1.1:15443"}]
  failover: [zone-a]
"#;

    #[test]
    fn defaults_apply() {
        let c = Config::parse(GOOD, "c.yaml").unwrap();
        assert_eq!(c.listen.tunnel.port(), DEFAULT_TUNNEL_PORT);
        assert_eq!(c.trust_domain, "cluster.local");
        assert_eq!(c.window_ms, DEFAULT_WINDOW_MS);
        assert_eq!(c.delivery.sidecar_port, DEFAULT_SIDECAR_INBOUND_PORT);
        assert!(!c.key_service.allow_any_source);
        assert_eq!(c.key_service.refresh_ms, DEFAULT_KEY_REFRESH_MS, "the section left out takes the field defaults");
        assert_eq!(
            (c.limits.flows_per_source(), c.limits.replay_share()),
            (DEFAULT_MAX_FLOWS / 4, DEFAULT_REPLAY_CAPACITY / 4)
        );
        assert!(!c.admin.remote && !c.delivery.external_loopback);
        assert_eq!(c.kubernetes, None);
        let k = Config::parse(&format!("{GOOD}\nkubernetes: {{prefix: 10.128.1.0/24}}\n"), "c.yaml").unwrap();
        let k = k.kubernetes.unwrap();
        assert_eq!((k.namespace.as_str(), k.record.as_str()), ("keyway-system", "keyway-overlay-addresses"));
        assert_eq!(
            (k.debounce_ms, k.sync_timeout_ms),
            (DEFAULT_KUBERNETES_DEBOUNCE_MS, DEFAULT_KUBERNETES_SYNC_TIMEOUT_MS)
        );
    }

    #[test]
    fn a_zone_behind_an_entry_leaves_the_name_to_the_certificate() {
        let text = GOOD.replace("name: gw-1\n", "").replace(
            "  gateways: [{name: gw-1, address: \"127.0.0.1:15443\"}, {name: gw-2, address: \"127.0.0.2:15443\"}]\n",
            "  entry: \"127.0.0.1:15443\"\n  ca: zone-a-ca.pem\n",
        );
        let c = Config::parse(&text, "c.yaml").unwrap();
        assert_eq!(c.name, "");
        let me = c.my_zone().unwrap();
        assert_eq!(me.entry, Some("127.0.0.1:15443".parse().unwrap()));
        assert_eq!(me.ca.as_deref(), Some(std::path::Path::new("zone-a-ca.pem")));
        assert!(me.gateways.is_empty());
    }

    #[test]
    fn bad_configs_name_the_field() {
        let cases = [
            (GOOD.replace("zone: zone-a\nname", "zone: zone-x\nname"), "zone: \"zone-x\" is not one of"),
            (GOOD.replace("name: gw-1\ntls", "name: gw-9\ntls"), "name: \"gw-9\" is not a gateway"),
            (GOOD.replace("failover: [zone-a]", "failover: [zone-q]"), "zones[1].failover[0]"),
            (format!("{GOOD}\nbogus: 1\n"), "unknown field `bogus`"),
            (GOOD.replace("secrets: epochs.json\n", ""), "missing field `secrets`"),
            (format!("{GOOD}\nwindow_ms: 0\n"), "window_ms: must be positive"),
            (
                format!("{GOOD}\nkubernetes: {{prefix: 10.128.1.0/33}}\n"),
                "kubernetes.prefix: \"10.128.1.0/33\" is not a CIDR",
            ),
            (
                format!("{GOOD}\nkubernetes: {{prefix: 10.128.1.0/31}}\n"),
                "kubernetes.prefix: \"10.128.1.0/31\" is too small",
            ),
            (format!("{GOOD}\nkubernetes: {{prefix: 10.128.1.0/24, namespace: Keyway}}\n"), "kubernetes.namespace"),
            (format!("{GOOD}\nkubernetes: {{prefix: 10.128.1.0/24, record: a/b}}\n"), "kubernetes.record"),
            (format!("{GOOD}\nkubernetes: {{prefix: 10.128.1.0/24, bogus: 1}}\n"), "unknown field `bogus`"),
            (format!("{GOOD}\nkubernetes: {{namespace: x}}\n"), "missing field `prefix`"),
            (GOOD.replace("name: gw-1\n", ""), "name: required unless zone \"zone-a\" has an `entry`"),
            (
                GOOD.replace("  gateways: [{name: gw-1, address: \"127.0.1.1:15443\"}]\n", ""),
                "zones[1].gateways: a zone needs at least one gateway, or an `entry` address",
            ),
        ];
        for (text, want) in cases {
            let err = Config::parse(&text, "c.yaml").unwrap_err().to_string();
            assert!(err.starts_with("c.yaml: ") && err.contains(want), "{err}\nwant {want}");
        }
    }
}
