//! keyway end to end: network namespaces, real gateways, real Envoy sidecars with the real
//! filter. Needs root; fails (never skips) when it cannot build its namespaces.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use keyway_e2e::cluster::{Cluster, INTERNET, INTERNET_PORTS};
use keyway_e2e::envoy::{HEALTH_PORT, INBOUND_PLAIN_PORT, KEYWAY_INBOUND_PORT, OUTBOUND_PORT};
use keyway_e2e::gateway::DEFAULT_TUNNEL_PORT;
use keyway_e2e::wait::wait_until;
use keyway_policy::engine::Peer;
use keyway_policy::wire::{TICKET_HEADER, TOKEN_HEADER};
use keyway_policy::{Protocol, Verdict};

const T: Duration = Duration::from_secs(3);

#[test]
fn matrix_every_pair_gets_the_verdict_of_keyway_policy() {
    let (_turn, c) = Cluster::for_test("mx");
    let rows = keyway_e2e::matrix::run(&c, T).unwrap();
    let table = keyway_e2e::matrix::table(&rows);
    println!("{table}");
    let allowed = rows.iter().filter(|r| r.observed == Verdict::Allow).count();
    assert!(allowed >= 10 && allowed < rows.len() - 10, "the matrix exercises both verdicts: {allowed}/{}", rows.len());
    let cross_zone_allowed = rows
        .iter()
        .filter(|r| r.observed == Verdict::Allow)
        .filter(|r| {
            let zone = |n: &str| c.workloads.iter().find(|w| w.name == n).map(|w| w.zone.clone());
            zone(&r.src).is_some() && zone(&r.dst).is_some() && zone(&r.src) != zone(&r.dst)
        })
        .count();
    assert!(cross_zone_allowed > 0, "some allowed flows cross zones");
    // UDP and the device, both ways, are in it, allowed and denied.
    let device = |n: &str| c.devices.iter().any(|d| d.name == n);
    let some = |what: &str, f: &dyn Fn(&keyway_e2e::matrix::Row) -> bool| {
        for verdict in [Verdict::Allow, Verdict::Deny] {
            assert!(rows.iter().any(|r| f(r) && r.observed == verdict), "no {what} row observed {verdict:?}:\n{table}");
        }
    };
    some("UDP", &|r| r.protocol == Protocol::Udp);
    some("UDP across zones", &|r| {
        let zone = |n: &str| c.workloads.iter().find(|w| w.name == n).map(|w| w.zone.clone());
        r.protocol == Protocol::Udp && zone(&r.src).is_some() && zone(&r.src) != zone(&r.dst)
    });
    some("device → pod TCP", &|r| device(&r.src) && r.protocol == Protocol::Tcp);
    some("device → pod UDP", &|r| device(&r.src) && r.protocol == Protocol::Udp);
    some("pod → device TCP", &|r| device(&r.dst) && r.protocol == Protocol::Tcp);
    some("pod → device UDP", &|r| device(&r.dst) && r.protocol == Protocol::Udp);
    let bad: Vec<_> = rows.iter().filter(|r| !r.ok()).collect();
    assert!(bad.is_empty(), "{} flows differ from keyway policy:\n{table}", bad.len());
}

