//! `latest.json` (the keys of issue #7 and more), its dated copy, and the Markdown table.

use serde_json::{Value, json};

use crate::measure::{GatewayMemory, LatencyRun, LatencySpec, ThroughputRun, UDP_ECHO, UdpSpec, median};

/// Every latency path, in the tables' order.
const LATENCY_PATHS: [&str; 7] =
    ["direct", "envoy_baseline", "envoy_hbone", "keyway_same_zone", "keyway_cross_zone", "boringtun", "agent"];

/// Median percentiles of a path and variant over the rounds.
fn latency_summary(runs: &[LatencyRun], path: &str, variant: &str) -> Value {
    let sel: Vec<&LatencyRun> = runs.iter().filter(|r| r.path == path && r.variant == variant).collect();
    if sel.is_empty() {
        return Value::Null;
    }
    let m = |f: &dyn Fn(&LatencyRun) -> f64| round3(median(&sel.iter().map(|r| f(r)).collect::<Vec<_>>()));
    json!({
        "p50_ms": m(&|r| r.result.p50_ms),
        "p90_ms": m(&|r| r.result.p90_ms),
        "p99_ms": m(&|r| r.result.p99_ms),
        "p999_ms": m(&|r| r.result.p999_ms),
        "max_ms": m(&|r| r.result.max_ms),
        "requests_per_round": m(&|r| r.result.requests as f64),
        "errors_total": sel.iter().map(|r| r.result.errors).sum::<u64>(),
        "rounds": sel.len(),
    })
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn get(v: &Value, path: &[&str]) -> f64 {
    let mut cur = v;
    for k in path {
        cur = &cur[*k];
    }
    cur.as_f64().unwrap_or(f64::NAN)
}

/// Median Gbit/s and CPU s/GB of a path at `flows`.
fn tput(runs: &[ThroughputRun], path: &str, flows: u32) -> (f64, f64) {
    let sel: Vec<&ThroughputRun> = runs.iter().filter(|r| r.path == path && r.flows == flows).collect();
    if sel.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    (
        median(&sel.iter().map(|r| r.gbps).collect::<Vec<_>>()),
        median(&sel.iter().map(|r| r.cpu_s_per_gb).collect::<Vec<_>>()),
    )
}

fn num(x: f64) -> Value {
    if x.is_finite() { json!(round3(x)) } else { Value::Null }
}

/// Everything the run measured, and the figures read from the engine and filter benches.
#[derive(Debug)]
pub struct Inputs<'a> {
    /// ISO date.
    pub date: String,
    /// Machine description.
    pub machine: String,
    /// Load seen.
    pub load: Value,
    /// Latency settings.
    pub lat_spec: &'a LatencySpec,
    /// UDP echo settings.
    pub udp_spec: &'a UdpSpec,
    /// Latency runs (UDP echo runs among them, variant [`UDP_ECHO`]).
    pub lat: &'a [LatencyRun],
    /// Throughput runs.
    pub tput: &'a [ThroughputRun],
    /// Throughput seconds per run.
    pub tput_seconds: u32,
    /// Gateway memory.
    pub mem: Option<&'a GatewayMemory>,
    /// `target/bench-policy.json`, when present.
    pub policy: Option<Value>,
    /// `target/bench-filter.json`, when present.
    pub filter: Option<Value>,
    /// `target/bench-failover.json` (the end-to-end failover tests' measurements), when present.
    pub failover: Option<Value>,
}

