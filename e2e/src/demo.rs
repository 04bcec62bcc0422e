//! `make demo`: the overlay of `samples/shop` (and the bed's device and UDP policies,
//! `e2e/bed/`) over three zones, the traffic matrix with the verdict of every TCP and UDP flow,
//! pods and a device both ways, a few lines of gateway metrics and access logs, then teardown.

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
        "starting: 3 zones as network namespaces, 2 gateways per zone, every workload of samples/shop with the app, an Envoy sidecar running the keyway filter and a keyway agent for its UDP, and a laptop outside the zones running keyway agent (e2e/bed/edge.yaml)",
    );
    let cluster = Cluster::start(opts)?;
    println!(
        "   up in {:.1} s: {} gateways, {} workloads, {} device(s), run directory {}",
        t0.elapsed().as_secs_f64(),
        cluster.gateways.len(),
        cluster.workloads.len(),
        cluster.devices.len(),
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
    for d in &cluster.devices {
        println!(
            "   {:<22} {:<7} overlay {:<12} device {:<8} ports {:?} (keyway agent, via {}'s gateways)",
            d.name,
            d.zone,
            d.overlay.to_string(),
            d.pod.ip,
            d.ports,
            d.zone
        );
    }

    say(
        "traffic matrix: for every (source, destination, port) a real TCP connection (sidecar or agent → gateway → QUIC → gateway → sidecar or agent) and a real UDP datagram with its answer (agent → gateway → QUIC datagrams → gateway → agent)",
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
            || l.starts_with("keyway_gateway_token_failures_total")
            || l.starts_with("keyway_gateway_udp_datagrams_total")
            || l.starts_with("keyway_gateway_agents"))
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
