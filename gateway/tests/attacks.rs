//! Attacks on the gateway, mounted in-process on loopback with only what each attacker has: a
//! compromised gateway's own certificate (another zone's), a workload's genuine credentials used
//! to flood, a workload allowed to reach the outside aiming at the gateway itself. The end-to-end
//! attacks (real Envoy, namespaces) are in e2e/tests/attacks.rs; docs/security.md lists them all.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use keyway_e2e::gateway::ZoneLayout;
use keyway_e2e::loopback::*;
use keyway_gateway::tls::{GatewayIdentity, TlsMaterial, quic_client_config, server_name};
use keyway_policy::Protocol;
use keyway_policy::flow::{FlowHeader, Status, StatusCode as FlowStatus};

fn app(k: u8) -> Vec<W> {
    let sc = |z: u8, n: u8| format!("127.{k}.{z}.{n}");
    vec![
        w("shop", "web", "web", "zone-a", "10.201.1.1", &sc(1, 1)),
        w("shop", "cache", "cache", "zone-a", "10.201.1.2", &sc(1, 2)),
        w("shop", "api", "api", "zone-b", "10.201.2.1", &sc(2, 1)),
        w("shop", "api-c", "api", "zone-c", "10.201.3.1", &sc(3, 1)),
    ]
}

const ZONES: &[ZoneLayout<'static>] = &[
    ZoneLayout { name: "zone-a", gateways: &["a1"], failover: &[] },
    ZoneLayout { name: "zone-b", gateways: &["b1"], failover: &[] },
    ZoneLayout { name: "zone-c", gateways: &["c1"], failover: &[] },
];

/// cache (zone-a) accepts only zone-c's api on 8080.
const POLICIES: &str = r#"
kind: NetworkPolicy
metadata: {name: cache-ingress, namespace: shop}
spec:
  podSelector: {matchLabels: {app: cache}}
  ingress: [{from: [{podSelector: {matchLabels: {app: api}}}], ports: [{port: 8080}]}]
"#;

/// Attacker: a compromised gateway of zone-b (its own certificate and key, nothing else). It
/// sends zone-a's gateway a flow header claiming a source workload of zone-c, which the policy
/// lets in. Expected: refused, because a peer speaks only for the workloads of its own zone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_gateway_cannot_speak_for_another_zones_workloads() {
    let o = Overlay::start("att-zone", ZONES, app(41), POLICIES).await;
    let (api_c, cache) = (o.workload("api-c").clone(), o.workload("cache").clone());
    let b1 = &o.configs[&("zone-b".to_string(), "b1".to_string())];
    let a1 = &o.configs[&("zone-a".to_string(), "a1".to_string())];
    let tls = TlsMaterial::load(&b1.tls.ca, &b1.tls.cert, &b1.tls.key).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quic_client_config(&tls).unwrap());
    let a1_id = GatewayIdentity { trust_domain: a1.trust_domain.clone(), zone: "zone-a".into(), name: "a1".into() };
    let a1_overlay = o.gw("zone-a", "a1").overlay_addr;
    let conn = endpoint.connect(a1_overlay, &server_name(&a1_id)).unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let header = FlowHeader {
        flow_id: 7,
        src: api_c.overlay,
        dst: cache.overlay,
        dst_port: 8080,
        protocol: Protocol::Tcp,
        identity: api_c.identity(),
        src_zone: "zone-b".into(),
        src_gateway: "b1".into(),
        verdict: "forged".into(),
    };
    send.write_all(&header.encode()).await.unwrap();
    let mut prefix = [0u8; 6];
    tokio::time::timeout(Duration::from_secs(10), recv.read_exact(&mut prefix)).await.unwrap().unwrap();
    let (code, n) = Status::decode_prefix(&prefix).unwrap();
    let mut reason = vec![0u8; n];
    recv.read_exact(&mut reason).await.unwrap();
    let reason = String::from_utf8_lossy(&reason).into_owned();
    assert_eq!(
        (code, reason.as_str()),
        (FlowStatus::Refused, "flow-source-zone"),
        "zone-b's gateway spoke for zone-c's api and was answered {code:?} {reason}"
    );
    assert!(o.sidecar("cache").accepted.lock().unwrap().is_empty(), "nothing reached cache");
}