/// Builds `latest.json`.
pub fn build(inp: &Inputs<'_>) -> Value {
    let variants = ["keepalive", "new_connection"];
    let mut by_variant = serde_json::Map::new();
    for v in variants {
        let mut p = serde_json::Map::new();
        for path in LATENCY_PATHS {
            p.insert(path.into(), latency_summary(inp.lat, path, v));
        }
        by_variant.insert(v.into(), Value::Object(p));
    }
    let ka = by_variant.get("keepalive").cloned().unwrap_or(Value::Null);
    let added = |variant: &str, path: &str, q: &str| {
        let v = &by_variant[variant];
        num(get(v, &[path, q]) - get(v, &["envoy_baseline", q]))
    };
    // vCPU per 1000 rps of each gateway, keep-alive cross-zone runs.
    let vcpu = |variant: &str, gw: usize| {
        let xs: Vec<f64> = inp
            .lat
            .iter()
            .filter(|r| r.path == "keyway_cross_zone" && r.variant == variant)
            .filter_map(|r| r.gateway_cpu_s.get(gw).map(|c| c / r.wall_s / (f64::from(inp.lat_spec.rate) / 1000.0)))
            .collect();
        if xs.is_empty() { f64::NAN } else { median(&xs) }
    };
    let (d1, dc1) = tput(inp.tput, "direct", 1);
    let (h1, hc1) = tput(inp.tput, "envoy_hbone", 1);
    let (k1, kc1) = tput(inp.tput, "keyway_cross_zone", 1);
    let (b1, bc1) = tput(inp.tput, "boringtun", 1);
    let (d8, dc8) = tput(inp.tput, "direct", 8);
    let (h8, hc8) = tput(inp.tput, "envoy_hbone", 8);
    let (k8, kc8) = tput(inp.tput, "keyway_cross_zone", 8);
    let (b8, bc8) = tput(inp.tput, "boringtun", 8);
    let (a1, ac1) = tput(inp.tput, "agent", 1);
    let (a8, ac8) = tput(inp.tput, "agent", 8);

    let filter = inp.filter.as_ref().map(|f| {
        let rate = |name: &str| {
            f["variants"]
                .as_array()
                .and_then(|a| a.iter().find(|v| v["variant"] == name))
                .and_then(|v| v["connections_per_second"].as_f64())
                .unwrap_or(f64::NAN)
        };
        let (none, rbac, kw, plain) = (rate("none"), rate("rbac"), rate("keyway"), rate("keyway_plain"));
        let empty = rate("empty_wasm");
        // The bench's own paired ratio (median of per-round ratios) when it wrote one.
        let paired = |key: &str, fallback: f64| f[key].as_f64().unwrap_or(fallback);
        json!({
            "conn_rate_no_filter": num(none), "conn_rate_rbac": num(rbac), "conn_rate_keyway": num(kw),
            "conn_rate_keyway_plain_inbound": num(plain), "conn_rate_empty_wasm": num(empty),
            "keyway_vs_no_filter": num(kw / none), "rbac_vs_no_filter": num(rbac / none),
            "keyway_vs_empty_wasm": num(paired("keyway_vs_empty_wasm", kw / empty)),
            "keyway_added_p99_us_vs_empty_wasm": num(paired("keyway_added_p99_us_vs_empty_wasm", f64::NAN)),
            "keyway_added_envoy_cpu_us_vs_empty_wasm": num(paired("keyway_added_envoy_cpu_us_vs_empty_wasm", f64::NAN)),
            "goal": {"keyway_vs_empty_wasm": 0.97, "keyway_added_p99_us_vs_empty_wasm": 50},
            "module_size_bytes": f["module_size_bytes"].clone(),
            "source": "target/bench-filter.json (cargo bench -p keyway-filter --bench connections)",
        })
    });
    let policy = inp.policy.as_ref().map(|p| {
        let rows = p["rows"].as_array().cloned().unwrap_or_default();
        let row = |pol: u64, wl: u64| rows.iter().find(|r| r["policies"] == pol && r["workloads"] == wl).cloned();
        let biggest = row(10_000, 50_000).unwrap_or(Value::Null);
        let table: Vec<Value> = rows
            .iter()
            .map(|r| {
                json!({"policies": r["policies"], "workloads": r["workloads"], "admin_tiers": r["admin_tiers"],
                       "compile_ms": num(r["compile_ms"].as_f64().unwrap_or(f64::NAN)),
                       "p50_ns": r["latency_ns"]["p50"], "p99_ns": r["latency_ns"]["p99"], "p999_ns": r["latency_ns"]["p999"],
                       "memory_mib": r["memory_mib"]})
            })
            .collect();
        json!({
            "decision_p99_ns_10k_policies": biggest["latency_ns"]["p99"],
            "decision_p50_ns_10k_policies": biggest["latency_ns"]["p50"],
            "compile_ms_10k_policies_50k_workloads": num(biggest["compile_ms"].as_f64().unwrap_or(f64::NAN)),
            "memory_mib_10k_policies_50k_workloads": biggest["memory_mib"],
            "rows": table,
            "source": "target/bench-policy.json (cargo bench -p keyway-policy --bench scale)",
        })
    });
    let gateway = inp.mem.map(|m| {
        let idle = m.rss_idle_mib.iter().copied().fold(0.0, f64::max);
        let per: Vec<f64> = m
            .rss_held_mib
            .iter()
            .zip(&m.rss_before_mib)
            .map(|(h, b)| (h - b) * 1000.0 / f64::from(m.flows.max(1)))
            .collect();
        json!({
            "rss_idle_mb": num(idle),
            "rss_per_1k_flows_mb": num(per.iter().copied().fold(0.0, f64::max)),
            "vcpu_per_1k_rps": num(vcpu("keepalive", 0).max(vcpu("keepalive", 1))),
            "per_gateway": {
                "rss_idle_mib": m.rss_idle_mib.iter().map(|x| num(*x)).collect::<Vec<_>>(),
                "rss_before_flows_mib": m.rss_before_mib.iter().map(|x| num(*x)).collect::<Vec<_>>(),
                "rss_with_flows_mib": m.rss_held_mib.iter().map(|x| num(*x)).collect::<Vec<_>>(),
                "rss_per_1k_flows_mib": per.iter().map(|x| num(*x)).collect::<Vec<_>>(),
                "flows_held": m.flows,
                "vcpu_per_1k_rps_keepalive": [num(vcpu("keepalive", 0)), num(vcpu("keepalive", 1))],
                "vcpu_per_1k_rps_new_connection": [num(vcpu("new_connection", 0)), num(vcpu("new_connection", 1))],
                "note": "index 0: source-zone gateway (zone-a), 1: destination-zone gateway (zone-b); vCPU over cross-zone latency runs at the fixed rate; headline = the busier gateway",
            },
            "anchor_ztunnel": {"vcpu_per_1k_rps": 0.06, "mb_per_1k_rps": 12},
        })
    });

    let agent = agent_beside_boringtun(inp);

    json!({
        "date": inp.date,
        "machine": inp.machine,
        "load": inp.load,
        "agent": agent,
        "latency": {
            "rate_rps": inp.lat_spec.rate,
            "connections": inp.lat_spec.connections,
            "response_bytes": crate::load::BODY_BYTES,
            "seconds_per_run": inp.lat_spec.seconds,
            "warmup_seconds": inp.lat_spec.warmup,
            "rounds": inp.lat_spec.rounds,
            "load_generator": "keyway-bench load (open loop, fixed rate, coordinated-omission corrected, HdrHistogram)",
            "paths": ka,
            "new_connection": by_variant.get("new_connection").cloned().unwrap_or(Value::Null),
            "added_cross_zone_p50_ms": added("keepalive", "keyway_cross_zone", "p50_ms"),
            "added_cross_zone_p99_ms": added("keepalive", "keyway_cross_zone", "p99_ms"),
            "added_same_zone_p50_ms": added("keepalive", "keyway_same_zone", "p50_ms"),
            "added_same_zone_p99_ms": added("keepalive", "keyway_same_zone", "p99_ms"),
            "added_cross_zone_new_connection_p50_ms": added("new_connection", "keyway_cross_zone", "p50_ms"),
            "added_cross_zone_new_connection_p99_ms": added("new_connection", "keyway_cross_zone", "p99_ms"),
            "goal": {
                "added_p50_ms": 0.25, "added_p99_ms": 0.8,
                "added_new_connection_p50_ms": 1.0, "added_new_connection_p99_ms": 3.0,
            },
            "runs": inp.lat,
        },
        "throughput": {
            "direct_gbps": num(d1), "envoy_hbone_gbps": num(h1), "keyway_gbps": num(k1), "boringtun_gbps": num(b1),
            "agent_gbps": num(a1),
            "keyway_vs_boringtun": num(k1 / b1), "keyway_vs_envoy_hbone": num(k1 / h1),
            "flows_8": {
                "direct_gbps": num(d8), "envoy_hbone_gbps": num(h8), "keyway_gbps": num(k8), "boringtun_gbps": num(b8),
                "agent_gbps": num(a8),
                "keyway_vs_boringtun": num(k8 / b8), "keyway_vs_envoy_hbone": num(k8 / h8),
            },
            "cpu_s_per_gb": {
                "flows_1": {"direct": num(dc1), "envoy_hbone": num(hc1), "keyway": num(kc1), "boringtun": num(bc1), "agent": num(ac1)},
                "flows_8": {"direct": num(dc8), "envoy_hbone": num(hc8), "keyway": num(kc8), "boringtun": num(bc8), "agent": num(ac8)},
                "keyway_vs_envoy_hbone": num(kc1 / hc1),
                "note": "CPU seconds (user+system) of every process on the path: iperf3 at both ends, the sidecars, the gateways, boringtun; per GB received",
            },
            "seconds_per_run": inp.tput_seconds,
            "tool": "iperf3 (Debian)",
            "goal": {"keyway_vs_boringtun": 4.0, "keyway_vs_envoy_hbone": 0.6, "cpu_s_per_gb_vs_envoy_hbone": 1.5},
            "runs": inp.tput,
        },
        "filter": filter.unwrap_or(Value::Null),
        "policy": policy.unwrap_or(Value::Null),
        "gateway": gateway.unwrap_or(Value::Null),
        "failover": inp.failover.clone().map_or(Value::Null, |mut v| {
            v["goal"] = json!({"replica_gap_s": 1.0, "zone_s": 1.5});
            v["source"] = json!("target/bench-failover.json (cargo test -p keyway-e2e --test e2e failover, KEYWAY_FAILOVER_OUT)");
            v
        }),
    })
}

