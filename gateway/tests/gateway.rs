//! Gateways of several zones in-process on loopback (the in-process bed of `keyway-e2e`), with
//! real QUIC and TLS, a test CA, real epoch secrets and tokens, and fake sidecars that verify
//! tickets with the filter's own code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use keyway_e2e::gateway::ZoneLayout;
use keyway_e2e::loopback::*;
use keyway_e2e::mesh::Speak;
use keyway_gateway::secrets::EpochSecrets;
use keyway_policy::keyservice::KeyBundle;

const POLICIES: &str = r#"
kind: NetworkPolicy
metadata: {name: api-ingress, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: 8080}]}]
---
kind: NetworkPolicy
metadata: {name: db-ingress, namespace: data}
spec:
  podSelector: {}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: shop}}, podSelector: {matchLabels: {app: api}}}]
    ports: [{port: 5432}]
"#;

/// The test application; `k` keeps each test's loopback addresses apart.
fn app(k: u8) -> Vec<W> {
    let sc = |z: u8, n: u8| format!("127.{k}.{z}.{n}");
    vec![
        w("shop", "web", "web", "zone-a", "10.200.1.1", &sc(1, 1)),
        w("shop", "cache", "cache", "zone-a", "10.200.1.2", &sc(1, 2)),
        w("shop", "api", "api", "zone-b", "10.200.2.1", &sc(2, 1)),
        w("data", "db", "db", "zone-b", "10.200.2.2", &sc(2, 2)),
        w("shop", "api-c", "api", "zone-c", "10.200.3.1", &sc(3, 1)),
    ]
}

const ZONES: &[ZoneLayout<'static>] = &[
    ZoneLayout { name: "zone-a", gateways: &["a1", "a2"], failover: &["zone-b", "zone-c"] },
    ZoneLayout { name: "zone-b", gateways: &["b1", "b2"], failover: &["zone-c"] },
    ZoneLayout { name: "zone-c", gateways: &["c1"], failover: &["zone-b"] },
];

fn dst(w: &W, port: u16) -> SocketAddr {
    SocketAddr::new(w.overlay, port)
}

