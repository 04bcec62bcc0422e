//! What a pod with `CAP_NET_RAW` on a bridge CNI sees: every TCP segment crossing the namespace
//! it runs in, captured with an `AF_PACKET` socket (`ETH_P_ALL`), written as JSON lines; and the
//! reading of such a capture: segments reassembled into streams, and whether a stream is TLS
//! records from end to end (what the sniffing attack test asserts for keyway's ports).

use std::collections::BTreeMap;
use std::io::{BufRead as _, Read as _, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use socket2::{Domain, Protocol, Socket, Type};

/// `ETH_P_ALL`: every protocol, outgoing frames included.
const ETH_P_ALL: u16 = 0x0003;
/// Large enough for a GSO/GRO super-frame (an IP packet is at most 64 KiB).
const FRAME_BUFFER: usize = 1 << 17;
/// The largest TLS record on the wire: 2^14 bytes of plaintext plus the most any version adds.
const MAX_TLS_RECORD: usize = (1 << 14) + 2048;

/// One captured TCP segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// Sender.
    pub src: SocketAddr,
    /// Receiver.
    pub dst: SocketAddr,
    /// TCP sequence number of the first payload byte (of the SYN itself for a SYN).
    pub seq: u32,
    /// A SYN: the stream's first byte is `seq + 1`.
    pub syn: bool,
    /// The TCP payload, hex.
    pub payload: String,
}

impl Segment {
    /// The payload bytes.
    pub fn bytes(&self) -> Vec<u8> {
        (0..self.payload.len() / 2)
            .filter_map(|i| self.payload.get(2 * i..2 * i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
            .collect()
    }
}

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

/// Captures every TCP segment with a payload (and every SYN) seen on any interface of the
/// current network namespace into `out`, one JSON [`Segment`] a line, until a TCP segment to
/// `stop_port` passes (the caller's marker that its traffic is over) or `max` has passed. `out`
/// is created once the socket is open, so its existence says the capture runs.
pub fn capture(out: &Path, stop_port: u16, max: Duration) -> anyhow::Result<usize> {
    let sock = Socket::new(Domain::PACKET, Type::RAW, Some(Protocol::from(i32::from(ETH_P_ALL.to_be()))))
        .context("AF_PACKET socket (needs CAP_NET_RAW)")?;
    let _ = sock.set_recv_buffer_size(16 << 20);
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut file = std::fs::File::create(out).with_context(|| format!("{}", out.display()))?;
    let start = Instant::now();
    let mut buf = vec![0u8; FRAME_BUFFER];
    let mut written = 0;
    while start.elapsed() < max {
        let n = match (&sock).read(&mut buf) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("reading the packet socket"),
        };
        let Some((seg, flags)) = buf.get(..n).and_then(parse_ethernet) else { continue };
        if seg.dst.port() == stop_port {
            break;
        }
        if !seg.payload.is_empty() || flags & SYN != 0 {
            writeln!(file, "{}", serde_json::to_string(&seg)?)?;
            file.flush()?;
            written += 1;
        }
    }
    Ok(written)
}

const SYN: u8 = 0x02;

/// An Ethernet frame carrying IPv4 or IPv6 TCP: the segment and its TCP flags.
fn parse_ethernet(frame: &[u8]) -> Option<(Segment, u8)> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = frame.get(14..)?;
    let (src, dst, tcp) = match ethertype {
        0x0800 => {
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
            if *ip.get(9)? != 6 || ihl < 20 {
                return None;
            }
            // A GSO super-frame may carry 0 as its total length: take the frame's.
            let end = if total >= ihl && total <= ip.len() { total } else { ip.len() };
            let a: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
            let b: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
            (IpAddr::from(Ipv4Addr::from(a)), IpAddr::from(Ipv4Addr::from(b)), ip.get(ihl..end)?)
        }
        0x86dd => {
            if *ip.get(6)? != 6 {
                return None;
            }
            let len = usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]));
            let end = if len > 0 && 40 + len <= ip.len() { 40 + len } else { ip.len() };
            let a: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            let b: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            (IpAddr::from(Ipv6Addr::from(a)), IpAddr::from(Ipv6Addr::from(b)), ip.get(40..end)?)
        }
        _ => return None,
    };
    let sport = u16::from_be_bytes([*tcp.first()?, *tcp.get(1)?]);
    let dport = u16::from_be_bytes([*tcp.get(2)?, *tcp.get(3)?]);
    let seq = u32::from_be_bytes(tcp.get(4..8)?.try_into().ok()?);
    let offset = usize::from(tcp.get(12)? >> 4) * 4;
    let flags = *tcp.get(13)?;
    let payload = tcp.get(offset..)?;
    let seg = Segment {
        src: SocketAddr::new(src, sport),
        dst: SocketAddr::new(dst, dport),
        seq,
        syn: flags & SYN != 0,
        payload: hex(payload),
    };
    Some((seg, flags))
}

