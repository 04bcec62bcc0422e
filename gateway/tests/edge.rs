//! The edge listener, in-process on loopback: `keyway agent`s' UDP and TCP through the overlay,
//! enforced as `keyway policy` decides, and the attacks on it mounted with only what each
//! attacker has (its own certificate and key, or a certificate of a CA of its own).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use keyway_e2e::gateway::ZoneLayout;
use keyway_e2e::loopback::*;
use keyway_gateway::agent::config::AgentConfig;
use keyway_gateway::ca::WorkloadUse;
use keyway_policy::flow::Datagram;

fn app(k: u8) -> Vec<W> {
    let sc = |z: u8, n: u8| format!("127.{k}.{z}.{n}");
    vec![
        w("shop", "web", "web", "zone-a", "10.202.1.1", &sc(1, 1)),
        w("shop", "cache", "cache", "zone-a", "10.202.1.2", &sc(1, 2)),
        w("shop", "dns", "dns", "zone-b", "10.202.2.1", &sc(2, 1)),
        w("shop", "dns-a", "dns", "zone-a", "10.202.1.3", &sc(1, 3)),
    ]
}

const ZONES: &[ZoneLayout<'static>] = &[
    ZoneLayout { name: "zone-a", gateways: &["a1"], failover: &[] },
    ZoneLayout { name: "zone-b", gateways: &["b1"], failover: &[] },
];

/// dns (both zones) takes UDP 5353 from web only; web's egress is open; cache may send nothing.
const POLICIES: &str = r#"
kind: NetworkPolicy
metadata: {name: dns-ingress, namespace: shop}
spec:
  podSelector: {matchLabels: {app: dns}}
  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: 5353, protocol: UDP}]}]
---
kind: NetworkPolicy
metadata: {name: cache-egress, namespace: shop}
spec:
  podSelector: {matchLabels: {app: cache}}
  policyTypes: [Egress]
"#;

