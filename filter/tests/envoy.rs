//! The keyway filter loaded into the real Envoy (1.40, V8), with real connections.
//!
//! These tests need Envoy (`$KEYWAY_ENVOY` or `scripts/install-envoy.sh`) and the built module
//! (`make wasm`); they fail, never skip, without them. `make test` provides both.

// A test harness: a failed expectation is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "envoy/harness.rs"]
mod harness;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use harness::*;
use keyway_policy::Protocol;
use keyway_policy::auth::{EpochSecret, TicketClaims, WorkloadKey, decode_token};
use keyway_policy::keyservice::{EpochKey, KeyBundle};
use keyway_policy::wire::{KEY_SERVICE_IP_PARAM, KEY_SERVICE_PATH, TOKEN_HEADER};

const OUTBOUND: &str = include_str!("envoy/outbound.yaml");
const INBOUND: &str = include_str!("envoy/inbound.yaml");

const SECRET: EpochSecret = EpochSecret::from_bytes([42; 32]);
const CART: &str = "spiffe://cluster.local/ns/shop/sa/cart";
const CART_IP: &str = "10.128.1.11";
const REDIS: &str = "spiffe://cluster.local/ns/data/sa/redis";
const REDIS_IP: &str = "10.128.2.20";
const ZONE: &str = "zone-a";
const WINDOW_MS: u64 = 30_000;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A key bundle for `identity` at `overlay_ip`, listing `epochs` with their `not_after_ms`.
fn bundle(identity: &str, overlay_ip: &str, epochs: &[(u32, Option<u64>)], refresh_ms: u64) -> KeyBundle {
    let wk = |e: u32| SECRET.workload_key(identity, ip(overlay_ip), e).unwrap().to_base64url();
    let tk = |e: u32| SECRET.ticket_key(identity, ip(overlay_ip), e).unwrap().to_base64url();
    KeyBundle {
        identity: identity.into(),
        overlay_ip: ip(overlay_ip),
        zone: ZONE.into(),
        workload_keys: epochs
            .iter()
            .map(|&(epoch, n)| EpochKey { epoch, key: wk(epoch), not_after_ms: n, not_before_ms: None })
            .collect(),
        ticket_keys: epochs
            .iter()
            .map(|&(epoch, n)| EpochKey { epoch, key: tk(epoch), not_after_ms: n, not_before_ms: None })
            .collect(),
        refresh_ms,
    }
}

fn json(v: &impl serde::Serialize) -> String {
    serde_json::to_string(v).unwrap()
}

