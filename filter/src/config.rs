//! The plugin configuration (what Istio's `WasmPlugin.pluginConfig` delivers), parsed and checked
//! once in `on_configure`. A bad configuration is refused whole, with the field at fault.

use std::net::IpAddr;

use keyway_policy::auth::DEFAULT_WINDOW_MS;
use keyway_policy::ip::{Cidr, parse_cidr};
use keyway_policy::keyservice::KeyBundle;
use keyway_policy::wire;
use serde::Deserialize;

use crate::replay::SHARDS;

/// Default trust domain of SPIFFE identities built from Istio node metadata.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Default capacity of the inbound ticket replay set (nonces held for the whole Envoy, all its
/// worker threads together).
pub const DEFAULT_REPLAY_CACHE_CAPACITY: usize = 65_536;
/// The default per-source share of the replay set: this fraction (1/n) of its capacity.
pub const DEFAULT_REPLAY_PER_SOURCE_DIVISOR: usize = 4;
/// Default path of the gateway's key service.
pub const DEFAULT_KEY_SERVICE_PATH: &str = wire::KEY_SERVICE_PATH;
/// Default `:authority` of key service requests.
pub const DEFAULT_KEY_SERVICE_AUTHORITY: &str = "keyway-gateway";
/// Default timeout of one key service request.
pub const DEFAULT_KEY_SERVICE_TIMEOUT_MS: u64 = 2_000;
/// Default time keys fetched from the key service stay usable after the last successful fetch.
pub const DEFAULT_KEY_GRACE_MS: u64 = 120_000;
/// Default first retry delay after a failed fetch (doubles per failure up to [`MAX_RETRY_MS`]).
pub const DEFAULT_RETRY_MS: u64 = 1_000;
/// The longest delay between two fetch attempts after failures.
pub const MAX_RETRY_MS: u64 = 30_000;
/// The shortest refresh interval the filter honours, whatever the key service suggests.
pub const MIN_REFRESH_MS: u64 = 100;

/// Which of the three filters this plugin instance is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Network filter before `tcp_proxy` on outbound listeners: attaches a token.
    Outbound,
    /// HTTP filter on the keyway inbound CONNECT listener: verifies the ticket.
    InboundTunnel,
    /// Network filter on every other inbound listener: closes what is not exempt.
    InboundPlain,
}

impl Mode {
    /// The metric label and log name of the mode.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Outbound => "outbound",
            Mode::InboundTunnel => "inbound_tunnel",
            Mode::InboundPlain => "inbound_plain",
        }
    }
}

/// The key service: `GET <path>?ip=<overlay ip>` through an Envoy cluster.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyServiceConfig {
    /// The Envoy cluster of the local gateway's admin port.
    pub cluster: String,
    /// The `:authority` of the request.
    #[serde(default = "default_authority")]
    pub authority: String,
    /// The path (without query).
    #[serde(default = "default_path")]
    pub path: String,
    /// The timeout of one request (ms).
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// How long keys stay usable after the last successful fetch when fetches fail (ms).
    #[serde(default = "default_grace")]
    pub grace_ms: u64,
    /// The first retry delay after a failure (ms); doubles up to 30 s.
    #[serde(default = "default_retry")]
    pub retry_ms: u64,
}

fn default_authority() -> String {
    DEFAULT_KEY_SERVICE_AUTHORITY.to_owned()
}
fn default_path() -> String {
    DEFAULT_KEY_SERVICE_PATH.to_owned()
}
fn default_timeout() -> u64 {
    DEFAULT_KEY_SERVICE_TIMEOUT_MS
}
fn default_grace() -> u64 {
    DEFAULT_KEY_GRACE_MS
}
fn default_retry() -> u64 {
    DEFAULT_RETRY_MS
}
fn default_window() -> u64 {
    DEFAULT_WINDOW_MS
}
fn default_trust_domain() -> String {
    DEFAULT_TRUST_DOMAIN.to_owned()
}
fn default_replay_capacity() -> usize {
    DEFAULT_REPLAY_CACHE_CAPACITY
}