/// A QUIC connection to the edge of `zone`'s gateway at `edge` with `cert`/`key` (an agent's
/// own credentials), trusting the overlay CA `ca`.
async fn edge_connect(
    edge: SocketAddr,
    zone: &str,
    ca: &Path,
    cert: &Path,
    key: &Path,
) -> anyhow::Result<quinn::Connection> {
    let yaml = format!(
        "zone: {zone}\noverlay_ip: 10.0.0.1\noverlay_cidrs: [10.0.0.0/8]\ngateways: [\"{edge}\"]\nmode: pod\n\
         tls: {{ca: {}, cert: {}, key: {}}}\n",
        ca.display(),
        cert.display(),
        key.display()
    );
    let config = AgentConfig::parse(&yaml, "test agent").map_err(|e| anyhow::anyhow!("{e}"))?;
    let client = keyway_gateway::agent::edge::client_config(&config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    endpoint.set_default_client_config(client);
    let conn = endpoint.connect(edge, &keyway_gateway::tls::zone_server_name(zone))?.await?;
    Ok(conn)
}

/// The edge connection of workload `name`'s agent, with its own mesh certificate.
async fn agent_of(o: &Overlay, name: &str, gateway: &str) -> quinn::Connection {
    let w = o.workload(name);
    let m = o.files.workload_mesh(w.ns, w.name);
    let edge = o.gw(w.zone, gateway).edge_addr;
    edge_connect(edge, w.zone, &o.files.ca.join("ca.pem"), &m.cert, &m.key)
        .await
        .unwrap_or_else(|e| panic!("agent of {name}: {e:#}"))
}

fn datagram(src: (IpAddr, u16), dst: (IpAddr, u16), payload: &str) -> bytes::Bytes {
    Datagram { src: src.0, dst: dst.0, src_port: src.1, dst_port: dst.1, payload: payload.as_bytes().to_vec() }
        .encode()
        .into()
}

/// The next datagram on `conn` within `wait`, decoded; `None` when none came.
async fn next(conn: &quinn::Connection, wait: Duration) -> Option<Datagram> {
    let b = tokio::time::timeout(wait, conn.read_datagram()).await.ok()?.ok()?;
    Some(Datagram::decode(&b).unwrap())
}

/// Waits until the gateway with admin `admin` counted `n` datagrams with `outcome`.
async fn counted(admin: SocketAddr, outcome: &str, n: f64) {
    let label = format!("outcome=\"{outcome}\"");
    wait_until_async(Duration::from_secs(10), &format!("{n} udp datagrams {outcome}"), || async {
        metric(admin, "keyway_gateway_udp_datagrams_total", &label).await >= n
    })
    .await
    .unwrap();
}

/// Sends `d` on `conn` until the agents at both ends are registered (the first datagrams of a
/// new connection may precede its registration): each try is a new flow of its own source port.
async fn send_until_delivered(
    from: &quinn::Connection,
    to: &quinn::Connection,
    src: (IpAddr, u16),
    dst: (IpAddr, u16),
) -> Datagram {
    for i in 0..50u16 {
        from.send_datagram(datagram((src.0, src.1 + i), dst, "ping")).unwrap();
        if let Some(d) = next(to, Duration::from_millis(200)).await {
            return d;
        }
    }
    panic!("no datagram from {src:?} reached {dst:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn udp_between_agents_of_two_zones_is_carried_as_the_policy_says_with_replies() {
    let o = Overlay::start("edge-udp", ZONES, app(51), POLICIES).await;
    let (web, cache, dns) = (o.workload("web").clone(), o.workload("cache").clone(), o.workload("dns").clone());
    let a = agent_of(&o, "web", "a1").await;
    let c = agent_of(&o, "cache", "a1").await;
    let b = agent_of(&o, "dns", "b1").await;
    // Allowed: web → dns:5353 across zones, and dns's reply comes back.
    let got = send_until_delivered(&a, &b, (web.overlay, 40000), (dns.overlay, 5353)).await;
    assert_eq!((got.dst, got.dst_port, got.src), (dns.overlay, 5353, web.overlay));
    b.send_datagram(datagram((dns.overlay, 5353), (got.src, got.src_port), "pong")).unwrap();
    let reply = next(&a, Duration::from_secs(5)).await.expect("dns's reply reaches web");
    assert_eq!((reply.src, reply.src_port, reply.payload.as_slice()), (dns.overlay, 5353, b"pong".as_slice()));
    // Denied: another port of dns, anything from cache (its egress is closed), and dns starting a
    // flow to dns-a in zone-a (which takes UDP from web only), though dns answers web's flow.
    let a1 = o.gw("zone-a", "a1").admin_addr;
    let b1 = o.gw("zone-b", "b1").admin_addr;
    a.send_datagram(datagram((web.overlay, 41000), (dns.overlay, 5354), "x")).unwrap();
    c.send_datagram(datagram((cache.overlay, 41000), (dns.overlay, 5353), "x")).unwrap();
    counted(a1, "policy-denied", 2.0).await;
    let dns_a = o.workload("dns-a").overlay;
    b.send_datagram(datagram((dns.overlay, 5353), (dns_a, 5353), "unasked")).unwrap();
    counted(b1, "policy-denied", 1.0).await;
    // The allowed flow still flows, and nothing denied arrived anywhere.
    a.send_datagram(datagram((web.overlay, got.src_port), (dns.overlay, 5353), "again")).unwrap();
    let again = next(&b, Duration::from_secs(5)).await.expect("the allowed flow still flows");
    assert_eq!(again.payload, b"again");
    assert!(next(&b, Duration::from_millis(300)).await.is_none(), "dns got a denied datagram");
    assert!(next(&a, Duration::from_millis(300)).await.is_none(), "web got a datagram it did not ask for");
}

/// Attacker: the cache pod (zone-a), whose egress policy allows nothing, with its own genuine mesh
/// certificate on its own agent connection, writes datagrams whose inner source is its neighbour
/// web's address (which dns takes UDP from). Expected: dropped at its own gateway
/// (`edge-source-address`); dns gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_cannot_send_with_another_workloads_source_address() {
    let o = Overlay::start("edge-spoof", ZONES, app(52), POLICIES).await;
    let (web, cache, dns) = (o.workload("web").clone(), o.workload("cache").clone(), o.workload("dns").clone());
    let attacker = agent_of(&o, "cache", "a1").await;
    let b = agent_of(&o, "dns", "b1").await;
    let a = agent_of(&o, "web", "a1").await;
    // The bed works: web's own datagrams reach dns.
    send_until_delivered(&a, &b, (web.overlay, 40000), (dns.overlay, 5353)).await;
    // cache, denied any egress, claims to be web (which dns takes UDP from).
    for port in 0..20u16 {
        attacker.send_datagram(datagram((web.overlay, 50000 + port), (dns.overlay, 5353), "spoofed")).unwrap();
    }
    let reached = next(&b, Duration::from_millis(500)).await;
    assert!(reached.is_none(), "a spoofed datagram reached dns: {reached:?}");
    let a1 = o.gw("zone-a", "a1").admin_addr;
    counted(a1, "edge-source-address", 20.0).await;
    // Its own address is still its own: denied by its policy, not carried either.
    attacker.send_datagram(datagram((cache.overlay, 50000), (dns.overlay, 5353), "own")).unwrap();
    counted(a1, "policy-denied", 1.0).await;
    assert!(next(&b, Duration::from_millis(300)).await.is_none());
}

/// Whether a connection attempt was refused: the handshake failed, or (TLS 1.3: the client is
/// done before the server has checked its certificate) the gateway closed it at once. A
/// datagram to `dns` is tried on it meanwhile.
async fn refused(attempt: anyhow::Result<quinn::Connection>, from: (IpAddr, u16), dns: IpAddr) -> bool {
    match attempt {
        Err(_) => true,
        Ok(conn) => {
            let _ = conn.send_datagram(datagram(from, (dns, 5353), "refused?"));
            tokio::time::timeout(Duration::from_secs(5), conn.closed()).await.is_ok()
        }
    }
}

/// The laptop: a device of zone-a labelled like web (so dns takes its UDP 5353).
const LAPTOP: &str = r#"
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: laptop
  namespace: shop
  annotations: {keyway.io/zone: zone-a, keyway.io/overlay-ips: "10.202.1.9"}
spec:
  serviceAccount: laptop
  labels: {app: web}
"#;

/// Attackers: a laptop whose device certificate was revoked (it still holds the certificate and
/// its key, and an open connection), and a machine with a certificate for the laptop's identity
/// from a CA of its own. Expected: the open connection is closed when the revocation list
/// changes, a new handshake with the revoked certificate fails, and so does the foreign one; dns
/// receives nothing from either.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_or_foreign_device_certificate_gets_no_connection() {
    let policies = format!("{POLICIES}{LAPTOP}");
    let o = Overlay::start_with("edge-revoke", ZONES, app(53), &policies, |c| {
        let dir = c.tls.ca.parent().unwrap().to_owned();
        keyway_gateway::ca::refresh_crl(&dir, std::time::SystemTime::now()).unwrap();
        c.edge.crls = vec![dir.join("revoked.pem")];
    })
    .await;
    let dns = o.workload("dns").clone();
    let laptop: IpAddr = "10.202.1.9".parse().unwrap();
    let b = agent_of(&o, "dns", "b1").await;
    let ca_dir = o.files.ca.clone();
    let ca = keyway_gateway::ca::Ca::load(&ca_dir).unwrap();
    let devices = o.scratch.0.join("devices");
    let issued =
        keyway_gateway::ca::issue_identity_with(&ca, "shop", "laptop", WorkloadUse::Device, 30, &devices).unwrap();
    let edge = o.gw("zone-a", "a1").edge_addr;
    let overlay_ca = ca_dir.join("ca.pem");
    // Before: the laptop's genuine certificate works.
    let conn = edge_connect(edge, "zone-a", &overlay_ca, &issued.cert, &issued.key).await.unwrap();
    send_until_delivered(&conn, &b, (laptop, 40000), (dns.overlay, 5353)).await;
    // Revoked: the open connection is closed, a new one refused, nothing reaches dns.
    keyway_gateway::ca::revoke(&ca_dir, &issued.cert, std::time::SystemTime::now()).unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await;
    assert!(closed.is_ok(), "the revoked laptop's open connection stayed open");
    let _ = conn.send_datagram(datagram((laptop, 41000), (dns.overlay, 5353), "revoked"));
    let again = edge_connect(edge, "zone-a", &overlay_ca, &issued.cert, &issued.key).await;
    assert!(
        refused(again, (laptop, 42000), dns.overlay).await,
        "a new connection with the revoked certificate stayed open"
    );
    // Foreign: the laptop's identity from another CA.
    let other = o.scratch.0.join("other-ca");
    keyway_gateway::ca::init_ca(&other, TD).unwrap();
    let forged = keyway_gateway::ca::issue_identity_with(
        &keyway_gateway::ca::Ca::load(&other).unwrap(),
        "shop",
        "laptop",
        WorkloadUse::Device,
        30,
        &o.scratch.0.join("forged"),
    )
    .unwrap();
    let foreign = edge_connect(edge, "zone-a", &overlay_ca, &forged.cert, &forged.key).await;
    assert!(refused(foreign, (laptop, 43000), dns.overlay).await, "a certificate of another CA kept a connection");
    let reached = next(&b, Duration::from_millis(500)).await;
    assert!(reached.is_none(), "dns got a datagram after the revocation: {reached:?}");
}

