//! `keyway agent`'s core on loopback against an in-process fake edge gateway (a quinn server
//! with a gateway certificate of the test CA, ALPN keyway-edge/1, client certificates required):
//! TCP both ways, refusals, UDP both ways, spoofed sources, fail closed and reconnection. The
//! host side (TUN, iptables) is replaced by channels and a table of original destinations; the
//! e2e suite runs the real command in network namespaces.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use keyway_gateway::agent::config::AgentConfig;
use keyway_gateway::agent::metrics::DropReason;
use keyway_gateway::agent::{self, AgentHandle, OriginalDst, PacketIo, packet};
use keyway_gateway::ca::Ca;
use keyway_policy::Protocol;
use keyway_policy::flow::{Datagram, FlowHeader, Status, StatusCode};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

const OVERLAY_IP: &str = "127.0.0.9";
const DEADLINE: Duration = Duration::from_secs(15);

fn tmpdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keyway-agent-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The CA, the gateway's certificate and the device's, on disk.
struct Pki {
    dir: PathBuf,
    ca: Ca,
    gw_cert: String,
    gw_key: String,
}

fn pki(name: &str) -> Pki {
    let dir = tmpdir(name);
    let now = SystemTime::now();
    let ca = Ca::generate("cluster.local", 2, now).unwrap();
    let gw = ca.issue("zone-a", "gw-1", 1, now).unwrap();
    let (dev_cert, dev_key) = ca.issue_workload("devices", "laptop", 1, now).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.cert_pem()).unwrap();
    std::fs::write(dir.join("laptop.pem"), dev_cert).unwrap();
    std::fs::write(dir.join("laptop-key.pem"), dev_key).unwrap();
    Pki { dir, gw_cert: gw.cert_pem.clone(), gw_key: gw.key_pem().to_owned(), ca }
}

/// A fake edge gateway listening on `addr`.
fn edge(p: &Pki, addr: SocketAddr) -> quinn::Endpoint {
    try_edge(p, addr).unwrap()
}

