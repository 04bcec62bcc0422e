//! Scale benchmark of the policy engine: for every combination of 10, 1 000 and 10 000
//! NetworkPolicies over 1 000, 10 000 and 50 000 generated workloads, the compile time and the
//! latency of single decisions (p50, p99, p99.9, each call timed on its own), and the resident
//! memory that compiling the largest case adds. Prints a table and writes JSON to
//! `target/bench-policy.json` (or `$KEYWAY_BENCH_OUT`).
//!
//! The cluster generator is the criterion benchmark's (`decide.rs`), included as a module.
//!
//! Run with `cargo bench -p keyway-policy --bench scale`. Without `--bench` (as `cargo test
//! --benches` runs it) only the smallest combination runs, briefly, as a smoke test.

// Benchmark harness: a failure to generate or compile the synthetic cluster is a bug to stop on.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use keyway_policy::policy::NetworkPolicy;
use keyway_policy::{Engine, Verdict};

// Only the generator of `decide.rs` is used here, not its criterion entry points.
#[allow(dead_code)]
#[path = "decide.rs"]
mod decide;

use decide::cluster::{self, Spec};

/// Timed decisions per combination.
const DECISIONS: usize = 200_000;
/// Distinct flows, cycled through.
const FLOWS: usize = 1 << 16;
/// The goals of the issue.
const GOAL_P99_NS: f64 = 1_000.0;
const GOAL_COMPILE_MS: f64 = 5_000.0;

/// Percentiles of one run, in nanoseconds.
#[derive(Clone, Copy, Debug)]
struct Percentiles {
    p50: u64,
    p99: u64,
    p999: u64,
}

fn percentiles(mut ns: Vec<u64>) -> Percentiles {
    ns.sort_unstable();
    let at = |q: f64| {
        let rank = ((q * ns.len() as f64).ceil() as usize).clamp(1, ns.len().max(1));
        ns.get(rank - 1).copied().unwrap_or(0)
    };
    Percentiles { p50: at(0.50), p99: at(0.99), p999: at(0.999) }
}

/// `VmRSS`, `VmHWM` and the like from `/proc/self/status`, in bytes.
fn proc_status(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| {
        let kib = l.strip_prefix(field)?.strip_prefix(':')?.trim().strip_suffix("kB")?.trim();
        kib.parse::<u64>().ok().map(|k| k * 1024)
    })
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Resident memory at the three points of the largest case.
#[derive(Clone, Copy, Debug)]
struct Memory {
    before: u64,
    generated: u64,
    compiled: u64,
    peak: u64,
}

/// How many NetworkPolicy rules apply to a workload, per direction (`[ingress, egress]`): the list
/// a decision walks before it denies. Computed from the public inventory and policies.
#[derive(Clone, Copy, Debug, Default)]
struct Selection {
    mean: [f64; 2],
    max: [usize; 2],
}

fn selection(engine: &Engine) -> Selection {
    let mut by_ns: BTreeMap<&str, Vec<&NetworkPolicy>> = BTreeMap::new();
    for np in &engine.policies().network {
        by_ns.entry(np.namespace.as_str()).or_default().push(np);
    }
    let mut out = Selection::default();
    let mut sum = [0usize; 2];
    for w in &engine.inventory().workloads {
        let mut n = [0usize; 2];
        for np in by_ns.get(w.namespace.as_str()).into_iter().flatten() {
            if np.pod_selector.matches(&w.labels) {
                n[0] += if np.ingress_in_effect { np.ingress_rules.len() } else { 0 };
                n[1] += if np.egress_in_effect { np.egress_rules.len() } else { 0 };
            }
        }
        for d in 0..2 {
            sum[d] += n[d];
            out.max[d] = out.max[d].max(n[d]);
        }
    }
    let count = engine.inventory().workloads.len().max(1) as f64;
    out.mean = sum.map(|s| s as f64 / count);
    out
}

#[derive(Debug)]
struct Row {
    spec: Spec,
    selection: Selection,
    namespaces: usize,
    generate_ms: f64,
    compile_ms: f64,
    warnings: usize,
    allowed: usize,
    denied: usize,
    timer: Percentiles,
    raw: Percentiles,
    mean_ns: f64,
    memory: Option<Memory>,
}

impl Row {
    /// A raw percentile minus the median timer overhead.
    fn net(&self, raw: u64) -> u64 {
        raw.saturating_sub(self.timer.p50)
    }
}