/// Attacker: one workload with genuine credentials, opening as many flows as it can and holding
/// them. Expected: it gets its share of the gateway's flows; another workload still gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_source_cannot_take_every_flow_of_the_gateway() {
    let o = Overlay::start_with("att-flood", ZONES, app(42), "", |c| {
        c.limits.max_flows = 8;
    })
    .await;
    let (web, cache, api) = (o.workload("web").clone(), o.workload("cache").clone(), o.workload("api").clone());
    let a1 = o.gw("zone-a", "a1").tunnel_addr;
    let mut held = Vec::new();
    let mut refused = None;
    for _ in 0..8 {
        let t = o.token(&web, cache.overlay, 8080, None, now_ms());
        match o.connect(a1, &web, SocketAddr::new(cache.overlay, 8080), Some(&t)).await {
            Connect::Open(io) => held.push(io),
            other => {
                refused = Some(other.refused());
                break;
            }
        }
    }
    assert!(held.len() < 8, "one source held every flow of the gateway ({})", held.len());
    let (status, reason, _) = refused.unwrap();
    assert_eq!((status, reason.as_str()), (503, "max-flows-per-source"));
    // Another workload of the zone still gets a flow.
    let t = o.token(&cache, api.overlay, 8080, None, now_ms());
    let io = o.connect(a1, &cache, SocketAddr::new(api.overlay, 8080), Some(&t)).await.open();
    assert_eq!(echo(io, b"still here").await, b"still here");
    drop(held);
}

/// Attacker: a workload the policy lets reach the outside (no egress policy), aiming its flow at
/// the gateway's own admin listener and at loopback. Expected: refused before any connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn external_flows_never_reach_loopback_or_the_gateway_itself() {
    let o = Overlay::start_with("att-ssrf", ZONES, app(43), "", |c| c.delivery.external_loopback = false).await;
    let web = o.workload("web").clone();
    let gw = o.gw("zone-a", "a1");
    for target in [gw.admin_addr, SocketAddr::new(IpAddr::from([127, 0, 0, 1]), gw.admin_addr.port())] {
        let t = o.token(&web, target.ip(), target.port(), None, now_ms());
        let (status, reason, _) = o.connect(gw.tunnel_addr, &web, target, Some(&t)).await.refused();
        assert_eq!((status, reason.as_str()), (403, "external-forbidden"), "flow to {target}");
    }
    for (ip, port) in [("169.254.169.254", 80), ("::1", gw.admin_addr.port()), ("0.0.0.0", gw.admin_addr.port())] {
        let target = SocketAddr::new(ip.parse().unwrap(), port);
        let t = o.token(&web, target.ip(), target.port(), None, now_ms());
        let (status, reason, _) = o.connect(gw.tunnel_addr, &web, target, Some(&t)).await.refused();
        assert_eq!((status, reason.as_str()), (403, "external-forbidden"), "flow to {target}");
    }
}

/// Attacker: anyone on the underlay sending QUIC Initials to a gateway's overlay port, from its
/// own or a spoofed address. Expected: the gateway answers a first attempt with a Retry (no TLS
/// work, no state) and serves a handshake only to an address that echoed it; the real peers'
/// connectors get through that way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quic_handshakes_are_served_only_after_a_retry() {
    let o = Overlay::start("att-retry", ZONES, app(44), "").await;
    let admin = o.gw("zone-a", "a1").admin_addr;
    let retries = metric(admin, "keyway_gateway_overlay_handshakes_total", "outcome=\"retry\"").await;
    let accepted = metric(admin, "keyway_gateway_overlay_handshakes_total", "outcome=\"accepted\"").await;
    assert!(retries >= 1.0 && accepted >= 1.0, "retries {retries}, accepted {accepted}");
    assert!(retries >= accepted, "every accepted handshake was retried first: {retries} < {accepted}");
}