/// The `agent` path beside `boringtun` on the same namespaces: each figure of both, and the ratio
/// agent ÷ boringtun.
fn agent_beside_boringtun(inp: &Inputs<'_>) -> Value {
    let pair = |a: f64, b: f64| json!({"agent": num(a), "boringtun": num(b), "agent_vs_boringtun": num(a / b)});
    let tput_pair = |flows: u32| {
        let (a, ac) = tput(inp.tput, "agent", flows);
        let (b, bc) = tput(inp.tput, "boringtun", flows);
        (pair(a, b), pair(ac, bc))
    };
    let (t1, c1) = tput_pair(1);
    let (t8, c8) = tput_pair(8);
    let lat = |variant: &str| {
        let a = latency_summary(inp.lat, "agent", variant);
        let b = latency_summary(inp.lat, "boringtun", variant);
        let ratio = |q: &str| num(get(&a, &[q]) / get(&b, &[q]));
        json!({"agent": a, "boringtun": b, "p50_agent_vs_boringtun": ratio("p50_ms"), "p99_agent_vs_boringtun": ratio("p99_ms")})
    };
    let mut udp = lat(UDP_ECHO);
    udp["rate_per_second"] = json!(inp.udp_spec.rate);
    udp["datagram_bytes"] = json!(inp.udp_spec.size);
    udp["tool"] = json!(
        "keyway-bench udp-ping (open loop, fixed rate; round trip from each datagram's send; errors_total = datagrams with no echo within 1 s)"
    );
    json!({
        "path": "device cwg (zone-a) → keyway agent → gateway zone-a → QUIC → gateway zone-b → keyway agent → device swg (zone-b), TCP one QUIC stream per flow, UDP one QUIC datagram per packet",
        "baseline": "boringtun: WireGuard in userspace between the same two namespaces",
        "throughput_gbps": {"flows_1": t1, "flows_8": t8},
        "cpu_s_per_gb": {"flows_1": c1, "flows_8": c8, "note": "agent: both agents, both gateways, iperf3 at both ends; boringtun: both boringtun-cli, iperf3 at both ends"},
        "tcp_keepalive": lat("keepalive"),
        "tcp_new_connection": lat("new_connection"),
        "udp_echo": udp,
    })
}

