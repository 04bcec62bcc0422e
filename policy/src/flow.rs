//! The flow header: the first bytes of every overlay stream (gateway → gateway), and the status
//! the receiving gateway answers with. Versioned, length-prefixed, total decoders.
//!
//! ```text
//! header = magic "KWF" | version u8 (1) | length u16be (of the body) | body
//! body   = flow_id u64be | src ip16 | dst ip16 | dst_port u16be | protocol u8 (IANA)
//!        | identity: u16be length + UTF-8 (the verified source identity)
//!        | source zone: u8 length + UTF-8 | source gateway: u8 length + UTF-8
//!        | verdict: u16be length + UTF-8 (the source gateway's deciding rule)
//! status = magic "KWS" | version u8 (1) | code u8 | reason: u8 length + UTF-8
//! ```
//!
//! UDP travels in QUIC datagrams (RFC 9221), one [`Datagram`] each, between an agent and its
//! gateways and between gateways; no stream, no status, no retransmission:
//!
//! ```text
//! datagram = magic "KWD" | version u8 (1) | protocol u8 (17) | src ip16 | dst ip16
//!          | src_port u16be | dst_port u16be | payload (the rest)
//! ```

use std::net::{IpAddr, SocketAddr};

use crate::auth::{ip_from16, ip16};
use crate::ports::Protocol;

const HEADER_MAGIC: &[u8; 3] = b"KWF";
const STATUS_MAGIC: &[u8; 3] = b"KWS";
const DATAGRAM_MAGIC: &[u8; 3] = b"KWD";
/// The bytes a [`Datagram`] adds in front of its payload.
pub const DATAGRAM_OVERHEAD: usize = 3 + 1 + 1 + 16 + 16 + 2 + 2;
/// The flow header version this gateway writes and reads.
pub const VERSION: u8 = 1;
/// The largest body a header may have.
pub const MAX_BODY: usize = 8 * 1024;

/// What a source gateway tells the destination gateway about a flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowHeader {
    /// Flow id, for logs on both sides.
    pub flow_id: u64,
    /// The verified source overlay address.
    pub src: IpAddr,
    /// The destination address.
    pub dst: IpAddr,
    /// The destination port.
    pub dst_port: u16,
    /// The protocol.
    pub protocol: Protocol,
    /// The verified source identity (SPIFFE id).
    pub identity: String,
    /// The source gateway's zone.
    pub src_zone: String,
    /// The source gateway's name.
    pub src_gateway: String,
    /// The source gateway's verdict reference (the deciding rule).
    pub verdict: String,
}

/// A malformed header or status.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FlowError {
    /// Not a keyway flow header.
    #[error("not a keyway flow header or status (bad magic)")]
    Magic,
    /// A version this gateway does not speak.
    #[error("flow header version {0} is not supported (this gateway speaks {VERSION})")]
    Version(u8),
    /// Too long.
    #[error("flow header body of {0} bytes exceeds {MAX_BODY}")]
    TooLong(usize),
    /// Ends early or has bytes left over.
    #[error("flow header is truncated or has trailing bytes")]
    Length,
    /// A field does not decode.
    #[error("flow header field {0} is invalid")]
    Field(&'static str),
}

impl FlowError {
    /// A fixed label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            FlowError::Magic => "flow-magic",
            FlowError::Version(_) => "flow-version",
            FlowError::TooLong(_) => "flow-too-long",
            FlowError::Length => "flow-length",
            FlowError::Field(_) => "flow-field",
        }
    }
}

/// A cursor that never panics.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FlowError> {
        if self.0.len() < n {
            return Err(FlowError::Length);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], FlowError> {
        self.take(N)?.try_into().map_err(|_| FlowError::Length)
    }
    fn u8(&mut self) -> Result<u8, FlowError> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, FlowError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn str8(&mut self, field: &'static str) -> Result<String, FlowError> {
        let n = usize::from(self.u8()?);
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| FlowError::Field(field))
    }
    fn str16(&mut self, field: &'static str) -> Result<String, FlowError> {
        let n = usize::from(self.u16()?);
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| FlowError::Field(field))
    }
}

fn put_str8(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    let n = b.len().min(255);
    out.push(n as u8);
    out.extend_from_slice(b.get(..n).unwrap_or_default());
}

fn put_str16(out: &mut Vec<u8>, s: &str, max: usize) {
    let b = s.as_bytes();
    let n = b.len().min(max);
    out.extend_from_slice(&(n as u16).to_be_bytes());
    out.extend_from_slice(b.get(..n).unwrap_or_default());
}