/// Reads a capture file written by [`capture`].
pub fn load(path: &Path) -> anyhow::Result<Vec<Segment>> {
    let file = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    std::io::BufReader::new(file)
        .lines()
        .map(|l| Ok(serde_json::from_str(&l?)?))
        .collect::<anyhow::Result<Vec<Segment>>>()
}

/// A contiguous run of one direction of a TCP connection's bytes.
#[derive(Debug, Clone, Default)]
pub struct Run {
    /// The bytes.
    pub data: Vec<u8>,
    /// Where each captured segment's new bytes start in `data`.
    pub starts: Vec<usize>,
    /// Whether `data` starts at the connection's first byte (its SYN was captured, no gap since).
    pub from_start: bool,
}

/// One direction of a TCP connection as captured: its contiguous runs (a gap in the capture
/// starts a new one). Segments seen twice (on two interfaces of a bridge) count once.
#[derive(Debug, Clone)]
pub struct Stream {
    /// Sender.
    pub src: SocketAddr,
    /// Receiver.
    pub dst: SocketAddr,
    /// The runs, in sequence order.
    pub runs: Vec<Run>,
}

impl Stream {
    /// Payload bytes captured (each byte once).
    pub fn len(&self) -> usize {
        self.runs.iter().map(|r| r.data.len()).sum()
    }

    /// Whether nothing was captured.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Reassembles the segments into streams, one per direction of each connection.
pub fn streams(segments: &[Segment]) -> Vec<Stream> {
    let mut by_dir: BTreeMap<(SocketAddr, SocketAddr), Vec<&Segment>> = BTreeMap::new();
    for s in segments {
        by_dir.entry((s.src, s.dst)).or_default().push(s);
    }
    let mut out = Vec::new();
    for ((src, dst), segs) in by_dir {
        // Sequence numbers relative to the first byte (after the SYN) or the first segment seen.
        let syn = segs.iter().find(|s| s.syn).map(|s| s.seq.wrapping_add(1));
        let base = syn.or_else(|| segs.first().map(|s| s.seq)).unwrap_or_default();
        let mut pieces: Vec<(u32, Vec<u8>)> = segs
            .iter()
            .map(|s| (s.seq.wrapping_sub(base), s.bytes()))
            .filter(|(rel, b)| !b.is_empty() && *rel < u32::MAX / 2)
            .collect();
        pieces.sort_by_key(|(rel, b)| (*rel, std::cmp::Reverse(b.len())));
        let mut runs: Vec<Run> = Vec::new();
        let mut cursor: Option<u32> = None;
        for (rel, bytes) in pieces {
            let end = rel.saturating_add(bytes.len() as u32);
            match cursor {
                Some(c) if end <= c => continue,
                Some(c) if rel <= c => {
                    if let Some(run) = runs.last_mut() {
                        run.starts.push(run.data.len());
                        run.data.extend_from_slice(bytes.get((c - rel) as usize..).unwrap_or_default());
                    }
                }
                _ => runs.push(Run {
                    data: bytes,
                    starts: vec![0],
                    from_start: syn.is_some() && rel == 0 && runs.is_empty(),
                }),
            }
            cursor = Some(end);
        }
        out.push(Stream { src, dst, runs });
    }
    out
}

/// Whether `data` from `at` is a chain of TLS record headers reaching its end (the last record
/// may be cut off by the end of the capture).
fn records_from(data: &[u8], mut at: usize) -> bool {
    let mut records = 0;
    while at < data.len() {
        let Some(h) = data.get(at..at + 5) else { return records > 0 };
        let (kind, major, minor) = (h[0], h[1], h[2]);
        let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
        if !(20..=23).contains(&kind) || major != 3 || minor > 4 || len == 0 || len > MAX_TLS_RECORD {
            return false;
        }
        records += 1;
        at += 5 + len;
    }
    true
}

/// Whether a run is TLS records: from its first byte when it starts the connection; otherwise
/// from some segment boundary on (a capture that begins mid-connection begins mid-record at
/// worst, and a sender starts a new write, so a new record, at a new segment), to the end.
pub fn is_tls(run: &Run) -> bool {
    if run.from_start {
        return records_from(&run.data, 0);
    }
    run.starts.iter().any(|&s| records_from(&run.data, s))
}

/// Where `needle` occurs in the stream's bytes, if anywhere.
pub fn contains(stream: &Stream, needle: &[u8]) -> bool {
    !needle.is_empty() && stream.runs.iter().any(|r| r.data.windows(needle.len()).any(|w| w == needle))
}

/// The first bytes of a run, printable, for a failure message.
pub fn excerpt(run: &Run) -> String {
    run.data.iter().take(48).map(|&b| if b.is_ascii_graphic() || b == b' ' { b as char } else { '.' }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(seq: u32, syn: bool, data: &[u8]) -> Segment {
        Segment {
            src: "10.0.0.1:40000".parse().unwrap(),
            dst: "10.0.0.2:15180".parse().unwrap(),
            seq,
            syn,
            payload: hex(data),
        }
    }

    fn record(kind: u8, len: usize) -> Vec<u8> {
        let mut r = vec![kind, 3, 3, (len >> 8) as u8, len as u8];
        r.extend(std::iter::repeat_n(0xab, len));
        r
    }

    #[test]
    fn reassembles_in_order_once_and_reads_tls_records() {
        let mut wire = record(22, 300);
        wire.extend(record(23, 40));
        let (a, b) = wire.split_at(100);
        // Out of order, and each segment seen twice (two bridge ports).
        let segs =
            [seg(999, true, &[]), seg(1100, false, b), seg(1000, false, a), seg(1000, false, a), seg(1100, false, b)];
        let s = streams(&segs);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].runs.len(), 1);
        assert_eq!(s[0].runs[0].data, wire);
        assert!(s[0].runs[0].from_start);
        assert!(is_tls(&s[0].runs[0]));
    }