/// The agent beside boringtun (Markdown).
pub fn agent_table(v: &Value) -> String {
    let a = &v["agent"];
    let mut s = String::from("| figure | keyway agent | boringtun | agent ÷ boringtun |\n|---|---:|---:|---:|\n");
    let mut row = |figure: &str, base: &[&str], digits: usize| {
        let at = |k: &str| {
            let mut p: Vec<&str> = base.to_vec();
            p.push(k);
            get(a, &p)
        };
        s.push_str(&format!(
            "| {figure} | {} | {} | {} |\n",
            shown(at("agent"), digits),
            shown(at("boringtun"), digits),
            shown(at("agent_vs_boringtun"), 2)
        ));
    };
    row("TCP throughput, 1 flow (Gbit/s)", &["throughput_gbps", "flows_1"], 2);
    row("TCP throughput, 8 flows (Gbit/s)", &["throughput_gbps", "flows_8"], 2);
    row("CPU s per GB, 1 flow", &["cpu_s_per_gb", "flows_1"], 2);
    row("CPU s per GB, 8 flows", &["cpu_s_per_gb", "flows_8"], 2);
    for (figure, key) in [
        ("TCP request/response, keep-alive", "tcp_keepalive"),
        ("TCP request/response, new connection", "tcp_new_connection"),
        ("UDP echo round trip", "udp_echo"),
    ] {
        for q in ["p50", "p99"] {
            let field = format!("{q}_ms");
            s.push_str(&format!(
                "| {figure}, {q} (ms) | {} | {} | {} |\n",
                f(a, &[key, "agent", &field], 3),
                f(a, &[key, "boringtun", &field], 3),
                f(a, &[key, &format!("{q}_agent_vs_boringtun")], 2)
            ));
        }
    }
    s.push_str(&format!(
        "| UDP echo datagrams with no echo (all rounds) | {} | {} | |\n",
        a["udp_echo"]["agent"]["errors_total"], a["udp_echo"]["boringtun"]["errors_total"]
    ));
    s
}