impl FlowHeader {
    /// The wire form. Over-long strings are cut to fit (identities are at most 1 KiB anyway).
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(128);
        body.extend_from_slice(&self.flow_id.to_be_bytes());
        body.extend_from_slice(&ip16(self.src));
        body.extend_from_slice(&ip16(self.dst));
        body.extend_from_slice(&self.dst_port.to_be_bytes());
        body.push(self.protocol.number());
        put_str16(&mut body, &self.identity, 2048);
        put_str8(&mut body, &self.src_zone);
        put_str8(&mut body, &self.src_gateway);
        put_str16(&mut body, &self.verdict, 2048);
        let mut out = Vec::with_capacity(body.len() + 6);
        out.extend_from_slice(HEADER_MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// The length of the body announced by a 6-byte prefix, after checking magic and version.
    pub fn body_len(prefix: &[u8; 6]) -> Result<usize, FlowError> {
        if &prefix[..3] != HEADER_MAGIC {
            return Err(FlowError::Magic);
        }
        if prefix[3] != VERSION {
            return Err(FlowError::Version(prefix[3]));
        }
        let n = usize::from(u16::from_be_bytes([prefix[4], prefix[5]]));
        if n > MAX_BODY {
            return Err(FlowError::TooLong(n));
        }
        Ok(n)
    }

    /// Decodes a whole header (prefix and body).
    pub fn decode(bytes: &[u8]) -> Result<FlowHeader, FlowError> {
        let mut r = Reader(bytes);
        let prefix: [u8; 6] = r.array()?;
        let n = FlowHeader::body_len(&prefix)?;
        if r.0.len() != n {
            return Err(FlowError::Length);
        }
        let h = FlowHeader {
            flow_id: u64::from_be_bytes(r.array()?),
            src: ip_from16(r.array()?),
            dst: ip_from16(r.array()?),
            dst_port: r.u16()?,
            protocol: Protocol::from_number(r.u8()?).ok_or(FlowError::Field("protocol"))?,
            identity: r.str16("identity")?,
            src_zone: r.str8("src_zone")?,
            src_gateway: r.str8("src_gateway")?,
            verdict: r.str16("verdict")?,
        };
        if !r.0.is_empty() {
            return Err(FlowError::Length);
        }
        Ok(h)
    }
}

/// The destination gateway's answer to a flow header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusCode {
    /// Connected to the destination: bytes follow.
    Connected = 0,
    /// The destination side's policy denies the flow.
    Denied = 1,
    /// The destination could not be reached (not in this zone, sidecar refused, timeout).
    Unreachable = 2,
    /// The header was malformed or the peer is not allowed to send flows.
    Refused = 3,
    /// A limit refused the flow.
    Overloaded = 4,
}

impl StatusCode {
    fn from_u8(b: u8) -> Option<StatusCode> {
        Some(match b {
            0 => StatusCode::Connected,
            1 => StatusCode::Denied,
            2 => StatusCode::Unreachable,
            3 => StatusCode::Refused,
            4 => StatusCode::Overloaded,
            _ => return None,
        })
    }
}

/// A status: code and a short reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// The code.
    pub code: StatusCode,
    /// A short reason (a fixed label or the deciding rule).
    pub reason: String,
}

impl Status {
    /// The wire form.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.reason.len());
        out.extend_from_slice(STATUS_MAGIC);
        out.push(VERSION);
        out.push(self.code as u8);
        put_str8(&mut out, &self.reason);
        out
    }

    /// Decodes the fixed 6-byte prefix: code and reason length.
    pub fn decode_prefix(prefix: &[u8; 6]) -> Result<(StatusCode, usize), FlowError> {
        if &prefix[..3] != STATUS_MAGIC {
            return Err(FlowError::Magic);
        }
        if prefix[3] != VERSION {
            return Err(FlowError::Version(prefix[3]));
        }
        let code = StatusCode::from_u8(prefix[4]).ok_or(FlowError::Field("code"))?;
        Ok((code, usize::from(prefix[5])))
    }
}

/// One UDP packet of a flow, as carried in a QUIC datagram: the 5-tuple and the payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Datagram {
    /// The source overlay address (checked by the receiver against who sent it).
    pub src: IpAddr,
    /// The destination address.
    pub dst: IpAddr,
    /// The source port.
    pub src_port: u16,
    /// The destination port.
    pub dst_port: u16,
    /// The UDP payload.
    pub payload: Vec<u8>,
}