/// Attacker: the web pod, with its own genuine certificate, opening a flood of UDP flows that its
/// policy allows (each datagram from a new source port). Expected: it holds at most its share of
/// the gateway's UDP flows (`limits.max_udp_flows_per_source`), the rest dropped and counted, and
/// another workload's new flow still gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_source_cannot_take_every_udp_flow_of_a_gateway() {
    let mut workloads = app(54);
    workloads.push(w("shop", "web2", "web", "zone-a", "10.202.1.4", "127.54.1.4"));
    let o = Overlay::start_with("edge-flood", ZONES, workloads, POLICIES, |c| {
        c.limits.max_udp_flows = 64;
        c.limits.max_udp_flows_per_source = None;
    })
    .await;
    let (web, web2, dns) = (o.workload("web").clone(), o.workload("web2").clone(), o.workload("dns").clone());
    let a = agent_of(&o, "web", "a1").await;
    let a2 = agent_of(&o, "web2", "a1").await;
    let b = agent_of(&o, "dns", "b1").await;
    send_until_delivered(&a, &b, (web.overlay, 30000), (dns.overlay, 5353)).await;
    for port in 0..100u16 {
        a.send_datagram(datagram((web.overlay, 20000 + port), (dns.overlay, 5353), "flood")).unwrap();
    }
    // The flood is over once a limit dropped what did not fit (the share, or the whole table).
    let a1 = o.gw("zone-a", "a1").admin_addr;
    let dropped = |limit: &'static str| async move {
        metric(a1, "keyway_gateway_udp_datagrams_total", &format!("outcome=\"{limit}\"")).await
    };
    wait_until_async(Duration::from_secs(10), "the flood handled", || async {
        dropped("max_udp_flows_per_source").await + dropped("max_udp_flows").await >= 36.0
    })
    .await
    .unwrap();
    while next(&b, Duration::from_millis(300)).await.is_some() {}
    // web2's new flow is carried.
    a2.send_datagram(datagram((web2.overlay, 30000), (dns.overlay, 5353), "mine")).unwrap();
    let got = next(&b, Duration::from_secs(5)).await;
    assert!(
        got.as_ref().is_some_and(|d| d.src == web2.overlay && d.payload == b"mine"),
        "another source's flow after the flood: {got:?}"
    );
    assert!(dropped("max_udp_flows_per_source").await >= 80.0, "web held no more than its share");
}

