//! The agent's configuration: one YAML file, strict (`deny_unknown_fields`), defaults as named
//! constants. A bad file is rejected whole with the path and the field at fault.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Default name of the TUN device.
pub const DEFAULT_TUN_NAME: &str = "kw0";
/// Default MTU of the TUN device: the IPv6 minimum, so that a full packet's UDP payload plus the
/// datagram header fits a QUIC datagram on any path.
pub const DEFAULT_TUN_MTU: u16 = 1280;
/// The smallest TUN MTU (IPv4's minimum datagram size).
pub const MIN_TUN_MTU: u16 = 576;
/// Default local listener of captured TCP (Istio's inbound capture port).
pub const DEFAULT_TCP_LISTEN: &str = "127.0.0.1:15006";
/// Default QUIC keep-alive interval (ms).
pub const DEFAULT_KEEPALIVE_MS: u64 = 200;
/// Default QUIC idle timeout (ms): a gateway silent this long is down.
pub const DEFAULT_IDLE_TIMEOUT_MS: u64 = 3_000;
/// The edge port of every gateway.
pub use crate::config::DEFAULT_EDGE_PORT;
/// The firewall mark of the agent's own QUIC packets (`SO_MARK`, "KW"): a pod's rules let them
/// out by it, and only a process with `CAP_NET_ADMIN` (the agent, not the app) can set it.
pub const DEFAULT_SOCKET_MARK: u32 = 0x4b57;

/// How the agent captures traffic.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// A device outside the clusters: TUN with the overlay address, TCP and UDP.
    #[default]
    Device,
    /// An enforced pod: UDP only (Envoy carries TCP), TUN without an address.
    Pod,
}

/// The overlay CA (the only roots gateways are verified against) and the agent's own certificate
/// chain and key (a device certificate of the overlay CA, or in pod mode the pod's mesh
/// certificate): the gateway's own `tls` section, with the agent's certificate in it.
pub use crate::config::TlsFiles;

/// The TUN device.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Tun {
    /// Its name.
    #[serde(default = "default_tun_name")]
    pub name: String,
    /// Its MTU.
    #[serde(default = "default_tun_mtu")]
    pub mtu: u16,
}

impl Default for Tun {
    fn default() -> Self {
        Tun { name: default_tun_name(), mtu: DEFAULT_TUN_MTU }
    }
}

fn default_tun_name() -> String {
    DEFAULT_TUN_NAME.to_owned()
}
fn default_tun_mtu() -> u16 {
    DEFAULT_TUN_MTU
}
fn default_tcp_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15006))
}
fn default_keepalive() -> u64 {
    DEFAULT_KEEPALIVE_MS
}
fn default_idle() -> u64 {
    DEFAULT_IDLE_TIMEOUT_MS
}

/// The configuration of one agent.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The zone whose edge gateways the agent joins (the server name is `<zone>.gateway.keyway`).
    pub zone: String,
    /// The device's (or pod's) overlay address.
    pub overlay_ip: IpAddr,
    /// The overlay prefixes: traffic to them goes through the gateways, nothing else is touched.
    pub overlay_cidrs: Vec<String>,
    /// The edge addresses (`host:port`) of the zone's gateways; the agent connects to all.
    pub gateways: Vec<String>,
    /// The overlay CA and the agent's certificate.
    pub tls: TlsFiles,
    /// `device` (default) or `pod`.
    #[serde(default)]
    pub mode: Mode,
    /// The TUN device.
    #[serde(default)]
    pub tun: Tun,
    /// The local listener captured TCP is redirected to (device mode).
    #[serde(default = "default_tcp_listen")]
    pub tcp_listen: SocketAddr,
    /// QUIC keep-alive interval (ms).
    #[serde(default = "default_keepalive")]
    pub keepalive_ms: u64,
    /// QUIC idle timeout (ms).
    #[serde(default = "default_idle")]
    pub idle_timeout_ms: u64,
    /// Where to serve /healthz and /metrics (a loopback address), if anywhere.
    #[serde(default)]
    pub admin: Option<SocketAddr>,
    /// The firewall mark set on the agent's QUIC socket (`SO_MARK`; 0: none). A pod's rules let
    /// the agent's own UDP to its gateways out by this mark, wherever the gateways are.
    #[serde(default = "default_socket_mark")]
    pub socket_mark: u32,
}