fn payload(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn allowed_flows_carry_bytes_intact_and_identity_survives() {
    let o = Overlay::start("allowed", ZONES, app(11), POLICIES).await;
    let (web, api, cache) = (o.workload("web").clone(), o.workload("api").clone(), o.workload("cache").clone());
    let a1 = o.gw("zone-a", "a1").tunnel_addr;

    // Cross-zone: two PEPs and the QUIC overlay; 4 MiB both ways with half-close.
    let data = payload(4 * 1024 * 1024 + 17);
    let t = o.token(&web, api.overlay, 8080, None, now_ms());
    let io = o.connect(a1, &web, dst(&api, 8080), Some(&t)).await.open();
    assert!(echo(io, &data).await == data, "cross-zone bytes differ");
    assert_eq!(
        o.sidecar("api").accepted.lock().unwrap().as_slice(),
        [web.identity()],
        "source identity survives every hop"
    );

    // Same zone: one PEP, local delivery.
    let t = o.token(&web, cache.overlay, 8080, None, now_ms());
    let io = o.connect(a1, &web, dst(&cache, 8080), Some(&t)).await.open();
    assert_eq!(echo(io, b"hello cache").await, b"hello cache");

    // Outside the overlay (web has no egress policy): straight out from the gateway.
    let ext = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ext_addr = ext.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = ext.accept().await.unwrap();
        let (mut r, mut w) = s.split();
        tokio::io::copy(&mut r, &mut w).await.unwrap();
    });
    let t = o.token(&web, ext_addr.ip(), ext_addr.port(), None, now_ms());
    let io = o.connect(a1, &web, ext_addr, Some(&t)).await.open();
    assert_eq!(echo(io, b"to the internet").await, b"to the internet");

    // The access-log drop guard counted them.
    let admin = o.gw("zone-a", "a1").admin_addr;
    let allowed = || async move { metric(admin, "keyway_gateway_flows_total", "verdict=\"allow\"").await };
    wait_until_async(Duration::from_secs(5), "the allowed flows counted", || async { allowed().await >= 3.0 })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_are_verified_and_denials_name_the_reason_or_rule() {
    let o = Overlay::start("tokens", ZONES, app(12), POLICIES).await;
    let (web, api, cache, db) =
        (o.workload("web").clone(), o.workload("api").clone(), o.workload("cache").clone(), o.workload("db").clone());
    let a1 = o.gw("zone-a", "a1").tunnel_addr;
    let to_api = dst(&api, 8080);
    let good = || o.token(&web, api.overlay, 8080, None, now_ms());

    let cases: Vec<(&str, Option<String>, IpAddr, &str)> = vec![
        ("missing", None, web.sidecar, "token-missing"),
        ("not base64", Some("!!!not-a-token!!!".into()), web.sidecar, "token-malformed"),
        ("forged MAC", Some(forge(&good())), web.sidecar, "token-mac"),
        ("expired", Some(o.token(&web, api.overlay, 8080, None, now_ms() - 120_000)), web.sidecar, "token-expired"),
        (
            "from the future",
            Some(o.token(&web, api.overlay, 8080, None, now_ms() + 120_000)),
            web.sidecar,
            "token-future",
        ),
        (
            "other destination",
            Some(o.token(&web, api.overlay, 9090, None, now_ms())),
            web.sidecar,
            "token-wrong-destination",
        ),
        ("used from another address", Some(good()), cache.sidecar, "token-source-address"),
        (
            // Another zone's leaked secrets impersonate none of this zone's workloads.
            "sealed with zone-b's secrets",
            Some(
                keyway_e2e::credentials::token(
                    &o.secrets("zone-b"),
                    &web.identity(),
                    web.overlay,
                    to_api,
                    None,
                    now_ms(),
                )
                .unwrap(),
            ),
            web.sidecar,
            "token-mac",
        ),
        (
            "unknown identity",
            Some(o.token(
                &w("shop", "ghost", "x", "zone-a", "10.200.9.9", "127.12.9.9"),
                api.overlay,
                8080,
                None,
                now_ms(),
            )),
            web.sidecar,
            "token-unknown-source",
        ),
    ];
    // Each with web's own mesh certificate: the address is the second factor.
    for (what, token, from, want) in cases {
        let how = Speak::As(o.mesh_of("web"));
        let (status, reason, _) = connect_speaking(a1, from, how, to_api, token.as_deref()).await.refused();
        assert_eq!((status, reason.as_str()), (403, want), "{what}");
    }
    // Web's token presented by cache, from cache's address with cache's certificate: the
    // certificate says who asks.
    let (status, reason, _) = o.connect(a1, &cache, to_api, Some(&good())).await.refused();
    assert_eq!((status, reason.as_str()), (403, "token-peer-identity"), "another workload's token");

    // Replayed: the first use passes, the second is refused.
    let t = good();
    let io = o.connect(a1, &web, to_api, Some(&t)).await.open();
    assert_eq!(echo(io, b"once").await, b"once");
    let (status, reason, _) = o.connect(a1, &web, to_api, Some(&t)).await.refused();
    assert_eq!((status, reason.as_str()), (403, "token-replay"));

    // Policy denials name the deciding rule.
    let t = o.token(&web, db.overlay, 5432, None, now_ms());
    let (status, reason, rule) = o.connect(a1, &web, dst(&db, 5432), Some(&t)).await.refused();
    assert_eq!((status, reason.as_str()), (403, "policy-denied"));
    assert!(rule.contains("data/db-ingress") && rule.contains("Deny"), "{rule}");
    let t = o.token(&web, api.overlay, 9999, None, now_ms());
    let (_, reason, rule) = o.connect(a1, &web, dst(&api, 9999), Some(&t)).await.refused();
    assert_eq!(reason, "policy-denied");
    assert!(rule.contains("shop/api-ingress"), "{rule}");

    let admin = o.gw("zone-a", "a1").admin_addr;
    assert!(metric(admin, "keyway_gateway_token_failures_total", "reason=\"token-mac\"").await >= 1.0);
    assert!(metric(admin, "keyway_gateway_flows_total", "reason=\"policy-denied\"").await >= 2.0);
}