#[test]
fn no_bypass_of_the_enforcement_points() {
    let (_turn, c) = Cluster::for_test("nb");
    let cart = c.workload("shop/cart").unwrap();
    let frontend = c.workload("shop/frontend").unwrap();
    let redis = c.workload("data/redis").unwrap();
    let cart_ip: IpAddr = cart.pod.ip.parse().unwrap();

    // Straight over the underlay, from the router (no sidecar on the way): app ports and the
    // sidecar's own ports give nothing.
    for port in [7070, 9090, OUTBOUND_PORT, INBOUND_PLAIN_PORT] {
        let r = c.probe_from_ns(&c.topo.router, SocketAddr::new(cart_ip, port), T).unwrap();
        assert!(!r.connected, "underlay connection to cart:{port} reached the app: {r:?}");
    }
    // The exempt health port does answer (as a kubelet probe would).
    assert!(c.probe_from_ns(&c.topo.router, SocketAddr::new(cart_ip, HEALTH_PORT), T).unwrap().connected);
    // The keyway inbound port: in cleartext, or with a mesh certificate that is not a gateway's,
    // nothing; it accepts only gateways' certificates.
    let inbound = SocketAddr::new(cart_ip, KEYWAY_INBOUND_PORT);
    let authority = SocketAddr::new(cart.overlay, 7070);
    let out = c.raw_connect(&c.topo.router, None, inbound, authority, &[]).unwrap();
    assert!(out.starts_with("refused"), "cleartext: {out}");
    let frontends = c.sidecar_mesh(frontend).unwrap();
    let out = c.raw_connect(&c.topo.router, Some(&frontends), inbound, authority, &[]).unwrap();
    assert!(out.starts_with("refused"), "a sidecar's certificate: {out}");
    // With a gateway's certificate, without a ticket and with tickets for other destinations.
    let gw_mesh = c.gateway_mesh("zone-a", "gw-1");
    let as_gw = Some(&gw_mesh);
    let out = c.raw_connect(&c.topo.router, as_gw, inbound, authority, &[]).unwrap();
    assert!(out.starts_with("status 403 reason ticket-missing"), "{out}");
    // A ticket sealed for another workload does not verify with cart's ticket key.
    let others =
        c.mint_ticket(frontend.overlay, "spiffe://cluster.local/ns/shop/sa/frontend", frontend.overlay, 8080).unwrap();
    let out = c.raw_connect(&c.topo.router, as_gw, inbound, authority, &[(TICKET_HEADER, &others)]).unwrap();
    assert!(out.starts_with("status 403 reason ticket-mac"), "{out}");
    // One sealed for cart but naming another of its ports is for another destination.
    let wrong =
        c.mint_ticket(frontend.overlay, "spiffe://cluster.local/ns/shop/sa/frontend", cart.overlay, 9090).unwrap();
    let out = c.raw_connect(&c.topo.router, as_gw, inbound, authority, &[(TICKET_HEADER, &wrong)]).unwrap();
    assert!(out.starts_with("status 403 reason ticket-wrong-destination"), "{out}");
    let right =
        c.mint_ticket(frontend.overlay, "spiffe://cluster.local/ns/shop/sa/frontend", cart.overlay, 7070).unwrap();
    let out = c.raw_connect(&c.topo.router, as_gw, inbound, authority, &[(TICKET_HEADER, &right)]).unwrap();
    assert!(
        out.starts_with("status 200") && out.contains("keyway-app shop/cart port 7070"),
        "a valid ticket is the only way in: {out}"
    );

    // Tokens at the gateway, sent by cart's own pod (with its sidecar's certificate) but not
    // through its sidecar.
    let gw = SocketAddr::new(c.gateway_ip("zone-a", "gw-1").unwrap(), DEFAULT_TUNNEL_PORT);
    let carts = c.sidecar_mesh(cart).unwrap();
    let as_cart = Some(&carts);
    let dst = SocketAddr::new(redis.overlay, 6379);
    let good = c.mint_token(cart, redis.overlay, 6379, None).unwrap();
    let mut forged = good.clone().into_bytes();
    let i = forged.len() - 3;
    forged[i] = if forged[i] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    let out = c.raw_connect(&cart.pod.ns, as_cart, gw, dst, &[(TOKEN_HEADER, &forged)]).unwrap();
    assert!(out.starts_with("status 403 reason token-mac"), "forged: {out}");
    let out = c.raw_connect(&cart.pod.ns, as_cart, gw, dst, &[(TOKEN_HEADER, &good)]).unwrap();
    assert!(out.starts_with("status 200") && out.contains("keyway-app data/redis port 6379"), "genuine: {out}");
    let out = c.raw_connect(&cart.pod.ns, as_cart, gw, dst, &[(TOKEN_HEADER, &good)]).unwrap();
    assert!(out.starts_with("status 403 reason token-replay"), "replayed: {out}");
    let stolen = c.mint_token(cart, redis.overlay, 6379, None).unwrap();
    let out = c.raw_connect(&frontend.pod.ns, Some(&frontends), gw, dst, &[(TOKEN_HEADER, &stolen)]).unwrap();
    assert!(out.starts_with("status 403 reason token-peer-identity"), "used by another workload: {out}");
    let out = c.raw_connect(&frontend.pod.ns, as_cart, gw, dst, &[(TOKEN_HEADER, &stolen)]).unwrap();
    assert!(
        out.starts_with("status 403 reason token-source-address"),
        "with cart's certificate, from another address: {out}"
    );
    let out = c.raw_connect(&cart.pod.ns, None, gw, dst, &[(TOKEN_HEADER, &stolen)]).unwrap();
    assert!(out.starts_with("refused"), "in cleartext: {out}");
    let out = c.raw_connect(&cart.pod.ns, as_cart, gw, dst, &[]).unwrap();
    assert!(out.starts_with("status 403 reason token-missing"), "{out}");
}