/// The plugin configuration with static keys.
fn static_config(mode: &str, b: &KeyBundle) -> String {
    format!(r#"{{"mode":"{mode}","keys":{}}}"#, json(b))
}

/// The plugin configuration with the key service (identity from node metadata unless given).
fn service_config(mode: &str, overlay_ip: Option<&str>) -> String {
    let ip = overlay_ip.map(|i| format!(r#""overlay_ip":"{i}","#)).unwrap_or_default();
    format!(
        r#"{{"mode":"{mode}",{ip}"key_service":{{"cluster":"keyway_keyservice","timeout_ms":1000,"retry_ms":100,"grace_ms":60000}}}}"#
    )
}

/// A ticket from cart to `dst`; `nonce` makes its nonce (distinct numbers, distinct nonces).
fn ticket(epoch: u32, dst: &str, port: u16, issued_at_ms: u64, nonce: u64, key_epoch: u32) -> String {
    let n = nonce.to_le_bytes();
    TicketClaims {
        epoch,
        src: ip(CART_IP),
        dst: ip(dst),
        dst_port: port,
        protocol: Protocol::Tcp,
        issued_at_ms,
        nonce: std::array::from_fn(|i| n.get(i).copied().unwrap_or(0)),
        src_identity: CART.into(),
    }
    // Sealed with the receiving workload's own ticket key (redis is the inbound side throughout).
    .seal(&SECRET.ticket_key(REDIS, ip(REDIS_IP), key_epoch).unwrap())
    .unwrap()
}

struct Outbound {
    vars: BTreeMap<&'static str, String>,
}

impl Outbound {
    fn new(gateway: u16, keyservice: u16, static_cfg: String, ks_cfg: String, nokey_cfg: String) -> Outbound {
        let mut vars = BTreeMap::new();
        vars.insert("WASM", wasm_module().display().to_string());
        vars.insert("OVERLAY_IP", CART_IP.to_owned());
        vars.insert("ADMIN_PORT", free_port().to_string());
        vars.insert("OUT_STATIC_PORT", free_port().to_string());
        vars.insert("OUT_KS_PORT", free_port().to_string());
        vars.insert("OUT_NOKEY_PORT", free_port().to_string());
        vars.insert("GATEWAY_PORT", gateway.to_string());
        vars.insert("KEYSERVICE_PORT", keyservice.to_string());
        vars.insert("OUT_STATIC_CONFIG", static_cfg);
        vars.insert("OUT_KS_CONFIG", ks_cfg);
        vars.insert("OUT_NOKEY_CONFIG", nokey_cfg);
        Outbound { vars }
    }

    fn port(&self, name: &str) -> u16 {
        self.vars[name].parse().unwrap()
    }

    fn yaml(&self) -> String {
        render(OUTBOUND, &self.vars)
    }

    fn start(&self) -> Result<Envoy> {
        Envoy::start(&self.yaml(), self.port("ADMIN_PORT"), "outbound")
    }
}

struct Inbound {
    vars: BTreeMap<&'static str, String>,
}

impl Inbound {
    fn new(app: u16, keyservice: u16, tunnel_cfg: String, plain_cfg: String) -> Inbound {
        let mut vars = BTreeMap::new();
        vars.insert("WASM", wasm_module().display().to_string());
        vars.insert("ADMIN_PORT", free_port().to_string());
        vars.insert("TUNNEL_PORT", free_port().to_string());
        vars.insert("PLAIN_PORT", free_port().to_string());
        vars.insert("EXEMPT_PORT", free_port().to_string());
        vars.insert("APP_PORT", app.to_string());
        vars.insert("KEYSERVICE_PORT", keyservice.to_string());
        vars.insert("TUNNEL_CONFIG", tunnel_cfg);
        vars.insert("PLAIN_CONFIG", plain_cfg);
        Inbound { vars }
    }

    fn port(&self, name: &str) -> u16 {
        self.vars[name].parse().unwrap()
    }

    fn yaml(&self) -> String {
        render(INBOUND, &self.vars)
    }

    fn start(&self) -> Result<Envoy> {
        Envoy::start(&self.yaml(), self.port("ADMIN_PORT"), "inbound")
    }
}

fn plain_config(exempt_port: u16) -> String {
    format!(r#"{{"mode":"inbound_plain","exempt_ports":[{exempt_port},15021],"exempt_cidrs":["127.0.0.2/32"]}}"#)
}

const CONN: &str = "keyway_filter_connections_total";

fn conn_stat(direction: &str, verdict: &str) -> String {
    format!("{CONN}_direction=.={direction};.;verdict=.={verdict};.;")
}

fn denial_stat(reason: &str) -> String {
    format!("keyway_filter_denials_total_reason=.={reason};.;")
}

fn refresh_stat(outcome: &str) -> String {
    format!("keyway_filter_key_refreshes_total_outcome=.={outcome};.;")
}

/// Finds a stat whose name ends with `suffix` (Envoy prefixes wasm metrics).
fn stat(envoy: &Envoy, suffix: &str) -> u64 {
    envoy.stats().iter().filter(|(k, _)| k.ends_with(suffix)).map(|(_, v)| *v).sum()
}

#[test]
fn configurations_pass_envoy_validate() {
    let k = bundle(CART, CART_IP, &[(1, None)], 10_000);
    let out = Outbound::new(
        1,
        2,
        static_config("outbound", &k),
        service_config("outbound", None),
        static_config("outbound", &k),
    );
    let (ok, text) = validate(&out.yaml(), "validate-outbound");
    assert!(ok, "outbound configuration refused by envoy --mode validate:\n{text}");
    let r = bundle(REDIS, REDIS_IP, &[(1, None)], 10_000);
    let inb = Inbound::new(1, 2, static_config("inbound_tunnel", &r), plain_config(3));
    let (ok, text) = validate(&inb.yaml(), "validate-inbound");
    assert!(ok, "inbound configuration refused by envoy --mode validate:\n{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_attaches_a_verifiable_token_and_closes_without_key() -> Result<()> {
    let mut gateway = FakeGateway::start().await?;
    let keys = bundle(CART, CART_IP, &[(6, Some(now_ms() + 3_600_000)), (7, None)], 10_000);
    let expired = bundle(CART, CART_IP, &[(5, Some(now_ms() - 1))], 10_000);
    let out = Outbound::new(
        gateway.port,
        free_port(),
        static_config("outbound", &keys),
        service_config("outbound", None),
        static_config("outbound", &expired),
    );
    let envoy = out.start()?;

    // A connection through the outbound listener reaches the gateway with a token.
    let port = out.port("OUT_STATIC_PORT");
    let before = now_ms();
    let echo = echo_through(port, b"hello through keyway").await?;
    assert_eq!(echo, b"hello through keyway");
    let connect = gateway.next_connect().await?;
    assert_eq!(connect.authority, format!("127.0.0.1:{port}"));
    let token = connect.headers.get(TOKEN_HEADER).expect("token header").to_str()?;
    let sealed = decode_token(token)?;
    // Sealed with the newest usable epoch, and it verifies with the workload's key.
    assert_eq!(sealed.claims().epoch, 7);
    let key: WorkloadKey = SECRET.workload_key(CART, ip(CART_IP), 7)?;
    let claims = sealed.verify(&key, now_ms(), WINDOW_MS)?;
    assert_eq!(claims.src, ip(CART_IP));
    assert_eq!(claims.dst, ip("127.0.0.1"));
    assert_eq!(claims.dst_port, port);
    assert_eq!(claims.protocol, Protocol::Tcp);
    assert!(claims.issued_at_ms >= before - 1_000 && claims.issued_at_ms <= now_ms() + 1_000);
    // Every connection gets a fresh nonce.
    echo_through(port, b"again").await?;
    let second = gateway.next_connect().await?;
    let second = decode_token(second.headers[TOKEN_HEADER].to_str()?)?;
    assert_ne!(second.claims().nonce, claims.nonce);
    // Allowed connections are added to their counter at the plugin's next tick.
    envoy.wait_until("two allowed connections to be counted", || stat(&envoy, &conn_stat("outbound", "allow")) >= 2)?;
    assert_eq!(stat(&envoy, &conn_stat("outbound", "allow")), 2);

    // Without a usable key the connection is closed and no CONNECT is ever opened upstream.
    let connects = gateway.connects.load(Ordering::SeqCst);
    let upstream_rq = envoy.stat("cluster.keyway_gateway.upstream_rq_total");
    assert!(closed_without_data(out.port("OUT_NOKEY_PORT"), None).await?, "connection without key was not closed");
    envoy.wait_until("the no-key denial to be counted", || stat(&envoy, &denial_stat("no-key")) >= 1)?;
    assert_eq!(gateway.connects.load(Ordering::SeqCst), connects, "a CONNECT was opened without a key");
    assert_eq!(envoy.stat("cluster.keyway_gateway.upstream_rq_total"), upstream_rq);
    assert_eq!(envoy.stat("cluster.keyway_gateway.upstream_cx_total"), 1, "one pooled HTTP/2 connection only");
    assert_eq!(stat(&envoy, &conn_stat("outbound", "deny")), 1);

    // The metrics surface with their labels in the Prometheus output.
    let prom = envoy.prometheus();
    assert!(
        prom.lines().any(|l| l.starts_with(&format!("{CONN}{{"))
            && l.contains(r#"direction="outbound""#)
            && l.contains(r#"verdict="allow""#)
            && l.ends_with(" 2")),
        "no labelled keyway metric in /stats/prometheus:\n{}",
        prom.lines().filter(|l| l.contains("keyway")).collect::<Vec<_>>().join("\n")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_tunnel_verifies_tickets_and_plain_inbound_is_closed() -> Result<()> {
    let app = EchoApp::start().await?;
    let keys = bundle(REDIS, REDIS_IP, &[(3, None)], 10_000);
    let inb = Inbound::new(app.port, free_port(), static_config("inbound_tunnel", &keys), String::new());
    let exempt = inb.port("EXEMPT_PORT");
    let mut inb = inb;
    inb.vars.insert("PLAIN_CONFIG", plain_config(exempt));
    let envoy = inb.start()?;
    let tunnel = inb.port("TUNNEL_PORT");
    let authority = format!("{REDIS_IP}:6379");
    let now = now_ms();

    // A valid ticket: the tunnel reaches the application.
    let good = ticket(3, REDIS_IP, 6379, now, 1, 3);
    let r = connect_tunnel(tunnel, &authority, Some(&good)).await?;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.echo.as_deref(), Some(&b"ping"[..]));
    assert_eq!(app.accepted.load(Ordering::SeqCst), 1);

    // Everything else: 403 with the reason, and the application never sees a connection.
    let forged = ticket(3, REDIS_IP, 6379, now, 2, 4); // sealed with another epoch's key
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("missing", None, "ticket-missing"),
        ("forged", Some(forged), "ticket-mac"),
        ("garbage", Some("not a ticket!".into()), "ticket-malformed"),
        ("future version", Some("AgAAAA".into()), "ticket-version"),
        ("expired", Some(ticket(3, REDIS_IP, 6379, now - WINDOW_MS - 5_000, 3, 3)), "ticket-expired"),
        ("other destination", Some(ticket(3, "10.128.2.21", 6379, now, 4, 3)), "ticket-wrong-destination"),
        ("other port", Some(ticket(3, REDIS_IP, 6380, now, 5, 3)), "ticket-wrong-destination"),
        ("unknown epoch", Some(ticket(9, REDIS_IP, 6379, now, 6, 9)), "ticket-epoch"),
        ("replayed", Some(good.clone()), "ticket-replay"),
    ];
    for (what, t, reason) in &cases {
        let r = connect_tunnel(tunnel, &authority, t.as_deref()).await?;
        assert_eq!(r.status, 403, "{what}: {r:?}");
        assert_eq!(r.reason(), Some(*reason), "{what}");
        assert_eq!(r.echo, None);
    }
    assert_eq!(app.accepted.load(Ordering::SeqCst), 1, "a refused tunnel reached the application");
    envoy
        .wait_until("the allowed tunnel to be counted", || stat(&envoy, &conn_stat("inbound_tunnel", "allow")) >= 1)?;
    assert_eq!(stat(&envoy, &conn_stat("inbound_tunnel", "allow")), 1);
    assert_eq!(stat(&envoy, &conn_stat("inbound_tunnel", "deny")), cases.len() as u64);
    assert_eq!(stat(&envoy, &denial_stat("ticket-wrong-destination")), 2);

    // Plain inbound: a connection to a guarded port is closed before tcp_proxy connects.
    assert!(closed_without_data(inb.port("PLAIN_PORT"), None).await?);
    envoy.wait_until("the not-exempt denial to be counted", || stat(&envoy, &denial_stat("not-exempt")) >= 1)?;
    assert_eq!(app.accepted.load(Ordering::SeqCst), 1, "a plain connection reached the application");
    assert_eq!(envoy.stat("cluster.app.upstream_cx_total"), 1);
    // An exempt port still works, and so does an exempt source address on a guarded port.
    assert_eq!(echo_through(exempt, b"probe").await?, b"probe");
    let mut from_exempt_source = {
        let s = tokio::net::TcpSocket::new_v4()?;
        s.bind("127.0.0.2:0".parse()?)?;
        s.connect(format!("127.0.0.1:{}", inb.port("PLAIN_PORT")).parse()?).await?
    };
    assert_eq!(echo_on(&mut from_exempt_source, b"kubelet").await?, b"kubelet");
    assert_eq!(app.accepted.load(Ordering::SeqCst), 3);
    envoy.wait_until("two allowed plain connections to be counted", || {
        stat(&envoy, &conn_stat("inbound_plain", "allow")) >= 2
    })?;
    assert_eq!(stat(&envoy, &conn_stat("inbound_plain", "allow")), 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_refresh_and_rotation_through_the_key_service() -> Result<()> {
    let mut gateway = FakeGateway::start().await?;
    let app = EchoApp::start().await?;
    let ks = FakeKeyService::start().await?;
    let k = bundle(CART, CART_IP, &[(1, None)], 10_000);
    let out = Outbound::new(
        gateway.port,
        ks.port,
        static_config("outbound", &k),
        service_config("outbound", None),
        static_config("outbound", &k),
    );
    // The key service answers 503 at first: nothing gets through, failures are counted.
    let envoy = out.start()?;
    let ks_port = out.port("OUT_KS_PORT");
    envoy.wait_until("failed refreshes to be counted", || stat(&envoy, &refresh_stat("http_status")) >= 1)?;
    assert!(closed_without_data(ks_port, None).await?, "a connection got through before any key arrived");
    assert!(
        ks.paths.lock().unwrap().iter().all(|p| p == &format!("{KEY_SERVICE_PATH}?{KEY_SERVICE_IP_PARAM}={CART_IP}")),
        "{:?}",
        ks.paths
    );

    // Epoch 1 arrives (short refresh interval so the test sees rotations quickly).
    ks.set(200, json(&bundle(CART, CART_IP, &[(1, None)], 200)));
    let mut open = None;
    envoy.wait_until("the first keys to be fetched", || stat(&envoy, &refresh_stat("ok")) >= 1)?;
    // Connections now carry epoch-1 tokens; keep one open across the rotation.
    let until = std::time::Instant::now() + DEADLINE;
    while open.is_none() {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", ks_port)).await?;
        if echo_on(&mut s, b"before").await.is_ok() {
            open = Some(s);
        }
        assert!(std::time::Instant::now() < until, "no connection got through after the keys arrived");
    }
    let mut open = open.unwrap();
    let first = gateway.next_connect().await?;
    let t = decode_token(first.headers[TOKEN_HEADER].to_str()?)?;
    assert_eq!(t.claims().epoch, 1);
    t.verify(&SECRET.workload_key(CART, ip(CART_IP), 1)?, now_ms(), WINDOW_MS)?;

    // Rotation: epochs 1 and 2 listed; new connections switch to epoch 2.
    ks.set(200, json(&bundle(CART, CART_IP, &[(1, Some(now_ms() + 60_000)), (2, None)], 200)));
    let until = std::time::Instant::now() + DEADLINE;
    loop {
        echo_through(ks_port, b"x").await?;
        let c = gateway.next_connect().await?;
        let t = decode_token(c.headers[TOKEN_HEADER].to_str()?)?;
        if t.claims().epoch == 2 {
            t.verify(&SECRET.workload_key(CART, ip(CART_IP), 2)?, now_ms(), WINDOW_MS)?;
            break;
        }
        assert!(std::time::Instant::now() < until, "tokens never switched to epoch 2");
    }
    // The connection opened before the rotation still works.
    assert_eq!(echo_on(&mut open, b"after rotation").await?, b"after rotation");

    // The key service fails: keys stay usable within the grace period.
    ks.set(503, "down".into());
    let failures = stat(&envoy, &refresh_stat("http_status"));
    envoy.wait_until("refresh failures to be counted", || stat(&envoy, &refresh_stat("http_status")) > failures)?;
    assert_eq!(echo_through(ks_port, b"grace").await?, b"grace");
    assert_eq!(echo_on(&mut open, b"still open").await?, b"still open");

    // The inbound tunnel takes its ticket keys from the key service too, and accepts both epochs
    // during the overlap.
    let redis = FakeKeyService::start().await?;
    redis.set(200, json(&bundle(REDIS, REDIS_IP, &[(1, Some(now_ms() + 60_000)), (2, None)], 200)));
    let inb = Inbound::new(app.port, redis.port, service_config("inbound_tunnel", Some(REDIS_IP)), plain_config(1));
    let inbound = inb.start()?;
    inbound.wait_until("the inbound keys to be fetched", || stat(&inbound, &refresh_stat("ok")) >= 1)?;
    let tunnel = inb.port("TUNNEL_PORT");
    let authority = format!("{REDIS_IP}:6379");
    let mut accepted = 0;
    for (i, epoch) in [1u32, 2].into_iter().enumerate() {
        let until = std::time::Instant::now() + DEADLINE;
        loop {
            let t = ticket(epoch, REDIS_IP, 6379, now_ms(), (i as u64 + 1) * 1_000_000 + accepted, epoch);
            accepted += 1;
            let r = connect_tunnel(tunnel, &authority, Some(&t)).await?;
            if r.status == 200 {
                assert_eq!(r.echo.as_deref(), Some(&b"ping"[..]));
                break;
            }
            // Until this worker's VM has fetched its keys it answers no-key.
            assert_eq!(r.reason(), Some("no-key"), "epoch {epoch}: {r:?}");
            assert!(std::time::Instant::now() < until, "epoch {epoch} ticket never accepted");
        }
    }
    // Once epoch 1 is gone from the bundle, its tickets are refused.
    redis.set(200, json(&bundle(REDIS, REDIS_IP, &[(2, None)], 200)));
    let until = std::time::Instant::now() + DEADLINE;
    // Every ticket of the loop has its own nonce: a repeated one would be a replay.
    let mut n = 1_000u64;
    loop {
        n += 1;
        let r = connect_tunnel(tunnel, &authority, Some(&ticket(1, REDIS_IP, 6379, now_ms(), n, 1))).await?;
        if r.status == 403 {
            assert_eq!(r.reason(), Some("ticket-epoch"));
            break;
        }
        assert!(std::time::Instant::now() < until, "epoch 1 tickets still accepted after the rotation");
    }
    drop(inbound);
    drop(envoy);
    Ok(())
}

#[test]
fn a_bad_plugin_configuration_is_refused_by_envoy() {
    let k = bundle(CART, CART_IP, &[(1, None)], 10_000);
    let bad = r#"{"mode":"outbound","key_service":{"cluster":"keyway_keyservice","refresh":5}}"#.to_owned();
    let out =
        Outbound::new(free_port(), free_port(), static_config("outbound", &k), bad, static_config("outbound", &k));
    let (mut child, log) = spawn(&out.yaml(), "bad-config").unwrap();
    let until = std::time::Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "envoy kept running with a bad keyway configuration:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!status.success(), "envoy exited successfully with a bad configuration");
    assert!(
        text.contains("invalid keyway plugin configuration: key_service.refresh: unknown field `refresh`"),
        "the log does not name the field at fault:\n{text}"
    );
    // Nothing listens on the outbound ports: it was never served open.
    for name in ["OUT_STATIC_PORT", "OUT_KS_PORT"] {
        assert!(std::net::TcpStream::connect(("127.0.0.1", out.port(name))).is_err(), "{name} is open");
    }
}

/// Issue 11: a ticket is usable once per Envoy, not once per worker thread. Two workers; the
/// first connection is held open, so the exact connection balancer puts the second on the other
/// worker (checked with the per-worker listener stats); the same ticket there is a replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_replayed_on_another_worker_is_refused() -> Result<()> {
    let app = EchoApp::start().await?;
    let keys = bundle(REDIS, REDIS_IP, &[(3, None)], 10_000);
    let inb = Inbound::new(app.port, free_port(), static_config("inbound_tunnel", &keys), plain_config(1));
    let envoy = Envoy::start_workers(&inb.yaml(), inb.port("ADMIN_PORT"), "replay-workers", 2)?;
    let tunnel = inb.port("TUNNEL_PORT");
    let authority = format!("{REDIS_IP}:6379");
    let worker_cx = |w: u32| envoy.stat(&format!("listener.127.0.0.1_{tunnel}.worker_{w}.downstream_cx_total"));

    let good = ticket(3, REDIS_IP, 6379, now_ms(), 77, 3);
    let (first, _held) = connect_tunnel_held(tunnel, &authority, Some(&good)).await?;
    assert_eq!(first.status, 200, "{first:?}");
    let (replayed, _held2) = connect_tunnel_held(tunnel, &authority, Some(&good)).await?;
    assert_eq!(
        (worker_cx(0), worker_cx(1)),
        (1, 1),
        "the two connections did not land on different workers: the test would prove nothing"
    );
    assert_eq!(replayed.status, 403, "a ticket replayed on another worker was accepted: {replayed:?}");
    assert_eq!(replayed.reason(), Some("ticket-replay"));
    assert_eq!(app.accepted.load(Ordering::SeqCst), 1, "the replay reached the application");
    // A fresh ticket on either worker still gets through.
    let fresh = ticket(3, REDIS_IP, 6379, now_ms(), 78, 3);
    assert_eq!(connect_tunnel(tunnel, &authority, Some(&fresh)).await?.status, 200);
    Ok(())
}

/// Issue 11: `fail_open` never admits a credential that failed verification. The key service is
/// unreachable, so the filter has no ticket key; an attacker presents a ticket sealed with the
/// only ticket key it can have (its own workload's). It must be refused, not let through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_open_without_keys_refuses_a_forged_ticket() -> Result<()> {
    let app = EchoApp::start().await?;
    let unreachable = free_port();
    let config = format!(
        r#"{{"mode":"inbound_tunnel","overlay_ip":"{REDIS_IP}","fail_open":true,"key_service":{{"cluster":"keyway_keyservice","timeout_ms":500,"retry_ms":100}}}}"#
    );
    let inb = Inbound::new(app.port, unreachable, config, plain_config(1));
    let envoy = inb.start()?;
    // Nothing listens on the key service port: Envoy answers the callout itself (503).
    envoy.wait_until("a failed key refresh", || {
        stat(&envoy, &refresh_stat("http_status")) + stat(&envoy, &refresh_stat("no_response")) >= 2
    })?;
    let forged = TicketClaims {
        epoch: 1,
        src: ip(CART_IP),
        dst: ip(REDIS_IP),
        dst_port: 6379,
        protocol: Protocol::Tcp,
        issued_at_ms: now_ms(),
        nonce: [9; 12],
        src_identity: "spiffe://cluster.local/ns/prod/sa/admin".into(),
    }
    .seal(&SECRET.ticket_key(CART, ip(CART_IP), 1)?)?;
    let r = connect_tunnel(inb.port("TUNNEL_PORT"), &format!("{REDIS_IP}:6379"), Some(&forged)).await?;
    assert_eq!(r.status, 403, "fail_open let a forged ticket through while the filter had no keys: {r:?}");
    assert_eq!(r.reason(), Some("no-key"));
    assert_eq!(app.accepted.load(Ordering::SeqCst), 0, "the forged ticket reached the application");
    assert_eq!(stat(&envoy, &conn_stat("inbound_tunnel", "fail_open")), 0);
    Ok(())
}

/// Issue 13: each worker's VM draws nonces from its own ChaCha20 generator, seeded from the host's
/// random source at its first draw; tokens sealed on two workers never share a nonce (one seed
/// shared by the VMs would repeat the same sequence on both). Connections are opened until both
/// workers sealed several tokens (per-worker listener stats).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nonces_differ_across_worker_vms() -> Result<()> {
    let mut gateway = FakeGateway::start().await?;
    let keys = bundle(CART, CART_IP, &[(7, None)], 10_000);
    let cfg = static_config("outbound", &keys);
    let out = Outbound::new(gateway.port, free_port(), cfg.clone(), service_config("outbound", None), cfg);
    let envoy = Envoy::start_workers(&out.yaml(), out.port("ADMIN_PORT"), "nonce-workers", 2)?;
    let port = out.port("OUT_STATIC_PORT");
    let worker_cx = |w: u32| envoy.stat(&format!("listener.127.0.0.1_{port}.worker_{w}.downstream_cx_total"));
    let mut nonces = std::collections::BTreeSet::new();
    let mut tokens = 0;
    while tokens < 400 && (worker_cx(0) < 8 || worker_cx(1) < 8) {
        assert_eq!(echo_through(port, b"n").await?, b"n");
        let connect = gateway.next_connect().await?;
        let token = decode_token(connect.headers.get(TOKEN_HEADER).expect("token header").to_str()?)?;
        nonces.insert(token.claims().nonce);
        tokens += 1;
    }
    assert!(
        worker_cx(0) >= 8 && worker_cx(1) >= 8,
        "the connections did not reach both workers ({} and {}): the test would prove nothing",
        worker_cx(0),
        worker_cx(1)
    );
    assert_eq!(nonces.len(), tokens, "a nonce was sealed twice");
    Ok(())
}