    #[test]
    fn cleartext_is_not_tls_records() {
        for text in [&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..], b"GET /v1/keys?ip=10.0.0.1 HTTP/1.1\r\n\r\n"] {
            let s = streams(&[seg(0, true, &[]), seg(1, false, text)]);
            assert!(!is_tls(&s[0].runs[0]), "{}", excerpt(&s[0].runs[0]));
            assert!(contains(&s[0], b"HTTP/"));
        }
    }

    #[test]
    fn a_capture_begun_mid_connection_resyncs_at_a_segment_boundary_only_for_tls() {
        let tail = record(23, 200);
        let head = &record(23, 500)[300..];
        let tls = streams(&[seg(5000, false, head), seg(5000 + head.len() as u32, false, &tail)]);
        assert!(!tls[0].runs[0].from_start);
        assert!(is_tls(&tls[0].runs[0]));
        // An h2c frame mid-connection (HEADERS, 200 bytes) is no chain of records.
        let mut h2 = vec![0, 0, 200, 1, 4, 0, 0, 0, 1];
        h2.extend(std::iter::repeat_n(b'a', 200));
        let plain = streams(&[seg(7000, false, &h2)]);
        assert!(!is_tls(&plain[0].runs[0]));
    }

    #[test]
    fn parses_an_ipv4_tcp_frame() {
        let mut f = vec![0u8; 14];
        f[12] = 0x08;
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 6, 0, 0, 10, 61, 1, 10, 10, 61, 1, 2];
        let mut tcp = vec![0x9c, 0x40, 0x3b, 0x5c, 0, 0, 0, 7, 0, 0, 0, 0, 0x50, 0x18, 0, 0, 0, 0, 0, 0];
        tcp.extend_from_slice(b"hi");
        let total = (ip.len() + tcp.len()) as u16;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        f.extend(ip);
        f.extend(tcp);
        f.extend([0, 0, 0, 0]); // Ethernet padding is not payload.
        let (s, _) = parse_ethernet(&f).unwrap();
        assert_eq!(
            (s.src.to_string(), s.dst.to_string(), s.seq, s.bytes()),
            ("10.61.1.10:40000".into(), "10.61.1.2:15196".into(), 7, b"hi".to_vec())
        );
    }
}