fn try_edge(p: &Pki, addr: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(p.ca.cert_pem().as_bytes()).unwrap()).unwrap();
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build().unwrap();
    let chain = vec![CertificateDer::from_pem_slice(p.gw_cert.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(p.gw_key.as_bytes()).unwrap();
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap();
    tls.alpn_protocols = vec![agent::edge::EDGE_ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    quinn::Endpoint::server(quinn::ServerConfig::with_crypto(Arc::new(quic)), addr)
}

fn config(dir: &Path, gateways: &[SocketAddr]) -> AgentConfig {
    let gws: Vec<String> = gateways.iter().map(|g| format!("\"{g}\"")).collect();
    let text = format!(
        "zone: zone-a\noverlay_ip: {OVERLAY_IP}\noverlay_cidrs: [127.0.0.8/29]\ngateways: [{}]\n\
         tls: {{ca: {d}/ca.pem, cert: {d}/laptop.pem, key: {d}/laptop-key.pem}}\n",
        gws.join(", "),
        d = dir.display()
    );
    AgentConfig::parse(&text, "agent.yaml").unwrap()
}

/// The test's stand-in for iptables: the original destination of each captured connection, by
/// its source port.
type Redirects = Arc<Mutex<HashMap<u16, SocketAddr>>>;

struct Running {
    handle: AgentHandle,
    redirects: Redirects,
    from_host: mpsc::Sender<Vec<u8>>,
    to_host: mpsc::Receiver<Vec<u8>>,
}

async fn start_agent(cfg: &AgentConfig) -> Running {
    let redirects: Redirects = Arc::default();
    let r = redirects.clone();
    let orig: OriginalDst = Arc::new(move |s: &tokio::net::TcpStream| {
        let port = s.peer_addr()?.port();
        r.lock().unwrap().get(&port).copied().ok_or_else(|| std::io::Error::other("not captured"))
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (from_tx, from_host) = mpsc::channel(64);
    let (to_host, to_rx) = mpsc::channel(64);
    let handle = agent::start(cfg, Some((listener, orig)), PacketIo { from_host, to_host }).await.unwrap();
    Running { handle, redirects, from_host: from_tx, to_host: to_rx }
}

impl Running {
    /// A local application connecting to `dst` (captured to the agent's listener).
    async fn connect(&self, dst: SocketAddr) -> tokio::net::TcpStream {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        self.redirects.lock().unwrap().insert(sock.local_addr().unwrap().port(), dst);
        sock.connect(self.handle.tcp_addr.unwrap()).await.unwrap()
    }

    async fn wait_connected(&self, n: u64) {
        let m = self.handle.metrics.clone();
        wait_for("gateways connected", || m.gateways_connected.load(std::sync::atomic::Ordering::Relaxed) == n).await;
    }
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let end = tokio::time::Instant::now() + DEADLINE;
    while !cond() {
        assert!(tokio::time::Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, f).await.expect("within the deadline")
}

async fn accept(server: &quinn::Endpoint) -> quinn::Connection {
    within(async { server.accept().await.unwrap().await.unwrap() }).await
}

async fn read_header(recv: &mut quinn::RecvStream) -> FlowHeader {
    let mut prefix = [0u8; 6];
    recv.read_exact(&mut prefix).await.unwrap();
    let n = FlowHeader::body_len(&prefix).unwrap();
    let mut all = prefix.to_vec();
    all.resize(6 + n, 0);
    recv.read_exact(&mut all[6..]).await.unwrap();
    FlowHeader::decode(&all).unwrap()
}

async fn read_status(recv: &mut quinn::RecvStream) -> Status {
    let mut prefix = [0u8; 6];
    recv.read_exact(&mut prefix).await.unwrap();
    let (code, n) = Status::decode_prefix(&prefix).unwrap();
    let mut reason = vec![0u8; n];
    recv.read_exact(&mut reason).await.unwrap();
    Status { code, reason: String::from_utf8(reason).unwrap() }
}

fn overlay_ip() -> IpAddr {
    OVERLAY_IP.parse().unwrap()
}

#[tokio::test]
async fn a_tcp_flow_carries_its_header_and_bytes_both_ways_and_a_refusal_resets() {
    let p = pki("tcp-out");
    let server = edge(&p, "127.0.0.1:0".parse().unwrap());
    let a = start_agent(&config(&p.dir, &[server.local_addr().unwrap()])).await;
    let conn = accept(&server).await;
    a.wait_connected(1).await;

    let dst: SocketAddr = "10.128.2.20:6379".parse().unwrap();
    let gateway = async {
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        let h = read_header(&mut recv).await;
        send.write_all(&Status { code: StatusCode::Connected, reason: String::new() }.encode()).await.unwrap();
        let got = recv.read_to_end(1 << 20).await.unwrap();
        send.write_all(&got.to_ascii_uppercase()).await.unwrap();
        send.finish().unwrap();
        h
    };
    let app = async {
        let mut s = a.connect(dst).await;
        s.write_all(b"hello through the overlay").await.unwrap();
        s.shutdown().await.unwrap();
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.unwrap();
        back
    };
    let (h, back) = within(async { tokio::join!(gateway, app) }).await;
    assert_eq!(back, b"HELLO THROUGH THE OVERLAY");
    assert_eq!((h.src, h.dst, h.dst_port, h.protocol), (overlay_ip(), dst.ip(), 6379, Protocol::Tcp));
    assert_eq!((h.identity.as_str(), h.src_zone.as_str(), h.verdict.as_str()), ("", "", ""));

    // Denied by the gateway: the application sees a reset.
    let gateway = async {
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        read_header(&mut recv).await;
        send.write_all(&Status { code: StatusCode::Denied, reason: "policy".into() }.encode()).await.unwrap();
        send.finish().unwrap();
    };
    let app = async {
        let mut s = a.connect(dst).await;
        let mut buf = [0u8; 16];
        s.read(&mut buf).await
    };
    let ((), read) = within(async { tokio::join!(gateway, app) }).await;
    assert_eq!(read.unwrap_err().kind(), std::io::ErrorKind::ConnectionReset);
    let m = &a.handle.metrics;
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!((m.tcp_outbound_opened.load(Relaxed), m.tcp_outbound_refused.load(Relaxed)), (1, 1));

    // A connection the capture did not redirect (no original destination) is reset too.
    let mut s = tokio::net::TcpStream::connect(a.handle.tcp_addr.unwrap()).await.unwrap();
    let mut buf = [0u8; 4];
    assert!(within(s.read(&mut buf)).await.is_err());
    a.handle.shutdown().await;
}

#[tokio::test]
async fn a_gateway_delivers_tcp_to_the_device_and_only_for_its_overlay_address() {
    let p = pki("tcp-in");
    let server = edge(&p, "127.0.0.1:0".parse().unwrap());
    let a = start_agent(&config(&p.dir, &[server.local_addr().unwrap()])).await;
    let conn = accept(&server).await;
    a.wait_connected(1).await;
    let local = tokio::net::TcpListener::bind((overlay_ip(), 0)).await.unwrap();
    let port = local.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut s, _) = local.accept().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        s.write_all(&got.to_ascii_uppercase()).await.unwrap();
    });
    let header = |dst: &str, port: u16| FlowHeader {
        flow_id: 7,
        src: "10.128.2.20".parse().unwrap(),
        dst: dst.parse().unwrap(),
        dst_port: port,
        protocol: Protocol::Tcp,
        identity: "spiffe://cluster.local/ns/shop/sa/cart".into(),
        src_zone: "zone-b".into(),
        src_gateway: "gw-1".into(),
        verdict: "allow".into(),
    };
    let (status, back) = within(async {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&header(OVERLAY_IP, port).encode()).await.unwrap();
        let status = read_status(&mut recv).await;
        send.write_all(b"inbound bytes").await.unwrap();
        send.finish().unwrap();
        (status, recv.read_to_end(1 << 20).await.unwrap())
    })
    .await;
    assert_eq!(status.code, StatusCode::Connected);
    assert_eq!(back, b"INBOUND BYTES");

    // Another address than the device's: refused.
    let status = within(async {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&header("127.0.0.10", port).encode()).await.unwrap();
        read_status(&mut recv).await
    })
    .await;
    assert_eq!(status, Status { code: StatusCode::Refused, reason: "not-this-device".into() });
    a.handle.shutdown().await;
}

