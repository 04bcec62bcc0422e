//! The IP packets of the TUN device: UDP in IPv4 or IPv6 read into a [`Datagram`], and a
//! [`Datagram`] written back as a packet. Everything else is refused with a reason. Total: never
//! panics on any input.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use keyway_policy::flow::Datagram;

const UDP: u8 = 17;
const IPV4_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;
const UDP_HEADER: usize = 8;

/// Why a packet from the host is not carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Not an IPv4 or IPv6 packet, or its lengths do not add up.
    Malformed,
    /// Another protocol than UDP (ICMP, SCTP, a TCP packet that slipped past the capture, or an
    /// IPv6 extension header): refused by default.
    NotUdp,
    /// A fragment: the agent carries whole UDP packets only.
    Fragment,
}

impl Refused {
    /// A fixed label for metrics and logs.
    pub fn reason(self) -> &'static str {
        match self {
            Refused::Malformed => "malformed",
            Refused::NotUdp => "not-udp",
            Refused::Fragment => "fragment",
        }
    }
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Reads one IP packet: the UDP datagram it carries.
pub fn parse(packet: &[u8]) -> Result<Datagram, Refused> {
    match packet.first().map(|b| b >> 4) {
        Some(4) => {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            let total = usize::from(be16(packet, 2).ok_or(Refused::Malformed)?);
            if ihl < IPV4_HEADER || total < ihl || total > packet.len() {
                return Err(Refused::Malformed);
            }
            let frag = be16(packet, 6).ok_or(Refused::Malformed)?;
            if frag & 0x3fff != 0 {
                return Err(Refused::Fragment);
            }
            if packet[9] != UDP {
                return Err(Refused::NotUdp);
            }
            let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
            let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
            udp(IpAddr::V4(src), IpAddr::V4(dst), &packet[ihl..total])
        }
        Some(6) => {
            if packet.len() < IPV6_HEADER {
                return Err(Refused::Malformed);
            }
            let len = usize::from(be16(packet, 4).ok_or(Refused::Malformed)?);
            if IPV6_HEADER + len > packet.len() {
                return Err(Refused::Malformed);
            }
            if packet[6] != UDP {
                return Err(Refused::NotUdp);
            }
            let a = |at: usize| -> [u8; 16] {
                let mut o = [0u8; 16];
                o.copy_from_slice(&packet[at..at + 16]);
                o
            };
            let (src, dst) = (Ipv6Addr::from(a(8)), Ipv6Addr::from(a(24)));
            udp(IpAddr::V6(src), IpAddr::V6(dst), &packet[IPV6_HEADER..IPV6_HEADER + len])
        }
        _ => Err(Refused::Malformed),
    }
}

fn udp(src: IpAddr, dst: IpAddr, seg: &[u8]) -> Result<Datagram, Refused> {
    let len = usize::from(be16(seg, 4).ok_or(Refused::Malformed)?);
    if len < UDP_HEADER || len > seg.len() {
        return Err(Refused::Malformed);
    }
    Ok(Datagram {
        src,
        dst,
        src_port: be16(seg, 0).ok_or(Refused::Malformed)?,
        dst_port: be16(seg, 2).ok_or(Refused::Malformed)?,
        payload: seg[UDP_HEADER..len].to_vec(),
    })
}

