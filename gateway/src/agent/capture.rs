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
                    pod_rp_filter(dev)?;
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

/// Turns the reverse-path filter of `dev` off, so that replies coming in on the TUN device (from
/// overlay sources the main table routes elsewhere) are not dropped. A container that is not
/// privileged has `/proc/sys` read-only: then the check the pod already has must let them through
/// (loose or off, the pod's sysctls `net.ipv4.conf.{all,default}.rp_filter`), or nothing comes
/// back and the agent refuses to start.
fn pod_rp_filter(dev: &str) -> Result<(), AgentError> {
    let own = format!("/proc/sys/net/ipv4/conf/{dev}/rp_filter");
    let Err(e) = std::fs::write(&own, "0") else {
        return Ok(());
    };
    let read = |p: &str| std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse::<u8>().ok());
    let (all, dev_value) = (read("/proc/sys/net/ipv4/conf/all/rp_filter"), read(&own));
    if rp_filter_lets_replies_in(all, dev_value) {
        tracing::info!(all = ?all, dev = ?dev_value, error = %e, "capture: rp_filter not writable, and already not strict");
        Ok(())
    } else {
        Err(AgentError::Capture(format!(
            "rp_filter of {dev}: {e}, and the effective value (all {all:?}, {dev} {dev_value:?}) is not 0 or 2: \
             replies from the TUN device would be dropped; set the pod's sysctls \
             net.ipv4.conf.all.rp_filter and net.ipv4.conf.default.rp_filter to 0 or 2"
        )))
    }
}

/// Whether the reverse-path filter lets replies in on a device: the kernel uses the larger of
/// `conf/all` and `conf/<dev>` (0 off, 1 strict, 2 loose); strict drops them, and an unknown value
/// counts as strict.
fn rp_filter_lets_replies_in(all: Option<u8>, dev: Option<u8>) -> bool {
    matches!((all, dev), (Some(a), Some(d)) if a.max(d) != 1 && a.max(d) <= 2)
}

/// Creates the TUN device (not persistent: the kernel removes it, and its addresses and routes,
/// when the agent exits).
pub fn open_tun(config: &AgentConfig) -> Result<tun_rs::AsyncDevice, AgentError> {
    tun_rs::DeviceBuilder::new().name(config.tun.name.clone()).mtu(config.tun.mtu).build_async().map_err(|e| {
        AgentError::Capture(format!("cannot create the TUN device {:?} (root needed): {e}", config.tun.name))
    })
}

#[cfg(test)]
mod tests {
    use super::rp_filter_lets_replies_in;

    #[test]
    fn replies_from_the_tun_device_pass_unless_the_effective_rp_filter_is_strict() {
        for (all, dev, ok) in [
            (Some(0), Some(0), true),
            (Some(2), Some(0), true),
            (Some(0), Some(2), true),
            (Some(1), Some(2), true),
            (Some(2), Some(1), true),
            (Some(1), Some(0), false),
            (Some(0), Some(1), false),
            (Some(1), Some(1), false),
            (Some(3), Some(0), false),
            (None, Some(0), false),
            (Some(0), None, false),
        ] {
            assert_eq!(rp_filter_lets_replies_in(all, dev), ok, "all {all:?}, dev {dev:?}");
        }
    }
}
