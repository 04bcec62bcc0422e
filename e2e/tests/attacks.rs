//! The attack suite: each test mounts one attack exactly as its attacker would, with only what
//! that attacker can have (a pod's own key bundle fetched over the network, a sniffed credential,
//! a peer certificate of another zone), against real gateways and real Envoy sidecars running the
//! real filter in network namespaces. docs/security.md lists them with the attacker and the
//! expected outcome. Needs root; fails (never skips) when it cannot build its namespaces.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keyway_e2e::cluster::{Cluster, DNS_PORT, INTERNET, INTERNET_PORTS, WorkloadPod};
use keyway_e2e::envoy::{ENVOY_UID, KEYWAY_INBOUND_PORT};
use keyway_e2e::proc::Proc;
use keyway_e2e::sniff;
use keyway_e2e::topology::ns_sh;
use keyway_e2e::wait::wait_until;
use keyway_gateway::config::{DEFAULT_ADMIN_PORT, DEFAULT_TUNNEL_PORT};
use keyway_policy::auth::TicketClaims;
use keyway_policy::engine::Peer;
use keyway_policy::keyservice::KeyBundle;
use keyway_policy::wire::{KEY_SERVICE_IP_PARAM, KEY_SERVICE_PATH, TICKET_HEADER, TOKEN_HEADER};
use keyway_policy::{Protocol, Verdict};

/// An HTTP GET from inside the pod `ns` as the app container of that pod can send it. The app
/// runs as root in these pods, so it can take the proxy's UID and step around the capture rules
/// (Istio's known limit, see docs/security.md): the strongest app-container attacker.
fn get_as_pod(c: &Cluster, ns: &str, url: &str) -> (u16, String) {
    let e2e = c.opts.e2e.display().to_string();
    let reuid = format!("--reuid={ENVOY_UID}");
    let regid = format!("--regid={ENVOY_UID}");
    let out = ns_sh(ns, &["setpriv", &reuid, &regid, "--clear-groups", &e2e, "get", url]).unwrap();
    let (status, body) = out.split_once('\n').unwrap_or((out.as_str(), ""));
    (status.trim().parse().unwrap_or(0), body.to_owned())
}

/// The tunnel port (and key service) of the first gateway of `w`'s zone.
fn zone_tunnel(c: &Cluster, w: &WorkloadPod) -> SocketAddr {
    let gw = c.gateways.iter().find(|g| g.zone == w.zone).expect("a gateway of the zone");
    SocketAddr::new(gw.pod.ip.parse().unwrap(), DEFAULT_TUNNEL_PORT)
}

