//! Per-connection cost of the inbound tunnel filter inside Envoy, and of its replay set.
//!
//! One Envoy (`BENCH_WORKERS` worker threads, default 1) with three HTTP/2 CONNECT listeners that
//! differ only in their HTTP filters, each routing accepted tunnels to the same local echo server:
//!
//! * `tunnel_none`: no keyway filter;
//! * `keyway_no_replay`: the keyway filter in mode `inbound_tunnel` with `replay_cache_capacity: 0`
//!   (the ticket verified, no replay check);
//! * `keyway`: the same with the default replay set, shared by every worker through proxy-wasm
//!   shared data (one `get_shared_data` and one `set_shared_data` per ticket).
//!
//! `keyway` minus `keyway_no_replay` is the cost of the shared replay set. Clients (this process,
//! `BENCH_CLIENTS` loops) open a TCP connection, do the HTTP/2 handshake, send a CONNECT with a
//! fresh ticket, send 4 bytes and wait for their echo; a sample is the time from `connect()` to
//! the echo. Variants take turns in rounds. Prints a table.
//!
//! `cargo bench -p keyway-filter --bench tunnel` (needs Envoy and `make wasm`, like the tests).
//! Every ticket has the same source, so the `keyway` variant raises the replay set's capacity and
//! per-source share to 262 144 (the default share, 16 384 nonces per 30 s window, is about 546
//! tickets a second from one source to one workload).
//!
//! Environment: `BENCH_ROUNDS` (default 3), `BENCH_SECONDS` (default 2), `BENCH_CLIENTS` (default
//! 8), `BENCH_WORKERS` (default 1).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/load.rs"]
mod load;

#[path = "../tests/envoy/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use harness::{EchoApp, Envoy, connect_tunnel, free_port, render, wasm_module};
use keyway_policy::Protocol;
use keyway_policy::auth::{EpochSecret, TicketClaims, TicketKey};
use keyway_policy::keyservice::{EpochKey, KeyBundle};
use load::{closed_loop, env_or, percentile};

const VARIANTS: [&str; 3] = ["tunnel_none", "keyway_no_replay", "keyway"];
const ID: &str = "spiffe://cluster.local/ns/data/sa/redis";
const IP: &str = "10.128.2.20";

const CONFIG: &str = r#"
admin:
  address: { socket_address: { address: 127.0.0.1, port_value: ${ADMIN_PORT} } }
