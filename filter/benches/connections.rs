//! Per-connection cost of the keyway filter inside Envoy, side by side in one run.
//!
//! One Envoy (one worker thread) with five listeners that differ only in their network filters,
//! each in front of `tcp_proxy` to the same local echo server:
//!
//! * `none`: no filter;
//! * `rbac`: Envoy's native RBAC network filter with one allow rule (source 127.0.0.0/8, the
//!   listener's port);
//! * `empty_wasm`: the empty proxy-wasm network filter (`examples/empty_filter.rs`: a stream
//!   context per connection that does nothing), same runtime (V8) and SDK, its own VM: Envoy's
//!   per-connection wasm plumbing and nothing else, the baseline keyway is judged against;
//! * `keyway`: the keyway filter in mode `outbound` (static keys), which seals a token per
//!   connection and stores it as filter state;
//! * `keyway_plain`: the keyway filter in mode `inbound_plain` with every source exempt (reads two
//!   properties, counts, lets the connection through).
//!
//! Clients (this process, `BENCH_CLIENTS` concurrent loops) open a connection, send one byte, wait
//! for the echo and reset the connection; a sample is the time from `connect()` to the echo. That
//! saturates Envoy's worker: the connection rate and Envoy's CPU time per connection
//! (`/proc/<pid>/task/*/schedstat`, every thread) come from it, and its latency is mostly queueing
//! (eight clients wait on one worker, so a lower rate alone raises it). Then one client alone runs
//! the same loop on the same listener for as long: the latency a connection sees when Envoy is not
//! saturated, which the added p99 is judged on. The
//! variants take turns in rounds (each round starts one variant later) so that drift on a shared
//! machine hits them alike. Each figure is the median over rounds of that round's figure; the
//! ratios and differences against `empty_wasm` are medians of the per-round ratios and
//! differences (paired in the same round). Prints a table and writes `target/bench-filter.json`.
//!
//! `cargo bench -p keyway-filter --bench connections` (needs Envoy and `make wasm`, which builds
//! both modules, like the tests). Environment: `BENCH_ROUNDS` (default 6), `BENCH_SECONDS` per
//! round, variant and load (default 2), `BENCH_CLIENTS` (default 8), `BENCH_VARIANTS` (a comma-separated
//! subset, for profiling one variant with `perf record -e cpu-clock -p <the bench's envoy child>`; default all).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/load.rs"]
mod load;

#[path = "../tests/envoy/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use harness::{EchoApp, Envoy, free_port, render, wasm_module};
use keyway_policy::auth::EpochSecret;
use keyway_policy::keyservice::{EpochKey, KeyBundle};
use load::{closed_loop, env_or, percentile};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const VARIANTS: [&str; 5] = ["none", "rbac", "empty_wasm", "keyway", "keyway_plain"];

const CONFIG: &str = r#"
admin:
  address: { socket_address: { address: 127.0.0.1, port_value: ${ADMIN_PORT} } }
