//! The measurements over a running bed: latency rounds, throughput rounds, gateway cost. Every
//! comparison runs side by side in one process lifetime (rounds of A B C …), and the report keeps
//! the median of the rounds.

use std::io::BufRead as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use keyway_e2e::topology::sh;
use serde::{Deserialize, Serialize};

use crate::bed::{Bed, IPERF_PORT};
use crate::load::LoadResult;

/// CPU time of a process (all its threads), in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    let Some((_, rest)) = stat.rsplit_once(") ") else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / clock_ticks()
}

fn clock_ticks() -> f64 {
    sh(&["getconf", "CLK_TCK"]).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(100.0)
}

/// Resident memory of a process, MiB.
pub fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Busy and total jiffies of the whole machine.
pub fn machine_jiffies() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> =
        text.lines().next().unwrap_or_default().split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// The median of `v` (0 when empty).
pub fn median(v: &[f64]) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return 0.0;
    }
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 { s[n / 2] } else { (s[n / 2 - 1] + s[n / 2]) / 2.0 }
}

/// One latency run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LatencyRun {
    /// Round.
    pub round: u32,
    /// Path.
    pub path: String,
    /// `keepalive` or `new_connection`.
    pub variant: String,
    /// The load generator's figures.
    pub result: LoadResult,
    /// CPU seconds of each gateway during the run (keyway paths).
    pub gateway_cpu_s: Vec<f64>,
    /// Wall seconds of the run (warm-up included).
    pub wall_s: f64,
    /// Machine busy fraction (all cores) during the run.
    pub machine_busy: f64,
}

/// Latency settings.
#[derive(Debug, Clone)]
pub struct LatencySpec {
    /// Rounds.
    pub rounds: u32,
    /// Requests per second.
    pub rate: u32,
    /// Connections.
    pub connections: u32,
    /// Measured seconds per run.
    pub seconds: f64,
    /// Warm-up seconds per run.
    pub warmup: f64,
    /// Paths, in the order they alternate.
    pub paths: Vec<String>,
    /// Variants.
    pub variants: Vec<String>,
}

/// Runs the latency rounds: for each round, each variant, each path.
pub fn latency(bed: &Bed, spec: &LatencySpec) -> anyhow::Result<Vec<LatencyRun>> {
    let mut runs = Vec::new();
    let gws: Vec<u32> = ["gw-1", "gw-2"].iter().filter_map(|g| bed.pid(g)).collect();
    for round in 1..=spec.rounds {
        for variant in &spec.variants {
            for name in &spec.paths {
                if name == "boringtun" && bed.tools.boringtun.is_none() {
                    continue;
                }
                let path = bed.path(name)?;
                let mut args = vec![
                    "ip".to_owned(),
                    "netns".into(),
                    "exec".into(),
                    path.client_ns.clone(),
                    bed.tools.me.display().to_string(),
                    "load".into(),
                    "--target".into(),
                    path.http()?.to_string(),
                    "--rate".into(),
                    spec.rate.to_string(),
                    "--connections".into(),
                    spec.connections.to_string(),
                    "--seconds".into(),
                    spec.seconds.to_string(),
                    "--warmup".into(),
                    spec.warmup.to_string(),
                ];
                if variant == "new_connection" {
                    args.push("--new-connection".into());
                }
                let argv: Vec<&str> = args.iter().map(String::as_str).collect();
                let Timed { result, wall, cpu, busy } =
                    timed(&gws, &argv).with_context(|| format!("latency run {name} {variant}"))?;
                eprintln!(
                    "  latency round {round} {variant:<14} {name:<18} p50 {:.3} p90 {:.3} p99 {:.3} p99.9 {:.3} ms  {} req {} err  gw cpu {:?}  busy {:.0}%",
                    result.p50_ms,
                    result.p90_ms,
                    result.p99_ms,
                    result.p999_ms,
                    result.requests,
                    result.errors,
                    cpu.iter().map(|c| (c * 100.0).round() / 100.0).collect::<Vec<_>>(),
                    busy * 100.0
                );
                runs.push(LatencyRun {
                    round,
                    path: name.clone(),
                    variant: variant.clone(),
                    result,
                    gateway_cpu_s: cpu,
                    wall_s: wall,
                    machine_busy: busy,
                });
            }
        }
    }
    Ok(runs)
}

/// UDP echo settings.
#[derive(Debug, Clone)]
pub struct UdpSpec {
    /// Rounds.
    pub rounds: u32,
    /// Datagrams per second.
    pub rate: u32,
    /// Bytes per datagram.
    pub size: usize,
    /// Measured seconds per run.
    pub seconds: f64,
    /// Warm-up seconds per run.
    pub warmup: f64,
    /// Paths (each must have the UDP echo server behind it: `agent`, `boringtun`).
    pub paths: Vec<String>,
}