fn run(spec: Spec, decisions: usize, measure_memory: bool) -> Row {
    let before = proc_status("VmRSS").unwrap_or(0);
    let t = Instant::now();
    let generated = cluster::generate(spec);
    let generate_ms = ms(t.elapsed());
    let namespaces = generated.inventory.namespaces.len();
    let after_generation = proc_status("VmRSS").unwrap_or(0);

    let t = Instant::now();
    let engine = Engine::compile(generated.inventory, generated.policies).expect("the generated cluster compiles");
    let compile_ms = ms(t.elapsed());
    let memory = measure_memory.then(|| Memory {
        before,
        generated: after_generation,
        compiled: proc_status("VmRSS").unwrap_or(0),
        peak: proc_status("VmHWM").unwrap_or(0),
    });

    let flows = cluster::flows(&engine, FLOWS, cluster::SEED);
    let mask = flows.len() - 1;
    // Warm up (caches, branch predictors) and count the verdicts over every flow.
    let (mut allowed, mut denied) = (0, 0);
    for f in &flows {
        match engine.decide(f.src, f.dst, f.protocol, f.port).verdict {
            Verdict::Allow => allowed += 1,
            Verdict::Deny => denied += 1,
        }
    }

    // The cost of the timer itself: an empty timed section, measured the same way.
    let mut timer = Vec::with_capacity(decisions);
    for _ in 0..decisions {
        let t = Instant::now();
        black_box(());
        timer.push(t.elapsed().as_nanos() as u64);
    }
    let mut raw = Vec::with_capacity(decisions);
    for i in 0..decisions {
        let f = flows[i & mask];
        let t = Instant::now();
        black_box(engine.decide(black_box(f.src), black_box(f.dst), black_box(f.protocol), black_box(f.port)));
        raw.push(t.elapsed().as_nanos() as u64);
    }
    // The mean without a timer around each call, as a cross-check.
    let t = Instant::now();
    for i in 0..decisions {
        let f = flows[i & mask];
        black_box(engine.decide(black_box(f.src), black_box(f.dst), black_box(f.protocol), black_box(f.port)));
    }
    let mean_ns = t.elapsed().as_nanos() as f64 / decisions as f64;

    let warnings = engine.warnings().len();
    Row {
        spec,
        selection: selection(&engine),
        namespaces,
        generate_ms,
        compile_ms,
        warnings,
        allowed,
        denied,
        timer: percentiles(timer),
        raw: percentiles(raw),
        mean_ns,
        memory,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `$KEYWAY_BENCH_OUT`, or `bench-policy.json` in the target directory this binary was built in
/// (`<target>/<profile>/deps/scale-<hash>`).
fn out_path() -> PathBuf {
    if let Some(p) = std::env::var_os("KEYWAY_BENCH_OUT") {
        return PathBuf::from(p);
    }
    let target = std::env::current_exe().ok().and_then(|exe| exe.ancestors().nth(3).map(PathBuf::from));
    target.unwrap_or_else(|| PathBuf::from("target")).join("bench-policy.json")
}

fn main() {
    let full = cluster::under_cargo_bench();
    let started = Instant::now();
    // Arguments like `10000x1000` select combinations (`cargo bench --bench scale -- 10000x1000`).
    let only: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let mut specs = if full { cluster::matrix() } else { vec![Spec::new(10, 1_000)] };
    specs.retain(|s| only.is_empty() || only.contains(&format!("{}x{}", s.policies, s.workloads)));
    // The largest case first, in a fresh process, so that its memory figures are not blurred by
    // the heap the earlier cases leave behind.
    specs.sort_by_key(|s| std::cmp::Reverse((s.policies, s.workloads)));
    let decisions = if full { DECISIONS } else { 2_000 };
    let mut rows: Vec<Row> = Vec::new();
    for (i, spec) in specs.into_iter().enumerate() {
        eprintln!("scale: {} policies x {} workloads ...", spec.policies, spec.workloads);
        rows.push(run(spec, decisions, i == 0));
    }
    rows.sort_by_key(|r| (r.spec.policies, r.spec.workloads));
    print_table(&rows, decisions);
    let goals = goals(&rows);

    // Only a complete run replaces the report (unless the path is given explicitly).
    let explicit = std::env::var_os("KEYWAY_BENCH_OUT").is_some();
    let complete = full && only.is_empty();
    if complete || explicit {
        let out = out_path();
        let report = report(&rows, decisions, complete, &goals);
        if let Some(dir) = out.parent() {
            std::fs::create_dir_all(dir).expect("create the output directory");
        }
        let text = serde_json::to_string_pretty(&report).expect("serialise the report");
        std::fs::write(&out, text + "\n").expect("write the report");
        println!("wrote {}", out.display());
    }
    println!("done in {:.1} s", started.elapsed().as_secs_f64());
}

fn print_table(rows: &[Row], decisions: usize) {
    println!();
    println!("keyway-policy scale benchmark: {decisions} decisions per row, each timed with std::time::Instant;");
    println!("p50/p99/p99.9 are net of the timer overhead (the median of an empty timed section, column timer_ns,");
    println!("measured in the same run and subtracted); mean_ns is a batch loop without per-call timers.");
    println!("Rows marked * include 3 AdminNetworkPolicies and a BaselineAdminNetworkPolicy. rules_in/rules_out:");
    println!("mean/max NetworkPolicy rules applying to a workload per direction (what a denied flow walks).");
    println!();
    println!(
        " policies workloads   nss generate_ms compile_ms timer_ns   p50_ns   p99_ns  p999_ns  mean_ns  allow%   deny%  \
         rules_in  rules_out"
    );
    for r in rows {
        let total = (r.allowed + r.denied).max(1) as f64;
        let rules = |d: usize| format!("{:.1}/{}", r.selection.mean[d], r.selection.max[d]);
        println!(
            "{:>8}{} {:>9} {:>5} {:>11.1} {:>10.1} {:>8} {:>8} {:>8} {:>8} {:>8.1} {:>7.1} {:>7.1} {:>9} {:>10}",
            r.spec.policies,
            if r.spec.tiers { "*" } else { " " },
            r.spec.workloads,
            r.namespaces,
            r.generate_ms,
            r.compile_ms,
            r.timer.p50,
            r.net(r.raw.p50),
            r.net(r.raw.p99),
            r.net(r.raw.p999),
            r.mean_ns,
            100.0 * r.allowed as f64 / total,
            100.0 * r.denied as f64 / total,
            rules(0),
            rules(1),
        );
    }
    println!();
    for r in rows {
        if r.warnings > 0 {
            println!("note: {} x {}: {} compile warnings", r.spec.policies, r.spec.workloads, r.warnings);
        }
        if let Some(m) = r.memory {
            println!(
                "memory, {} policies x {} workloads: RSS {:.1} MiB before generation, {:.1} MiB generated \
                 (+{:.1}), {:.1} MiB compiled; engine's share (compiled - generated) +{:.1} MiB; peak RSS {:.1} MiB",
                r.spec.policies,
                r.spec.workloads,
                mib(m.before),
                mib(m.generated),
                mib(m.generated.saturating_sub(m.before)),
                mib(m.compiled),
                mib(m.compiled.saturating_sub(m.generated)),
                mib(m.peak),
            );
        }
    }
}

/// The goals, judged on the rows that ran (`None`: the rows it needs did not run).
#[derive(Debug)]
struct Goals {
    p99: Option<bool>,
    compile: Option<bool>,
}

fn goals(rows: &[Row]) -> Goals {
    let at_10k: Vec<&Row> = rows.iter().filter(|r| r.spec.policies == 10_000).collect();
    let worst = at_10k.iter().map(|r| r.net(r.raw.p99)).max();
    let p99 = worst.map(|w| (w as f64) < GOAL_P99_NS);
    if let (Some(w), Some(met)) = (worst, p99) {
        println!("goal p99 < {GOAL_P99_NS} ns at 10 000 policies: {} (worst p99 {w} ns)", verdict(met));
    }
    let largest = rows.iter().find(|r| (r.spec.policies, r.spec.workloads) == (10_000, 50_000));
    let compile = largest.map(|r| r.compile_ms < GOAL_COMPILE_MS);
    if let (Some(r), Some(met)) = (largest, compile) {
        println!("goal compile of 10 000 x 50 000 < {GOAL_COMPILE_MS} ms: {} ({:.0} ms)", verdict(met), r.compile_ms);
    }
    Goals { p99, compile }
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT met" }
}

fn report(rows: &[Row], decisions: usize, complete: bool, goals: &Goals) -> serde_json::Value {
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "policies": r.spec.policies,
                "workloads": r.spec.workloads,
                "namespaces": r.namespaces,
                "admin_tiers": r.spec.tiers,
                "generate_ms": r.generate_ms,
                "compile_ms": r.compile_ms,
                "compile_warnings": r.warnings,
                "flows": FLOWS,
                "decisions": decisions,
                "allowed": r.allowed,
                "denied": r.denied,
                "timer_overhead_ns": { "p50": r.timer.p50, "p99": r.timer.p99, "p999": r.timer.p999 },
                "latency_ns": { "p50": r.net(r.raw.p50), "p99": r.net(r.raw.p99), "p999": r.net(r.raw.p999) },
                "latency_raw_ns": { "p50": r.raw.p50, "p99": r.raw.p99, "p999": r.raw.p999 },
                "mean_ns": r.mean_ns,
                "networkpolicy_rules_per_workload": {
                    "ingress": { "mean": r.selection.mean[0], "max": r.selection.max[0] },
                    "egress": { "mean": r.selection.mean[1], "max": r.selection.max[1] },
                },
                "memory_mib": r.memory.map(|m| serde_json::json!({
                    "rss_before_generation": mib(m.before),
                    "rss_after_generation": mib(m.generated),
                    "rss_after_compile": mib(m.compiled),
                    "engine": mib(m.compiled.saturating_sub(m.generated)),
                    "peak_rss": mib(m.peak),
                })),
            })
        })
        .collect();
    serde_json::json!({
        "benchmark": "keyway-policy scale",
        "complete": complete,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "latency_note": "each call timed with Instant; latency_ns = latency_raw_ns - timer_overhead_ns.p50",
        "goals": {
            "p99_ns_at_10000_policies": { "limit": GOAL_P99_NS, "met": goals.p99 },
            "compile_ms_10000_policies_50000_workloads": { "limit": GOAL_COMPILE_MS, "met": goals.compile },
        },
        "rows": rows,
    })
}