impl Datagram {
    /// The wire form.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(DATAGRAM_OVERHEAD + self.payload.len());
        out.extend_from_slice(DATAGRAM_MAGIC);
        out.push(VERSION);
        out.push(Protocol::Udp.number());
        out.extend_from_slice(&ip16(self.src));
        out.extend_from_slice(&ip16(self.dst));
        out.extend_from_slice(&self.src_port.to_be_bytes());
        out.extend_from_slice(&self.dst_port.to_be_bytes());
        out.extend_from_slice(&self.payload);
        out
    }

    /// Decodes one datagram. Only UDP is carried (protocol 17).
    pub fn decode(bytes: &[u8]) -> Result<Datagram, FlowError> {
        let (src, dst) = Datagram::addresses(bytes)?;
        Ok(Datagram {
            src: src.ip(),
            dst: dst.ip(),
            src_port: src.port(),
            dst_port: dst.port(),
            payload: bytes.get(DATAGRAM_OVERHEAD..).unwrap_or_default().to_vec(),
        })
    }

    /// The source and destination of an encoded datagram, checked as [`Datagram::decode`] checks
    /// them, without copying its payload (a gateway forwards the bytes as they came).
    pub fn addresses(bytes: &[u8]) -> Result<(SocketAddr, SocketAddr), FlowError> {
        let mut r = Reader(bytes);
        if r.take(3)? != DATAGRAM_MAGIC {
            return Err(FlowError::Magic);
        }
        let version = r.u8()?;
        if version != VERSION {
            return Err(FlowError::Version(version));
        }
        if r.u8()? != Protocol::Udp.number() {
            return Err(FlowError::Field("protocol"));
        }
        let (src, dst): (IpAddr, IpAddr) = (ip_from16(r.array()?), ip_from16(r.array()?));
        Ok((SocketAddr::new(src, r.u16()?), SocketAddr::new(dst, r.u16()?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn datagrams_round_trip_and_refuse_what_they_are_not() {
        let d = Datagram {
            src: "10.128.9.1".parse().unwrap(),
            dst: "10.128.2.20".parse().unwrap(),
            src_port: 40000,
            dst_port: 5353,
            payload: b"ping".to_vec(),
        };
        let b = d.encode();
        assert_eq!(b.len(), DATAGRAM_OVERHEAD + 4);
        assert_eq!(Datagram::decode(&b), Ok(d.clone()));
        assert_eq!(Datagram::decode(&b[..DATAGRAM_OVERHEAD - 1]), Err(FlowError::Length));
        let mut v = b.clone();
        v[4] = 6;
        assert_eq!(Datagram::decode(&v), Err(FlowError::Field("protocol")));
        let mut v = b.clone();
        v[3] = 2;
        assert_eq!(Datagram::decode(&v), Err(FlowError::Version(2)));
        let empty = Datagram { payload: Vec::new(), ..d };
        assert_eq!(Datagram::decode(&empty.encode()), Ok(empty));
    }

    fn header() -> FlowHeader {
        FlowHeader {
            flow_id: 42,
            src: "10.128.1.11".parse().unwrap(),
            dst: "fd00::5".parse().unwrap(),
            dst_port: 6379,
            protocol: Protocol::Tcp,
            identity: "spiffe://cluster.local/ns/shop/sa/cart".into(),
            src_zone: "zone-a".into(),
            src_gateway: "gw-1".into(),
            verdict: "NetworkPolicy shop/cart-egress rule 0: Allow".into(),
        }
    }

    #[test]
    fn round_trip_and_errors() {
        let h = header();
        let b = h.encode();
        assert_eq!(FlowHeader::decode(&b), Ok(h));
        assert_eq!(FlowHeader::decode(&b[..b.len() - 1]), Err(FlowError::Length));
        let mut v = b.clone();
        v[3] = 9;
        assert_eq!(FlowHeader::decode(&v), Err(FlowError::Version(9)));
        let mut v = b.clone();
        v[0] = b'X';
        assert_eq!(FlowHeader::decode(&v), Err(FlowError::Magic));
        let mut v = b.clone();
        v.push(0);
        assert_eq!(FlowHeader::decode(&v), Err(FlowError::Length));
        let s = Status { code: StatusCode::Denied, reason: "policy".into() };
        let e = s.encode();
        let prefix: [u8; 6] = e[..6].try_into().unwrap();
        assert_eq!(Status::decode_prefix(&prefix), Ok((StatusCode::Denied, 6)));
        assert_eq!(&e[6..], b"policy");
    }

    proptest! {
        #[test]
        fn decoder_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = FlowHeader::decode(&bytes);
            let _ = Datagram::decode(&bytes);
            if bytes.len() >= 6 {
                let p: [u8; 6] = bytes[..6].try_into().unwrap();
                let _ = Status::decode_prefix(&p);
                let _ = FlowHeader::body_len(&p);
            }
        }

        #[test]
        fn round_trips(id in any::<u64>(), a in any::<[u8; 16]>(), port in any::<u16>(), ident in "[a-z:/.]{0,80}") {
            let mut h = header();
            h.flow_id = id;
            h.src = ip_from16(a);
            h.dst_port = port;
            h.identity = ident;
            prop_assert_eq!(FlowHeader::decode(&h.encode()), Ok(h));
        }
    }
}