/// Attacker: a workload holding flows open without sending anything, to pin the gateway's flows.
/// Expected: a silent flow is closed after `limits.flow_idle_timeout_ms` (here 300 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_flow_is_closed_after_the_idle_timeout() {
    use tokio::io::AsyncReadExt;
    let o = Overlay::start_with("att-idle", ZONES, app(45), "", |c| c.limits.flow_idle_timeout_ms = 300).await;
    let (web, cache) = (o.workload("web").clone(), o.workload("cache").clone());
    let a1 = o.gw("zone-a", "a1");
    let t = o.token(&web, cache.overlay, 8080, None, now_ms());
    let mut io = o.connect(a1.tunnel_addr, &web, SocketAddr::new(cache.overlay, 8080), Some(&t)).await.open();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), io.read(&mut buf)).await;
    assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "the silent flow was not closed: {n:?}");
}

/// Attacker: anyone reaching the tunnel port, opening TCP connections and sending nothing (or
/// only part of a preface), to hold the gateway's sockets. Expected: a connection that has not
/// sent a request within `limits.header_timeout_ms` (here 2 s) is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_tunnel_connection_is_closed_after_the_header_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let o = Overlay::start_with("att-hdr", ZONES, app(46), "", |c| c.limits.header_timeout_ms = 2_000).await;
    let tunnel = o.gw("zone-a", "a1").tunnel_addr;
    for preface in [&b""[..], &b"PRI * HTTP/2.0\r\n"[..]] {
        let mut tcp = tokio::net::TcpStream::connect(tunnel).await.unwrap();
        tcp.write_all(preface).await.unwrap();
        let mut buf = [0u8; 64];
        let closed = tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {} // the server's SETTINGS and the like
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "a connection that sent {preface:?} and then nothing stayed open");
    }
}

/// Attacker: a pod that took over a workload's sidecar address (an IP reused by a new pod, or an
/// ARP spoof on a bridge CNI) and listens on the keyway inbound port with its own genuine mesh
/// certificate, to receive the flows (and tickets) meant for that workload. Expected: the
/// gateway sees the certificate is not the destination workload's and delivers nothing
/// (`destination-identity`); the impostor accepts no flow and sees no ticket.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sidecar_address_taken_over_by_another_workload_gets_no_delivery() {
    let mut o = Overlay::start("att-impostor", ZONES, app(47), POLICIES).await;
    let (api_c, cache, web) = (o.workload("api-c").clone(), o.workload("cache").clone(), o.workload("web").clone());
    // cache's sidecar goes away; web's pod answers on its address with web's own certificate.
    let at = o.sidecars.iter().position(|s| s.overlay_ip == cache.overlay).unwrap();
    drop(o.sidecars.remove(at));
    let web_mesh = std::sync::Arc::new(o.mesh_of("web").clone());
    let impostor = wait_for_port(&cache, o.sidecar_port, &o.secrets("zone-a"), web_mesh).await;
    // api-c (zone-c) is allowed to cache:8080.
    let c1 = o.gw("zone-c", "c1").tunnel_addr;
    let t = o.token(&api_c, cache.overlay, 8080, None, now_ms());
    let (status, _, _) = o.connect(c1, &api_c, SocketAddr::new(cache.overlay, 8080), Some(&t)).await.refused();
    assert_eq!(status, 502, "delivered to {}'s pod", web.name);
    // zone-a's gateway refused the delivery for the certificate (the source sees only that the
    // destination could not be reached).
    let a1 = o.gw("zone-a", "a1").admin_addr;
    let refused = metric(a1, "keyway_gateway_flows_total", "reason=\"destination-identity\"").await;
    assert_eq!(refused, 1.0, "zone-a's gateway refused the delivery for the certificate");
    assert!(impostor.accepted.lock().unwrap().is_empty(), "the impostor accepted a flow");
}