/// Attacker: zone-b's own issuer (a compromised cluster: its CA signs zone-b's certificates),
/// minting a device certificate for zone-a's laptop. Every gateway trusts both zones' CAs and
/// pins each zone to its own (`zones[].ca`). Expected: zone-a's edge refuses it; the laptop's
/// genuine certificate, of zone-a's CA, is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_zones_issuer_cannot_mint_a_device_of_this_zone() {
    use keyway_gateway::ca::Ca;
    let dir = Scratch::new("edge-issuer-files").unwrap();
    let zone_b_ca = Ca::generate(TD, 2, std::time::SystemTime::now()).unwrap();
    let zb_dir = dir.0.join("zone-b-ca");
    zone_b_ca.save(&zb_dir, false).unwrap();
    let zb_ca_pem = zb_dir.join("ca.pem");
    let bundle = dir.0.join("bundle.pem");
    let policies = format!("{POLICIES}{LAPTOP}");
    let o = Overlay::start_with("edge-issuer", ZONES, app(55), &policies, |c| {
        let bed_ca = c.tls.ca.clone();
        let both = std::fs::read_to_string(&bed_ca).unwrap() + &std::fs::read_to_string(&zb_ca_pem).unwrap();
        std::fs::write(&bundle, both).unwrap();
        c.tls.ca = bundle.clone();
        for z in &mut c.zones {
            z.ca = Some(if z.name == "zone-b" { zb_ca_pem.clone() } else { bed_ca.clone() });
        }
        if c.zone == "zone-b" {
            let out = dir.0.join("zone-b-certs");
            let (paths, _) =
                keyway_gateway::ca::issue_gateway_with(&Ca::load(&zb_dir).unwrap(), "zone-b", &c.name, 1, &out)
                    .unwrap();
            (c.tls.cert, c.tls.key) = (paths.cert, paths.key);
        }
    })
    .await;
    let (dns, laptop) = (o.workload("dns").clone(), "10.202.1.9".parse::<IpAddr>().unwrap());
    let m = o.files.workload_mesh(dns.ns, dns.name);
    let b = edge_connect(o.gw("zone-b", "b1").edge_addr, "zone-b", &bundle, &m.cert, &m.key).await.unwrap();
    let edge = o.gw("zone-a", "a1").edge_addr;
    let forged = keyway_gateway::ca::issue_identity_with(
        &zone_b_ca,
        "shop",
        "laptop",
        WorkloadUse::Device,
        1,
        &dir.0.join("forged"),
    )
    .unwrap();
    let attempt = edge_connect(edge, "zone-a", &bundle, &forged.cert, &forged.key).await;
    assert!(refused(attempt, (laptop, 40000), dns.overlay).await, "zone-b's issuer minted a zone-a device");
    let reached = next(&b, Duration::from_millis(500)).await;
    assert!(reached.is_none(), "dns got a datagram from the forged laptop: {reached:?}");
    let genuine = keyway_gateway::ca::issue_identity_with(
        &Ca::load(&o.files.ca).unwrap(),
        "shop",
        "laptop",
        WorkloadUse::Device,
        30,
        &dir.0.join("genuine"),
    )
    .unwrap();
    let conn = edge_connect(edge, "zone-a", &bundle, &genuine.cert, &genuine.key).await.unwrap();
    send_until_delivered(&conn, &b, (laptop, 41000), (dns.overlay, 5353)).await;
}