#[tokio::test]
async fn udp_goes_both_ways_and_nothing_but_the_agents_own_udp_leaves() {
    let p = pki("udp");
    let server = edge(&p, "127.0.0.1:0".parse().unwrap());
    let mut a = start_agent(&config(&p.dir, &[server.local_addr().unwrap()])).await;
    let conn = accept(&server).await;
    a.wait_connected(1).await;
    let out = Datagram {
        src: overlay_ip(),
        dst: "10.128.2.20".parse().unwrap(),
        src_port: 40000,
        dst_port: 5353,
        payload: b"query".to_vec(),
    };
    let spoofed = Datagram { src: "10.128.2.99".parse().unwrap(), payload: b"spoofed".to_vec(), ..out.clone() };
    let mut icmp = packet::build(&out).unwrap();
    icmp[9] = 1;
    a.from_host.send(packet::build(&spoofed).unwrap()).await.unwrap();
    a.from_host.send(icmp).await.unwrap();
    let huge = Datagram { payload: vec![7; 2000], ..out.clone() };
    a.from_host.send(packet::build(&huge).unwrap()).await.unwrap();
    a.from_host.send(packet::build(&out).unwrap()).await.unwrap();
    // Packets are handled in order: the first datagram the gateway sees is the genuine one.
    let got = within(conn.read_datagram()).await.unwrap();
    assert_eq!(Datagram::decode(&got).unwrap(), out);
    let m = a.handle.metrics.clone();
    assert_eq!(m.dropped(DropReason::SpoofedSource), 1);
    assert_eq!(m.dropped(DropReason::NotUdp), 1);
    assert_eq!(m.dropped(DropReason::TooLarge), 1);

    // Gateway → device: written to the host as an IP packet; for another address: dropped.
    let back = Datagram { src: out.dst, dst: out.src, src_port: 5353, dst_port: 40000, payload: b"answer".to_vec() };
    let other = Datagram { dst: "127.0.0.10".parse().unwrap(), ..back.clone() };
    conn.send_datagram(other.encode().into()).unwrap();
    conn.send_datagram(back.encode().into()).unwrap();
    let p = within(a.to_host.recv()).await.unwrap();
    assert_eq!(packet::parse(&p).unwrap(), back);
    wait_for("the other datagram dropped", || m.dropped(DropReason::NotThisDevice) == 1).await;
    a.handle.shutdown().await;
}