/// The plugin configuration as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Which filter this is.
    pub mode: Mode,
    /// The workload's SPIFFE id; default: built from node metadata, or the key bundle's.
    #[serde(default)]
    pub identity: Option<String>,
    /// The workload's overlay address; default: the key bundle's, else node metadata.
    #[serde(default)]
    pub overlay_ip: Option<IpAddr>,
    /// Trust domain for identities built from node metadata.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// Static keys (as written by `keyway keys issue`).
    #[serde(default)]
    pub keys: Option<KeyBundle>,
    /// The key service, instead of static keys.
    #[serde(default)]
    pub key_service: Option<KeyServiceConfig>,
    /// Accepted clock skew of tickets either way (ms).
    #[serde(default = "default_window")]
    pub window_ms: u64,
    /// Ticket nonces remembered by the whole Envoy (every worker); 0 turns replay detection off.
    #[serde(default = "default_replay_capacity")]
    pub replay_cache_capacity: usize,
    /// Nonces of one source address the replay set holds at most; default a quarter of the
    /// capacity.
    #[serde(default)]
    pub replay_cache_per_source: Option<usize>,
    /// `inbound_plain`: destination ports let through (health probes, metrics).
    #[serde(default)]
    pub exempt_ports: Vec<u16>,
    /// `inbound_plain`: source CIDRs let through.
    #[serde(default)]
    pub exempt_cidrs: Vec<String>,
    /// `outbound` only: let a connection go on without a token (counted and logged) when the
    /// filter cannot seal one (no usable key, no randomness, no destination); the gateway, which
    /// requires a token, then decides. No effect on the other modes: a ticket is admitted only
    /// when it verified.
    #[serde(default)]
    pub fail_open: bool,
}

/// Where keys come from. `Debug` never shows key material.
#[derive(Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `inbound_plain` needs none.
    None,
    /// Inline in the configuration.
    Static(Box<KeyBundle>),
    /// Fetched from the gateway.
    Service(KeyServiceConfig),
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::None => f.write_str("None"),
            KeySource::Static(b) => {
                let epochs =
                    |keys: &[keyway_policy::keyservice::EpochKey]| keys.iter().map(|k| k.epoch).collect::<Vec<_>>();
                f.debug_struct("Static")
                    .field("identity", &b.identity)
                    .field("overlay_ip", &b.overlay_ip)
                    .field("zone", &b.zone)
                    .field("workload_key_epochs", &epochs(&b.workload_keys))
                    .field("ticket_key_epochs", &epochs(&b.ticket_keys))
                    .finish_non_exhaustive()
            }
            KeySource::Service(ks) => f.debug_tuple("Service").field(ks).finish(),
        }
    }
}

/// The checked configuration the contexts run with.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Which filter this is.
    pub mode: Mode,
    /// Configured SPIFFE id, if any.
    pub identity: Option<String>,
    /// Configured overlay address, if any.
    pub overlay_ip: Option<IpAddr>,
    /// Trust domain for identities built from node metadata.
    pub trust_domain: String,
    /// Where keys come from.
    pub keys: KeySource,
    /// Ticket window (ms).
    pub window_ms: u64,
    /// Replay set capacity (whole Envoy).
    pub replay_cache_capacity: usize,
    /// Replay set per-source share.
    pub replay_cache_per_source: usize,
    /// Exempt destination ports (sorted, deduplicated).
    pub exempt_ports: Vec<u16>,
    /// Exempt source ranges.
    pub exempt_cidrs: Vec<Cidr>,
    /// `outbound`: go on without a token when none can be sealed.
    pub fail_open: bool,
}

/// A refused configuration: the field at fault and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid keyway plugin configuration: {field}: {message}")]
pub struct ConfigError {
    /// The JSON path of the field at fault (`.` for the whole document).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError { field: field.into(), message: message.into() }
    }
}

/// Parses and checks the plugin configuration.
pub fn parse(bytes: &[u8]) -> Result<Settings, ConfigError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        ConfigError::new(path, e.into_inner().to_string())
    })?;
    check(config)
}