/// A fake sidecar of `w`'s address, with `mesh` as its certificate, once the port is free again.
async fn wait_for_port(
    w: &W,
    port: u16,
    secrets: &std::path::Path,
    mesh: std::sync::Arc<keyway_gateway::mesh::MeshTls>,
) -> Sidecar {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match Sidecar::start(w, port, secrets.to_path_buf(), mesh.clone()).await {
            Ok(s) => return s,
            Err(e) if tokio::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("the sidecar port stayed taken: {e}"),
        }
    }
}

/// Attacker: a compromised cluster of zone-b holding zone-b's own issuer (the CA that issues
/// zone-b's replicas their certificates, as cert-manager does in a Deployment install). It issues
/// itself a certificate claiming a gateway of zone-c and sends zone-a's gateway a flow header for
/// zone-c's api, which the policy lets in. Expected: zone-a's gateway, which pins each zone to its
/// own CA (`zones[].ca`), refuses the connection; nothing reaches cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_zones_own_issuer_cannot_speak_for_another_zone() {
    use keyway_gateway::ca::Ca;
    let dir = Scratch::new("att-issuer-files").unwrap();
    let zone_b_ca = Ca::generate(TD, 2, std::time::SystemTime::now()).unwrap();
    let zb_dir = dir.0.join("zone-b-ca");
    zone_b_ca.save(&zb_dir, false).unwrap();
    let zb_ca_pem = zb_dir.join("ca.pem");
    let bundle = dir.0.join("bundle.pem");
    let o = Overlay::start_with("att-issuer", ZONES, app(48), POLICIES, |c| {
        // Zones a and c keep the bed's CA, zone-b has its own; every gateway trusts both and pins
        // each zone to its CA.
        let bed_ca = c.tls.ca.clone();
        let both = std::fs::read_to_string(&bed_ca).unwrap() + &std::fs::read_to_string(&zb_ca_pem).unwrap();
        std::fs::write(&bundle, both).unwrap();
        c.tls.ca = bundle.clone();
        for z in &mut c.zones {
            z.ca = Some(if z.name == "zone-b" { zb_ca_pem.clone() } else { bed_ca.clone() });
        }
        if c.zone == "zone-b" {
            let ca = Ca::load(&zb_dir).unwrap();
            let out = dir.0.join("zone-b-certs");
            let (paths, _) = keyway_gateway::ca::issue_gateway_with(&ca, "zone-b", &c.name, 1, &out).unwrap();
            (c.tls.cert, c.tls.key) = (paths.cert, paths.key);
        }
    })
    .await;
    let (api_c, cache) = (o.workload("api-c").clone(), o.workload("cache").clone());
    // The attacker's certificate: zone-c's c1, issued by zone-b's issuer.
    let forged =
        keyway_gateway::ca::issue_gateway_with(&zone_b_ca, "zone-c", "c1", 1, &dir.0.join("forged")).unwrap().0;
    let tls = TlsMaterial::load(&bundle, &forged.cert, &forged.key).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quic_client_config(&tls).unwrap());
    let a1_id = GatewayIdentity { trust_domain: TD.into(), zone: "zone-a".into(), name: "a1".into() };
    let a1_overlay = o.gw("zone-a", "a1").overlay_addr;
    let outcome = async {
        let conn = endpoint.connect(a1_overlay, &server_name(&a1_id)).ok()?.await.ok()?;
        let (mut send, mut recv) = conn.open_bi().await.ok()?;
        let header = FlowHeader {
            flow_id: 8,
            src: api_c.overlay,
            dst: cache.overlay,
            dst_port: 8080,
            protocol: Protocol::Tcp,
            identity: api_c.identity(),
            src_zone: "zone-c".into(),
            src_gateway: "c1".into(),
            verdict: "forged".into(),
        };
        send.write_all(&header.encode()).await.ok()?;
        let mut prefix = [0u8; 6];
        recv.read_exact(&mut prefix).await.ok()?;
        let (code, n) = Status::decode_prefix(&prefix).ok()?;
        let mut reason = vec![0u8; n];
        recv.read_exact(&mut reason).await.ok()?;
        Some((code, String::from_utf8_lossy(&reason).into_owned()))
    };
    let answered = tokio::time::timeout(Duration::from_secs(10), outcome).await.unwrap_or(None);
    assert_eq!(answered, None, "zone-b's issuer spoke for zone-c and was answered {answered:?}");
    assert!(o.sidecar("cache").accepted.lock().unwrap().is_empty(), "nothing reached cache");
    // The genuine zones still work under the pinning: zone-c's api reaches cache through a1.
    let c1 = o.gw("zone-c", "c1").tunnel_addr;
    let t = o.token(&api_c, cache.overlay, 8080, None, now_ms());
    let io = o.connect(c1, &api_c, SocketAddr::new(cache.overlay, 8080), Some(&t)).await.open();
    assert_eq!(echo(io, b"pinned").await, b"pinned");
}