/// Flips a bit of the MAC (the last characters of the base64url text).
fn forge(token: &str) -> String {
    let mut b = token.as_bytes().to_vec();
    let i = b.len() - 2;
    b[i] = if b[i] == b'A' { b'B' } else { b'A' };
    String::from_utf8(b).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_endpoints_and_key_service() {
    let o = Overlay::start("admin", ZONES, app(13), POLICIES).await;
    let a1 = o.gw("zone-a", "a1").admin_addr;
    assert_eq!(http_get(a1, "/healthz").await.0, 200);
    assert_eq!(http_get(a1, "/readyz").await.0, 200);
    let (s, m) = http_get(a1, "/metrics").await;
    assert_eq!(s, 200);
    assert!(m.contains("keyway_gateway_peers_up{zone=\"zone-b\"} 2"), "{m}");
    let (_, dump) = http_get(a1, "/config_dump").await;
    let secrets = EpochSecrets::load(&o.secrets("zone-a")).unwrap();
    let secret = secrets.current(now_ms()).unwrap().secret.to_base64url();
    assert!(dump.contains("[redacted]") && !dump.contains(&secret), "config dump must not show secrets");
    assert!(dump.contains("\"workloads\": 5"), "{dump}");
    let (_, peers) = http_get(a1, "/peers").await;
    let peers: serde_json::Value = serde_json::from_str(&peers).unwrap();
    assert_eq!(peers.as_array().unwrap().len(), 3);

    // Keys (on the tunnel port, over mutual TLS): only to the workload's own certificate and
    // addresses, only for this zone.
    let (status, _) = http_get(a1, &format!("/v1/keys?ip={}", o.workload("web").overlay)).await;
    assert_eq!(status, 404, "no key service on the admin port");
    let a1 = o.gw("zone-a", "a1").tunnel_addr;
    let web = o.workload("web").clone();
    let (status, body) = o.keys(a1, &web, web.overlay).await;
    assert_eq!(status, 200, "{body}");
    let bundle: KeyBundle = serde_json::from_str(&body).unwrap();
    assert_eq!(bundle.identity, web.identity());
    let (epoch, key) = bundle.signing_key(now_ms()).unwrap();
    let want = secrets.current(now_ms()).unwrap().secret.workload_key(&web.identity(), web.overlay, epoch).unwrap();
    assert_eq!(key, want);
    // Every refusal is the same answer (probing tells nothing about the inventory).
    let cache = o.workload("cache").clone();
    let refused = o.keys(a1, &cache, web.overlay).await;
    assert_eq!(refused.0, 403, "another workload's: {}", refused.1);
    assert!(refused.1.starts_with("keys refused"), "{}", refused.1);
    let as_web = Speak::As(o.mesh_of("web"));
    let from_cache = keys_speaking(a1, Some(cache.sidecar), as_web, web.overlay).await.unwrap();
    assert_eq!(from_cache, refused, "web's certificate from another workload's address");
    let api = o.workload("api").clone();
    assert_eq!(o.keys(a1, &api, api.overlay).await, refused, "another zone's");
    assert_eq!(
        keys_speaking(a1, Some(web.sidecar), as_web, "10.9.9.9".parse().unwrap()).await.unwrap(),
        refused,
        "no workload's address"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_replica_is_taken_out_and_new_flows_use_the_other() {
    let mut o = Overlay::start("failover", ZONES, app(14), POLICIES).await;
    let (web, api) = (o.workload("web").clone(), o.workload("api").clone());
    let a1 = o.gw("zone-a", "a1").tunnel_addr;
    let b1 = o.gateways.remove(&("zone-b".to_string(), "b1".to_string())).unwrap();
    b1.kill().await;
    let start = tokio::time::Instant::now();
    let mut longest_gap = Duration::ZERO;
    let mut last_ok = tokio::time::Instant::now();
    for i in 0..40 {
        let t = o.token(&web, api.overlay, 8080, None, now_ms());
        match o.connect(a1, &web, dst(&api, 8080), Some(&t)).await {
            Connect::Open(io) => {
                let msg = format!("flow {i}");
                assert_eq!(echo(io, msg.as_bytes()).await, msg.as_bytes());
                longest_gap = longest_gap.max(last_ok.elapsed());
                last_ok = tokio::time::Instant::now();
            }
            Connect::Refused { status, reason, .. } => {
                panic!("flow {i} refused after a replica died: {status} {reason}")
            }
        }
    }
    println!("replica failover: 40 new flows in {:?}, longest gap {longest_gap:?}", start.elapsed());
    let admin = o.gw("zone-a", "a1").admin_addr;
    wait_until_async(Duration::from_secs(5), "b1 taken out", || async move { peers_up(admin, "zone-b").await == 1 })
        .await
        .unwrap();
    assert_eq!(metric(admin, "keyway_gateway_peers_up", "zone=\"zone-b\"").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broken_policy_edit_is_rejected_and_a_good_one_applies() {
    let o = Overlay::start("reload", ZONES, app(15), POLICIES).await;
    let (web, api, db) = (o.workload("web").clone(), o.workload("api").clone(), o.workload("db").clone());
    let a1 = o.gw("zone-a", "a1");
    let try_db = || async {
        let t = o.token(&web, db.overlay, 5432, None, now_ms());
        matches!(o.connect(a1.tunnel_addr, &web, dst(&db, 5432), Some(&t)).await, Connect::Open(_))
    };
    assert!(!try_db().await);

    std::fs::write(
        o.inventory.join("broken.yaml"),
        "kind: NetworkPolicy\nmetadata: {name: x}\nspec: {podSelector: {matchLabels: {app: -bad}}}\n",
    )
    .unwrap();
    let admin = a1.admin_addr;
    wait_until_async(Duration::from_secs(10), "the broken edit looked at", || async move {
        metric(admin, "keyway_gateway_reloads_total", "outcome=\"rejected\"").await >= 1.0
    })
    .await
    .unwrap();
    assert!(!try_db().await, "old verdicts stay after a broken edit");
    let t = o.token(&web, api.overlay, 8080, None, now_ms());
    assert!(matches!(o.connect(a1.tunnel_addr, &web, dst(&api, 8080), Some(&t)).await, Connect::Open(_)));

    // A good edit: allow web to db. Every gateway on the path must apply it.
    std::fs::remove_file(o.inventory.join("broken.yaml")).unwrap();
    let allow = "kind: NetworkPolicy\nmetadata: {name: db-from-web, namespace: data}\nspec:\n  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}]}]\n";
    std::fs::write(o.inventory.join("allow.yaml"), allow).unwrap();
    let took = wait_until_async(Duration::from_secs(10), "the new policy enforced", try_db).await.unwrap();
    println!("policy propagation: {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_rotation_keeps_open_flows_and_retires_the_old_epoch() {
    let o = Overlay::start("rotation", ZONES, app(16), POLICIES).await;
    let (web, api) = (o.workload("web").clone(), o.workload("api").clone());
    let a1 = o.gw("zone-a", "a1");
    let t = o.token(&web, api.overlay, 8080, None, now_ms());
    let mut open = o.connect(a1.tunnel_addr, &web, dst(&api, 8080), Some(&t)).await.open();
    roundtrip(&mut open, b"before rotation").await;
    let old_epoch = EpochSecrets::load(&o.secrets("zone-a")).unwrap().current(now_ms()).unwrap().epoch;

    // Every zone rotates its own secrets (web's tokens are zone-a's, api's tickets zone-b's).
    let mut rotated = BTreeMap::new();
    for z in ZONES {
        let mut s = EpochSecrets::load(&o.secrets(z.name)).unwrap();
        let new_epoch = s.rotate(now_ms(), 3_000).unwrap();
        s.save(&o.secrets(z.name)).unwrap();
        rotated.insert(z.name, (new_epoch, s));
    }
    let (new_epoch, s) = rotated.remove("zone-a").unwrap();
    for h in o.gateways.values() {
        let admin = h.admin_addr;
        wait_until_async(Duration::from_secs(10), "the secrets reloaded", || async move {
            metric(admin, "keyway_gateway_reloads_total", "what=\"secrets\",outcome=\"ok\"").await >= 1.0
        })
        .await
        .unwrap();
    }
    roundtrip(&mut open, b"after rotation, same flow").await;
    let t = o.token(&web, api.overlay, 8080, Some(new_epoch), now_ms());
    let io = o.connect(a1.tunnel_addr, &web, dst(&api, 8080), Some(&t)).await.open();
    assert_eq!(echo(io, b"new epoch").await, b"new epoch");
    let t = o.token(&web, api.overlay, 8080, Some(old_epoch), now_ms());
    let io = o.connect(a1.tunnel_addr, &web, dst(&api, 8080), Some(&t)).await.open();
    assert_eq!(echo(io, b"old epoch in the overlap").await, b"old epoch in the overlap");

    // After the overlap the old epoch is retired.
    let old = s.valid_at(now_ms()).into_iter().find(|e| e.epoch == old_epoch).unwrap().secret.clone();
    // The gateways' clock moves past the overlap (no sleeping: the clock is injected).
    o.clock.advance(3_200);
    let key = old.workload_key(&web.identity(), web.overlay, old_epoch).unwrap();
    let t = keyway_policy::auth::TokenClaims {
        epoch: old_epoch,
        src: web.overlay,
        dst: api.overlay,
        dst_port: 8080,
        protocol: keyway_policy::Protocol::Tcp,
        issued_at_ms: now_ms(),
        nonce: [9; 12],
    }
    .seal(&key);
    let (status, reason, _) = o.connect(a1.tunnel_addr, &web, dst(&api, 8080), Some(&t)).await.refused();
    assert_eq!((status, reason.as_str()), (403, "token-epoch"));
    roundtrip(&mut open, b"the old flow is still open").await;
}

async fn roundtrip(io: &mut hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>, msg: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    io.write_all(msg).await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), io.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(buf, msg);
}

const SERVICE: &str = r#"
---
apiVersion: v1
kind: Service
metadata:
  name: api
  namespace: shop
  annotations: {keyway.io/overlay-ips: "10.200.9.1"}
spec:
  selector: {app: api}
  ports: [{port: 8080}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_zone_down_fails_over_by_locality_and_comes_back() {
    let mut o = Overlay::start("zonefail", ZONES, app(17), &format!("{POLICIES}{SERVICE}")).await;
    let web = o.workload("web").clone();
    let vip: IpAddr = "10.200.9.1".parse().unwrap();
    let a1 = o.gw("zone-a", "a1").tunnel_addr;
    let accepted = |o: &Overlay, name: &str| o.sidecar(name).accepted.lock().unwrap().len();
    async fn flow(o: &Overlay, web: &W, vip: IpAddr, a1: SocketAddr) -> Connect {
        let t = o.token(web, vip, 8080, None, now_ms());
        o.connect(a1, web, SocketAddr::new(vip, 8080), Some(&t)).await
    }

    // zone-a has no endpoint: zone-b comes first in zone-a's locality order.
    for _ in 0..3 {
        assert_eq!(echo(flow(&o, &web, vip, a1).await.open(), b"b").await, b"b");
    }
    assert_eq!((accepted(&o, "api"), accepted(&o, "api-c")), (3, 0));

    // Every gateway of zone-b goes away: the service fails over to zone-c.
    let b1 = o.gateways.remove(&("zone-b".into(), "b1".into())).unwrap();
    let b2 = o.gateways.remove(&("zone-b".into(), "b2".into())).unwrap();
    b1.kill().await;
    b2.kill().await;
    let a1_admin = o.gw("zone-a", "a1").admin_addr;
    let zone_b_up = || async move { peers_up(a1_admin, "zone-b").await > 0 };
    let took = wait_until_async(Duration::from_secs(10), "zone-b down", || async { !zone_b_up().await }).await.unwrap();
    for _ in 0..3 {
        assert_eq!(echo(flow(&o, &web, vip, a1).await.open(), b"c").await, b"c");
    }
    println!("zone failover: zone-b seen down after {took:?}");
    assert_eq!((accepted(&o, "api"), accepted(&o, "api-c")), (3, 3));

    // zone-b returns: traffic comes back to it.
    for name in ["b1", "b2"] {
        let cfg = o.configs[&("zone-b".to_string(), name.to_string())].clone();
        let port = cfg.listen.overlay;
        // In-process only: a dead process frees its socket at once, but quinn keeps a closed
        // endpoint's socket until its connections have drained.
        let took = wait_until_async(Duration::from_secs(30), "the overlay port released", || async move {
            std::net::UdpSocket::bind(port).is_ok()
        })
        .await
        .unwrap();
        println!("port {port} free after {took:?}");
        let source = keyway_gateway::source::FileSource::new(&cfg);
        let h = keyway_gateway::app::build_from(cfg, source, o.clock.clone()).await.unwrap();
        o.gateways.insert(("zone-b".into(), name.into()), h);
    }
    wait_until_async(Duration::from_secs(15), "zone-b back", zone_b_up).await.unwrap();
    assert_eq!(echo(flow(&o, &web, vip, a1).await.open(), b"back").await, b"back");
    assert_eq!((accepted(&o, "api"), accepted(&o, "api-c")), (4, 3));
}

/// A zone whose replicas are not listed (a Deployment behind one load-balanced address, its
/// `entry`), each replica with a certificate of its own and no name in its configuration: the
/// other zones reach it through the entry and take any gateway certificate of that zone; each
/// replica takes its name from its certificate and dials out as itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_zone_behind_one_entry_with_a_certificate_per_replica() {
    let o = Overlay::start_with("entry", ZONES, app(18), POLICIES, |c| {
        let Some(b) = c.zones.iter_mut().find(|z| z.name == "zone-b") else { return };
        // b1's address stands for the load balancer.
        b.entry = b.gateways.first().map(|g| g.address);
        b.gateways.clear();
        if c.zone == "zone-b" {
            c.name.clear();
        }
    })
    .await;
    let (web, api) = (o.workload("web").clone(), o.workload("api").clone());
    assert_eq!(o.gw("zone-b", "b2").proxy.config.name, "b2", "the name comes from the certificate");
    let a1 = o.gw("zone-a", "a1");
    let t = o.token(&web, api.overlay, 8080, None, now_ms());
    let io = o.connect(a1.tunnel_addr, &web, dst(&api, 8080), Some(&t)).await.open();
    assert_eq!(echo(io, b"through the entry").await, b"through the entry");
    let (_, peers) = http_get(a1.admin_addr, "/peers").await;
    let peers: serde_json::Value = serde_json::from_str(&peers).unwrap();
    let zone_b: Vec<&serde_json::Value> = peers.as_array().unwrap().iter().filter(|p| p["zone"] == "zone-b").collect();
    assert_eq!(zone_b.len(), 1, "one peer for the entry: {peers}");
    assert_eq!((zone_b[0]["up"].as_bool(), zone_b[0]["name"].as_str()), (Some(true), Some("b1")), "{peers}");
    // b2, behind the same entry, still reaches zone-a as itself (a1 takes any zone-b certificate).
    let b2_admin = o.gw("zone-b", "b2").admin_addr;
    assert_eq!(peers_up(b2_admin, "zone-a").await, 2);
}

/// A renewed overlay certificate (new key, same gateway) is taken without a restart: new
/// handshakes get it; a certificate of another gateway put in its place is rejected and the
/// running one stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_renewed_overlay_certificate_is_taken_without_a_restart() {
    use keyway_gateway::tls::{GatewayIdentity, TlsMaterial, peer_chain, quic_client_config, server_name};
    let o = Overlay::start("renew", ZONES, app(19), POLICIES).await;
    let a1 = &o.configs[&("zone-a".to_string(), "a1".to_string())];
    let admin = o.gw("zone-a", "a1").admin_addr;
    let presented = || async {
        let b1 = &o.configs[&("zone-b".to_string(), "b1".to_string())];
        let tls = TlsMaterial::load(&b1.tls.ca, &b1.tls.cert, &b1.tls.key).unwrap();
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(quic_client_config(&tls).unwrap());
        let id = GatewayIdentity { trust_domain: TD.into(), zone: "zone-a".into(), name: "a1".into() };
        let conn = endpoint.connect(o.gw("zone-a", "a1").overlay_addr, &server_name(&id)).unwrap().await.unwrap();
        peer_chain(&conn).first().unwrap().as_ref().to_vec()
    };
    let before = presented().await;
    let ca = keyway_gateway::ca::Ca::load(&o.files.ca).unwrap();
    let renewed = ca.issue("zone-a", "a1", 1, std::time::SystemTime::now()).unwrap();
    std::fs::write(&a1.tls.key, renewed.key_pem()).unwrap();
    std::fs::write(&a1.tls.cert, &renewed.cert_pem).unwrap();
    let reloaded =
        || async { metric(admin, "keyway_gateway_reloads_total", "what=\"overlay-tls\",outcome=\"ok\"").await };
    wait_until_async(Duration::from_secs(10), "the renewed certificate", || async { reloaded().await >= 1.0 })
        .await
        .unwrap();
    let after = presented().await;
    assert_ne!(before, after, "new handshakes get the renewed certificate");
    assert!(peers_up(admin, "zone-b").await == 2, "peers still up");
    // Another gateway's certificate in its place: rejected, the renewed one stays.
    let other = ca.issue("zone-a", "a2", 1, std::time::SystemTime::now()).unwrap();
    std::fs::write(&a1.tls.key, other.key_pem()).unwrap();
    std::fs::write(&a1.tls.cert, &other.cert_pem).unwrap();
    let rejected =
        || async { metric(admin, "keyway_gateway_reloads_total", "what=\"overlay-tls\",outcome=\"rejected\"").await };
    wait_until_async(Duration::from_secs(10), "the rejection", || async { rejected().await >= 1.0 }).await.unwrap();
    assert_eq!(presented().await, after, "the running certificate stays");
}

/// A gateway whose mesh certificate files are not there yet when it starts (istio-agent writes
/// them once istiod signed) waits for them instead of exiting, and then serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_gateway_waits_for_its_mesh_certificate_files() {
    let late = Scratch::new("late-mesh").unwrap();
    let dir = late.0.clone();
    let o = Overlay::start_with("latemesh", ZONES, app(20), POLICIES, move |c| {
        if c.zone != "zone-c" {
            return;
        }
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let (from_cert, from_key) = (c.mesh.cert.clone(), c.mesh.key.clone());
        (c.mesh.cert, c.mesh.key) = (cert.clone(), key.clone());
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1500));
            std::fs::copy(from_key, key).unwrap();
            std::fs::copy(from_cert, cert).unwrap();
        });
    })
    .await;
    let (web, api_c) = (o.workload("web").clone(), o.workload("api-c").clone());
    let c1 = o.gw("zone-c", "c1").tunnel_addr;
    let t = o.token(&api_c, web.overlay, 8080, None, now_ms());
    // Over c1's (late) mesh TLS: the token verified, the flow carried to web.
    let io = o.connect(c1, &api_c, dst(&web, 8080), Some(&t)).await.open();
    assert_eq!(echo(io, b"late").await, b"late");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_peer_connection_sends_flows_to_the_other_replica_then_refuses_them() {
    // Two flows per peer connection; zone-b has two replicas, so a1 carries four into zone-b (all
    // from web: its share of a connection is the whole of it here).
    let o = Overlay::start_with("peerfull", ZONES, app(21), POLICIES, |c| {
        c.limits.max_flows_per_peer = 2;
        c.limits.max_flows_per_peer_per_source = Some(2);
    })
    .await;
    let (web, api) = (o.workload("web").clone(), o.workload("api").clone());
    let a1 = o.gw("zone-a", "a1").tunnel_addr;
    let mut open = Vec::new();
    for _ in 0..4 {
        let t = o.token(&web, api.overlay, 8080, None, now_ms());
        let mut io = o.connect(a1, &web, dst(&api, 8080), Some(&t)).await.open();
        roundtrip(&mut io, b"held").await;
        open.push(io);
    }
    let t = o.token(&web, api.overlay, 8080, None, now_ms());
    let (status, reason, _) = o.connect(a1, &web, dst(&api, 8080), Some(&t)).await.refused();
    assert_eq!((status, reason.as_str()), (503, "max-flows-per-peer"));
    // Nothing was taken down: the open flows still carry bytes, and one ending makes room.
    for io in &mut open {
        roundtrip(io, b"still here").await;
    }
    drop(open.pop());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let t = o.token(&web, api.overlay, 8080, None, now_ms());
        match o.connect(a1, &web, dst(&api, 8080), Some(&t)).await {
            keyway_e2e::loopback::Connect::Open(_) => break,
            refused => {
                assert!(tokio::time::Instant::now() < deadline, "no room after a flow ended: {:?}", refused.refused());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    let refused =
        metric(o.gw("zone-a", "a1").admin_addr, "keyway_gateway_limit_refusals_total", "limit=\"max_flows_per_peer\"")
            .await;
    assert!(refused >= 1.0, "counted: {refused}");
}
