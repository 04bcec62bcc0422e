//! `keyway-bench`: keyway's data path side by side with what a user would run instead.
//!
//! `keyway-bench run` (root) builds the bed (see `bed.rs`), runs the latency rounds (open-loop
//! fixed-rate load from `keyway-bench load`), the throughput rounds (iperf3), the gateway cost
//! measurements, reads the policy-engine and filter bench results, and writes
//! `bench/results/latest.json`, a dated copy, `latest.md` and the SVG plots.

use keyway_bench::{bed, carriage, load, measure, plot, report, udp};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use keyway_e2e::topology::sh;

/// keyway's side-by-side data-path benchmarks.
#[derive(Debug, Parser)]
#[command(name = "keyway-bench", version)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run every measurement and write the results (root: network namespaces).
    Run(RunArgs),
    /// Rewrite latest.md and the plots from a results JSON.
    Report {
        /// The results directory.
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
    },
    /// The HTTP server: 1 KiB answers.
    Serve {
        /// Port.
        #[arg(long, default_value_t = 8080)]
        port: u16,
    },
    /// Open-loop fixed-rate HTTP/1.1 load; prints one JSON object.
    Load {
        /// `ip:port`.
        #[arg(long)]
        target: SocketAddr,
        /// Requests per second.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// Connections.
        #[arg(long, default_value_t = 16)]
        connections: usize,
        /// Measured seconds.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Warm-up seconds (not recorded).
        #[arg(long, default_value_t = 2.0)]
        warmup: f64,
        /// A new connection for every request.
        #[arg(long)]
        new_connection: bool,
    },
    /// The UDP echo server.
    UdpServe {
        /// Port.
        #[arg(long, default_value_t = bed::UDP_ECHO_PORT)]
        port: u16,
    },
    /// Open-loop fixed-rate UDP echo round trips; prints one JSON object (`errors`: datagrams
    /// with no echo).
    UdpPing {
        /// `ip:port`.
        #[arg(long)]
        target: SocketAddr,
        /// Datagrams per second.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// Bytes per datagram.
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Measured seconds.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Warm-up seconds (not recorded).
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
    },
    /// UDP carried over QUIC between two quinn endpoints on loopback, one QUIC datagram per
    /// packet against one stream per flow (length-prefixed), with and without loss (root: a
    /// network namespace with netem on its loopback); prints and writes JSON.
    UdpCarriage(carriage::Args),
    /// Hold keep-alive connections open (gateway memory per flow).
    Hold {
        /// `ip:port`.
        #[arg(long)]
        target: SocketAddr,
        /// Connections.
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// How long to hold them.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Results directory.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Rounds of every comparison (medians are reported).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Measured seconds of each latency run.
    #[arg(long, default_value_t = 8.0)]
    latency_seconds: f64,
    /// Warm-up seconds of each latency run.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Requests per second.
    #[arg(long, default_value_t = 1000)]
    rate: u32,
    /// Connections.
    #[arg(long, default_value_t = 16)]
    connections: u32,
    /// Seconds of each throughput run.
    #[arg(long, default_value_t = 5)]
    throughput_seconds: u32,
    /// Flows held open for the gateway's memory per flow.
    #[arg(long, default_value_t = 1000)]
    hold_flows: u32,
    /// Skip the latency rounds.
    #[arg(long)]
    no_latency: bool,
    /// UDP echo datagrams per second (the `agent` and `boringtun` paths).
    #[arg(long, default_value_t = 1000)]
    udp_rate: u32,
    /// Skip the throughput rounds.
    #[arg(long)]
    no_throughput: bool,
    /// Skip holding flows open (the gateway's memory per flow).
    #[arg(long)]
    no_memory: bool,
    /// Only these paths (comma-separated, e.g. `envoy_hbone,keyway_cross_zone`), for profiling
    /// one change; the published run measures every path.
    #[arg(long, value_delimiter = ',')]
    paths: Vec<String>,
    /// The MTU of every link of the bed (9000: jumbo frames, as on most clouds' VPCs).
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u16).range(1280..))]
    mtu: u16,
    /// Keep the bed up after the measurements until Enter is pressed (for profiling).
    #[arg(long)]
    keep: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Run(args) => run(&args),
        Cmd::Report { out } => rewrite(&out),
        Cmd::Serve { port } => rt(1).and_then(|rt| rt.block_on(load::serve(port))),
        Cmd::Load { target, rate, connections, seconds, warmup, new_connection } => rt(1).and_then(|rt| {
            let spec = load::LoadSpec {
                target,
                rate,
                connections,
                duration: Duration::from_secs_f64(seconds),
                warmup: Duration::from_secs_f64(warmup),
                new_connection,
            };
            let r = rt.block_on(load::run(spec))?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }),
        Cmd::UdpServe { port } => rt(1).and_then(|rt| rt.block_on(udp::serve(port))),
        Cmd::UdpPing { target, rate, size, seconds, warmup } => rt(1).and_then(|rt| {
            let spec = udp::PingSpec {
                target,
                rate,
                size,
                duration: Duration::from_secs_f64(seconds),
                warmup: Duration::from_secs_f64(warmup),
            };
            let r = rt.block_on(udp::ping(spec))?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(())
        }),
        Cmd::UdpCarriage(args) => carriage::main(&args),
        Cmd::Hold { target, connections, seconds } => {
            rt(1).and_then(|rt| rt.block_on(load::hold(target, connections, Duration::from_secs(seconds))))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keyway-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn rt(_threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

fn repo() -> anyhow::Result<PathBuf> {
    Ok(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize()?)
}

fn which(name: &str) -> Option<PathBuf> {
    sh(&["sh", "-c", &format!("command -v {name}")]).ok().map(|s| PathBuf::from(s.trim())).filter(|p| p.exists())
}

fn tools() -> anyhow::Result<bed::Tools> {
    let repo = repo()?;
    let me = std::env::current_exe()?;
    let bindir = me.parent().map(Path::to_path_buf).unwrap_or_default();
    let need = |p: PathBuf, hint: &str| -> anyhow::Result<PathBuf> {
        anyhow::ensure!(p.exists(), "{} not found: {hint}", p.display());
        Ok(p)
    };
    let envoy = match std::env::var_os("KEYWAY_ENVOY") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(sh(&[repo.join("scripts/install-envoy.sh").to_str().unwrap_or_default()])?.trim()),
    };
    let boringtun = std::env::var_os("KEYWAY_BORINGTUN")
        .map(PathBuf::from)
        .or_else(|| which("boringtun-cli"))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo/bin/boringtun-cli")))
        .filter(|p| p.exists());
    Ok(bed::Tools {
        keyway: need(bindir.join("keyway"), "cargo build --release -p keyway-gateway")?,
        e2e: need(bindir.join("keyway-e2e"), "cargo build --release -p keyway-e2e")?,
        envoy: need(envoy, "scripts/install-envoy.sh")?,
        wasm: need(
            std::env::var_os("KEYWAY_WASM")
                .map(PathBuf::from)
                .unwrap_or_else(|| repo.join("target/wasm32-wasip1/wasm-release/keyway_filter.wasm")),
            "make wasm",
        )?,
        iperf3: which("iperf3").context("iperf3 not found: apt-get install iperf3")?,
        boringtun,
        me,
    })
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let n = sh(&["nproc"]).map(|s| s.trim().to_owned()).unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<f64>().ok()))
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let kernel = sh(&["uname", "-r"]).map(|s| s.trim().to_owned()).unwrap_or_default();
    format!("{n} vCPU ({cpu}), {mem:.0} GiB, Linux {kernel}, shared with other builds")
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn run(a: &RunArgs) -> anyhow::Result<()> {
    // The paths `--paths` selects (all when it is not given).
    let selected = |all: &[&str]| -> Vec<String> {
        all.iter().filter(|p| a.paths.is_empty() || a.paths.iter().any(|q| q == *p)).map(|p| (*p).to_owned()).collect()
    };
    let t_start = std::time::Instant::now();
    let tools = tools()?;
    let out = if a.out.is_absolute() { a.out.clone() } else { repo()?.join(&a.out) };
    std::fs::create_dir_all(&out)?;
    // Many flows need many descriptors in every process of the bed.
    let _ = sh(&["prlimit", "--pid", &std::process::id().to_string(), "--nofile=65536:65536"]);
    // Background load before anything of ours runs.
    let la_before = loadavg();
    let m0 = measure::machine_jiffies();
    std::thread::sleep(Duration::from_secs(2));
    let m1 = measure::machine_jiffies();
    let idle_busy = (m1.0 - m0.0) as f64 / (m1.1 - m0.1).max(1) as f64;
    eprintln!("== machine: {}; load average {la_before}; busy before start {:.0}%", machine(), idle_busy * 100.0);
    if tools.boringtun.is_none() {
        eprintln!("   boringtun-cli not found (cargo install boringtun-cli --locked): its throughput is skipped");
    }

    eprintln!("== starting the bed");
    let bed = bed::Bed::start_all(tools, "kwbench", a.mtu)?;
    eprintln!("   up in {:.1} s (run directory {})", t_start.elapsed().as_secs_f64(), bed.dir.display());
    let rss_idle = measure::gateway_rss(&bed);

    let lat_spec = measure::LatencySpec {
        rounds: a.rounds,
        rate: a.rate,
        connections: a.connections,
        seconds: a.latency_seconds,
        warmup: a.warmup,
        paths: selected(&[
            "direct",
            "envoy_baseline",
            "envoy_hbone",
            "keyway_same_zone",
            "keyway_cross_zone",
            "boringtun",
            "agent",
        ]),
        variants: vec!["keepalive".into(), "new_connection".into()],
    };
    let udp_spec = measure::UdpSpec {
        rounds: a.rounds,
        rate: a.udp_rate,
        size: 64,
        seconds: a.latency_seconds,
        warmup: a.warmup,
        paths: selected(&["boringtun", "agent"]),
    };
    let mut lat = if a.no_latency {
        Vec::new()
    } else {
        eprintln!("== latency: {} req/s, {} connections, rounds of every path", a.rate, a.connections);
        measure::latency(&bed, &lat_spec)?
    };
    if !a.no_latency && !udp_spec.paths.is_empty() {
        eprintln!(
            "== UDP echo: {} datagrams/s of {} bytes, rounds of the agent and boringtun",
            a.udp_rate, udp_spec.size
        );
        lat.extend(measure::udp_latency(&bed, &udp_spec)?);
    }
    let mem = if a.no_memory {
        None
    } else {
        eprintln!("== gateway memory: {} flows held across zones", a.hold_flows);
        match measure::hold_flows(&bed, a.hold_flows, rss_idle.clone()) {
            Ok(m) => Some(m),
            Err(e) => {
                eprintln!("   failed: {e:#}");
                None
            }
        }
    };
    let tput = if a.no_throughput {
        Vec::new()
    } else {
        eprintln!("== throughput: iperf3, 1 and 8 flows, rounds of every path");
        let paths = selected(&["direct", "envoy_hbone", "keyway_cross_zone", "boringtun", "agent"]);
        measure::throughput(&bed, a.rounds, a.throughput_seconds, &[1, 8], &paths)?
    };
    let la_after = loadavg();
    let busy_runs: Vec<f64> = lat.iter().map(|r| r.machine_busy).chain(tput.iter().map(|r| r.machine_busy)).collect();
    if a.keep {
        eprintln!(
            "== bed kept up (gateways: pids {:?} {:?}); press Enter to tear down",
            bed.pid("gw-1"),
            bed.pid("gw-2")
        );
        let mut s = String::new();
        let _ = std::io::stdin().read_line(&mut s);
    }
    drop(bed);

    let repo = repo()?;
    let read = |p: &str| std::fs::read_to_string(repo.join(p)).ok().and_then(|s| serde_json::from_str(&s).ok());
    let date = sh(&["date", "-u", "+%Y-%m-%dT%H:%M:%SZ"])?.trim().to_owned();
    let load = serde_json::json!({
        "loadavg_before": la_before,
        "loadavg_after": la_after,
        "busy_before_start": (idle_busy * 1000.0).round() / 1000.0,
        "busy_during_runs_median": (measure::median(&busy_runs) * 1000.0).round() / 1000.0,
        "summary": format!(
            "load average {la_before} before, {la_after} after; {:.0}% of both cores busy before the bed started (other work), {:.0}% median during the runs (ours included)",
            idle_busy * 100.0,
            measure::median(&busy_runs) * 100.0
        ),
        "wall_seconds": t_start.elapsed().as_secs_f64().round(),
    });
    let v = report::build(&report::Inputs {
        date: date.clone(),
        machine: format!("{}; links of MTU {}", machine(), a.mtu),
        load,
        lat_spec: &lat_spec,
        udp_spec: &udp_spec,
        lat: &lat,
        tput: &tput,
        tput_seconds: a.throughput_seconds,
        mem: mem.as_ref(),
        policy: read("target/bench-policy.json"),
        filter: read("target/bench-filter.json"),
        failover: read("target/bench-failover.json"),
    });
    let text = serde_json::to_string_pretty(&v)?;
    std::fs::write(out.join("latest.json"), &text)?;
    std::fs::write(out.join(format!("{}.json", date.get(..10).unwrap_or("undated"))), &text)?;
    write_outputs(&v, &out)?;
    eprintln!("== done in {:.0} s: {}", t_start.elapsed().as_secs_f64(), out.join("latest.json").display());
    print!("{}", report::markdown(&v));
    Ok(())
}

fn write_outputs(v: &serde_json::Value, out: &Path) -> anyhow::Result<()> {
    std::fs::write(out.join("latest.md"), report::markdown(v))?;
    plot::latency(v, "paths", "Latency at 1000 req/s, HTTP/1.1 keep-alive (ms)", &out.join("latency-keepalive.svg"))?;
    plot::latency(
        v,
        "new_connection",
        "Latency at 1000 req/s, new connection per request (ms)",
        &out.join("latency-new-connection.svg"),
    )?;
    plot::throughput(v, &out.join("throughput.svg"))?;
    plot::policy(v, &out.join("policy.svg"))?;
    Ok(())
}

fn rewrite(out: &Path) -> anyhow::Result<()> {
    let out = if out.is_absolute() { out.to_path_buf() } else { repo()?.join(out) };
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("latest.json"))?)?;
    write_outputs(&v, &out)?;
    print!("{}", report::markdown(&v));
    Ok(())
}
