//! The host side of the agent (root only): the TUN device, its address and routes, and the TCP
//! capture, configured with `ip` and `iptables` as Istio's init container does, and removed on
//! exit in reverse order.
//!
//! * `device` mode: the TUN device carries the overlay address (`/32` or `/128`) and routes for
//!   `overlay_cidrs`; a chain `KEYWAY_AGENT` in the nat table's OUTPUT redirects TCP to the
//!   overlay to the agent's listener (connections to the device's own overlay address stay
//!   local); every other IP packet to the overlay arrives on the TUN device.
//! * `pod` mode: the pod's eth0 already has the overlay address and Envoy captures TCP; only UDP
//!   to the overlay is routed into the TUN device, by `ip rule ipproto udp to <cidr>` into a
//!   table of its own, with the pod's address as source.

use std::process::Command;

use super::AgentError;
use super::config::{AgentConfig, Mode};

/// The nat chain of the TCP capture.
pub const CHAIN: &str = "KEYWAY_AGENT";
/// The routing table of UDP in pod mode.
pub const POD_TABLE: u32 = 15444;
/// The priority of pod mode's ip rules (before `main` at 32766).
pub const POD_RULE_PRIORITY: u32 = 15444;

/// What the agent added to the host, to remove on exit.
#[derive(Debug, Default)]
pub struct Capture {
    undo: Vec<Vec<String>>,
}

fn run(args: &[String]) -> Result<(), String> {
    let (cmd, rest) = args.split_first().ok_or("empty command")?;
    let out = Command::new(cmd).args(rest).output().map_err(|e| format!("{}: cannot run: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_owned).collect()
}

impl Capture {
    /// Runs `cmd`; on success remembers `undo` (run on [`Capture::remove`], last first).
    fn apply(&mut self, cmd: String, undo: Option<String>) -> Result<(), AgentError> {
        run(&words(&cmd)).map_err(AgentError::Capture)?;
        tracing::info!(command = %cmd, "capture");
        if let Some(u) = undo {
            self.undo.push(words(&u));
        }
        Ok(())
    }

    /// Configures the host for `config` around the TUN device `tun` (already created). On error
    /// what was added is removed again.
    pub fn install(config: &AgentConfig) -> Result<Capture, AgentError> {
        let mut c = Capture::default();
        match c.install_inner(config) {
            Ok(()) => Ok(c),
            Err(e) => {
                c.remove();
                Err(e)
            }
        }
    }

    fn install_inner(&mut self, config: &AgentConfig) -> Result<(), AgentError> {
        let dev = &config.tun.name;
        let cidrs = config.cidrs();
        if config.overlay_ip.is_ipv4() && cidrs.iter().all(|c| c.v4) {
            // No IPv6 on the device: no link-local address, no router solicitations into it.
            let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{dev}/disable_ipv6"), "1");
        }
        self.apply(format!("ip link set dev {dev} mtu {} up", config.tun.mtu), None)?;
        let ip = config.overlay_ip;
        let (fam, host) = if ip.is_ipv4() { ("-4", 32) } else { ("-6", 128) };
        match config.mode {
            Mode::Device => {
                self.apply(format!("ip {fam} addr add {ip}/{host} dev {dev}"), None)?;
                for c in &cidrs {
                    let f = if c.v4 { "-4" } else { "-6" };
                    self.apply(
                        format!("ip {f} route replace {} dev {dev} src {ip}", c.text),
                        Some(format!("ip {f} route del {} dev {dev}", c.text)),
                    )?;
                }
                let port = config.tcp_listen.port();
                for (tool, v4) in [("iptables", true), ("ip6tables", false)] {
                    let family: Vec<_> = cidrs.iter().filter(|c| c.v4 == v4).collect();
                    if family.is_empty() {
                        continue;
                    }
                    // A chain left by an agent that did not exit cleanly.
                    let _ = run(&words(&format!("{tool} -w -t nat -D OUTPUT -p tcp -j {CHAIN}")));
                    let _ = run(&words(&format!("{tool} -w -t nat -F {CHAIN}")));
                    let _ = run(&words(&format!("{tool} -w -t nat -X {CHAIN}")));
                    self.apply(format!("{tool} -w -t nat -N {CHAIN}"), Some(format!("{tool} -w -t nat -X {CHAIN}")))?;
                    self.undo.push(words(&format!("{tool} -w -t nat -F {CHAIN}")));
                    if ip.is_ipv4() == v4 {
                        self.apply(format!("{tool} -w -t nat -A {CHAIN} -d {ip}/{host} -j RETURN"), None)?;
                    }
                    for c in family {
                        self.apply(
                            format!("{tool} -w -t nat -A {CHAIN} -p tcp -d {} -j REDIRECT --to-ports {port}", c.text),
                            None,
                        )?;
                    }
                    self.apply(
                        format!("{tool} -w -t nat -A OUTPUT -p tcp -j {CHAIN}"),
                        Some(format!("{tool} -w -t nat -D OUTPUT -p tcp -j {CHAIN}")),
                    )?;
                }
            }
            Mode::Pod => {
                if ip.is_ipv4() {
                    std::fs::write(format!("/proc/sys/net/ipv4/conf/{dev}/rp_filter"), "0")
                        .map_err(|e| AgentError::Capture(format!("rp_filter of {dev}: {e}")))?;
                }
                // The agent's own QUIC to a gateway whose address is inside the overlay (a
                // gateway pod's address) keeps the pod's normal route.
                for g in config.gateway_ips_in_overlay() {
                    let rule = format!("to {g} ipproto udp lookup main priority {}", POD_RULE_PRIORITY - 1);
                    let f = if g.is_ipv4() { "-4" } else { "-6" };
                    self.apply(format!("ip {f} rule add {rule}"), Some(format!("ip {f} rule del {rule}")))?;
                }
                for c in cidrs.iter().filter(|c| c.v4 == ip.is_ipv4()) {
                    self.apply(
                        format!("ip {fam} route replace {} dev {dev} src {ip} table {POD_TABLE}", c.text),
                        Some(format!("ip {fam} route del {} dev {dev} table {POD_TABLE}", c.text)),
                    )?;
                    let rule = format!("ipproto udp to {} lookup {POD_TABLE} priority {POD_RULE_PRIORITY}", c.text);
                    self.apply(format!("ip {fam} rule add {rule}"), Some(format!("ip {fam} rule del {rule}")))?;
                }
            }
        }
        Ok(())
    }

    /// Removes what [`Capture::install`] added, last first; failures are logged.
    pub fn remove(&mut self) {
        while let Some(cmd) = self.undo.pop() {
            match run(&cmd) {
                Ok(()) => tracing::info!(command = %cmd.join(" "), "capture removed"),
                Err(e) => tracing::warn!(error = %e, "capture: cannot remove"),
            }
        }
    }
}

/// Creates the TUN device (not persistent: the kernel removes it, and its addresses and routes,
/// when the agent exits).
pub fn open_tun(config: &AgentConfig) -> Result<tun_rs::AsyncDevice, AgentError> {
    tun_rs::DeviceBuilder::new().name(config.tun.name.clone()).mtu(config.tun.mtu).build_async().map_err(|e| {
        AgentError::Capture(format!("cannot create the TUN device {:?} (root needed): {e}", config.tun.name))
    })
}
