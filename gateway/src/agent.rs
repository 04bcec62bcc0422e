//! `keyway agent`: a device outside the clusters (a laptop, a VM), or an enforced pod's UDP,
//! joins the overlay through the edge gateways of its zone.
//!
//! The core here is independent of the host: it takes a TCP listener (the captured connections,
//! with a function giving each one's original destination) and two channels of raw IP packets
//! ([`PacketIo`]), and speaks the edge protocol (QUIC, ALPN [`edge::EDGE_ALPN`]) to every
//! gateway of `gateways`:
//!
//! * TCP, agent → gateway: one bidirectional stream per flow, a `FlowHeader`, the gateway's
//!   `Status`, then bytes both ways; anything but `Connected` resets the local connection.
//! * TCP, gateway → agent (device mode): the gateway opens a stream with a header for this
//!   device's overlay address; the agent connects locally and answers with a status.
//! * UDP: one QUIC datagram per packet ([`keyway_policy::flow::Datagram`]), both ways.
//!
//! Fail closed: with no gateway connected, captured TCP is reset and UDP dropped (counted).
//! [`capture`] configures the host (TUN device, routes, iptables or ip rules) for the real
//! command; the tests drive the core on loopback without it.

pub mod admin;
pub mod capture;
pub mod config;
pub mod edge;
pub mod metrics;
pub mod packet;
mod tcp;
mod udp;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use config::{AgentConfig, Mode};
use edge::Gateways;
use metrics::AgentMetrics;

/// How many packets may wait in each direction between the host side and the core.
pub const PACKET_QUEUE: usize = 1024;

/// Why the agent cannot start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The TLS files cannot be used.
    #[error("tls: {0}")]
    Tls(String),
    /// A socket could not be opened.
    #[error("{what}: {source}")]
    Io {
        /// Which socket.
        what: String,
        /// The error.
        source: io::Error,
    },
    /// The host could not be configured (TUN, routes, iptables).
    #[error("capture: {0}")]
    Capture(String),
}

/// The host side of UDP: IP packets captured from the host (the TUN device) and packets to
/// write back to it.
#[derive(Debug)]
pub struct PacketIo {
    /// Packets from the host.
    pub from_host: mpsc::Receiver<Vec<u8>>,
    /// Packets to the host.
    pub to_host: mpsc::Sender<Vec<u8>>,
}

/// The original destination of a captured TCP connection (with iptables REDIRECT:
/// `SO_ORIGINAL_DST`, [`original_dst`]).
pub type OriginalDst = Arc<dyn Fn(&TcpStream) -> io::Result<SocketAddr> + Send + Sync>;

/// The destination a connection had before iptables REDIRECT sent it to the agent's listener.
pub fn original_dst(s: &TcpStream) -> io::Result<SocketAddr> {
    let sock = socket2::SockRef::from(s);
    let a = if s.local_addr()?.is_ipv6() { sock.original_dst_v6()? } else { sock.original_dst_v4()? };
    a.as_socket().ok_or_else(|| io::Error::other("original destination is not an IP address"))
}

/// What the running core shares between its tasks.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) overlay_ip: IpAddr,
    pub(crate) mode: Mode,
    pub(crate) gateways: Arc<Gateways>,
    pub(crate) metrics: Arc<AgentMetrics>,
    pub(crate) to_host: mpsc::Sender<Vec<u8>>,
    pub(crate) next_flow: std::sync::atomic::AtomicU64,
    /// Each UDP flow's gateway connection.
    pub(crate) sticky: udp::Sticky,
}

/// A running agent core.
#[derive(Debug)]
pub struct AgentHandle {
    /// Where captured TCP is accepted.
    pub tcp_addr: Option<SocketAddr>,
    /// The QUIC endpoint's local address.
    pub quic_addr: SocketAddr,
    /// The counters.
    pub metrics: Arc<AgentMetrics>,
    stop: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
    endpoint: quinn::Endpoint,
}

impl AgentHandle {
    /// Gateways connected now.
    pub fn gateways_connected(&self) -> u64 {
        self.metrics.gateways_connected.load(Ordering::Relaxed)
    }

    /// Stops every task, closes the gateway connections, and waits for them (briefly).
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.endpoint.close(0u32.into(), b"agent stopping");
        self.tasks.close();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), self.tasks.wait()).await;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

/// Starts the core: the QUIC endpoint on an unspecified address (so that it follows address
/// changes), one task per gateway, the TCP listener (device mode; `None` in pod mode), and the
/// packet pump.
pub async fn start(
    config: &AgentConfig,
    tcp: Option<(TcpListener, OriginalDst)>,
    packets: PacketIo,
) -> Result<AgentHandle, AgentError> {
    let all_v4 = config.gateways.iter().all(|g| g.parse::<SocketAddr>().is_ok_and(|a| a.is_ipv4()));
    start_with(config, tcp, packets, edge::dns(!all_v4)).await
}