/// Attacker: a pod's agent (its genuine certificate) opening edge connection after connection.
/// Expected: past its share (`limits.max_tunnel_connections_per_source`) each is closed at once
/// and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_source_cannot_open_edge_connections_without_end() {
    let o = Overlay::start_with("edge-conns", ZONES, app(56), POLICIES, |c| {
        c.limits.max_tunnel_connections_per_source = 4;
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(agent_of(&o, "web", "a1").await);
    }
    let fifth = agent_of(&o, "web", "a1").await;
    let closed = tokio::time::timeout(Duration::from_secs(5), fifth.closed()).await;
    assert!(closed.is_ok(), "the fifth edge connection of one source stayed open");
    let a1 = o.gw("zone-a", "a1").admin_addr;
    let label = "limit=\"max_tunnel_connections_per_source\"";
    assert!(metric(a1, "keyway_gateway_limit_refusals_total", label).await >= 1.0);
    assert!(held.iter().all(|c| c.close_reason().is_none()), "the four within the share stay open");
}

/// Attacker: the laptop (a device, its own genuine device certificate of the overlay CA) writes
/// datagrams and opens a TCP flow whose inner source is web's address (which dns takes UDP from).
/// Expected: both refused at its gateway (`edge-source-address`); dns gets nothing; its own
/// address still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_device_cannot_send_with_a_workloads_source_address() {
    let policies = format!("{POLICIES}{LAPTOP}");
    let o = Overlay::start("edge-dev-spoof", ZONES, app(57), &policies).await;
    let (web, dns) = (o.workload("web").clone(), o.workload("dns").clone());
    let laptop: IpAddr = "10.202.1.9".parse().unwrap();
    let b = agent_of(&o, "dns", "b1").await;
    let ca = keyway_gateway::ca::Ca::load(&o.files.ca).unwrap();
    let issued = keyway_gateway::ca::issue_identity_with(
        &ca,
        "shop",
        "laptop",
        WorkloadUse::Device,
        30,
        &o.scratch.0.join("dev"),
    )
    .unwrap();
    let edge = o.gw("zone-a", "a1").edge_addr;
    let device = edge_connect(edge, "zone-a", &o.files.ca.join("ca.pem"), &issued.cert, &issued.key).await.unwrap();
    for port in 0..10u16 {
        device.send_datagram(datagram((web.overlay, 50000 + port), (dns.overlay, 5353), "spoofed")).unwrap();
    }
    let reached = next(&b, Duration::from_millis(500)).await;
    assert!(reached.is_none(), "a spoofed datagram of the laptop reached dns: {reached:?}");
    let a1 = o.gw("zone-a", "a1").admin_addr;
    counted(a1, "edge-source-address", 10.0).await;
    // A TCP flow claiming web's address: refused with a status, never opened.
    let (mut send, mut recv) = device.open_bi().await.unwrap();
    let header = keyway_policy::flow::FlowHeader {
        flow_id: 1,
        src: web.overlay,
        dst: dns.overlay,
        dst_port: 8080,
        protocol: keyway_policy::Protocol::Tcp,
        identity: String::new(),
        src_zone: String::new(),
        src_gateway: String::new(),
        verdict: String::new(),
    };
    send.write_all(&header.encode()).await.unwrap();
    let mut prefix = [0u8; 6];
    tokio::time::timeout(Duration::from_secs(10), recv.read_exact(&mut prefix)).await.unwrap().unwrap();
    let (code, n) = keyway_policy::flow::Status::decode_prefix(&prefix).unwrap();
    let mut reason = vec![0u8; n];
    recv.read_exact(&mut reason).await.unwrap();
    assert_ne!(code, keyway_policy::flow::StatusCode::Connected, "the laptop's TCP as web was connected");
    assert_eq!(String::from_utf8_lossy(&reason), "edge-source-address");
    // Its own address is carried.
    send_until_delivered(&device, &b, (laptop, 40000), (dns.overlay, 5353)).await;
}