static_resources:
  listeners:
  - name: none
    address: { socket_address: { address: 127.0.0.1, port_value: ${NONE_PORT} } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config: &proxy
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: bench
          cluster: echo
  - name: rbac
    address: { socket_address: { address: 127.0.0.1, port_value: ${RBAC_PORT} } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.rbac
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.rbac.v3.RBAC
          stat_prefix: bench_rbac
          rules:
            action: ALLOW
            policies:
              allow-mesh:
                permissions: [ { destination_port: ${RBAC_PORT} } ]
                principals: [ { remote_ip: { address_prefix: 127.0.0.0, prefix_len: 8 } } ]
      - name: envoy.filters.network.tcp_proxy
        typed_config: *proxy
  - name: empty_wasm
    address: { socket_address: { address: 127.0.0.1, port_value: ${EMPTY_WASM_PORT} } }
    filter_chains:
    - filters:
      - name: empty
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm
          config:
            name: empty
            root_id: empty
            vm_config:
              vm_id: empty
              runtime: envoy.wasm.runtime.v8
              code: { local: { filename: "${EMPTY_WASM}" } }
      - name: envoy.filters.network.tcp_proxy
        typed_config: *proxy
  - name: keyway
    address: { socket_address: { address: 127.0.0.1, port_value: ${KEYWAY_PORT} } }
    filter_chains:
    - filters:
      - name: keyway.outbound
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm
          config:
            name: keyway.outbound
            root_id: keyway
            vm_config:
              vm_id: keyway
              runtime: envoy.wasm.runtime.v8
              code: { local: { filename: "${WASM}" } }
            configuration:
              "@type": type.googleapis.com/google.protobuf.StringValue
              value: '${KEYWAY_CONFIG}'
      - name: envoy.filters.network.tcp_proxy
        typed_config: *proxy
  - name: keyway_plain
    address: { socket_address: { address: 127.0.0.1, port_value: ${KEYWAY_PLAIN_PORT} } }
    filter_chains:
    - filters:
      - name: keyway.inbound_plain
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm
          config:
            name: keyway.inbound_plain
            root_id: keyway
            vm_config:
              vm_id: keyway
              runtime: envoy.wasm.runtime.v8
              code: { local: { filename: "${WASM}" } }
            configuration:
              "@type": type.googleapis.com/google.protobuf.StringValue
              value: '{"mode":"inbound_plain","exempt_cidrs":["127.0.0.0/8"]}'
      - name: envoy.filters.network.tcp_proxy
        typed_config: *proxy
  clusters:
  - name: echo
    connect_timeout: 1s
    type: STATIC
    load_assignment:
      cluster_name: echo
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: ${ECHO_PORT} } } }
"#;

/// One connection: connect, one byte, its echo, reset. The sample in µs.
async fn one(port: u16) -> Option<u32> {
    let start = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    s.set_nodelay(true).ok()?;
    s.write_all(b"x").await.ok()?;
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await.ok()?.ok()?;
    let elapsed = start.elapsed();
    // Reset instead of FIN: no TIME_WAIT pile-up on the client side.
    #[allow(deprecated)]
    let _ = s.set_linger(Some(Duration::ZERO));
    drop(s);
    (n == 1).then(|| u32::try_from(elapsed.as_micros()).unwrap_or(u32::MAX))
}

/// Runs `clients` loops against `port` for `seconds`: (samples, failures).
async fn round(port: u16, clients: u64, seconds: u64) -> (Vec<u32>, u64) {
    closed_loop(clients, seconds, move || one(port)).await
}

/// The empty module next to the keyway module (`make wasm` builds both).
fn empty_wasm_module(keyway: &Path) -> PathBuf {
    let p = keyway.parent().map(|d| d.join("examples/empty_filter.wasm")).unwrap_or_default();
    assert!(
        p.is_file(),
        "the empty filter module {} is missing: build it with `make wasm` (cargo build -p keyway-filter \
         --target wasm32-wasip1 --profile wasm-release --example empty_filter)",
        p.display()
    );
    p
}

/// One round of one variant.
#[derive(Clone, Copy, Default)]
struct Round {
    rate: f64,
    p50: u32,
    p90: u32,
    p99: u32,
    /// Envoy's CPU time (every thread, user and kernel) per connection, µs.
    cpu_us: f64,
    /// One client alone (Envoy not saturated): the latency a connection sees, µs.
    light_p50: u32,
    light_p99: u32,
}

/// The pid of this process's Envoy child.
fn envoy_pid() -> Option<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
        // `pid (comm) state ppid …`; comm may hold spaces, so split after the last ')'.
        let (head, tail) = stat.rsplit_once(')')?;
        let ppid: u32 = tail.split_whitespace().nth(1)?.parse().ok()?;
        (ppid == me && head.ends_with("(envoy")).then_some(pid)
    })
}