/// The variant name of UDP echo runs among the latency runs.
pub const UDP_ECHO: &str = "udp_echo";

/// Runs the UDP echo rounds (`keyway-bench udp-ping`): for each round, each path; the runs are
/// latency runs of variant [`UDP_ECHO`] (`errors`: datagrams with no echo).
pub fn udp_latency(bed: &Bed, spec: &UdpSpec) -> anyhow::Result<Vec<LatencyRun>> {
    let mut runs = Vec::new();
    let gws: Vec<u32> = ["gw-1", "gw-2"].iter().filter_map(|g| bed.pid(g)).collect();
    for round in 1..=spec.rounds {
        for name in &spec.paths {
            if name == "boringtun" && bed.tools.boringtun.is_none() {
                continue;
            }
            let path = bed.path(name)?;
            let me = bed.tools.me.display().to_string();
            let target = path.udp_echo()?.to_string();
            let (rate, size, seconds, warmup) =
                (spec.rate.to_string(), spec.size.to_string(), spec.seconds.to_string(), spec.warmup.to_string());
            let Timed { result, wall, cpu, busy } = timed(
                &gws,
                &[
                    "ip",
                    "netns",
                    "exec",
                    &path.client_ns,
                    &me,
                    "udp-ping",
                    "--target",
                    &target,
                    "--rate",
                    &rate,
                    "--size",
                    &size,
                    "--seconds",
                    &seconds,
                    "--warmup",
                    &warmup,
                ],
            )
            .with_context(|| format!("udp echo over {name}"))?;
            eprintln!(
                "  udp echo round {round} {name:<18} p50 {:.3} p90 {:.3} p99 {:.3} p99.9 {:.3} ms  {} echoes {} lost  busy {:.0}%",
                result.p50_ms,
                result.p90_ms,
                result.p99_ms,
                result.p999_ms,
                result.requests,
                result.errors,
                busy * 100.0
            );
            runs.push(LatencyRun {
                round,
                path: name.clone(),
                variant: UDP_ECHO.into(),
                result,
                gateway_cpu_s: cpu,
                wall_s: wall,
                machine_busy: busy,
            });
        }
    }
    Ok(runs)
}

/// One throughput run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ThroughputRun {
    /// Round.
    pub round: u32,
    /// Path.
    pub path: String,
    /// Parallel flows.
    pub flows: u32,
    /// Received bits per second.
    pub gbps: f64,
    /// Bytes received.
    pub bytes: f64,
    /// CPU seconds of every process of the path (iperf3 both ends, sidecars, gateways, boringtun).
    pub cpu_s: f64,
    /// CPU seconds per GB received.
    pub cpu_s_per_gb: f64,
    /// Machine busy fraction during the run.
    pub machine_busy: f64,
}

/// The roles whose CPU counts for each path (besides iperf3 at both ends).
pub fn path_roles(path: &str) -> &'static [&'static str] {
    match path {
        "envoy_baseline" => &["envoy-cbase", "envoy-sbase"],
        "envoy_hbone" => &["envoy-chbone", "envoy-shbone"],
        "keyway_same_zone" => &["envoy-ckw", "envoy-skwa", "gw-1"],
        "keyway_cross_zone" => &["envoy-ckw", "envoy-skwb", "gw-1", "gw-2"],
        "boringtun" => &["boringtun-cwg", "boringtun-swg"],
        "agent" => &["agent-cwg", "agent-swg", "gw-1", "gw-2"],
        _ => &[],
    }
}

