//! Probes of what keyway does not carry (yet): UDP, SCTP and ICMP from inside a pod, to check
//! that an enforced pod's sidecar capture refuses them. Each reports whether the kernel let the
//! packet out of the pod and what came back.

use std::io::Read as _;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::net::UdpSocket;

/// The outcome of one datagram probe.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DatagramResult {
    /// What was tried (`udp ip:port`, `icmp ip`, `sctp ip`).
    pub target: String,
    /// Whether the pod's kernel sent the packet (a refused send fails at once).
    pub sent: bool,
    /// The answer, when one came (UDP: the echo; ICMP: `echo-reply`).
    pub reply: String,
    /// Why nothing was sent or nothing came back.
    pub error: String,
}

impl DatagramResult {
    fn new(target: String) -> DatagramResult {
        DatagramResult { target, sent: false, reply: String::new(), error: String::new() }
    }
}

/// What a UDP probe sends (the app echoes it after its banner).
pub const PROBE: &str = "keyway-udp-probe";

/// Sends one UDP datagram to `target` and waits up to `timeout` for the echo.
pub async fn udp(target: SocketAddr, timeout: Duration) -> DatagramResult {
    let mut res = DatagramResult::new(format!("udp {target}"));
    let sock = match UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 0))).await {
        Ok(s) => s,
        Err(e) => {
            res.error = format!("bind: {e}");
            return res;
        }
    };
    // Not connected: a host with several addresses (the router's "internet") may answer from
    // another one; the echoed probe in the answer is what identifies it.
    if let Err(e) = sock.send_to(PROBE.as_bytes(), target).await {
        res.error = format!("send: {e}");
        return res;
    }
    res.sent = true;
    let mut buf = [0u8; 512];
    match tokio::time::timeout(timeout, sock.recv_from(&mut buf)).await {
        Ok(Ok((n, _))) => {
            res.reply = String::from_utf8_lossy(buf.get(..n).unwrap_or_default()).trim_end().to_owned();
        }
        Ok(Err(e)) => res.error = format!("recv: {e}"),
        Err(_) => res.error = "no reply within the timeout".into(),
    }
    res
}

/// The Internet checksum (RFC 1071).
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| (u32::from(c[0]) << 8) | u32::from(*c.get(1).unwrap_or(&0))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends one ICMP echo request to `target` (a raw socket: needs root, as the app container of
/// these pods has) and waits up to `timeout` for its echo reply.
pub fn icmp(target: IpAddr, timeout: Duration) -> DatagramResult {
    let mut res = DatagramResult::new(format!("icmp {target}"));
    let id = (std::process::id() & 0xffff) as u16;
    let mut packet = vec![8, 0, 0, 0, (id >> 8) as u8, id as u8, 0, 1];
    packet.extend_from_slice(b"keyway-icmp-probe");
    let sum = checksum(&packet);
    packet[2] = (sum >> 8) as u8;
    packet[3] = sum as u8;
    let outcome = raw_send(Protocol::ICMPV4, target, &packet, &mut res).and_then(|sock| {
        let end = Instant::now() + timeout;
        let mut buf = [0u8; 1500];
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("no echo reply within the timeout".to_owned());
            }
            sock.set_read_timeout(Some(left)).map_err(|e| format!("timeout: {e}"))?;
            let n = (&sock).read(&mut buf).map_err(|e| format!("recv: {e}"))?;
            // An IPv4 header, then the ICMP message: type 0 (echo reply) with our identifier.
            let ihl = usize::from(buf[0] & 0x0f) * 4;
            let icmp = buf.get(ihl..n).unwrap_or_default();
            if icmp.len() >= 8 && icmp[0] == 0 && icmp[4..6] == [(id >> 8) as u8, id as u8] {
                return Ok("echo-reply".to_owned());
            }
        }
    });
    match outcome {
        Ok(reply) => res.reply = reply,
        Err(e) => res.error = e,
    }
    res
}

/// Sends one SCTP packet (an INIT chunk) to `target` port `port` from a raw socket; SCTP has no
/// echo to wait for: the probe says whether the pod's kernel let it out.
pub fn sctp(target: IpAddr, port: u16) -> DatagramResult {
    let mut res = DatagramResult::new(format!("sctp {target}:{port}"));
    // Common header (ports, verification tag 0, checksum left 0), INIT chunk (type 1, length 20).
    let mut packet = vec![0x9c, 0x40, (port >> 8) as u8, port as u8, 0, 0, 0, 0, 0, 0, 0, 0];
    packet.extend_from_slice(&[1, 0, 0, 20, 0, 0, 0, 1, 0, 1, 0, 0, 0, 10, 0, 10, 0, 0, 0, 1]);
    if let Err(e) = raw_send(Protocol::from(132), target, &packet, &mut res) {
        res.error = e;
    }
    res
}

/// Sends `packet` on a raw IPv4 socket of `protocol`; marks `res` sent when the kernel took it.
fn raw_send(protocol: Protocol, target: IpAddr, packet: &[u8], res: &mut DatagramResult) -> Result<Socket, String> {
    let sock = Socket::new(Domain::IPV4, Type::RAW, Some(protocol)).map_err(|e| format!("raw socket: {e}"))?;
    sock.send_to(packet, &SockAddr::from(SocketAddr::new(target, 0))).map_err(|e| format!("send: {e}"))?;
    res.sent = true;
    Ok(sock)
}
