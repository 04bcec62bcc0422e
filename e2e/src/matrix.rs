//! The traffic matrix: every (source, destination, port) of the bed tried with a real connection
//! (TCP) and a real datagram and its answer (UDP), pods and devices both ways, compared with what
//! `keyway policy` decides.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use keyway_policy::engine::Peer;
use keyway_policy::{Protocol, Verdict};

use crate::cluster::{Cluster, INTERNET, INTERNET_PORTS};

/// One tried flow.
#[derive(Debug, Clone)]
pub struct Row {
    /// Source workload or device (`ns/name`).
    pub src: String,
    /// Destination workload, device or address.
    pub dst: String,
    /// Port.
    pub port: u16,
    /// Protocol.
    pub protocol: Protocol,
    /// What the policy engine says.
    pub expected: Verdict,
    /// What happened: the destination app answered.
    pub observed: Verdict,
    /// The deciding rule.
    pub rule: String,
    /// Why it did not connect, when it did not.
    pub error: String,
}

impl Row {
    /// Whether the observation matches the expectation.
    pub fn ok(&self) -> bool {
        self.expected == self.observed
    }
}

/// A source or destination of the matrix: a workload's pod or a device.
#[derive(Debug, Clone)]
pub struct End {
    /// `ns/name`.
    pub name: String,
    /// Index in the engine's inventory.
    pub index: usize,
    /// Its network namespace.
    pub ns: String,
    /// Its overlay address.
    pub overlay: IpAddr,
    /// Its app's ports (TCP and UDP alike).
    pub ports: Vec<u16>,
    /// Whether it is a device (its traffic outside the overlay is not keyway's).
    pub device: bool,
}

/// Every pod and device of the bed.
pub fn ends(c: &Cluster) -> Vec<End> {
    let pods = c.workloads.iter().map(|w| End {
        name: w.name.clone(),
        index: w.index,
        ns: w.pod.ns.clone(),
        overlay: w.overlay,
        ports: w.ports.clone(),
        device: false,
    });
    let devices = c.devices.iter().map(|d| End {
        name: d.name.clone(),
        index: d.index,
        ns: d.pod.ns.clone(),
        overlay: d.overlay,
        ports: d.ports.clone(),
        device: true,
    });
    pods.chain(devices).collect()
}

/// Runs the matrix: from every pod and device to every other one's ports, over TCP and over UDP,
/// and from every pod to the host outside the overlay (TCP).
pub fn run(c: &Cluster, timeout: Duration) -> anyhow::Result<Vec<Row>> {
    let all = ends(c);
    let mut rows = Vec::new();
    for src in &all {
        let mut targets: Vec<(SocketAddr, String, Peer)> = Vec::new();
        for dst in all.iter().filter(|d| d.name != src.name) {
            for &port in &dst.ports {
                targets.push((SocketAddr::new(dst.overlay, port), dst.name.clone(), Peer::Workload(dst.index)));
            }
        }
        let workloads = targets.len();
        if !src.device {
            let internet: IpAddr = INTERNET.parse()?;
            for port in INTERNET_PORTS {
                targets.push((SocketAddr::new(internet, port), "internet".to_owned(), Peer::Ip(internet)));
            }
        }
        let addrs: Vec<SocketAddr> = targets.iter().map(|t| t.0).collect();
        let tcp = c.probe_in(&src.ns, &addrs, 0, timeout)?;
        for ((addr, name, peer), r) in targets.iter().cloned().zip(tcp) {
            let (expected, rule) = c.expected_for(src.index, peer, Protocol::Tcp, addr.port());
            let answered = r.connected && r.banner == format!("keyway-app {name} port {}", addr.port());
            rows.push(Row {
                src: src.name.clone(),
                dst: if name == "internet" { format!("internet {}", addr.ip()) } else { name },
                port: addr.port(),
                protocol: Protocol::Tcp,
                expected,
                observed: if answered { Verdict::Allow } else { Verdict::Deny },
                rule,
                error: if answered { String::new() } else { r.error },
            });
        }
        // UDP to the pods and devices: a datagram, and the app's answer back.
        let udp_targets = targets.get(..workloads).unwrap_or_default();
        let udp_addrs: Vec<SocketAddr> = udp_targets.iter().map(|t| t.0).collect();
        let udp = c.udp_in(&src.ns, &udp_addrs, timeout)?;
        for ((addr, name, peer), r) in udp_targets.iter().cloned().zip(udp) {
            let (expected, rule) = c.expected_for(src.index, peer, Protocol::Udp, addr.port());
            let want = format!("{}{}", crate::app::udp_banner(&name, addr.port()), crate::datagram::PROBE);
            let answered = r.reply == want;
            rows.push(Row {
                src: src.name.clone(),
                dst: name,
                port: addr.port(),
                protocol: Protocol::Udp,
                expected,
                observed: if answered { Verdict::Allow } else { Verdict::Deny },
                rule,
                error: if answered {
                    String::new()
                } else if r.error.is_empty() {
                    r.reply
                } else {
                    r.error
                },
            });
        }
    }
    Ok(rows)
}