#[tokio::test]
async fn without_a_gateway_flows_fail_closed_and_the_agent_reconnects() {
    let p = pki("fail-closed");
    let server = edge(&p, "127.0.0.1:0".parse().unwrap());
    let addr = server.local_addr().unwrap();
    let a = start_agent(&config(&p.dir, &[addr])).await;
    let conn = accept(&server).await;
    a.wait_connected(1).await;

    // The gateway goes away.
    conn.close(0u32.into(), b"gone");
    server.close(0u32.into(), b"gone");
    within(server.wait_idle()).await;
    drop((conn, server));
    a.wait_connected(0).await;
    let dst: SocketAddr = "10.128.2.20:80".parse().unwrap();
    let mut s = a.connect(dst).await;
    let mut buf = [0u8; 4];
    assert_eq!(within(s.read(&mut buf)).await.unwrap_err().kind(), std::io::ErrorKind::ConnectionReset);
    let d = Datagram { src: overlay_ip(), dst: dst.ip(), src_port: 1, dst_port: 2, payload: b"x".to_vec() };
    a.from_host.send(packet::build(&d).unwrap()).await.unwrap();
    let m = a.handle.metrics.clone();
    wait_for("the datagram dropped", || m.dropped(DropReason::NoGateway) == 1).await;

    // It comes back on the same address: the agent reconnects and flows pass again.
    // (The old endpoint's socket is released by its driver task, soon after the last handle.)
    let mut server = None;
    wait_for("the port free again", || {
        server = try_edge(&p, addr).ok();
        server.is_some()
    })
    .await;
    let server = server.unwrap();
    let conn = accept(&server).await;
    a.wait_connected(1).await;
    let gateway = async {
        let (mut send, mut recv) = conn.accept_bi().await.unwrap();
        read_header(&mut recv).await;
        send.write_all(&Status { code: StatusCode::Connected, reason: String::new() }.encode()).await.unwrap();
        send.write_all(b"welcome back").await.unwrap();
        send.finish().unwrap();
    };
    let app = async {
        let mut s = a.connect(dst).await;
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.unwrap();
        back
    };
    let ((), back) = within(async { tokio::join!(gateway, app) }).await;
    assert_eq!(back, b"welcome back");
    a.handle.shutdown().await;
}