fn default_socket_mark() -> u32 {
    DEFAULT_SOCKET_MARK
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AgentConfigError {
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
        /// Why.
        reason: String,
    },
    /// A field has a value the agent cannot use.
    #[error("{path}: field `{field}`: {reason}")]
    Invalid {
        /// Path.
        path: String,
        /// The field.
        field: String,
        /// What was expected.
        reason: String,
    },
}

/// One overlay prefix, parsed: its text (for `ip` and `iptables`) and family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverlayCidr {
    /// As written in the configuration.
    pub text: String,
    /// IPv4 (else IPv6).
    pub v4: bool,
    cidr: keyway_policy::ip::Cidr,
}

impl OverlayCidr {
    /// Whether `ip` is inside the prefix.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let a = keyway_policy::ip::addr(ip);
        self.cidr.range.first <= a && a <= self.cidr.range.last
    }
}

impl AgentConfig {
    /// Loads and validates a file.
    pub fn load(path: &Path) -> Result<AgentConfig, AgentConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| AgentConfigError::Read { path: path.display().to_string(), reason: e.to_string() })?;
        AgentConfig::parse(&text, &path.display().to_string())
    }

    /// Parses and validates configuration text; `path` is for messages.
    pub fn parse(text: &str, path: &str) -> Result<AgentConfig, AgentConfigError> {
        let cfg: AgentConfig = serde_yaml_ng::from_str(text)
            .map_err(|e| AgentConfigError::Parse { path: path.to_owned(), reason: e.to_string() })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// The overlay prefixes, parsed (validated at load, so never an error afterwards).
    pub fn cidrs(&self) -> Vec<OverlayCidr> {
        self.overlay_cidrs
            .iter()
            .filter_map(|t| {
                let c = keyway_policy::ip::parse_cidr(t).ok()?;
                Some(OverlayCidr { text: t.clone(), v4: c.v4, cidr: c })
            })
            .collect()
    }

    /// The gateways given as IP addresses that lie inside `overlay_cidrs`.
    pub fn gateway_ips_in_overlay(&self) -> Vec<IpAddr> {
        let cidrs = self.cidrs();
        self.gateways
            .iter()
            .filter_map(|g| g.parse::<SocketAddr>().ok())
            .map(|a| a.ip())
            .filter(|ip| cidrs.iter().any(|c| c.contains(*ip)))
            .collect()
    }

    fn validate(&self, path: &str) -> Result<(), AgentConfigError> {
        let bad = |field: &str, reason: String| AgentConfigError::Invalid {
            path: path.to_owned(),
            field: field.to_owned(),
            reason,
        };
        crate::tls::check_label("zone", &self.zone).map_err(|e| bad("zone", e))?;
        if self.overlay_cidrs.is_empty() {
            return Err(bad("overlay_cidrs", "expected at least one overlay prefix, e.g. [10.128.0.0/16]".into()));
        }
        for (i, t) in self.overlay_cidrs.iter().enumerate() {
            keyway_policy::ip::parse_cidr(t).map_err(|e| {
                bad(&format!("overlay_cidrs[{i}]"), format!("{t:?}: expected a CIDR such as 10.128.0.0/16: {e}"))
            })?;
        }
        if !self.cidrs().iter().any(|c| c.contains(self.overlay_ip)) {
            return Err(bad(
                "overlay_ip",
                format!("{} is in none of `overlay_cidrs` {:?}", self.overlay_ip, self.overlay_cidrs),
            ));
        }
        if self.gateways.is_empty() {
            return Err(bad(
                "gateways",
                format!("expected at least one edge address host:port (gateways listen on {DEFAULT_EDGE_PORT})"),
            ));
        }
        for (i, g) in self.gateways.iter().enumerate() {
            let ok = g.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p != 0));
            if !ok {
                return Err(bad(
                    &format!("gateways[{i}]"),
                    format!("{g:?}: expected host:port, e.g. \"192.0.2.10:{DEFAULT_EDGE_PORT}\""),
                ));
            }
        }
        if self.mode == Mode::Device
            && let Some(g) = self.gateway_ips_in_overlay().first()
        {
            return Err(bad(
                "gateways",
                format!(
                    "{g} is inside `overlay_cidrs`: a device reaches its gateways through the underlay, give \
                     their edge addresses outside the overlay"
                ),
            ));
        }
        let name_ok = !self.tun.name.is_empty()
            && self.tun.name.len() < 16
            && self.tun.name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !name_ok {
            return Err(bad(
                "tun.name",
                format!("{:?}: expected an interface name of 1 to 15 letters, digits, '-', '_' or '.'", self.tun.name),
            ));
        }
        if self.tun.mtu < MIN_TUN_MTU {
            return Err(bad("tun.mtu", format!("{} is below the minimum {MIN_TUN_MTU}", self.tun.mtu)));
        }
        if self.keepalive_ms == 0 || self.keepalive_ms >= self.idle_timeout_ms {
            return Err(bad(
                "keepalive_ms",
                format!("{} must be above 0 and below idle_timeout_ms ({})", self.keepalive_ms, self.idle_timeout_ms),
            ));
        }
        if let Some(a) = self.admin
            && !a.ip().is_loopback()
        {
            return Err(bad("admin", format!("{a}: expected a loopback address such as 127.0.0.1:15021")));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "zone: zone-a\noverlay_ip: 10.128.9.1\noverlay_cidrs: [10.128.0.0/16]\n\
        gateways: [\"192.0.2.10:15444\"]\ntls: {ca: ca.pem, cert: laptop.pem, key: laptop-key.pem}\n";

    #[test]
    fn defaults_and_errors_name_the_field() {
        let c = AgentConfig::parse(MINIMAL, "agent.yaml").unwrap();
        assert_eq!(c.mode, Mode::Device);
        assert_eq!(c.tun, Tun { name: "kw0".into(), mtu: 1280 });
        assert_eq!(c.tcp_listen.to_string(), DEFAULT_TCP_LISTEN);
        assert_eq!((c.keepalive_ms, c.idle_timeout_ms, c.admin), (200, 3000, None));
        let cases = [
            ("overlay_ip: 10.128.9.1", "overlay_ip: 10.9.9.1", "field `overlay_ip`: 10.9.9.1 is in none"),
            ("[10.128.0.0/16]", "[]", "field `overlay_cidrs`: expected at least one"),
            ("[10.128.0.0/16]", "[10.128.0.0/40]", "field `overlay_cidrs[0]`"),
            ("[\"192.0.2.10:15444\"]", "[\"192.0.2.10\"]", "field `gateways[0]`: \"192.0.2.10\": expected host:port"),
            ("zone: zone-a", "zone: Zone_A", "field `zone`"),
            ("zone: zone-a", "zone: zone-a\nmode: router", "mode: unknown variant `router`"),
            ("zone: zone-a", "zone: zone-a\ntun: {mtu: 100}", "field `tun.mtu`"),
            ("zone: zone-a", "zone: zone-a\nadmin: 0.0.0.0:15021", "field `admin`"),
            ("zone: zone-a", "zone: zone-a\nkeepalive_ms: 5000", "field `keepalive_ms`"),
            ("zone: zone-a", "zone: zone-a\ncolour: blue", "unknown field `colour`"),
            ("192.0.2.10:15444", "10.128.0.5:15444", "field `gateways`: 10.128.0.5 is inside `overlay_cidrs`"),
        ];
        for (from, to, want) in cases {
            let text = MINIMAL.replace(from, to);
            let err = AgentConfig::parse(&text, "agent.yaml").unwrap_err().to_string();
            assert!(err.starts_with("agent.yaml: ") && err.contains(want), "{to}: {err}");
        }
        let pod = AgentConfig::parse(&format!("{MINIMAL}mode: pod\n"), "agent.yaml").unwrap();
        assert_eq!(pod.mode, Mode::Pod);
    }
}
