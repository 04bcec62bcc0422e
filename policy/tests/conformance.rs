//! The engine against public golden data: every scenario of np-guard/netpol-analyzer copied to
//! `testdata/conformance/` must give its `expected_connlist.txt` byte for byte, and the
//! single-flow decision function must agree with the connectivity sets at every port boundary.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test harness

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use keyway_policy::connlist::{Format, connections, render};
use keyway_policy::engine::Peer;
use keyway_policy::{ConnSet, Engine, Protocol, Verdict};

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/conformance")
}

fn scenarios(set: &str) -> Vec<PathBuf> {
    let dir = testdata().join(set);
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("index.json")).unwrap_or_else(|e| panic!("{}: {e}", dir.display())),
    )
    .unwrap();
    index["scenarios"].as_array().unwrap().iter().map(|s| dir.join(s["scenario"].as_str().unwrap())).collect()
}

/// Runs one scenario; `Err` holds a line diff.
fn run(dir: &Path) -> Result<(), String> {
    let expected = std::fs::read_to_string(dir.join("expected_connlist.txt")).map_err(|e| e.to_string())?;
    let (engine, _warnings) = keyway_policy::fs::load_dir(dir).map_err(|e| format!("load failed: {e}"))?;
    agree_per_port(&engine)?;
    let got = render(&connections(&engine), Format::Txt);
    if got == expected {
        return Ok(());
    }
    let split = |s: &str| -> Vec<(String, String)> {
        s.lines()
            .map(|l| match l.rsplit_once(" : ") {
                Some((pair, conn)) => (pair.to_owned(), conn.to_owned()),
                None => (l.to_owned(), String::new()),
            })
            .collect()
    };
    let (want, have) = (split(&expected), split(&got));
    let mut diff = format!("{} lines expected, {} produced\n", want.len(), have.len());
    for (pair, conn) in &want {
        match have.iter().find(|(p, _)| p == pair) {
            None => writeln!(diff, "  missing: {pair} : {conn}").unwrap(),
            Some((_, c)) if c != conn => writeln!(diff, "  differs: {pair} : expected {conn:?}, got {c:?}").unwrap(),
            Some(_) => {}
        }
    }
    for (pair, conn) in &have {
        if !want.iter().any(|(p, _)| p == pair) {
            writeln!(diff, "  extra:   {pair} : {conn}").unwrap();
        }
    }
    if diff.lines().count() == 1 {
        diff.push_str("  same lines, different order or bytes\n");
    }
    Err(diff)
}

fn run_set(set: &str) -> (usize, Vec<(String, String)>) {
    let all = scenarios(set);
    let mut failures = Vec::new();
    for dir in &all {
        if let Err(diff) = run(dir) {
            failures.push((dir.file_name().unwrap().to_string_lossy().into_owned(), diff));
        }
    }
    (all.len(), failures)
}

#[test]
fn netpol_analyzer_scenarios_match_byte_for_byte() {
    let (total, failures) = run_set("netpol-analyzer");
    assert_eq!(total, 29, "the conformance set has 29 scenarios");
    let mut report = String::new();
    for (name, diff) in &failures {
        writeln!(report, "{name}:\n{diff}").unwrap();
    }
    println!("netpol-analyzer: {} of {total} scenarios pass", total - failures.len());
    assert!(failures.is_empty(), "{} of {total} scenarios differ:\n{report}", failures.len());
}

#[test]
fn netpol_analyzer_anp_scenarios_match_byte_for_byte() {
    let (total, failures) = run_set("netpol-analyzer-anp");
    assert_eq!(total, 54, "the admin-tier conformance set has 54 scenarios");
    let mut report = String::new();
    for (name, diff) in &failures {
        writeln!(report, "{name}:\n{diff}").unwrap();
    }
    println!("netpol-analyzer-anp: {} of {total} scenarios pass", total - failures.len());
    assert!(failures.is_empty(), "{} of {total} scenarios differ:\n{report}", failures.len());
}

/// The ports worth probing for a set: both ends of every range and their neighbours.
fn probe_ports(set: &ConnSet) -> Vec<(Protocol, u16)> {
    let mut out = Vec::new();
    for p in Protocol::ALL {
        let mut ports = vec![1u16, 80, 65535];
        for &(lo, hi) in set.ports(p).ranges() {
            ports.extend([lo, hi, lo.saturating_sub(1).max(1), hi.saturating_add(1)]);
        }
        ports.sort_unstable();
        ports.dedup();
        out.extend(ports.into_iter().map(|port| (p, port)));
    }
    out
}

/// `Engine::decide` (one port, what the gateway calls) must agree with `Engine::allowed` (the
/// sets the connectivity list prints) for every pair of workloads at every range boundary.
fn agree_per_port(engine: &Engine) -> Result<(), String> {
    let n = engine.inventory().workloads.len();
    let peers: Vec<Peer> = (0..n).map(Peer::Workload).chain([Peer::Ip("8.8.8.8".parse().unwrap())]).collect();
    for &src in &peers {
        for &dst in &peers {
            if src == dst {
                continue;
            }
            let set = engine.allowed(src, dst);
            for (proto, port) in probe_ports(&set) {
                let d = engine.decide(src, dst, proto, port);
                if (d.verdict == Verdict::Allow) != set.contains(proto, port) {
                    return Err(format!(
                        "decide and allowed disagree for {} => {} {proto} {port}: set {set}\n{}",
                        engine.peer_name(src),
                        engine.peer_name(dst),
                        engine.explain(src, dst, proto, port).text
                    ));
                }
            }
        }
    }
    Ok(())
}