#[test]
fn egress_default_deny_reaches_nothing() {
    let (_turn, c) = Cluster::for_test("eg");
    let pg = c.workload("data/postgres").unwrap();
    let mut targets: Vec<SocketAddr> = c
        .workloads
        .iter()
        .filter(|w| w.name != pg.name)
        .flat_map(|w| w.ports.iter().map(move |p| SocketAddr::new(w.overlay, *p)))
        .collect();
    let internet: IpAddr = INTERNET.parse().unwrap();
    targets.extend(INTERNET_PORTS.iter().map(|p| SocketAddr::new(internet, *p)));
    for t in &targets {
        let peer = c.engine.peer_for(t.ip());
        assert_eq!(c.expected(pg, peer, t.port()).0, Verdict::Deny);
    }
    let results = c.probe(pg, &targets, 0, T).unwrap();
    for r in &results {
        assert!(!r.connected, "data/postgres reached {}: {r:?}", r.target);
    }
    // While payments reaches its partner range outside the overlay, and nothing else there.
    let pay = c.workload("payments/payment-api").unwrap();
    let r = c.probe(pay, &[SocketAddr::new(internet, 443), SocketAddr::new(internet, 8443)], 0, T).unwrap();
    assert!(r[0].connected && !r[1].connected, "{r:?}");
}