/// The CPU time of every thread of `pid` so far, ns (`/proc/<pid>/task/*/schedstat`).
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return 0 };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// The median of `v` (0 when empty).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken from the command line.
    let rounds = env_or("BENCH_ROUNDS", 6);
    let seconds = env_or("BENCH_SECONDS", 2);
    let clients = env_or("BENCH_CLIENTS", 8);
    let wasm = wasm_module();
    let empty_wasm = empty_wasm_module(&wasm);
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let (module_size, empty_module_size) = (size(&wasm), size(&empty_wasm));
    let echo = EchoApp::start().await.unwrap();

    let secret = EpochSecret::from_bytes([42; 32]);
    let id = "spiffe://cluster.local/ns/shop/sa/cart";
    let ip = "10.128.1.11".parse().unwrap();
    let bundle = KeyBundle {
        identity: id.into(),
        overlay_ip: ip,
        zone: "zone-a".into(),
        workload_keys: vec![EpochKey {
            epoch: 1,
            key: secret.workload_key(id, ip, 1).unwrap().to_base64url(),
            not_after_ms: None,
            not_before_ms: None,
        }],
        ticket_keys: vec![],
        refresh_ms: 10_000,
    };
    let keyway_config = format!(r#"{{"mode":"outbound","keys":{}}}"#, serde_json::to_string(&bundle).unwrap());
    let mut vars = BTreeMap::new();
    let admin = free_port();
    vars.insert("ADMIN_PORT", admin.to_string());
    for v in VARIANTS {
        vars.insert(port_var(v), free_port().to_string());
    }
    vars.insert("ECHO_PORT", echo.port.to_string());
    vars.insert("WASM", wasm.display().to_string());
    vars.insert("EMPTY_WASM", empty_wasm.display().to_string());
    vars.insert("KEYWAY_CONFIG", keyway_config);
    let envoy = Envoy::start(&render(CONFIG, &vars), admin, "bench").unwrap();
    let port_of = |v: &str| -> u16 { vars[port_var(v)].parse().unwrap() };
    let pid = envoy_pid().expect("the bench's Envoy process");

    let only = std::env::var("BENCH_VARIANTS").unwrap_or_default();
    let chosen: Vec<&str> =
        VARIANTS.into_iter().filter(|v| only.is_empty() || only.split(',').any(|o| o == *v)).collect();
    // Warm up every listener (V8 compiles lazily, pools fill).
    for v in chosen.iter().copied() {
        let _ = round(port_of(v), clients, 1).await;
    }
    let mut per_round: BTreeMap<&str, Vec<Round>> = BTreeMap::new();
    let mut totals: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    for r in 0..rounds {
        // Each round starts one variant later, so no variant always follows the same one.
        let shift = usize::try_from(r).unwrap_or(0) % chosen.len();
        for v in chosen.iter().copied().cycle().skip(shift).take(chosen.len()) {
            let (started, cpu_before) = (Instant::now(), cpu_ns(pid));
            let (mut s, f) = round(port_of(v), clients, seconds).await;
            let secs = started.elapsed().as_secs_f64();
            let cpu = cpu_ns(pid).saturating_sub(cpu_before);
            s.sort_unstable();
            let t = totals.entry(v).or_default();
            t.0 += s.len();
            t.1 += f;
            let p = |q| percentile(&s, q);
            let cpu_us = cpu as f64 / 1000.0 / (s.len().max(1) as f64);
            let (mut light, light_failures) = round(port_of(v), 1, seconds).await;
            light.sort_unstable();
            t.1 += light_failures;
            let one = Round {
                rate: s.len() as f64 / secs.max(1e-9),
                p50: p(0.5),
                p90: p(0.9),
                p99: p(0.99),
                cpu_us,
                light_p50: percentile(&light, 0.5),
                light_p99: percentile(&light, 0.99),
            };
            per_round.entry(v).or_default().push(one);
            eprintln!(
                "round {}/{rounds} {v}: {:.0} conn/s, p50 {} µs, p99 {} µs, envoy cpu {:.1} µs/conn; one client: p50 {} µs, \
                 p99 {} µs",
                r + 1,
                one.rate,
                one.p50,
                one.p99,
                one.cpu_us,
                one.light_p50,
                one.light_p99
            );
        }
    }
    let keyway_allowed = envoy
        .stats()
        .iter()
        .filter(|(k, _)| k.contains("keyway_filter_connections_total") && k.contains("verdict=.=allow"))
        .map(|(_, v)| *v)
        .sum::<u64>();
    drop(envoy);

    let rounds_of = |v: &str| per_round.get(v).cloned().unwrap_or_default();
    let med = |v: &str, f: fn(&Round) -> f64| median(rounds_of(v).iter().map(f).collect());
    // Paired in the same round: `f(a's round, b's round)`, median over rounds.
    let paired = |a: &str, b: &str, f: fn(&Round, &Round) -> f64| {
        median(rounds_of(a).iter().zip(rounds_of(b).iter()).map(|(x, y)| f(x, y)).collect())
    };
    let ratio = |x: &Round, y: &Round| x.rate / y.rate.max(1e-9);
    let added_p99 = |x: &Round, y: &Round| f64::from(x.p99) - f64::from(y.p99);
    let added_p50 = |x: &Round, y: &Round| f64::from(x.p50) - f64::from(y.p50);
    let added_cpu = |x: &Round, y: &Round| x.cpu_us - y.cpu_us;
    let added_light_p99 = |x: &Round, y: &Round| f64::from(x.light_p99) - f64::from(y.light_p99);
    let added_light_p50 = |x: &Round, y: &Round| f64::from(x.light_p50) - f64::from(y.light_p50);
    println!(
        "\nper-connection cost through one Envoy listener ({clients} clients, {rounds} rounds x {seconds} s per \
         variant; medians over rounds, ratios and differences paired per round)"
    );
    println!(
        "| variant | conn/s | vs none | vs empty wasm | p50 µs | p90 µs | p99 µs | added p99 µs vs empty wasm | \
         envoy CPU µs/conn | added CPU µs vs empty wasm | one client p50 / p99 µs | one client added p99 µs vs empty wasm | \
         connections | failures |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut variants = Vec::new();
    for v in chosen.iter().copied() {
        let (n, failures) = totals.get(v).copied().unwrap_or_default();
        let (rate, p50, p90, p99, cpu) = (
            med(v, |r| r.rate),
            med(v, |r| f64::from(r.p50)),
            med(v, |r| f64::from(r.p90)),
            med(v, |r| f64::from(r.p99)),
            med(v, |r| r.cpu_us),
        );
        let (light_p50, light_p99) = (med(v, |r| f64::from(r.light_p50)), med(v, |r| f64::from(r.light_p99)));
        let light_p99_vs_empty = paired(v, "empty_wasm", added_light_p99);
        let (vs_none, vs_empty) = (paired(v, "none", ratio), paired(v, "empty_wasm", ratio));
        let (p99_vs_empty, cpu_vs_empty) = (paired(v, "empty_wasm", added_p99), paired(v, "empty_wasm", added_cpu));
        println!(
            "| {v} | {rate:.0} | {vs_none:.3} | {vs_empty:.3} | {p50:.0} | {p90:.0} | {p99:.0} | {p99_vs_empty:.0} | \
             {cpu:.1} | {cpu_vs_empty:.1} | {light_p50:.0} / {light_p99:.0} | {light_p99_vs_empty:.0} | {n} | {failures} |"
        );
        variants.push(serde_json::json!({
            "variant": v, "connections_per_second": rate, "p50_us": p50, "p90_us": p90, "p99_us": p99,
            "envoy_cpu_us_per_connection": cpu,
            "vs_none": vs_none, "vs_empty_wasm": vs_empty, "added_p99_us_vs_empty_wasm": p99_vs_empty,
            "added_envoy_cpu_us_vs_empty_wasm": cpu_vs_empty,
            "one_client_p50_us": light_p50, "one_client_p99_us": light_p99,
            "one_client_added_p99_us_vs_empty_wasm": light_p99_vs_empty,
            "connections": n, "failures": failures,
            "rounds": rounds_of(v).iter().map(|r| serde_json::json!({
                "connections_per_second": r.rate, "p50_us": r.p50, "p90_us": r.p90, "p99_us": r.p99,
                "envoy_cpu_us_per_connection": r.cpu_us,
                "one_client_p50_us": r.light_p50, "one_client_p99_us": r.light_p99,
            })).collect::<Vec<_>>(),
        }));
    }
    let kw_vs_empty = paired("keyway", "empty_wasm", ratio);
    let kw_p99 = paired("keyway", "empty_wasm", added_light_p99);
    let kw_p50 = paired("keyway", "empty_wasm", added_light_p50);
    let kw_p99_saturated = paired("keyway", "empty_wasm", added_p99);
    let kw_p50_saturated = paired("keyway", "empty_wasm", added_p50);
    let kw_cpu = paired("keyway", "empty_wasm", added_cpu);
    let kw_cpu_ratio = paired("empty_wasm", "keyway", |x, y| x.cpu_us / y.cpu_us.max(1e-9));
    println!(
        "\nkeyway / empty wasm = {kw_vs_empty:.3} (goal >= 0.97), added p99 over empty wasm, one client = {kw_p99:.0} µs \
         (goal <= 50), added p50 = {kw_p50:.0} µs; saturated ({clients} clients): added p50 {kw_p50_saturated:.0} µs, \
         p99 {kw_p99_saturated:.0} µs; Envoy CPU per connection: keyway + {kw_cpu:.1} µs over empty wasm \
         (empty ÷ keyway {kw_cpu_ratio:.3}); keyway / none = {:.3}, keyway / rbac = {:.3}, empty wasm / none = {:.3}; \
         module size {module_size} bytes (empty {empty_module_size}); keyway counted {keyway_allowed} allowed connections",
        paired("keyway", "none", ratio),
        paired("keyway", "rbac", ratio),
        paired("empty_wasm", "none", ratio),
    );
    if chosen.len() != VARIANTS.len() {
        eprintln!("BENCH_VARIANTS chose a subset: target/bench-filter.json left as it was");
        return;
    }
    let json = serde_json::json!({
        "clients": clients, "rounds": rounds, "seconds_per_round": seconds,
        "module_size_bytes": module_size, "empty_module_size_bytes": empty_module_size,
        "keyway_vs_empty_wasm": kw_vs_empty,
        "keyway_added_p99_us_vs_empty_wasm": kw_p99,
        "keyway_added_p50_us_vs_empty_wasm": kw_p50,
        "keyway_added_p99_us_vs_empty_wasm_saturated": kw_p99_saturated,
        "keyway_added_p50_us_vs_empty_wasm_saturated": kw_p50_saturated,
        "keyway_added_envoy_cpu_us_vs_empty_wasm": kw_cpu,
        "empty_wasm_vs_keyway_envoy_cpu": kw_cpu_ratio,
        "variants": variants,
    });
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-filter.json");
    let _ = std::fs::write(&out, serde_json::to_string_pretty(&json).unwrap());
    eprintln!("wrote {}", out.display());
}

/// The template variable of a variant's port (`keyway_plain` → `KEYWAY_PLAIN_PORT`).
fn port_var(variant: &str) -> &'static str {
    match variant {
        "none" => "NONE_PORT",
        "rbac" => "RBAC_PORT",
        "empty_wasm" => "EMPTY_WASM_PORT",
        "keyway" => "KEYWAY_PORT",
        _ => "KEYWAY_PLAIN_PORT",
    }
}