fn f(v: &Value, path: &[&str], digits: usize) -> String {
    shown(get(v, path), digits)
}

/// `x` with `digits` decimals, or "–" when it was not measured.
fn shown(x: f64, digits: usize) -> String {
    if x.is_finite() { format!("{x:.digits$}") } else { "–".into() }
}

/// A goal: the figures (JSON paths), each at most or at least its goal, digits shown.
struct Goal {
    figure: &'static str,
    paths: &'static [&'static [&'static str]],
    at_most: bool,
    goals: &'static [f64],
    digits: usize,
}

/// The goals of issue 13, each with this run's figures.
const GOALS: &[Goal] = &[
    Goal {
        figure: "added cross-zone latency, keep-alive, p50 / p99 (ms)",
        paths: &[&["latency", "added_cross_zone_p50_ms"], &["latency", "added_cross_zone_p99_ms"]],
        at_most: true,
        goals: &[0.25, 0.8],
        digits: 2,
    },
    Goal {
        figure: "added cross-zone latency, new connection per request, p50 / p99 (ms)",
        paths: &[
            &["latency", "added_cross_zone_new_connection_p50_ms"],
            &["latency", "added_cross_zone_new_connection_p99_ms"],
        ],
        at_most: true,
        goals: &[1.0, 3.0],
        digits: 2,
    },
    Goal {
        figure: "cross-zone throughput ÷ Envoy HBONE, 1 / 8 flows",
        paths: &[&["throughput", "keyway_vs_envoy_hbone"], &["throughput", "flows_8", "keyway_vs_envoy_hbone"]],
        at_most: false,
        goals: &[0.6, 0.6],
        digits: 2,
    },
    Goal {
        figure: "CPU seconds per GB ÷ Envoy HBONE's, 1 flow",
        paths: &[&["throughput", "cpu_s_per_gb", "keyway_vs_envoy_hbone"]],
        at_most: true,
        goals: &[1.5],
        digits: 2,
    },
    Goal {
        figure: "throughput ÷ boringtun, 8 flows",
        paths: &[&["throughput", "flows_8", "keyway_vs_boringtun"]],
        at_most: false,
        goals: &[4.0],
        digits: 2,
    },
    Goal {
        figure: "gateway vCPU per 1000 req/s, keep-alive (busier gateway)",
        paths: &[&["gateway", "vcpu_per_1k_rps"]],
        at_most: true,
        goals: &[0.06],
        digits: 3,
    },
    Goal {
        figure: "gateway RSS idle (MiB)",
        paths: &[&["gateway", "rss_idle_mb"]],
        at_most: true,
        goals: &[12.0],
        digits: 1,
    },
    Goal {
        figure: "gateway RSS per 1000 open flows (MiB, busier gateway)",
        paths: &[&["gateway", "rss_per_1k_flows_mb"]],
        at_most: true,
        goals: &[8.0],
        digits: 1,
    },
    Goal {
        figure: "filter connection rate ÷ an empty wasm filter",
        paths: &[&["filter", "keyway_vs_empty_wasm"]],
        at_most: false,
        goals: &[0.97],
        digits: 2,
    },
    Goal {
        figure: "filter added p99 per connection over the empty wasm filter (µs)",
        paths: &[&["filter", "keyway_added_p99_us_vs_empty_wasm"]],
        at_most: true,
        goals: &[50.0],
        digits: 0,
    },
    Goal {
        figure: "replica failover: longest gap for new connections (s)",
        paths: &[&["failover", "replica_gap_s"]],
        at_most: true,
        goals: &[1.0],
        digits: 2,
    },
    Goal { figure: "zone failover (s)", paths: &[&["failover", "zone_s"]], at_most: true, goals: &[1.5], digits: 2 },
];

/// The goals table: each figure of this run, its goal, and whether it is met.
pub fn goals(v: &Value) -> String {
    let mut s = String::from("| figure | this run | goal | met |\n|---|---:|---:|---|\n");
    for g in GOALS {
        let values: Vec<f64> = g.paths.iter().map(|p| get(v, p)).collect();
        let cmp = if g.at_most { "≤" } else { "≥" };
        let met = if values.iter().any(|x| !x.is_finite()) {
            "not measured"
        } else if values.iter().zip(g.goals).all(|(x, goal)| if g.at_most { x <= goal } else { x >= goal }) {
            "yes"
        } else {
            "no"
        };
        s.push_str(&format!(
            "| {} | {} | {} {} | {met} |\n",
            g.figure,
            values.iter().map(|x| shown(*x, g.digits)).collect::<Vec<_>>().join(" / "),
            cmp,
            g.goals.iter().map(|x| shown(*x, 2)).collect::<Vec<_>>().join(" / "),
        ));
    }
    s
}

/// The results section (Markdown) for `bench/README.md`.
pub fn markdown(v: &Value) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "Run of {} on {}. Load seen: {}.\n\n",
        v["date"].as_str().unwrap_or_default(),
        v["machine"].as_str().unwrap_or_default(),
        v["load"]["summary"].as_str().unwrap_or_default()
    ));
    s.push_str("**Goals** (issue 13)\n\n");
    s.push_str(&goals(v));
    s.push('\n');
    let lat = &v["latency"];
    s.push_str(&format!(
        "**Latency** ({} req/s, {} connections, 1 KiB answers, {} rounds of {} s, medians of rounds; ms)\n\n",
        lat["rate_rps"], lat["connections"], lat["rounds"], lat["seconds_per_run"]
    ));
    s.push_str("| path | keep-alive p50 | p90 | p99 | p99.9 | new conn. p50 | p90 | p99 | p99.9 |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for p in LATENCY_PATHS {
        s.push_str(&format!("| `{p}` "));
        for base in [&lat["paths"], &lat["new_connection"]] {
            for q in ["p50_ms", "p90_ms", "p99_ms", "p999_ms"] {
                s.push_str(&format!("| {} ", f(base, &[p, q], 3)));
            }
        }
        s.push_str("|\n");
    }
    s.push_str(&format!(
        "\nAdded by keyway (minus `envoy_baseline`), keep-alive: cross-zone p50 **{}** ms, p99 **{}** ms (goal ≤ 0.25 / ≤ 0.8); same-zone p50 {} ms, p99 {} ms. New connection per request, cross-zone: p50 {} ms, p99 {} ms (goal ≤ 1 / ≤ 3).\n\n",
        f(lat, &["added_cross_zone_p50_ms"], 3),
        f(lat, &["added_cross_zone_p99_ms"], 3),
        f(lat, &["added_same_zone_p50_ms"], 3),
        f(lat, &["added_same_zone_p99_ms"], 3),
        f(lat, &["added_cross_zone_new_connection_p50_ms"], 3),
        f(lat, &["added_cross_zone_new_connection_p99_ms"], 3),
    ));
    let t = &v["throughput"];
    s.push_str(&format!(
        "**Throughput** (iperf3, {} s per run, medians of rounds)\n\n| path | 1 flow Gbit/s | CPU s/GB | 8 flows Gbit/s | CPU s/GB |\n|---|---:|---:|---:|---:|\n",
        t["seconds_per_run"]
    ));
    for (p, key) in [
        ("direct", "direct"),
        ("envoy_hbone", "envoy_hbone"),
        ("keyway_cross_zone", "keyway"),
        ("boringtun", "boringtun"),
        ("agent", "agent"),
    ] {
        s.push_str(&format!(
            "| `{p}` | {} | {} | {} | {} |\n",
            f(t, &[&format!("{key}_gbps")], 2),
            f(t, &["cpu_s_per_gb", "flows_1", key], 2),
            f(t, &["flows_8", &format!("{key}_gbps")], 2),
            f(t, &["cpu_s_per_gb", "flows_8", key], 2),
        ));
    }
    s.push_str(&format!(
        "\nkeyway ÷ boringtun: **{}** (1 flow), {} (8 flows), goal ≥ 4; keyway ÷ envoy_hbone: **{}** (1 flow), {} (8 flows), goal ≥ 0.6; CPU s/GB keyway ÷ envoy_hbone {} (1 flow), goal ≤ 1.5.\n\n",
        f(t, &["keyway_vs_boringtun"], 2),
        f(t, &["flows_8", "keyway_vs_boringtun"], 2),
        f(t, &["keyway_vs_envoy_hbone"], 2),
        f(t, &["flows_8", "keyway_vs_envoy_hbone"], 2),
        f(t, &["cpu_s_per_gb", "keyway_vs_envoy_hbone"], 2),
    ));
    let ag = &v["agent"];
    s.push_str(&format!(
        "**The agent beside boringtun** (`agent`: {}; `boringtun` on the same two namespaces; TCP latency at the rate above, UDP echo at {} datagrams/s of {} bytes; medians of rounds)\n\n",
        ag["path"].as_str().unwrap_or_default(),
        ag["udp_echo"]["rate_per_second"],
        ag["udp_echo"]["datagram_bytes"],
    ));
    s.push_str(&agent_table(v));
    s.push('\n');
    let fl = &v["filter"];
    s.push_str(&format!(
        "**Filter** (from the filter bench): no filter {} conn/s, RBAC {}, empty wasm filter {}, keyway {} (keyway ÷ none {}; keyway ÷ empty wasm **{}**, goal ≥ 0.97; added p99 over empty wasm, one client, **{}** µs, goal ≤ 50).\n\n",
        f(fl, &["conn_rate_no_filter"], 0),
        f(fl, &["conn_rate_rbac"], 0),
        f(fl, &["conn_rate_empty_wasm"], 0),
        f(fl, &["conn_rate_keyway"], 0),
        f(fl, &["keyway_vs_no_filter"], 2),
        f(fl, &["keyway_vs_empty_wasm"], 3),
        f(fl, &["keyway_added_p99_us_vs_empty_wasm"], 0)
    ));
    let fo = &v["failover"];
    s.push_str(&format!(
        "**Failover** (from the end-to-end tests): longest gap for new connections when a gateway replica dies {} s (goal ≤ 1), traffic in the failover zone {} s after a zone's gateways died (goal ≤ 1.5).\n\n",
        f(fo, &["replica_gap_s"], 2),
        f(fo, &["zone_s"], 2)
    ));
    let po = &v["policy"];
    s.push_str(&format!(
        "**Policy engine** (from the scale bench): 10 000 policies × 50 000 workloads: decision p50 {} ns, p99 **{}** ns; compile **{}** ms.\n\n",
        f(po, &["decision_p50_ns_10k_policies"], 0),
        f(po, &["decision_p99_ns_10k_policies"], 0),
        f(po, &["compile_ms_10k_policies_50k_workloads"], 0)
    ));
    let g = &v["gateway"];
    s.push_str(&format!(
        "**Gateway**: RSS idle {} MiB, {} MiB per 1000 open flows, {} vCPU per 1000 req/s (keep-alive, busier gateway; new connection per request: {:?}). ztunnel anchor: 0.06 vCPU and 12 MB per 1000 req/s.\n",
        f(g, &["rss_idle_mb"], 1),
        f(g, &["rss_per_1k_flows_mb"], 1),
        f(g, &["vcpu_per_1k_rps"], 3),
        g["per_gateway"]["vcpu_per_1k_rps_new_connection"].as_array().map(|a| a.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(" / ")).unwrap_or_default()
    ));
    s
}