#[tokio::test]
async fn every_gateway_is_connected_and_flows_use_another_when_one_is_gone() {
    let p = pki("two");
    let (s1, s2) = (edge(&p, "127.0.0.1:0".parse().unwrap()), edge(&p, "127.0.0.1:0".parse().unwrap()));
    let a = start_agent(&config(&p.dir, &[s1.local_addr().unwrap(), s2.local_addr().unwrap()])).await;
    let (c1, c2) = (accept(&s1).await, accept(&s2).await);
    a.wait_connected(2).await;
    c1.close(0u32.into(), b"gone");
    s1.close(0u32.into(), b"gone");
    a.wait_connected(1).await;
    for _ in 0..3 {
        let gateway = async {
            let (mut send, mut recv) = c2.accept_bi().await.unwrap();
            read_header(&mut recv).await;
            send.write_all(&Status { code: StatusCode::Connected, reason: String::new() }.encode()).await.unwrap();
            send.finish().unwrap();
        };
        let app = async {
            let mut s = a.connect("10.128.2.20:80".parse().unwrap()).await;
            let mut back = Vec::new();
            s.read_to_end(&mut back).await
        };
        let ((), back) = within(async { tokio::join!(gateway, app) }).await;
        assert_eq!(back.unwrap(), 0);
    }
    a.handle.shutdown().await;
}

#[tokio::test]
async fn a_gateway_with_a_certificate_of_another_ca_is_never_used() {
    let p = pki("foreign");
    let other = pki("foreign-other");
    let server = edge(&other, "127.0.0.1:0".parse().unwrap());
    let a = start_agent(&config(&p.dir, &[server.local_addr().unwrap()])).await;
    let incoming = within(server.accept()).await.unwrap();
    assert!(within(incoming.accept().unwrap()).await.is_err(), "the agent refuses the handshake");
    let mut s = a.connect("10.128.2.20:80".parse().unwrap()).await;
    let mut buf = [0u8; 4];
    assert_eq!(within(s.read(&mut buf)).await.unwrap_err().kind(), std::io::ErrorKind::ConnectionReset);
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(a.handle.metrics.gateway_connects.load(Relaxed), 0);
    a.handle.shutdown().await;
}

/// A UDP flow keeps to one gateway, the one its last datagram came from: replicas of a zone each
/// track the flows they carry, and a reply sent to another replica would be a new flow there.
#[tokio::test]
async fn a_udp_flow_keeps_to_the_gateway_it_came_from() {
    let p = pki("sticky");
    let (s1, s2) = (edge(&p, "127.0.0.1:0".parse().unwrap()), edge(&p, "127.0.0.1:0".parse().unwrap()));
    let mut a = start_agent(&config(&p.dir, &[s1.local_addr().unwrap(), s2.local_addr().unwrap()])).await;
    let (c1, c2) = (accept(&s1).await, accept(&s2).await);
    a.wait_connected(2).await;
    let asked = |port: u16| Datagram {
        src: "10.128.2.20".parse().unwrap(),
        dst: overlay_ip(),
        src_port: 40000 + port,
        dst_port: 5353,
        payload: b"query".to_vec(),
    };
    let answer = |d: &Datagram| Datagram {
        src: d.dst,
        dst: d.src,
        src_port: d.dst_port,
        dst_port: d.src_port,
        payload: b"answer".to_vec(),
    };
    // Flows asked through gateway 2, then through gateway 1: every answer goes back the same way,
    // several times each (round robin alone would alternate).
    for (conn, other, port) in [(&c2, &c1, 1u16), (&c1, &c2, 2), (&c2, &c1, 3)] {
        let q = asked(port);
        conn.send_datagram(q.encode().into()).unwrap();
        within(a.to_host.recv()).await.unwrap();
        for _ in 0..4 {
            a.from_host.send(packet::build(&answer(&q)).unwrap()).await.unwrap();
            let got = within(conn.read_datagram()).await.unwrap();
            assert_eq!(Datagram::decode(&got).unwrap(), answer(&q));
        }
        let stray = tokio::time::timeout(Duration::from_millis(200), other.read_datagram()).await;
        assert!(stray.is_err(), "an answer of flow {port} went to the other gateway");
    }
    a.handle.shutdown().await;
}