fn v(v: Verdict) -> &'static str {
    match v {
        Verdict::Allow => "allow",
        Verdict::Deny => "deny",
    }
}

/// The matrix as a person reads it: mismatches first (if any), then every allowed flow with the
/// rule that allowed it, then the denied flows grouped by source and deciding rule.
pub fn table(rows: &[Row]) -> String {
    let w_src = rows.iter().map(|r| r.src.len()).max().unwrap_or(6).max(6);
    let w_dst = rows.iter().map(|r| r.dst.len()).max().unwrap_or(11).max(11);
    let mut s = String::new();
    let header = |s: &mut String| {
        let _ = writeln!(
            s,
            "  {:<w_src$}  {:<w_dst$}  {:>9}  {:<8}  {:<8}  deciding rule",
            "source", "destination", "port", "expected", "observed"
        );
    };
    let line = |s: &mut String, r: &Row| {
        let _ = writeln!(
            s,
            "  {:<w_src$}  {:<w_dst$}  {:>9}  {:<8}  {:<8}  {}",
            r.src,
            r.dst,
            format!("{}/{}", r.port, r.protocol),
            v(r.expected),
            v(r.observed),
            r.rule
        );
    };
    let bad: Vec<&Row> = rows.iter().filter(|r| !r.ok()).collect();
    if !bad.is_empty() {
        let _ = writeln!(s, "MISMATCHES: the observed verdict differs from keyway policy");
        header(&mut s);
        for r in &bad {
            line(&mut s, r);
            if !r.error.is_empty() {
                let _ = writeln!(s, "      ({})", r.error);
            }
        }
        s.push('\n');
    }
    let _ = writeln!(s, "ALLOWED: the destination app answered, as keyway policy says");
    header(&mut s);
    for r in rows.iter().filter(|r| r.ok() && r.observed == Verdict::Allow) {
        line(&mut s, r);
    }
    let _ =
        writeln!(s, "\nDENIED: refused before reaching the app, as keyway policy says (by source and deciding rule)");
    let mut groups: Vec<(String, String, Vec<String>)> = Vec::new();
    for r in rows.iter().filter(|r| r.ok() && r.observed == Verdict::Deny) {
        let dst = format!("{}:{}/{}", r.dst.trim_start_matches("internet "), r.port, r.protocol);
        match groups.iter_mut().find(|g| g.0 == r.src && g.1 == r.rule) {
            Some(g) => g.2.push(dst),
            None => groups.push((r.src.clone(), r.rule.clone(), vec![dst])),
        }
    }
    for (src, rule, dsts) in groups {
        let _ = writeln!(s, "  {src}: {rule}");
        let mut cur = String::from("     ");
        for d in &dsts {
            if cur.len() + d.len() > 110 {
                let _ = writeln!(s, "{cur}");
                cur = String::from("     ");
            }
            cur.push(' ');
            cur.push_str(d);
        }
        let _ = writeln!(s, "{cur}");
    }
    let allowed = rows.iter().filter(|r| r.observed == Verdict::Allow).count();
    let udp = rows.iter().filter(|r| r.protocol == Protocol::Udp).count();
    let _ = writeln!(
        s,
        "\n{} flows tried ({} TCP, {udp} UDP): {allowed} allowed, {} denied, {} mismatches",
        rows.len(),
        rows.len() - udp,
        rows.len() - allowed,
        bad.len()
    );
    s
}