/// The key bundle `w`'s own pod fetches from its zone's gateway, over the network, with its
/// sidecar's mesh certificate (the most an app container could hold).
fn own_bundle(c: &Cluster, w: &WorkloadPod) -> KeyBundle {
    let mesh = c.sidecar_mesh(w).unwrap();
    let (status, body) = c.raw_keys(&w.pod.ns, Some(&mesh), zone_tunnel(c, w), w.overlay);
    assert_eq!(status, 200, "{} fetches its own bundle: {body}", w.name);
    serde_json::from_str(&body).unwrap()
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A pair of workloads of one zone where the policy denies `attacker` → `victim` on the victim's
/// first port.
fn denied_pair(c: &Cluster) -> (&WorkloadPod, &WorkloadPod, u16) {
    for v in &c.workloads {
        let Some(&port) = v.ports.first() else { continue };
        for a in c.workloads.iter().filter(|a| a.zone == v.zone && a.name != v.name) {
            let d = c.engine.decide(Peer::Workload(a.index), Peer::Workload(v.index), Protocol::Tcp, port);
            if d.verdict == Verdict::Deny {
                return (a, v, port);
            }
        }
    }
    panic!("the sample has no denied pair within one zone");
}

/// Attacker: the app container of an enforced pod. It fetches its own key bundle from the key
/// service (as its sidecar does), seals a ticket with the bundle's ticket key naming any source
/// identity, and connects straight to another workload's keyway inbound port with its own mesh
/// certificate. Expected: refused (the port accepts gateways' certificates only); and were it a
/// gateway, the ticket would still be refused, because a bundle's ticket key verifies only
/// tickets addressed to its own workload.
#[test]
fn a_pods_own_bundle_cannot_mint_tickets_for_another_workload() {
    let (_turn, c) = Cluster::for_test("at1");
    let (attacker, victim, port) = denied_pair(&c);
    let bundle = own_bundle(&c, attacker);
    let now = now_ms();
    let tk = bundle.ticket_keys.last().expect("the bundle has a ticket key");
    let key = keyway_policy::auth::TicketKey::from_base64url(&tk.key).unwrap();
    // Claim to be the victim's own namespace's admin, or anyone: the identity is the attacker's choice.
    let forged = TicketClaims {
        epoch: tk.epoch,
        src: victim.overlay,
        dst: victim.overlay,
        dst_port: port,
        protocol: Protocol::Tcp,
        issued_at_ms: now,
        nonce: *b"attack-nonce",
        src_identity: "spiffe://cluster.local/ns/kube-system/sa/anything".to_owned(),
    }
    .seal(&key)
    .unwrap();
    let victim_ip: IpAddr = victim.pod.ip.parse().unwrap();
    let inbound = SocketAddr::new(victim_ip, KEYWAY_INBOUND_PORT);
    let own = c.sidecar_mesh(attacker).unwrap();
    let headers = [(TICKET_HEADER, forged.as_str())];
    let authority = SocketAddr::new(victim.overlay, port);
    let out = c.raw_connect(&attacker.pod.ns, Some(&own), inbound, authority, &headers).unwrap();
    assert!(
        out.starts_with("refused"),
        "{} reached {}'s keyway inbound port with its own certificate: {out}",
        attacker.name,
        victim.name
    );
    // Past the certificate check (a gateway's certificate, from the underlay), the ticket itself.
    let gw_mesh = c.gateway_mesh(&victim.zone, "gw-1");
    let out = c.raw_connect(&c.topo.router, Some(&gw_mesh), inbound, authority, &headers).unwrap();
    assert!(
        out.starts_with("status 403 reason ticket-mac"),
        "{} minted a ticket for {}:{port} from its own bundle and got in: {out}",
        attacker.name,
        victim.name
    );
}

/// Attacker: the app container of an enforced pod, reaching its zone's gateway over the network.
/// It reads the admin endpoints (configuration, peers, metrics) and probes the key service to
/// learn which addresses are workloads and where they live. Expected: the admin endpoints beyond
/// health and readiness answer only the gateway's own host, and every key request that is not
/// for the asking pod itself gets one and the same refusal.
#[test]
fn a_pod_learns_nothing_from_the_gateways_admin_and_key_service() {
    let (_turn, c) = Cluster::for_test("at2");
    let me = c.workloads.first().expect("a workload");
    let gw = c.gateways.iter().find(|g| g.zone == me.zone).expect("a gateway of the zone");
    let base = format!("{}:{DEFAULT_ADMIN_PORT}", gw.pod.ip);
    for path in ["/config_dump", "/peers", "/metrics"] {
        let (status, body) = get_as_pod(&c, &me.pod.ns, &format!("{base}{path}"));
        assert_eq!(status, 403, "{} read {path} of its gateway: {status} {body}", me.name);
    }
    for path in ["/healthz", "/readyz"] {
        assert_eq!(get_as_pod(&c, &me.pod.ns, &format!("{base}{path}")).0, 200, "{path} stays open to probes");
    }
    // No key service on the admin port.
    let on_admin =
        get_as_pod(&c, &me.pod.ns, &format!("{base}{KEY_SERVICE_PATH}?{KEY_SERVICE_IP_PARAM}={}", me.overlay));
    assert_eq!(on_admin.0, 404, "{on_admin:?}");
    // Its own keys, with its own certificate, on the tunnel port: yes.
    let mesh = c.sidecar_mesh(me).unwrap();
    let keys = |ip: IpAddr| c.raw_keys(&me.pod.ns, Some(&mesh), zone_tunnel(&c, me), ip);
    assert_eq!(keys(me.overlay).0, 200);
    // Anything else: one answer, whatever the address is.
    let same_zone = c.workloads.iter().find(|w| w.zone == me.zone && w.name != me.name).expect("a neighbour");
    let other_zone = c.workloads.iter().find(|w| w.zone != me.zone).expect("a workload elsewhere");
    let nobody: IpAddr = "10.255.255.254".parse().unwrap();
    let answers: Vec<(u16, String)> = [same_zone.overlay, other_zone.overlay, nobody].into_iter().map(keys).collect();
    assert_eq!(answers[0].0, 403, "a neighbour's keys: {:?}", answers[0]);
    assert!(
        answers.iter().all(|a| *a == answers[0]),
        "the key service tells a neighbour, another zone's workload and no workload apart: {answers:?}"
    );
}

/// Attacker: whoever holds one zone's leaked epoch secrets file (a compromised gateway of that
/// zone, or one read of its Secret). It mints a token for a workload of another zone (its
/// identity, its overlay address, a genuine epoch of the leaked zone) and sends it to that zone's
/// gateway from the workload's own pod as the proxy's UID, and it mints a ticket for a workload of
/// the other zone and connects to that workload's keyway inbound port. Expected: both refused,
/// because each zone's gateways hold only their own zone's secrets.
#[test]
fn one_zones_leaked_secrets_impersonate_no_workload_of_another_zone() {
    let (_turn, c) = Cluster::for_test("at3");
    // The bed's zone-a secrets file, as the attacker read it.
    let leaked = c.secrets("zone-a");
    // A workload of zone-b and a destination its policy allows, so only the token stands in the way.
    let (src, dst, port) = c
        .workloads
        .iter()
        .filter(|s| s.zone == "zone-b")
        .find_map(|s| {
            c.workloads.iter().filter(|d| d.name != s.name).find_map(|d| {
                let allowed = |p: &&u16| {
                    c.engine.decide(Peer::Workload(s.index), Peer::Workload(d.index), Protocol::Tcp, **p).verdict
                        == Verdict::Allow
                };
                d.ports.iter().find(allowed).map(|p| (s, d, *p))
            })
        })
        .expect("a zone-b workload with an allowed destination");
    let identity = c.engine.inventory().workloads[src.index].identity(keyway_gateway::config::DEFAULT_TRUST_DOMAIN);
    let target = SocketAddr::new(dst.overlay, port);
    let token = keyway_e2e::credentials::token(&leaked, &identity, src.overlay, target, None, now_ms()).unwrap();
    let gw = SocketAddr::new(c.gateway_ip("zone-b", "gw-1").unwrap(), DEFAULT_TUNNEL_PORT);
    let mut taken = Vec::new();
    // Sent from the workload's pod with its certificate: only the token stands in the way.
    let src_mesh = c.sidecar_mesh(src).unwrap();
    let out = c.raw_connect(&src.pod.ns, Some(&src_mesh), gw, target, &[(TOKEN_HEADER, &token)]).unwrap();
    if !out.starts_with("status 403 reason token-mac") {
        taken.push(format!("a token of {} ({}) sent to zone-b's gateway: {out}", src.name, src.zone));
    }

    // A ticket for a zone-b workload, sealed with zone-a's secret, straight to its inbound port.
    let victim = c.workloads.iter().find(|w| w.zone == "zone-b" && !w.ports.is_empty()).expect("a zone-b workload");
    let vport = victim.ports[0];
    let ticket = keyway_e2e::credentials::ticket(
        &leaked,
        (
            &c.engine.inventory().workloads[victim.index].identity(keyway_gateway::config::DEFAULT_TRUST_DOMAIN),
            victim.overlay,
        ),
        src.overlay,
        &identity,
        SocketAddr::new(victim.overlay, vport),
    )
    .unwrap();
    let victim_ip: IpAddr = victim.pod.ip.parse().unwrap();
    // A compromised zone-a gateway's own mesh certificate gets it to the port.
    let gw_mesh = c.gateway_mesh("zone-a", "gw-1");
    let out = c
        .raw_connect(
            &c.topo.router,
            Some(&gw_mesh),
            SocketAddr::new(victim_ip, KEYWAY_INBOUND_PORT),
            SocketAddr::new(victim.overlay, vport),
            &[(TICKET_HEADER, &ticket)],
        )
        .unwrap();
    if !out.starts_with("status 403 reason ticket-mac") {
        taken.push(format!("a ticket sent to {} ({}): {out}", victim.name, victim.zone));
    }
    assert!(taken.is_empty(), "zone-a's leaked secrets impersonated zone-b workloads:\n{}", taken.join("\n"));
}

/// Attacker: the app container of an enforced pod (root, as these app containers run), sending
/// what keyway does not carry yet: UDP to another workload's pod and to a host outside the
/// overlay, SCTP, ICMP echo. Expected: refused in the pod itself (REJECT, so the send fails at
/// once), nothing reaches; UDP to the cluster resolver's DNS port is the one exception (the bed's
/// resolver is the internet host here).
#[test]
fn udp_sctp_and_icmp_of_an_enforced_pod_reach_nothing() {
    let internet: IpAddr = INTERNET.parse().unwrap();
    let (_turn, c) = Cluster::for_test_with("at4", |opts| opts.resolver = Some(internet));
    let me = c.workload("shop/frontend").unwrap();
    let other = c.workloads.iter().find(|w| w.name != me.name && !w.ports.is_empty()).expect("another workload");
    let other_ip: IpAddr = other.pod.ip.parse().unwrap();
    let refused = [
        SocketAddr::new(other_ip, other.ports[0]),
        SocketAddr::new(other_ip, DNS_PORT),
        SocketAddr::new(internet, INTERNET_PORTS[0]),
    ];
    let mut udp: Vec<SocketAddr> = refused.to_vec();
    udp.push(SocketAddr::new(internet, DNS_PORT));
    let results = c.datagrams(me, &udp, &[other_ip, internet], Duration::from_secs(1)).unwrap();
    for r in &results {
        println!("{}: sent {}, reply {:?}, error {:?}", r.target, r.sent, r.reply, r.error);
    }
    let (dns, rest): (Vec<_>, Vec<_>) =
        results.iter().partition(|r| r.target == format!("udp {}", SocketAddr::new(internet, DNS_PORT)));
    let got_out: Vec<_> = rest.iter().filter(|r| r.sent || !r.reply.is_empty()).collect();
    assert!(got_out.is_empty(), "{} sent what keyway does not carry: {got_out:#?}", me.name);
    assert_eq!(rest.len(), refused.len() + 4, "{results:#?}");
    assert!(
        rest.iter().all(|r| r.error.contains("not permitted")),
        "every refusal is immediate (REJECT), none a silent drop: {rest:#?}"
    );
    assert!(
        dns.len() == 1 && dns[0].sent && dns[0].reply.starts_with("keyway-app internet udp port 53"),
        "UDP to the resolver's DNS port stays open: {dns:?}"
    );
}

/// Two distinct workloads that `fits`, where the policy allows `src` → `dst` on a port of `dst`.
fn allowed_pair(c: &Cluster, fits: impl Fn(&WorkloadPod, &WorkloadPod) -> bool) -> (&WorkloadPod, &WorkloadPod, u16) {
    c.workloads
        .iter()
        .find_map(|s| {
            c.workloads.iter().filter(|d| d.name != s.name && fits(s, d)).find_map(|d| {
                let allowed = |p: &&u16| {
                    c.engine.decide(Peer::Workload(s.index), Peer::Workload(d.index), Protocol::Tcp, **p).verdict
                        == Verdict::Allow
                };
                d.ports.iter().find(allowed).map(|p| (s, d, *p))
            })
        })
        .expect("the sample has such an allowed pair")
}

/// The SPIFFE identity of a workload.
fn identity(c: &Cluster, w: &WorkloadPod) -> String {
    c.engine.inventory().workloads[w.index].identity(keyway_gateway::config::DEFAULT_TRUST_DOMAIN)
}

/// Every key string of a bundle.
fn key_strings(b: &KeyBundle) -> Vec<String> {
    b.workload_keys.iter().chain(&b.ticket_keys).map(|k| k.key.clone()).collect()
}

/// Attacker: the app container of an enforced pod that takes over its neighbour's address on
/// the bridge (ARP spoofing with the default `CAP_NET_RAW`). Modelled as running in the
/// neighbour's own network namespace, so it holds the address completely, but with only what
/// it has: its own mesh certificate, or none (the neighbour's key stays in the neighbour's
/// sidecar). It asks for the neighbour's key bundle every way there is (plain HTTP/1 on the
/// admin port's old key path, cleartext HTTP/2 to the tunnel port, TLS with its own certificate)
/// and presents the neighbour's genuine token (as sniffed) at the gateway from the neighbour's
/// address. Expected: no bundle (the uniform refusal, or no handshake), the token refused
/// (`token-peer-identity`); the same token kind from the neighbour's own sidecar certificate
/// passes, so the certificate alone made the difference.
#[test]
fn a_pod_holding_its_neighbours_address_gets_neither_its_keys_nor_its_flows() {
    let (_turn, c) = Cluster::for_test("at5");
    // The neighbour (victim) with a destination its policy allows, so only identity stands in the way.
    let (victim, dst, port) = allowed_pair(&c, |v, _| {
        c.workloads.iter().any(|a| a.zone == v.zone && a.name != v.name && identity(&c, a) != identity(&c, v))
    });
    let attacker = c
        .workloads
        .iter()
        .find(|a| a.zone == victim.zone && a.name != victim.name && identity(&c, a) != identity(&c, victim))
        .expect("a neighbour of another identity");
    let genuine = key_strings(&own_bundle(&c, victim));
    let leaks = |body: &str| genuine.iter().any(|k| body.contains(k.as_str()));
    let gw = zone_tunnel(&c, victim);
    let own = c.sidecar_mesh(attacker).unwrap();
    // The one refusal the key service gives for anything not the asker's own.
    let refusal = c.raw_keys(&attacker.pod.ns, Some(&own), gw, "10.255.255.254".parse().unwrap());
    assert_eq!(refusal.0, 403, "the key service's refusal: {refusal:?}");
    let at = &victim.pod.ns; // the attacker, holding the neighbour's address
    let mut taken = Vec::new();

    let url = format!("{}:{DEFAULT_ADMIN_PORT}{KEY_SERVICE_PATH}?{KEY_SERVICE_IP_PARAM}={}", gw.ip(), victim.overlay);
    let (status, body) = get_as_pod(&c, at, &url);
    println!("plain HTTP/1 GET on the admin port: {status} {body}");
    if status == 200 || leaks(&body) {
        taken.push(format!("its bundle by plain HTTP/1 GET on the admin port {DEFAULT_ADMIN_PORT}: {status} {body}"));
    }
    for (how, mesh) in [("cleartext HTTP/2", None), ("TLS with its own certificate", Some(&own))] {
        let answer = c.raw_keys(at, mesh, gw, victim.overlay);
        println!("{how} to the tunnel port: {answer:?}");
        if !(answer.0 == 0 || answer == refusal) || leaks(&answer.1) {
            taken.push(format!("its bundle by {how} to the tunnel port: {answer:?}"));
        }
    }

    let target = SocketAddr::new(dst.overlay, port);
    let token = c.mint_token(victim, dst.overlay, port, None).unwrap();
    let out = c.raw_connect(at, None, gw, target, &[(TOKEN_HEADER, &token)]).unwrap();
    println!("its token in cleartext HTTP/2: {out}");
    if !out.starts_with("refused") {
        taken.push(format!("a flow with its token in cleartext HTTP/2: {out}"));
    }
    let out = c.raw_connect(at, Some(&own), gw, target, &[(TOKEN_HEADER, &token)]).unwrap();
    println!("its token with the attacker's own certificate: {out}");
    if !out.starts_with("status 403 reason token-peer-identity") {
        taken.push(format!("a flow with its token and the attacker's own certificate: {out}"));
    }
    assert!(
        taken.is_empty(),
        "{} holding {}'s address ({}) took:\n{}",
        attacker.name,
        victim.name,
        victim.pod.ip,
        taken.join("\n")
    );
    // The victim's own sidecar certificate with a fresh token of the same kind passes.
    let fresh = c.mint_token(victim, dst.overlay, port, None).unwrap();
    let victim_mesh = c.sidecar_mesh(victim).unwrap();
    let out = c.raw_connect(at, Some(&victim_mesh), gw, target, &[(TOKEN_HEADER, &fresh)]).unwrap();
    assert!(out.starts_with("status 200"), "the genuine sidecar's flow {} → {target}: {out}", victim.name);
}

/// A TCP port nothing listens on: a segment to it ends a capture.
const MARKER_PORT: u16 = 9;

/// The successful key fetches of `w`'s sidecar so far (its Envoy's stats).
fn key_refreshes(c: &Cluster, w: &WorkloadPod) -> u64 {
    let url = format!("127.0.0.1:{}/stats?filter=key_refreshes", keyway_e2e::envoy::ADMIN_PORT);
    let (_, stats) = c.http_get(&w.pod.ns, &url).unwrap();
    stats.lines().filter(|l| l.contains("outcome=.=ok")).filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok()).sum()
}

