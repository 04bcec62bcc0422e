//! Per-connection cost of the keyway filter inside Envoy, side by side in one run.
//!
//! One Envoy (one worker thread) with three listeners that differ only in their network filters,
//! each in front of `tcp_proxy` to the same local echo server:
//!
//! * `none`: no filter;
//! * `rbac`: Envoy's native RBAC network filter with one allow rule (source 127.0.0.0/8, the
//!   listener's port);
//! * `keyway`: the keyway filter in mode `outbound` (static keys), which seals a token per
//!   connection and stores it as filter state;
//! * `keyway_plain`: the keyway filter in mode `inbound_plain` with every source exempt: the cost
//!   of a wasm network filter that reads two properties and lets the connection through, which
//!   tells Envoy's per-connection wasm overhead apart from keyway's own work.
//!
//! Clients (this process, `BENCH_CLIENTS` concurrent loops) open a connection, send one byte, wait
//! for the echo and reset the connection; a sample is the time from `connect()` to the echo. The
//! variants take turns in rounds so that drift on a shared machine hits them alike. Prints a table
//! and writes `target/bench-filter.json`.
//!
//! `cargo bench -p keyway-filter --bench connections` (needs Envoy and `make wasm`, like the tests).
//! Environment: `BENCH_ROUNDS` (default 4), `BENCH_SECONDS` per round and variant (default 2),
//! `BENCH_CLIENTS` (default 8).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/load.rs"]
mod load;

#[path = "../tests/envoy/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use harness::{EchoApp, Envoy, free_port, render, wasm_module};
use keyway_policy::auth::EpochSecret;
use keyway_policy::keyservice::{EpochKey, KeyBundle};
use load::{closed_loop, env_or, percentile};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const VARIANTS: [&str; 4] = ["none", "rbac", "keyway", "keyway_plain"];

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

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken from the command line.
    let rounds = env_or("BENCH_ROUNDS", 4);
    let seconds = env_or("BENCH_SECONDS", 2);
    let clients = env_or("BENCH_CLIENTS", 8);
    let wasm = wasm_module();
    let module_size = std::fs::metadata(&wasm).map(|m| m.len()).unwrap_or(0);
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
    for v in ["NONE_PORT", "RBAC_PORT", "KEYWAY_PORT", "KEYWAY_PLAIN_PORT"] {
        vars.insert(v, free_port().to_string());
    }
    vars.insert("ECHO_PORT", echo.port.to_string());
    vars.insert("WASM", wasm.display().to_string());
    vars.insert("KEYWAY_CONFIG", keyway_config);
    let envoy = Envoy::start(&render(CONFIG, &vars), admin, "bench").unwrap();
    let port_of = |v: &str| -> u16 { vars[format!("{}_PORT", v.to_uppercase()).as_str()].parse().unwrap() };

    // Warm up every listener (V8 compiles lazily, pools fill).
    for v in VARIANTS {
        let _ = round(port_of(v), clients, 1).await;
    }
    let mut samples: BTreeMap<&str, (Vec<u32>, u64, f64)> = BTreeMap::new();
    for r in 0..rounds {
        for v in VARIANTS {
            let started = Instant::now();
            let (s, f) = round(port_of(v), clients, seconds).await;
            let e = samples.entry(v).or_default();
            e.0.extend(s);
            e.1 += f;
            e.2 += started.elapsed().as_secs_f64();
            eprintln!("round {}/{rounds} {v}: done", r + 1);
        }
    }
    let keyway_allowed = envoy
        .stats()
        .iter()
        .filter(|(k, _)| k.contains("keyway_filter_connections_total") && k.contains("verdict=.=allow"))
        .map(|(_, v)| *v)
        .sum::<u64>();
    drop(envoy);

    let mut rows = Vec::new();
    for v in VARIANTS {
        let (mut s, failures, secs) = samples.remove(v).unwrap_or_default();
        s.sort_unstable();
        let rate = s.len() as f64 / secs.max(1e-9);
        rows.push((v, rate, percentile(&s, 0.5), percentile(&s, 0.9), percentile(&s, 0.99), s.len(), failures));
    }
    let base = rows[0];
    let rbac = rows[1];
    println!(
        "\nper-connection cost through one Envoy listener ({clients} clients, {rounds} rounds x {seconds} s per variant)"
    );
    println!("| variant | conn/s | vs none | p50 µs | p90 µs | p99 µs | added p99 µs | connections | failures |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (v, rate, p50, p90, p99, n, failures) in &rows {
        println!(
            "| {v} | {rate:.0} | {:.3} | {p50} | {p90} | {p99} | {} | {n} | {failures} |",
            rate / base.1,
            i64::from(*p99) - i64::from(base.4)
        );
    }
    let keyway = rows[2];
    println!(
        "\nkeyway / none = {:.3}, keyway / rbac = {:.3}, keyway added p99 = {} µs; module size {module_size} bytes; \
         keyway counted {keyway_allowed} allowed connections",
        keyway.1 / base.1,
        keyway.1 / rbac.1,
        i64::from(keyway.4) - i64::from(base.4)
    );
    let json = serde_json::json!({
        "clients": clients, "rounds": rounds, "seconds_per_round": seconds,
        "module_size_bytes": module_size,
        "variants": rows.iter().map(|(v, rate, p50, p90, p99, n, f)| serde_json::json!({
            "variant": v, "connections_per_second": rate, "p50_us": p50, "p90_us": p90, "p99_us": p99,
            "connections": n, "failures": f,
        })).collect::<Vec<_>>(),
    });
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-filter.json");
    let _ = std::fs::write(&out, serde_json::to_string_pretty(&json).unwrap());
    eprintln!("wrote {}", out.display());
}