/// New connections from frontend (zone-a) to checkout (zone-b) every 50 ms, for `secs`.
fn stream_of_connections(c: &Cluster, secs: u64, mut at: impl FnMut(f64)) -> (usize, usize, Duration) {
    let frontend = c.workload("shop/frontend").unwrap();
    let checkout = c.workload("shop/checkout").unwrap();
    let target = SocketAddr::new(checkout.overlay, 8080);
    let start = Instant::now();
    let (mut ok, mut failed) = (0, 0);
    let mut last_ok = Instant::now();
    let mut longest = Duration::ZERO;
    while start.elapsed() < Duration::from_secs(secs) {
        at(start.elapsed().as_secs_f64());
        let r = c.probe(frontend, &[target], 0, T).unwrap().remove(0);
        if r.connected {
            ok += 1;
            longest = longest.max(last_ok.elapsed());
            last_ok = Instant::now();
        } else {
            failed += 1;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    longest = longest.max(last_ok.elapsed());
    (ok, failed, longest)
}

/// Adds a failover measurement to the JSON object in `$KEYWAY_FAILOVER_OUT`, when set: `make bench`
/// reports it (the figure is measured, not asserted: timings are the benchmarks' business).
fn record_failover(key: &str, took: Duration) {
    let Some(path) = std::env::var_os("KEYWAY_FAILOVER_OUT") else { return };
    let mut v: serde_json::Value = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_else(|| serde_json::json!({}));
    v[key] = serde_json::json!((took.as_secs_f64() * 1000.0).round() / 1000.0);
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap_or_default()).unwrap();
}

#[test]
fn gateway_replica_failover_keeps_new_connections_flowing() {
    let (_turn, mut c) = Cluster::for_test("gf");
    let mut killed_local = false;
    let mut killed_remote = false;
    let mut kill = |t: f64, c: &mut Cluster| {
        if t > 1.0 && !killed_local {
            c.kill_gateway("zone-a", "gw-1").unwrap();
            killed_local = true;
        }
        if t > 3.0 && !killed_remote {
            c.kill_gateway("zone-b", "gw-1").unwrap();
            killed_remote = true;
        }
    };
    // The closure needs the cluster mutably; run the stream by hand.
    let frontend_name = "shop/frontend";
    let start = Instant::now();
    let (mut ok, mut failed, mut longest, mut last_ok) = (0, 0, Duration::ZERO, Instant::now());
    while start.elapsed() < Duration::from_secs(6) {
        kill(start.elapsed().as_secs_f64(), &mut c);
        let src = c.workload(frontend_name).unwrap();
        let dst = c.workload("shop/checkout").unwrap();
        let r = c.probe(src, &[SocketAddr::new(dst.overlay, 8080)], 0, T).unwrap().remove(0);
        if r.connected {
            ok += 1;
            longest = longest.max(last_ok.elapsed());
            last_ok = Instant::now();
        } else {
            failed += 1;
            println!("  failed at {:.2}s: {}", start.elapsed().as_secs_f64(), r.error);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "gateway failover (zone-a/gw-1 killed at 1 s, zone-b/gw-1 at 3 s): {ok} ok, {failed} failed, longest gap {longest:?}"
    );
    record_failover("replica_gap_s", longest);
    assert!(ok >= 20, "new connections kept flowing: {ok} ok, {failed} failed");
    assert!(failed <= 3, "at most the connections in flight at each kill fail: {failed}");
    let (_, after_failed, _) = stream_of_connections(&c, 2, |_| {});
    assert_eq!(after_failed, 0, "once the replicas are gone, no new connection fails");
}

/// `(up, silent)` of peer `peer` in the `/peers` of gateway `of`.
fn peer_state(c: &Cluster, of: (&str, &str), peer: (&str, &str)) -> Option<(bool, bool)> {
    let (status, body) = c.gateway_admin(of.0, of.1, "/peers").ok()?;
    let peers: Vec<serde_json::Value> = serde_json::from_str(&body).ok().filter(|_| status == 200)?;
    let p = peers.iter().find(|p| p["zone"] == peer.0 && p["name"] == peer.1)?;
    Some((p["up"].as_bool()?, p["silent"].as_bool()?))
}

#[test]
fn a_hung_gateway_is_left_while_its_connection_is_still_open_and_taken_back_when_it_answers() {
    let (_turn, c) = Cluster::for_test("hg");
    assert_eq!(peer_state(&c, ("zone-a", "gw-1"), ("zone-b", "gw-1")), Some((true, false)));
    // Frozen: no datagram, no close, no reset; its QUIC connection stays open until the idle timeout.
    c.signal_gateway("zone-b", "gw-1", "STOP").unwrap();
    let seen = wait_until(Duration::from_secs(10), "zone-b/gw-1 silent on an open connection", || {
        peer_state(&c, ("zone-a", "gw-1"), ("zone-b", "gw-1")) == Some((true, true))
    });
    c.signal_gateway("zone-b", "gw-1", "CONT").unwrap();
    let seen = seen.unwrap();
    println!("hung gateway: silent on an open connection after {seen:?}");
    // While it was silent, new flows into zone-b went to gw-2; awake, it is taken back.
    wait_until(Duration::from_secs(10), "zone-b/gw-1 taken back", || {
        peer_state(&c, ("zone-a", "gw-1"), ("zone-b", "gw-1")) == Some((true, false))
    })
    .unwrap();
    let (_, failed, _) = stream_of_connections(&c, 1, |_| {});
    assert_eq!(failed, 0, "flows go on once the replica answers again");
}

#[test]
fn zone_failover_by_locality_and_back() {
    let (_turn, mut c) = Cluster::for_test("zf");
    let frontend = c.workload("shop/frontend").unwrap();
    let vip = SocketAddr::new("10.128.9.11".parse().unwrap(), 3550);
    let who = |c: &Cluster| -> String {
        let r = c.probe(c.workload("shop/frontend").unwrap(), &[vip], 0, T).unwrap().remove(0);
        assert!(r.connected, "service unreachable: {r:?}");
        r.banner
    };
    let _ = frontend;
    assert_eq!(who(&c), "keyway-app shop/catalog port 3550", "zone-b first in zone-a's locality order");
    c.kill_gateway("zone-b", "gw-1").unwrap();
    c.kill_gateway("zone-b", "gw-2").unwrap();
    let moved = wait_until(Duration::from_secs(15), "traffic moved to zone-c", || {
        let r = c.probe(c.workload("shop/frontend").unwrap(), &[vip], 0, T).unwrap().remove(0);
        r.connected && r.banner == "keyway-app shop/catalog-c port 3550"
    })
    .unwrap();
    println!("zone failover: traffic in zone-c {moved:?} after zone-b's gateways died");
    record_failover("zone_s", moved);
    for _ in 0..3 {
        assert_eq!(who(&c), "keyway-app shop/catalog-c port 3550");
    }
    c.start_gateway("zone-b", "gw-1").unwrap();
    c.start_gateway("zone-b", "gw-2").unwrap();
    c.wait_gateways_ready(Duration::from_secs(30)).unwrap();
    let back = wait_until(Duration::from_secs(15), "traffic back in zone-b", || {
        who(&c) == "keyway-app shop/catalog port 3550"
    })
    .unwrap();
    println!("zone failback: traffic back in zone-b {back:?} after its gateways were ready");
}

#[test]
fn policy_change_propagates_and_a_broken_edit_is_rejected() {
    let (_turn, c) = Cluster::for_test("pc");
    let cart = c.workload("shop/cart").unwrap();
    let redis = c.workload("data/redis").unwrap();
    let to_redis = SocketAddr::new(redis.overlay, 6379);
    assert!(c.probe(cart, &[to_redis], 0, T).unwrap()[0].connected);

    // Remove cart's egress rule: cart → redis becomes denied everywhere.
    let file = c.inventory.join("networkpolicies.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    let edited = text.replace("port: 6379", "port: 6380");
    assert_ne!(text, edited);
    let loaded = inventory_reloads(&c, "ok");
    std::fs::write(&file, &edited).unwrap();
    let took = wait_until(Duration::from_secs(10), "the edit enforced", || {
        !c.probe(cart, &[to_redis], 0, T).unwrap()[0].connected
    })
    .unwrap();
    println!("policy propagation: new verdict enforced {took:?} after the edit");
    // Every gateway has it (cart's sidecar spreads its flows over both of its zone's replicas).
    wait_until(Duration::from_secs(10), "every gateway loaded the edit", || {
        inventory_reloads(&c, "ok").iter().zip(&loaded).all(|(now, before)| now > before)
    })
    .unwrap();

    // A broken edit is rejected by every gateway; the verdicts stay.
    let rejected = inventory_reloads(&c, "rejected");
    std::fs::write(&file, format!("{edited}\n---\nkind: NetworkPolicy\nmetadata: {{name: broken, namespace: shop}}\nspec: {{podSelector: {{matchLabels: {{app: -x}}}}}}\n")).unwrap();
    wait_until(Duration::from_secs(10), "the broken edit looked at", || {
        inventory_reloads(&c, "rejected").iter().zip(&rejected).all(|(now, before)| now > before)
    })
    .unwrap();
    assert!(!c.probe(cart, &[to_redis], 0, T).unwrap()[0].connected, "old verdicts stay after a broken edit");
    let frontend = c.workload("shop/frontend").unwrap();
    let cartsvc = SocketAddr::new(cart.overlay, 7070);
    assert!(c.probe(frontend, &[cartsvc], 0, T).unwrap()[0].connected);
}

/// Each gateway's count of inventory reloads with `outcome` (`ok`, `rejected`), in gateway order.
fn inventory_reloads(c: &Cluster, outcome: &str) -> Vec<f64> {
    let series = format!("keyway_gateway_reloads_total{{outcome=\"{outcome}\",what=\"inventory\"}} ");
    c.gateways
        .iter()
        .map(|g| {
            let (_, m) = c.gateway_admin(&g.zone, &g.name, "/metrics").unwrap();
            m.lines().find_map(|l| l.strip_prefix(&series)).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
        })
        .collect()
}

#[test]
fn faults_loss_delay_and_a_cut_link() {
    let (_turn, c) = Cluster::for_test("ft");
    let frontend = c.workload("shop/frontend").unwrap();
    let checkout = c.workload("shop/checkout").unwrap();
    let target = SocketAddr::new(checkout.overlay, 8080);
    c.impair(20, 5.0).unwrap();
    let start = Instant::now();
    for r in c.probe(frontend, &[target, target, target], 1 << 20, Duration::from_secs(10)).unwrap() {
        assert!(r.connected && r.intact, "1 MiB across a lossy, slow overlay must arrive intact: {r:?}");
    }
    println!("faults: 3 × 1 MiB echoed intact with 20 ms delay and 5% loss in {:?}", start.elapsed());
    c.impair(0, 0.0).unwrap();

    // Cut zone-b off for 3 s: what starts then fails cleanly, within its timeout.
    c.set_zone_link("zone-b", false).unwrap();
    let start = Instant::now();
    let r = c.probe(frontend, &[target], 0, T).unwrap().remove(0);
    let took = start.elapsed();
    assert!(!r.connected, "zone-b is cut off");
    assert!(took < Duration::from_secs(12), "a failing connection ends within its timeouts: {took:?}");
    std::thread::sleep(Duration::from_secs(2));
    c.set_zone_link("zone-b", true).unwrap();
    let took = wait_until(Duration::from_secs(20), "the gateways to recover", || {
        let r = c.probe(frontend, &[target], 1 << 16, T).unwrap().remove(0);
        r.connected && r.intact
    })
    .unwrap();
    println!("faults: recovered {took:?} after the link came back, without restarting anything");
}

#[test]
fn key_rotation_keeps_open_connections_and_retires_the_old_epoch() {
    let (_turn, c) = Cluster::for_test("kr");
    let frontend = c.workload("shop/frontend").unwrap();
    let checkout = c.workload("shop/checkout").unwrap();
    let target = SocketAddr::new(checkout.overlay, 8080);
    let old_epoch = 1;

    // A connection that stays open through the rotation.
    let e2e = c.opts.e2e.clone();
    let ns = frontend.pod.ns.clone();
    let held = std::thread::spawn(move || {
        keyway_e2e::topology::ns_sh(&ns, &[e2e.to_str().unwrap(), "probe", "--hold-ms", "6000", &target.to_string()])
            .unwrap()
    });
    std::thread::sleep(Duration::from_secs(1));
    let new_epoch = c.rotate_keys("3s").unwrap();
    assert_eq!(new_epoch, old_epoch + 1);

    // New connections move to the new epoch once the sidecars refreshed their keys.
    wait_until(Duration::from_secs(15), "a token of the new epoch", || {
        assert!(c.probe(frontend, &[target], 0, T).unwrap()[0].connected);
        let log = c.access_log("zone-a", "gw-1").unwrap();
        let log2 = c.access_log("zone-a", "gw-2").unwrap();
        log.iter().chain(log2.iter()).any(|f| f["epoch"] == new_epoch)
    })
    .unwrap();
    let out = held.join().unwrap();
    let r: keyway_e2e::app::ProbeResult = serde_json::from_str(out.trim()).unwrap();
    assert!(r.connected && r.intact, "the connection opened before the rotation stays open: {r:?}");

    // After the overlap the old epoch is refused.
    std::thread::sleep(Duration::from_secs(3));
    let redis = c.workload("data/redis").unwrap();
    let cart = c.workload("shop/cart").unwrap();
    let gw = SocketAddr::new(c.gateway_ip("zone-a", "gw-1").unwrap(), DEFAULT_TUNNEL_PORT);
    let t = c.mint_token(cart, redis.overlay, 6379, Some(old_epoch)).unwrap();
    let carts = c.sidecar_mesh(cart).unwrap();
    let out = c
        .raw_connect(&cart.pod.ns, Some(&carts), gw, SocketAddr::new(redis.overlay, 6379), &[(TOKEN_HEADER, &t)])
        .unwrap();
    assert!(out.starts_with("status 403 reason token-epoch"), "{out}");
    let _ = Peer::Ip(INTERNET.parse().unwrap());
}

/// The value of the agent metric line starting with `series` in namespace `ns`.
fn agent_metric(c: &Cluster, ns: &str, series: &str) -> f64 {
    let url = format!("http://127.0.0.1:{}/metrics", keyway_e2e::cluster::AGENT_ADMIN_PORT);
    let (_, body) = keyway_e2e::topology::ns_get(ns, &c.opts.e2e, &url).unwrap();
    body.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// A laptop that changes networks (its underlay address replaced mid-flow) keeps its open flow
/// and its gateway connections: QUIC connection migration, no reconnect.
#[test]
fn a_device_that_changes_networks_keeps_its_flows_and_connections() {
    let (_turn, mut c) = Cluster::for_test("roam");
    let laptop = c.device("devices/laptop").unwrap();
    let ns = laptop.pod.ns.clone();
    let frontend = c.workload("shop/frontend").unwrap();
    let target = SocketAddr::new(frontend.overlay, 8080);
    let connects = agent_metric(&c, &ns, "keyway_agent_gateway_connects_total");
    assert_eq!(connects, 2.0, "the laptop's agent holds one connection per gateway of its zone");
    // A flow held open for 8 s, a line echoed every 200 ms.
    let e2e = c.opts.e2e.display().to_string();
    let (ns2, t) = (ns.clone(), target.to_string());
    let held = std::thread::spawn(move || {
        keyway_e2e::topology::ns_sh(&ns2, &[&e2e, "probe", "--hold-ms", "8000", "--timeout-ms", "3000", &t])
    });
    wait_until(Duration::from_secs(10), "the held flow open", || {
        agent_metric(&c, &ns, "keyway_agent_tcp_flows_total{direction=\"outbound\",result=\"opened\"}") >= 1.0
    })
    .unwrap();
    c.roam_device("devices/laptop", 7).unwrap();
    let out = held.join().unwrap().unwrap();
    let r: keyway_e2e::app::ProbeResult = serde_json::from_str(out.trim()).unwrap();
    assert!(r.connected && r.intact && r.error.is_empty(), "the held flow survived the move: {r:?}");
    // New flows from the new address, TCP and UDP, and still the same two connections.
    let tcp = c.probe_in(&ns, &[target], 0, T).unwrap();
    assert!(tcp[0].connected, "TCP after the move: {:?}", tcp[0]);
    let udp = c.udp_in(&ns, &[target], T).unwrap();
    assert!(udp[0].reply.contains("keyway-app shop/frontend udp port 8080"), "UDP after the move: {:?}", udp[0]);
    assert_eq!(agent_metric(&c, &ns, "keyway_agent_gateway_connects_total"), 2.0, "no reconnect: migrated");
    assert_eq!(c.device("devices/laptop").unwrap().pod.ip, "10.63.1.7");
}