/// As [`start`], with the gateway entries resolved by `resolve` (tests; the system resolver
/// otherwise).
pub async fn start_with(
    config: &AgentConfig,
    tcp: Option<(TcpListener, OriginalDst)>,
    packets: PacketIo,
    resolve: edge::Resolver,
) -> Result<AgentHandle, AgentError> {
    let client = edge::client_config(config)?;
    let all_v4 = config.gateways.iter().all(|g| g.parse::<SocketAddr>().is_ok_and(|a| a.is_ipv4()));
    let bind: SocketAddr = if all_v4 { "0.0.0.0:0" } else { "[::]:0" }.parse().unwrap_or(SocketAddr::from(([0; 4], 0)));
    let mut endpoint = quic_endpoint(bind, config.socket_mark)
        .map_err(|source| AgentError::Io { what: format!("quic {bind}"), source })?;
    endpoint.set_default_client_config(client);
    let quic_addr = endpoint.local_addr().map_err(|source| AgentError::Io { what: "quic".into(), source })?;

    let metrics = Arc::new(AgentMetrics::default());
    let gateways = Arc::new(Gateways::new());
    let shared = Arc::new(Shared {
        overlay_ip: config.overlay_ip,
        mode: config.mode,
        gateways: gateways.clone(),
        metrics: metrics.clone(),
        to_host: packets.to_host,
        next_flow: std::sync::atomic::AtomicU64::new(1),
        sticky: udp::Sticky::default(),
    });
    let stop = CancellationToken::new();
    let tasks = tokio_util::task::TaskTracker::new();

    let dialer = edge::Dialer {
        endpoint: endpoint.clone(),
        gateways: gateways.clone(),
        server_name: crate::tls::zone_server_name(&config.zone),
        stop: stop.clone(),
        config: Arc::new(config.clone()),
        tasks: tasks.clone(),
    };
    for addr in &config.gateways {
        let (s, t, stop) = (shared.clone(), tasks.clone(), stop.clone());
        tasks.spawn(edge::follow(dialer.clone(), addr.clone(), resolve.clone(), move |conn| {
            serve_gateway(s.clone(), conn, t.clone(), stop.clone())
        }));
    }

    let tcp_addr = match tcp {
        Some((listener, orig)) => {
            let addr =
                listener.local_addr().map_err(|source| AgentError::Io { what: "tcp listener".into(), source })?;
            tasks.spawn(tcp::accept_loop(shared.clone(), listener, orig, tasks.clone(), stop.clone()));
            Some(addr)
        }
        None => None,
    };
    tasks.spawn(udp::outbound_loop(shared.clone(), packets.from_host, stop.clone()));
    Ok(AgentHandle { tcp_addr, quic_addr, metrics, stop, tasks, endpoint })
}

/// A client QUIC endpoint on `bind` whose packets carry the firewall mark `mark` (none when 0;
/// setting one needs `CAP_NET_ADMIN`).
fn quic_endpoint(bind: SocketAddr, mark: u32) -> io::Result<quinn::Endpoint> {
    let socket = socket2::Socket::new(socket2::Domain::for_address(bind), socket2::Type::DGRAM, None)?;
    if mark != 0 {
        socket.set_mark(mark)?;
    }
    if bind.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.bind(&bind.into())?;
    let runtime = Arc::new(quinn::TokioRuntime);
    quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket.into(), runtime)
}

/// Serves one gateway connection until it closes: inbound streams and datagrams.
async fn serve_gateway(
    shared: Arc<Shared>,
    conn: quinn::Connection,
    tasks: tokio_util::task::TaskTracker,
    stop: CancellationToken,
) {
    shared.metrics.inc(&shared.metrics.gateway_connects);
    let _connected = Connected::new(shared.metrics.clone());
    let streams = async {
        while let Ok((send, recv)) = conn.accept_bi().await {
            tasks.spawn(tcp::inbound(shared.clone(), send, recv, stop.clone()));
        }
    };
    let datagrams = async {
        while let Ok(bytes) = conn.read_datagram().await {
            udp::inbound(&shared, &conn, &bytes);
        }
    };
    tokio::join!(streams, datagrams);
}

/// Counts one connected gateway while it lives (also when its task is cancelled).
struct Connected(Arc<AgentMetrics>);

impl Connected {
    fn new(m: Arc<AgentMetrics>) -> Self {
        m.gateways_connected.fetch_add(1, Ordering::Relaxed);
        Connected(m)
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.gateways_connected.fetch_sub(1, Ordering::Relaxed);
    }
}
