//! The traffic matrix: every (source, destination, port) of the sample tried with a real
//! connection, compared with what `keyway policy` decides.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use keyway_policy::Verdict;
use keyway_policy::engine::Peer;

use crate::cluster::{Cluster, INTERNET, INTERNET_PORTS};

/// One tried flow.
#[derive(Debug, Clone)]
pub struct Row {
    /// Source workload (`ns/name`).
    pub src: String,
    /// Destination workload or address.
    pub dst: String,
    /// Port.
    pub port: u16,
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

/// Runs the matrix: from every workload to every other workload's TCP ports and to the host
/// outside the overlay.
pub fn run(c: &Cluster, timeout: Duration) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    for src in &c.workloads {
        let mut targets: Vec<(SocketAddr, String, Peer)> = Vec::new();
        for dst in c.workloads.iter().filter(|d| d.name != src.name) {
            for &port in &dst.ports {
                targets.push((SocketAddr::new(dst.overlay, port), dst.name.clone(), Peer::Workload(dst.index)));
            }
        }
        let internet: IpAddr = INTERNET.parse()?;
        for port in INTERNET_PORTS {
            targets.push((SocketAddr::new(internet, port), "internet".to_owned(), Peer::Ip(internet)));
        }
        let addrs: Vec<SocketAddr> = targets.iter().map(|t| t.0).collect();
        let results = c.probe(src, &addrs, 0, timeout)?;
        for ((addr, name, peer), r) in targets.into_iter().zip(results) {
            let (expected, rule) = c.expected(src, peer, addr.port());
            let answered = r.connected && r.banner == format!("keyway-app {name} port {}", addr.port());
            rows.push(Row {
                src: src.name.clone(),
                dst: if name == "internet" { format!("internet {}", addr.ip()) } else { name },
                port: addr.port(),
                expected,
                observed: if answered { Verdict::Allow } else { Verdict::Deny },
                rule,
                error: if answered { String::new() } else { r.error },
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
            "  {:<w_src$}  {:<w_dst$}  {:>5}  {:<8}  {:<8}  deciding rule",
            "source", "destination", "port", "expected", "observed"
        );
    };
    let line = |s: &mut String, r: &Row| {
        let _ = writeln!(
            s,
            "  {:<w_src$}  {:<w_dst$}  {:>5}  {:<8}  {:<8}  {}",
            r.src,
            r.dst,
            r.port,
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
        let dst = format!("{}:{}", r.dst.trim_start_matches("internet "), r.port);
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
    let _ = writeln!(
        s,
        "\n{} flows tried: {allowed} allowed, {} denied, {} mismatches",
        rows.len(),
        rows.len() - allowed,
        bad.len()
    );
    s
}