fn check(c: Config) -> Result<Settings, ConfigError> {
    if c.window_ms == 0 {
        return Err(ConfigError::new("window_ms", "must be above 0"));
    }
    if c.trust_domain.is_empty() {
        return Err(ConfigError::new("trust_domain", "must not be empty"));
    }
    if let Some(id) = &c.identity
        && !id.starts_with("spiffe://")
    {
        return Err(ConfigError::new("identity", format!("{id:?} is not a SPIFFE id (spiffe://…)")));
    }
    let keys = match (c.mode, c.keys, c.key_service) {
        (_, Some(_), Some(_)) => {
            return Err(ConfigError::new("key_service", "give either `keys` or `key_service`, not both"));
        }
        (Mode::InboundPlain, Some(_), None) => {
            return Err(ConfigError::new("keys", "not used by mode inbound_plain"));
        }
        (Mode::InboundPlain, None, Some(_)) => {
            return Err(ConfigError::new("key_service", "not used by mode inbound_plain"));
        }
        (Mode::InboundPlain, None, None) => KeySource::None,
        (mode, None, None) => {
            return Err(ConfigError::new(
                "keys",
                format!("mode {} needs `keys` (static) or `key_service`", mode.as_str()),
            ));
        }
        (_, Some(bundle), None) => {
            bundle.validate().map_err(|e| ConfigError::new(format!("keys.{}", field_of(&e)), e))?;
            if let Some(ip) = c.overlay_ip
                && ip.to_canonical() != bundle.overlay_ip.to_canonical()
            {
                let message = format!("{ip} differs from keys.overlay_ip {}", bundle.overlay_ip);
                return Err(ConfigError::new("overlay_ip", message));
            }
            if let Some(id) = &c.identity
                && *id != bundle.identity
            {
                let message = format!("{id:?} differs from keys.identity {:?}", bundle.identity);
                return Err(ConfigError::new("identity", message));
            }
            KeySource::Static(Box::new(bundle))
        }
        (_, None, Some(ks)) => {
            if ks.cluster.is_empty() {
                return Err(ConfigError::new("key_service.cluster", "must name an Envoy cluster"));
            }
            if !ks.path.starts_with('/') || ks.path.contains('?') {
                return Err(ConfigError::new("key_service.path", "must start with / and carry no query"));
            }
            if ks.timeout_ms == 0 || ks.timeout_ms > u64::from(u32::MAX) {
                return Err(ConfigError::new("key_service.timeout_ms", "must be 1..=4294967295"));
            }
            if ks.retry_ms == 0 {
                return Err(ConfigError::new("key_service.retry_ms", "must be above 0"));
            }
            KeySource::Service(ks)
        }
    };
    if c.mode != Mode::InboundPlain && (!c.exempt_ports.is_empty() || !c.exempt_cidrs.is_empty()) {
        let field = if c.exempt_ports.is_empty() { "exempt_cidrs" } else { "exempt_ports" };
        return Err(ConfigError::new(field, "only used by mode inbound_plain"));
    }
    let mut exempt_cidrs = Vec::with_capacity(c.exempt_cidrs.len());
    for (i, s) in c.exempt_cidrs.iter().enumerate() {
        exempt_cidrs.push(parse_cidr(s).map_err(|e| ConfigError::new(format!("exempt_cidrs[{i}]"), e))?);
    }
    let capacity = c.replay_cache_capacity;
    if (1..SHARDS).contains(&capacity) {
        let message = format!("must be 0 (replay detection off) or at least {SHARDS} (one per shard)");
        return Err(ConfigError::new("replay_cache_capacity", message));
    }
    let per_source = c.replay_cache_per_source.unwrap_or(capacity / DEFAULT_REPLAY_PER_SOURCE_DIVISOR);
    if capacity > 0 && !(SHARDS..=capacity).contains(&per_source) {
        let message = format!("must be {SHARDS}..={capacity} (at least one per shard, at most the capacity)");
        return Err(ConfigError::new("replay_cache_per_source", message));
    }
    let mut exempt_ports = c.exempt_ports;
    exempt_ports.sort_unstable();
    exempt_ports.dedup();
    Ok(Settings {
        mode: c.mode,
        identity: c.identity,
        overlay_ip: c.overlay_ip,
        trust_domain: c.trust_domain,
        keys,
        window_ms: c.window_ms,
        replay_cache_capacity: capacity,
        replay_cache_per_source: per_source,
        exempt_ports,
        exempt_cidrs,
        fail_open: c.fail_open,
    })
}