/// Runs the throughput rounds.
pub fn throughput(
    bed: &Bed,
    rounds: u32,
    seconds: u32,
    flows: &[u32],
    paths: &[String],
) -> anyhow::Result<Vec<ThroughputRun>> {
    let mut runs = Vec::new();
    for round in 1..=rounds {
        for &n in flows {
            for name in paths {
                let Ok(path) = bed.path(name) else { continue };
                if name == "boringtun" && bed.tools.boringtun.is_none() {
                    continue;
                }
                let pids: Vec<u32> = path_roles(name).iter().filter_map(|r| bed.pid(r)).collect();
                let cpu0: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum();
                let m0 = machine_jiffies();
                let out = sh(&[
                    "ip",
                    "netns",
                    "exec",
                    &path.client_ns,
                    bed.tools.iperf3.to_str().unwrap_or_default(),
                    "-c",
                    &path.server_ip,
                    "-p",
                    &IPERF_PORT.to_string(),
                    "-t",
                    &seconds.to_string(),
                    "-P",
                    &n.to_string(),
                    "-J",
                ])
                .with_context(|| format!("iperf3 over {name}"))?;
                let m1 = machine_jiffies();
                let cpu_path: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>() - cpu0;
                let v: serde_json::Value = serde_json::from_str(&out).context("iperf3 output")?;
                if let Some(e) = v["error"].as_str() {
                    anyhow::bail!("iperf3 over {name}: {e}");
                }
                let end = &v["end"];
                let bps = end["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0);
                let bytes = end["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
                let dur = end["sum_received"]["seconds"].as_f64().unwrap_or(f64::from(seconds));
                let host = end["cpu_utilization_percent"]["host_total"].as_f64().unwrap_or(0.0);
                let remote = end["cpu_utilization_percent"]["remote_total"].as_f64().unwrap_or(0.0);
                let cpu = cpu_path + (host + remote) / 100.0 * dur;
                let gb = bytes / 1e9;
                let busy = (m1.0 - m0.0) as f64 / (m1.1 - m0.1).max(1) as f64;
                eprintln!(
                    "  throughput round {round} {n} flow(s) {name:<18} {:.2} Gbit/s  {:.2} CPU s/GB  busy {:.0}%",
                    bps / 1e9,
                    cpu / gb.max(1e-9),
                    busy * 100.0
                );
                runs.push(ThroughputRun {
                    round,
                    path: name.clone(),
                    flows: n,
                    gbps: bps / 1e9,
                    bytes,
                    cpu_s: cpu,
                    cpu_s_per_gb: cpu / gb.max(1e-9),
                    machine_busy: busy,
                });
            }
        }
    }
    Ok(runs)
}

/// Gateway memory: idle, and with `flows` flows held open across zones.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GatewayMemory {
    /// RSS of each gateway before any load, MiB.
    pub rss_idle_mib: Vec<f64>,
    /// RSS of each gateway just before the flows were opened, MiB.
    pub rss_before_mib: Vec<f64>,
    /// RSS of each gateway with the flows open, MiB.
    pub rss_held_mib: Vec<f64>,
    /// Flows held.
    pub flows: u32,
}

/// RSS of the gateways now.
pub fn gateway_rss(bed: &Bed) -> Vec<f64> {
    ["gw-1", "gw-2"].iter().filter_map(|g| bed.pid(g)).map(rss_mib).collect()
}

/// Opens `flows` keep-alive flows across zones, measures the gateways' RSS, closes them.
pub fn hold_flows(bed: &Bed, flows: u32, idle: Vec<f64>) -> anyhow::Result<GatewayMemory> {
    let path = bed.path("keyway_cross_zone")?;
    let before = gateway_rss(bed);
    let mut child = Command::new("ip")
        .args(["netns", "exec", &path.client_ns])
        .arg(&bed.tools.me)
        .args(["hold", "--target", &path.http()?.to_string(), "--connections", &flows.to_string(), "--seconds", "120"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdout = child.stdout.take().context("hold stdout")?;
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    let held = if line.starts_with("held") {
        std::thread::sleep(Duration::from_secs(1));
        gateway_rss(bed)
    } else {
        let _ = child.kill();
        let _ = child.wait();
        anyhow::bail!("holding {flows} flows failed: {line:?}");
    };
    let _ = child.kill();
    let _ = child.wait();
    Ok(GatewayMemory { rss_idle_mib: idle, rss_before_mib: before, rss_held_mib: held, flows })
}

/// One measured run: the load tool's result, the wall time, the CPU seconds of each gateway
/// process meanwhile, and how busy the machine was (its share of non-idle time).
struct Timed {
    result: LoadResult,
    wall: f64,
    cpu: Vec<f64>,
    busy: f64,
}

/// Runs `argv` (a load tool printing a [`LoadResult`]), accounting the gateways' CPU (`gws`) and
/// the machine's.
fn timed(gws: &[u32], argv: &[&str]) -> anyhow::Result<Timed> {
    let cpu0: Vec<f64> = gws.iter().map(|p| cpu_seconds(*p)).collect();
    let m0 = machine_jiffies();
    let t0 = Instant::now();
    let out = sh(argv)?;
    let wall = t0.elapsed().as_secs_f64();
    let m1 = machine_jiffies();
    let cpu: Vec<f64> = gws.iter().zip(&cpu0).map(|(p, c)| cpu_seconds(*p) - c).collect();
    let result: LoadResult = serde_json::from_str(out.trim()).context("load output")?;
    let busy = (m1.0 - m0.0) as f64 / (m1.1 - m0.1).max(1) as f64;
    Ok(Timed { result, wall, cpu, busy })
}