static_resources:
  listeners:
  - name: tunnel_none
    address: { socket_address: { address: 127.0.0.1, port_value: ${TUNNEL_NONE_PORT} } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: tunnel_none
          codec_type: HTTP2
          http2_protocol_options: { allow_connect: true }
          upgrade_configs: [ { upgrade_type: CONNECT } ]
          route_config: &route
            name: tunnel
            virtual_hosts:
            - name: app
              domains: ["*"]
              routes:
              - match: { connect_matcher: {} }
                route:
                  cluster: echo
                  upgrade_configs: [ { upgrade_type: CONNECT, connect_config: {} } ]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: &router
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  - name: keyway_no_replay
    address: { socket_address: { address: 127.0.0.1, port_value: ${KEYWAY_NO_REPLAY_PORT} } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: keyway_no_replay
          codec_type: HTTP2
          http2_protocol_options: { allow_connect: true }
          upgrade_configs: [ { upgrade_type: CONNECT } ]
          route_config: *route
          http_filters:
          - name: keyway.inbound_tunnel
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: keyway.inbound_tunnel
                root_id: keyway
                vm_config: &vm
                  vm_id: keyway
                  runtime: envoy.wasm.runtime.v8
                  code: { local: { filename: "${WASM}" } }
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: '${NO_REPLAY_CONFIG}'
          - name: envoy.filters.http.router
            typed_config: *router
  - name: keyway
    address: { socket_address: { address: 127.0.0.1, port_value: ${KEYWAY_PORT} } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: keyway
          codec_type: HTTP2
          http2_protocol_options: { allow_connect: true }
          upgrade_configs: [ { upgrade_type: CONNECT } ]
          route_config: *route
          http_filters:
          - name: keyway.inbound_tunnel
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: keyway.inbound_tunnel
                root_id: keyway
                vm_config: *vm
                configuration:
                  "@type": type.googleapis.com/google.protobuf.StringValue
                  value: '${KEYWAY_CONFIG}'
          - name: envoy.filters.http.router
            typed_config: *router
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

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A fresh ticket for the workload (`n` makes the nonce unique).
fn ticket(key: &TicketKey, n: u64) -> String {
    let b = n.to_le_bytes();
    TicketClaims {
        epoch: 1,
        src: "10.128.1.11".parse().unwrap(),
        dst: IP.parse().unwrap(),
        dst_port: 6379,
        protocol: Protocol::Tcp,
        issued_at_ms: now_ms(),
        nonce: std::array::from_fn(|i| b.get(i).copied().unwrap_or(0x5a)),
        src_identity: "spiffe://cluster.local/ns/shop/sa/cart".into(),
    }
    .seal(key)
    .unwrap()
}

/// Runs `clients` loops against `port` for `seconds`: (samples in µs, failures).
async fn round(port: u16, clients: u64, seconds: u64, key: Arc<TicketKey>, n: Arc<AtomicU64>) -> (Vec<u32>, u64) {
    let authority = Arc::new(format!("{IP}:6379"));
    closed_loop(clients, seconds, move || {
        let (key, n, authority) = (key.clone(), n.clone(), authority.clone());
        async move {
            let t = ticket(&key, n.fetch_add(1, Ordering::Relaxed));
            let start = Instant::now();
            match connect_tunnel(port, &authority, Some(&t)).await {
                Ok(r) if r.status == 200 && r.echo.as_deref() == Some(b"ping") => {
                    Some(u32::try_from(start.elapsed().as_micros()).unwrap_or(u32::MAX))
                }
                _ => None,
            }
        }
    })
    .await
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let rounds = env_or("BENCH_ROUNDS", 3);
    let seconds = env_or("BENCH_SECONDS", 2);
    let clients = env_or("BENCH_CLIENTS", 8);
    let workers = u32::try_from(env_or("BENCH_WORKERS", 1)).unwrap();
    let wasm = wasm_module();
    let echo = EchoApp::start().await.unwrap();

    let secret = EpochSecret::from_bytes([42; 32]);
    let ip: IpAddr = IP.parse().unwrap();
    let key = secret.ticket_key(ID, ip, 1).unwrap();
    let bundle = KeyBundle {
        identity: ID.into(),
        overlay_ip: ip,
        zone: "zone-a".into(),
        workload_keys: vec![],
        ticket_keys: vec![EpochKey { epoch: 1, key: key.to_base64url(), not_after_ms: None, not_before_ms: None }],
        refresh_ms: 10_000,
    };
    let keys = serde_json::to_string(&bundle).unwrap();
    let mut vars = BTreeMap::new();
    let admin = free_port();
    vars.insert("ADMIN_PORT", admin.to_string());
    for v in VARIANTS {
        vars.insert(format!("{}_PORT", v.to_uppercase()).leak(), free_port().to_string());
    }
    vars.insert("ECHO_PORT", echo.port.to_string());
    vars.insert("WASM", wasm.display().to_string());
    // Every ticket comes from one source: room for all of them, so nothing is refused for the
    // per-source share (at the default, a quarter of 65 536 per 30 s window, it would be).
    vars.insert(
        "KEYWAY_CONFIG",
        format!(
            r#"{{"mode":"inbound_tunnel","replay_cache_capacity":262144,"replay_cache_per_source":262144,"keys":{keys}}}"#
        ),
    );
    vars.insert("NO_REPLAY_CONFIG", format!(r#"{{"mode":"inbound_tunnel","replay_cache_capacity":0,"keys":{keys}}}"#));
    let envoy = Envoy::start_workers(&render(CONFIG, &vars), admin, "bench-tunnel", workers).unwrap();
    let port_of = |v: &str| -> u16 { vars[format!("{}_PORT", v.to_uppercase()).as_str()].parse().unwrap() };
    let (key, n) = (Arc::new(key), Arc::new(AtomicU64::new(0)));

    for v in VARIANTS {
        let _ = round(port_of(v), clients, 1, key.clone(), n.clone()).await;
    }
    let mut samples: BTreeMap<&str, (Vec<u32>, u64, f64)> = BTreeMap::new();
    for r in 0..rounds {
        for v in VARIANTS {
            let started = Instant::now();
            let (s, f) = round(port_of(v), clients, seconds, key.clone(), n.clone()).await;
            let e = samples.entry(v).or_default();
            e.0.extend(s);
            e.1 += f;
            e.2 += started.elapsed().as_secs_f64();
            eprintln!("round {}/{rounds} {v}: done", r + 1);
        }
    }
    let denials: Vec<String> = envoy
        .stats()
        .iter()
        .filter(|(k, v)| k.contains("keyway_filter_denials_total") && **v > 0)
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    drop(envoy);

    println!(
        "\ninbound tunnel per-connection cost ({clients} clients, {workers} workers, {rounds} rounds x {seconds} s)"
    );
    println!("| variant | conn/s | p50 µs | p90 µs | p99 µs | connections | failures |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for v in VARIANTS {
        let (mut s, failures, secs) = samples.remove(v).unwrap_or_default();
        s.sort_unstable();
        let rate = s.len() as f64 / secs.max(1e-9);
        let (p50, p90, p99) = (percentile(&s, 0.5), percentile(&s, 0.9), percentile(&s, 0.99));
        println!("| {v} | {rate:.0} | {p50} | {p90} | {p99} | {} | {failures} |", s.len());
    }
    println!("keyway refusals: {denials:?}");
}