/// Attacker: any pod with `CAP_NET_RAW` on the pods' layer-2 segment of a bridge CNI, capturing
/// everything. Modelled at the bridge's host side (the zone's namespace), which sees every frame
/// of every pod of the zone, the most ARP spoofing can get it. While it captures, genuine traffic
/// runs: every sidecar of the zone fetches its keys (as it does every refresh; the test fetches
/// each workload's bundle through the proper channel too), a flow from one workload's app to
/// another's through the tunnel and the delivery, and a CONNECT with a genuine token. Expected:
/// the capture holds the traffic of the tunnel port and the keyway inbound port, all of it TLS
/// records, and no credential in cleartext anywhere: no HTTP/2 client preface, no key-service
/// path, no key of any bundle, no token. HPACK can hide a header's name and value in a cleartext
/// stream (Huffman coding), so the TLS framing of every byte on keyway's ports is what rules out
/// tokens and tickets; the preface says whether HTTP/2 ran in cleartext at all.
#[test]
fn a_sniffer_on_the_pods_bridge_sees_only_tls_on_keyways_ports() {
    let (_turn, c) = Cluster::for_test("at6");
    // An allowed pair within one zone, so the tunnel and the delivery cross the same bridge.
    let (src, dst, port) = allowed_pair(&c, |s, d| s.zone == d.zone);
    let bridge = c.topo.zones[usize::from(src.pod.zone) - 1].clone();
    let capture = c.dir.join("sniffed.jsonl");
    let args = [
        c.opts.e2e.display().to_string(),
        "sniff".into(),
        "--out".into(),
        capture.display().to_string(),
        "--stop-port".into(),
        MARKER_PORT.to_string(),
    ];
    let mut sniffer = Proc::start("sniffer", &bridge, None, &args, &c.dir.join("logs/sniffer.log"), &[]).unwrap();
    wait_until(Duration::from_secs(10), "the capture to run", || capture.exists() || !sniffer.running()).unwrap();
    assert!(sniffer.running(), "the sniffer: {}", sniffer.tail(5));
    let refreshed = key_refreshes(&c, src);

    // Genuine traffic. Each workload of the zone fetches its bundle as its sidecar does.
    let zone: Vec<&WorkloadPod> = c.workloads.iter().filter(|w| w.zone == src.zone).collect();
    let bundles: Vec<(&WorkloadPod, KeyBundle)> = zone.iter().map(|w| (*w, own_bundle(&c, w))).collect();
    // The app's flow through its sidecar, the tunnel, the gateway and the delivery.
    let target = SocketAddr::new(dst.overlay, port);
    let probe = c.probe(src, &[target], 4096, Duration::from_secs(5)).unwrap();
    assert!(probe[0].connected && probe[0].intact, "{} → {target} ({}): {:?}", src.name, dst.name, probe[0]);
    // A CONNECT with a genuine token, with the sidecar's certificate.
    let token = c.mint_token(src, dst.overlay, port, None).unwrap();
    let src_mesh = c.sidecar_mesh(src).unwrap();
    let out = c.raw_connect(&src.pod.ns, Some(&src_mesh), zone_tunnel(&c, src), target, &[(TOKEN_HEADER, &token)]);
    let out = out.unwrap();
    assert!(out.starts_with("status 200"), "{out}");
    // And a refresh of the sidecar's keys on its standing connection.
    wait_until(Duration::from_secs(10), "a key refresh of the sidecar", || key_refreshes(&c, src) > refreshed).unwrap();
    // The marker ends the capture once everything before it is in.
    let marker = SocketAddr::new(src.pod.ip.parse().unwrap(), MARKER_PORT);
    c.probe_from_ns(&bridge, marker, Duration::from_secs(1)).unwrap();
    wait_until(Duration::from_secs(10), "the capture to end", || !sniffer.running()).unwrap();

    let streams = sniff::streams(&sniff::load(&capture).unwrap());
    let mut needles: Vec<(String, Vec<u8>)> = vec![
        ("the HTTP/2 client preface".into(), b"PRI * HTTP/2.0".to_vec()),
        ("the key service's path".into(), KEY_SERVICE_PATH.as_bytes().to_vec()),
        ("the token header's name".into(), TOKEN_HEADER.as_bytes().to_vec()),
        ("the ticket header's name".into(), TICKET_HEADER.as_bytes().to_vec()),
        ("a genuine token".into(), token.as_bytes().to_vec()),
    ];
    for (w, b) in &bundles {
        needles.extend(key_strings(b).into_iter().map(|k| (format!("a key of {}'s bundle", w.name), k.into_bytes())));
    }
    let keyway_ports = [DEFAULT_TUNNEL_PORT, KEYWAY_INBOUND_PORT];
    let mut bytes: BTreeMap<u16, usize> = keyway_ports.iter().map(|p| (*p, 0)).collect();
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for s in &streams {
        let flow = format!("{} → {}", s.src, s.dst);
        if let Some(p) = keyway_ports.iter().find(|p| s.src.port() == **p || s.dst.port() == **p) {
            *bytes.entry(*p).or_default() += s.len();
            for run in s.runs.iter().filter(|r| !sniff::is_tls(r)) {
                let example = format!("{flow}, {} bytes: {:?}", run.data.len(), sniff::excerpt(run));
                seen.entry("bytes on keyway's ports that are not TLS records".into()).or_default().push(example);
            }
        }
        for (what, needle) in &needles {
            if sniff::contains(s, needle) {
                seen.entry(format!("{what} in cleartext")).or_default().push(flow.clone());
            }
        }
    }
    let on_ports = streams.iter().filter(|s| keyway_ports.iter().any(|p| s.src.port() == *p || s.dst.port() == *p));
    let (checked, whole) =
        on_ports.fold((0, 0), |(n, w), s| (n + 1, w + usize::from(s.runs.iter().any(|r| r.from_start))));
    println!("captured on keyway's ports: {bytes:?} bytes in {checked} streams ({whole} from their first byte)");
    let short: Vec<String> =
        bytes.iter().filter(|(_, n)| **n < 2048).map(|(p, n)| format!("port {p}: {n} bytes")).collect();
    assert!(short.is_empty(), "the capture missed keyway's traffic: {}", short.join(", "));
    let seen: Vec<String> =
        seen.iter().map(|(what, flows)| format!("{what}: {} stream(s), e.g. {}", flows.len(), flows[0])).collect();
    assert!(seen.is_empty(), "a sniffer on {}'s bridge saw:\n{}", src.zone, seen.join("\n"));
}