/// Attacker: one pod opening as many connections to the gateway's tunnel port (where the key
/// service is too) as it can, sending nothing. Expected: beyond its share
/// (`limits.max_tunnel_connections_per_source`, here 4) its connections are closed at once, and
/// another workload still gets its keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_source_cannot_take_every_tunnel_connection() {
    use tokio::io::AsyncReadExt;
    let o =
        Overlay::start_with("att-conns", ZONES, app(49), "", |c| c.limits.max_tunnel_connections_per_source = 4).await;
    let (web, cache) = (o.workload("web").clone(), o.workload("cache").clone());
    let tunnel = o.gw("zone-a", "a1").tunnel_addr;
    let open_from = |ip: IpAddr| async move {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::new(ip, 0)).unwrap();
        sock.connect(tunnel).await.unwrap()
    };
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(open_from(web.sidecar).await);
    }
    let mut fifth = open_from(web.sidecar).await;
    let mut buf = [0u8; 8];
    let closed = tokio::time::timeout(Duration::from_secs(2), fifth.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "the fifth connection of one source stayed open: {closed:?}");
    let (status, body) = o.keys(tunnel, &cache, cache.overlay).await;
    assert_eq!(status, 200, "another workload still gets its keys: {body}");
    let refused = metric(
        o.gw("zone-a", "a1").admin_addr,
        "keyway_gateway_limit_refusals_total",
        "limit=\"max_tunnel_connections_per_source\"",
    )
    .await;
    assert!(refused >= 1.0, "counted: {refused}");
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_source_cannot_take_every_stream_into_a_zone() {
    // 8 streams on the peer connection into zone-b; one source may hold a quarter of them.
    let o = Overlay::start_with("att-peer", ZONES, app(50), POLICIES, |c| c.limits.max_flows_per_peer = 8).await;
    let (web, cache, api) = (o.workload("web").clone(), o.workload("cache").clone(), o.workload("api").clone());
    let a1 = o.gw("zone-a", "a1").tunnel_addr;
    let to_api = SocketAddr::new(api.overlay, 8080);
    // web floods genuine, allowed flows into zone-b with tokens of its own keys.
    let mut held = Vec::new();
    for _ in 0..2 {
        let t = o.token(&web, api.overlay, 8080, None, now_ms());
        held.push(o.connect(a1, &web, to_api, Some(&t)).await.open());
    }
    let t = o.token(&web, api.overlay, 8080, None, now_ms());
    let (status, reason, _) = o.connect(a1, &web, to_api, Some(&t)).await.refused();
    assert_eq!((status, reason.as_str()), (503, "max-flows-per-peer"), "web's third flow into zone-b");
    // Another workload of the zone still reaches zone-b.
    let t = o.token(&cache, api.overlay, 8080, None, now_ms());
    let io = o.connect(a1, &cache, to_api, Some(&t)).await.open();
    assert_eq!(echo(io, b"cache still gets through").await, b"cache still gets through");
    drop(held);
}