/// `workload_keys[0].key` from `KeyBundle::validate`'s "workload_keys[0].key: …".
fn field_of(message: &str) -> &str {
    message.split_once(": ").map_or(message, |(field, _)| field)
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyway_policy::auth::WorkloadKey;

    fn key() -> String {
        WorkloadKey::from_bytes([1; 32]).to_base64url()
    }

    fn static_json(extra: &str) -> String {
        format!(
            r#"{{"mode":"outbound",{extra}"keys":{{"identity":"spiffe://td/ns/a/sa/b","overlay_ip":"10.0.0.1",
               "zone":"z","workload_keys":[{{"epoch":1,"key":"{k}"}}],"ticket_keys":[]}}}}"#,
            k = key()
        )
    }

    fn err(json: &str) -> (String, String) {
        match parse(json.as_bytes()) {
            Ok(s) => panic!("accepted: {s:?}"),
            Err(e) => (e.field, e.message),
        }
    }

    #[test]
    fn static_keys_with_defaults() {
        let s = parse(static_json("").as_bytes()).unwrap();
        assert_eq!(s.mode, Mode::Outbound);
        assert!(matches!(s.keys, KeySource::Static(_)));
        let shown = format!("{s:?}");
        assert!(!shown.contains(&key()) && shown.contains("workload_key_epochs: [1]"), "{shown}");
        assert_eq!(s.window_ms, DEFAULT_WINDOW_MS);
        assert_eq!(s.replay_cache_capacity, DEFAULT_REPLAY_CACHE_CAPACITY);
        assert_eq!(s.replay_cache_per_source, DEFAULT_REPLAY_CACHE_CAPACITY / 4);
        let off = parse(static_json(r#""replay_cache_capacity":0,"#).as_bytes()).unwrap();
        assert_eq!(off.replay_cache_capacity, 0);
        assert_eq!(s.trust_domain, "cluster.local");
        assert!(!s.fail_open);
    }

    #[test]
    fn key_service_with_defaults() {
        let s = parse(br#"{"mode":"inbound_tunnel","key_service":{"cluster":"gw"}}"#).unwrap();
        let KeySource::Service(ks) = s.keys else { panic!("{:?}", s.keys) };
        assert_eq!(ks.path, wire::KEY_SERVICE_PATH);
        assert_eq!(ks.authority, "keyway-gateway");
        assert_eq!((ks.timeout_ms, ks.grace_ms, ks.retry_ms), (2_000, 120_000, 1_000));
    }

    #[test]
    fn plain_inbound() {
        let s =
            parse(br#"{"mode":"inbound_plain","exempt_ports":[15021,80,80],"exempt_cidrs":["10.0.0.0/8"]}"#).unwrap();
        assert_eq!(s.exempt_ports, vec![80, 15021]);
        assert_eq!(s.exempt_cidrs.len(), 1);
        assert!(matches!(s.keys, KeySource::None));
    }

    #[test]
    fn refusals_name_the_field() {
        let cases: Vec<(String, &str)> = vec![
            ("{}".into(), "."),
            (r#"{"mode":"sideways"}"#.into(), "mode"),
            (r#"{"mode":"outbound","extra":1}"#.into(), "extra"),
            (r#"{"mode":"outbound"}"#.into(), "keys"),
            (r#"{"mode":"outbound","key_service":{"cluster":"gw","bogus":1}}"#.into(), "key_service.bogus"),
            (r#"{"mode":"outbound","key_service":{"cluster":""}}"#.into(), "key_service.cluster"),
            (r#"{"mode":"outbound","key_service":{"cluster":"x","path":"v1"}}"#.into(), "key_service.path"),
            (r#"{"mode":"outbound","key_service":{"cluster":"x","timeout_ms":0}}"#.into(), "key_service.timeout_ms"),
            (r#"{"mode":"inbound_plain","key_service":{"cluster":"x"}}"#.into(), "key_service"),
            (r#"{"mode":"inbound_plain","exempt_cidrs":["10.0.0.0/40"]}"#.into(), "exempt_cidrs[0]"),
            (r#"{"mode":"inbound_plain","exempt_ports":[70000]}"#.into(), "exempt_ports[0]"),
            (r#"{"mode":"inbound_plain","overlay_ip":"nope"}"#.into(), "overlay_ip"),
            (r#"{"mode":"inbound_plain","window_ms":0}"#.into(), "window_ms"),
            (r#"{"mode":"inbound_plain","identity":"cart"}"#.into(), "identity"),
            (r#"{"mode":"inbound_plain","replay_cache_capacity":255}"#.into(), "replay_cache_capacity"),
            (r#"{"mode":"inbound_plain","replay_cache_per_source":255}"#.into(), "replay_cache_per_source"),
            (
                r#"{"mode":"inbound_plain","replay_cache_capacity":1024,"replay_cache_per_source":2048}"#.into(),
                "replay_cache_per_source",
            ),
            (static_json(r#""exempt_ports":[1],"#), "exempt_ports"),
            (static_json(r#""overlay_ip":"10.0.0.2","#), "overlay_ip"),
            (static_json(r#""identity":"spiffe://td/ns/a/sa/c","#), "identity"),
            (static_json("").replace(&key(), "short"), "keys.workload_keys[0].key"),
            (static_json("").replace("\"zone\"", "\"bad\":1,\"zone\""), "keys.bad"),
            ("not json".into(), "."),
        ];
        for (json, field) in cases {
            let (f, message) = err(&json);
            assert_eq!(f, field, "{json}: {message}");
            assert!(!message.is_empty());
        }
    }
}