/// The one's-complement sum of `bytes` added to `sum`.
fn sum16(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut chunks = bytes.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Writes `d` as an IP packet (IPv4 or IPv6 as its addresses are; `None` when the families
/// differ or the payload does not fit one packet), with valid IP and UDP checksums.
pub fn build(d: &Datagram) -> Option<Vec<u8>> {
    let udp_len = UDP_HEADER + d.payload.len();
    let mut seg = Vec::with_capacity(udp_len);
    seg.extend_from_slice(&d.src_port.to_be_bytes());
    seg.extend_from_slice(&d.dst_port.to_be_bytes());
    seg.extend_from_slice(&u16::try_from(udp_len).ok()?.to_be_bytes());
    seg.extend_from_slice(&[0, 0]);
    seg.extend_from_slice(&d.payload);
    match (d.src, d.dst) {
        (IpAddr::V4(s), IpAddr::V4(t)) => {
            let total = u16::try_from(IPV4_HEADER + udp_len).ok()?;
            let pseudo = [&s.octets()[..], &t.octets()[..], &[0, UDP], &(udp_len as u16).to_be_bytes()].concat();
            let c = fold(sum16(sum16(0, &pseudo), &seg));
            let c = if c == 0 { 0xffff } else { c };
            seg[6..8].copy_from_slice(&c.to_be_bytes());
            let mut p = Vec::with_capacity(usize::from(total));
            p.extend_from_slice(&[0x45, 0]);
            p.extend_from_slice(&total.to_be_bytes());
            p.extend_from_slice(&[0, 0, 0x40, 0, 64, UDP, 0, 0]);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&t.octets());
            let h = fold(sum16(0, &p));
            p[10..12].copy_from_slice(&h.to_be_bytes());
            p.extend_from_slice(&seg);
            Some(p)
        }
        (IpAddr::V6(s), IpAddr::V6(t)) => {
            let len32 = u32::try_from(udp_len).ok()?;
            let pseudo = [&s.octets()[..], &t.octets()[..], &len32.to_be_bytes(), &[0, 0, 0, UDP]].concat();
            let c = fold(sum16(sum16(0, &pseudo), &seg));
            let c = if c == 0 { 0xffff } else { c };
            seg[6..8].copy_from_slice(&c.to_be_bytes());
            let mut p = Vec::with_capacity(IPV6_HEADER + udp_len);
            p.extend_from_slice(&[0x60, 0, 0, 0]);
            p.extend_from_slice(&u16::try_from(udp_len).ok()?.to_be_bytes());
            p.extend_from_slice(&[UDP, 64]);
            p.extend_from_slice(&s.octets());
            p.extend_from_slice(&t.octets());
            p.extend_from_slice(&seg);
            Some(p)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn d(src: &str, dst: &str) -> Datagram {
        Datagram {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            src_port: 40000,
            dst_port: 53,
            payload: b"hello".to_vec(),
        }
    }

    #[test]
    fn round_trips_with_valid_checksums() {
        for (s, t) in [("10.128.9.1", "10.128.2.20"), ("fd00::9", "fd00::2:20")] {
            let dg = d(s, t);
            let p = build(&dg).unwrap();
            assert_eq!(parse(&p), Ok(dg.clone()));
            // A packet with its checksum in place sums to zero (0xffff before inversion).
            let (pseudo, seg) = if p[0] >> 4 == 4 {
                assert_eq!(fold(sum16(0, &p[..20])), 0, "ipv4 header checksum");
                let len = (p.len() - 20) as u16;
                ([&p[12..20], &[0, UDP], &len.to_be_bytes()[..]].concat(), &p[20..])
            } else {
                let len = (p.len() - 40) as u32;
                ([&p[8..40], &len.to_be_bytes()[..], &[0, 0, 0, UDP]].concat(), &p[40..])
            };
            assert_eq!(fold(sum16(sum16(0, &pseudo), seg)), 0, "udp checksum");
        }
        assert_eq!(build(&d("10.0.0.1", "fd00::1")), None);
    }

    #[test]
    fn refuses_what_is_not_a_whole_udp_packet() {
        let p = build(&d("10.128.9.1", "10.128.2.20")).unwrap();
        let mut icmp = p.clone();
        icmp[9] = 1;
        assert_eq!(parse(&icmp), Err(Refused::NotUdp));
        let mut frag = p.clone();
        frag[6] = 0x20;
        assert_eq!(parse(&frag), Err(Refused::Fragment));
        assert_eq!(parse(&p[..p.len() - 1]), Err(Refused::Malformed));
        assert_eq!(parse(&[]), Err(Refused::Malformed));
        let mut v6 = build(&d("fd00::9", "fd00::2:20")).unwrap();
        v6[6] = 58;
        assert_eq!(parse(&v6), Err(Refused::NotUdp));
    }

    proptest! {
        #[test]
        fn parse_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
            let _ = parse(&bytes);
        }
    }
}
