//! `make demo`: the overlay of `samples/shop` over three zones, the traffic matrix with the
//! verdict of every flow, a few lines of gateway metrics and access logs, then teardown.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::cluster::{Cluster, Options};

fn say(s: &str) {
    println!("\n== {s}");
}

/// Runs the demo; exits non-zero if any observed verdict differs from the expected one.
pub async fn run() -> anyhow::Result<ExitCode> {
    if let Err(e) = crate::topology::require_root() {
        eprintln!("keyway demo: {e}");
        return Ok(ExitCode::from(2));
    }
    tokio::task::spawn_blocking(demo).await?
}

fn demo() -> anyhow::Result<ExitCode> {
    let t0 = Instant::now();
    let opts = Options::discover("kwdemo")?;
    say(
        "starting: 3 zones as network namespaces, 2 gateways per zone, every workload of samples/shop with the app and an Envoy sidecar running the keyway filter",
    );
    let cluster = Cluster::start(opts)?;
    println!(
        "   up in {:.1} s: {} gateways, {} workloads, run directory {}",
        t0.elapsed().as_secs_f64(),
        cluster.gateways.len(),
        cluster.workloads.len(),
        cluster.dir.display()
    );
    for w in &cluster.workloads {
        println!(
            "   {:<22} {:<7} overlay {:<12} pod {:<11} ports {:?}",
            w.name,
            w.zone,
            w.overlay.to_string(),
            w.pod.ip,
            w.ports
        );
    }

    say(
        "traffic matrix: a real connection for every (source, destination, port), through sidecar → gateway → (QUIC) → gateway → sidecar",
    );
    let t1 = Instant::now();
    let rows = crate::matrix::run(&cluster, Duration::from_secs(3))?;
    print!("{}", crate::matrix::table(&rows));
    println!("   ({:.1} s)", t1.elapsed().as_secs_f64());

    say("gateway metrics (zone-a/gw-1, /metrics)");
    let (_, metrics) = cluster.gateway_admin("zone-a", "gw-1", "/metrics")?;
    for line in metrics.lines().filter(|l| {
        (l.starts_with("keyway_gateway_flows_total")
            || l.starts_with("keyway_gateway_peers_up")
            || l.starts_with("keyway_gateway_token_failures_total"))
            && !l.starts_with('#')
    }) {
        println!("   {line}");
    }

    say("access log (zone-b/gw-1: flows that crossed the overlay, arriving from or leaving for another zone)");
    if let Some(g) = cluster.gateways.iter().find(|g| g.zone == "zone-b" && g.name == "gw-1")
        && let Some(p) = &g.proc
    {
        let text = std::fs::read_to_string(&p.log).unwrap_or_default();
        let flows: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("keyway::access"))
            .filter(|l| l.contains("\"entry\":\"overlay\"") || l.contains("\"next_hop\":\"zone-"))
            .collect();
        for l in flows.iter().rev().take(4).rev() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
            let f = &v["fields"];
            println!(
                "   {:<7} {} {} -> {} {} ({}) via {}\n           rule: {}",
                f["entry"].as_str().unwrap_or_default(),
                f["identity"].as_str().unwrap_or_default(),
                f["src"].as_str().unwrap_or_default(),
                f["dst"].as_str().unwrap_or_default(),
                f["verdict"].as_str().unwrap_or_default(),
                f["reason"].as_str().unwrap_or_default(),
                f["next_hop"].as_str().filter(|s| !s.is_empty()).unwrap_or("-"),
                f["rule"].as_str().unwrap_or_default()
            );
        }
    }

    let bad = rows.iter().filter(|r| !r.ok()).count();
    say("teardown: stopping every process and removing every namespace");
    drop(cluster);
    if bad == 0 {
        println!(
            "\nkeyway demo: every observed verdict matches `keyway policy` ({} flows, {:.1} s)",
            rows.len(),
            t0.elapsed().as_secs_f64()
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!("\nkeyway demo: {bad} observed verdicts differ from `keyway policy`");
        Ok(ExitCode::FAILURE)
    }
}