/// A reconnection presents the certificate on disk now, not the one read at start: a pod's mesh
/// certificate is rotated in place by istio-agent (`OUTPUT_CERTS`).
#[tokio::test]
async fn a_reconnection_presents_the_certificate_on_disk_now() {
    let p = pki("rotate");
    let server = edge(&p, "127.0.0.1:0".parse().unwrap());
    let a = start_agent(&config(&p.dir, &[server.local_addr().unwrap()])).await;
    let presented = |conn: &quinn::Connection| -> Vec<u8> {
        let any = conn.peer_identity().expect("a client certificate");
        let chain = any.downcast::<Vec<CertificateDer<'static>>>().expect("rustls certificates");
        chain[0].to_vec()
    };
    let der = |pem: &[u8]| CertificateDer::from_pem_slice(pem).unwrap().to_vec();
    let conn = accept(&server).await;
    a.wait_connected(1).await;
    assert_eq!(presented(&conn), der(&std::fs::read(p.dir.join("laptop.pem")).unwrap()));

    // The certificate is renewed on disk; then the connection ends (the gateway restarts, say).
    let (cert, key) = p.ca.issue_workload("devices", "laptop", 1, SystemTime::now()).unwrap();
    std::fs::write(p.dir.join("laptop.pem"), &cert).unwrap();
    std::fs::write(p.dir.join("laptop-key.pem"), key).unwrap();
    assert_ne!(presented(&conn), der(cert.as_bytes()));
    conn.close(0u32.into(), b"restart");
    let again = accept(&server).await;
    assert_eq!(presented(&again), der(cert.as_bytes()), "the reconnection presents the renewed certificate");
    a.wait_connected(1).await;
    a.handle.shutdown().await;
}

/// One gateway entry that names every replica of a zone (a headless Service) is followed: the
/// agent connects to each address it resolves to, and leaves one that is no longer in the answer
/// at the next resolution; a name that stops resolving keeps the connections there are.
#[tokio::test]
async fn a_name_for_every_replica_is_followed_as_the_replicas_change() {
    let p = pki("follow");
    let (s1, s2) = (edge(&p, "127.0.0.1:0".parse().unwrap()), edge(&p, "127.0.0.1:0".parse().unwrap()));
    let (a1, a2) = (s1.local_addr().unwrap(), s2.local_addr().unwrap());
    let mut cfg = config(&p.dir, &[a1]);
    cfg.gateways = vec!["keyway-gateway.keyway-system.svc.cluster.local:15444".into()];
    let answer: Arc<Mutex<Vec<SocketAddr>>> = Arc::new(Mutex::new(vec![a1, a2]));
    let asked: Arc<Mutex<Vec<String>>> = Arc::default();
    let (ans, log) = (answer.clone(), asked.clone());
    let resolve: keyway_gateway::agent::edge::Resolver = Arc::new(move |name: String| {
        log.lock().unwrap().push(name);
        let now = ans.lock().unwrap().clone();
        Box::pin(async move { now })
    });
    let (_from_tx, from_host) = mpsc::channel(8);
    let (to_host, _to_rx) = mpsc::channel(8);
    let handle = agent::start_with(&cfg, None, PacketIo { from_host, to_host }, resolve).await.unwrap();
    let (c1, _c2) = (accept(&s1).await, accept(&s2).await);
    let m = handle.metrics.clone();
    let connected = |n: u64| m.gateways_connected.load(std::sync::atomic::Ordering::Relaxed) == n;
    wait_for("both replicas connected", || connected(2)).await;
    assert_eq!(asked.lock().unwrap()[0], "keyway-gateway.keyway-system.svc.cluster.local:15444");
    // The first replica leaves the answer (scaled down): its connection is left.
    *answer.lock().unwrap() = vec![a2];
    within(c1.closed()).await;
    wait_for("one replica connected", || connected(1)).await;
    // The name stops resolving: the connection there is stays.
    answer.lock().unwrap().clear();
    let n = asked.lock().unwrap().len();
    wait_for("resolved again", || asked.lock().unwrap().len() > n).await;
    assert!(connected(1), "a name that does not resolve keeps the connection there is");
    handle.shutdown().await;
}
