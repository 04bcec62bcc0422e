//! Tickets: what a destination gateway hands the destination filter, bound to the destination
//! address and port and carrying the verified source identity.
//!
//! Binary form (78 to 1102 bytes), sent as base64url without padding:
//!
//! ```text
//! version u8 = 1 | epoch u32be | src ip16 | dst ip16 | dst_port u16be | protocol u8 (IANA)
//!   | issued_at_ms u64be | nonce [12] | u16be(len identity) | identity (UTF-8, ≤ 1024 bytes)
//!   | mac [16]
//! ```
//!
//! The fields before the identity are laid out as in a token ([`super::token`]); `mac` is the
//! first 16 bytes of `HMAC-SHA256(ticket key of the destination zone, every byte before it)`.

use std::net::IpAddr;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::keys::{TAG_LEN, TicketKey, TicketMac};
use super::token::{HEADER_LEN, NONCE_LEN, Reader, TokenClaims, check_version, decode_text, read_header, write_header};
use super::{AuthError, Kind, MAX_IDENTITY_LEN, check_window};
use crate::ports::Protocol;

/// The length of a binary ticket with an empty identity.
pub const TICKET_MIN_LEN: usize = HEADER_LEN + 2 + TAG_LEN;

/// The length of a binary ticket with the longest identity.
pub const TICKET_MAX_LEN: usize = TICKET_MIN_LEN + MAX_IDENTITY_LEN;

/// What a ticket asserts: the flow, the key epoch, when it was issued, a nonce and the source
/// identity the source gateway verified.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TicketClaims {
    /// The key epoch the ticket is sealed for.
    pub epoch: u32,
    /// The source workload's overlay address.
    pub src: IpAddr,
    /// The destination address the ticket is valid for.
    pub dst: IpAddr,
    /// The destination port the ticket is valid for.
    pub dst_port: u16,
    /// The transport protocol.
    pub protocol: Protocol,
    /// When the gateway issued the ticket (unix ms).
    pub issued_at_ms: u64,
    /// A nonce unique per ticket, from the gateway's randomness.
    pub nonce: [u8; NONCE_LEN],
    /// The source's SPIFFE id, at most [`MAX_IDENTITY_LEN`] bytes.
    pub src_identity: String,
}

impl TicketClaims {
    /// The binary ticket: these claims sealed with `key`. Refuses an identity longer than
    /// [`MAX_IDENTITY_LEN`] bytes.
    pub fn seal_bytes(&self, key: &TicketKey) -> Result<Vec<u8>, AuthError> {
        let id = self.src_identity.as_bytes();
        let too_long = AuthError::IdentityTooLong { len: id.len() };
        if id.len() > MAX_IDENTITY_LEN {
            return Err(too_long);
        }
        let id_len = u16::try_from(id.len()).map_err(|_| too_long)?;
        let mut out = Vec::with_capacity(TICKET_MIN_LEN + id.len());
        write_header(&mut out, &self.flow());
        out.extend_from_slice(&id_len.to_be_bytes());
        out.extend_from_slice(id);
        let mac = key.keyed().tag(&out);
        out.extend_from_slice(&mac);
        Ok(out)
    }

    /// The ticket as sent: [`TicketClaims::seal_bytes`] in base64url without padding.
    pub fn seal(&self, key: &TicketKey) -> Result<String, AuthError> {
        self.seal_bytes(key).map(|b| URL_SAFE_NO_PAD.encode(b))
    }

    /// The fields a ticket shares with a token.
    fn flow(&self) -> TokenClaims {
        TokenClaims {
            epoch: self.epoch,
            src: self.src,
            dst: self.dst,
            dst_port: self.dst_port,
            protocol: self.protocol,
            issued_at_ms: self.issued_at_ms,
            nonce: self.nonce,
        }
    }
}

/// A well-formed ticket whose MAC, destination and time are not yet checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedTicket {
    claims: TicketClaims,
    signed: Vec<u8>,
    mac: [u8; TAG_LEN],
}

impl SealedTicket {
    /// The claims, unverified: only to find the key (by `epoch`).
    pub fn claims(&self) -> &TicketClaims {
        &self.claims
    }

    /// Checks the MAC under `key` (in constant time), then that the ticket names this
    /// connection's destination `expected_dst` and `expected_port` (IPv4 and v4-mapped IPv6 are
    /// the same address), then that it was issued within `window_ms` of `now_ms` either way (both
    /// edges included), and returns the claims.
    pub fn verify(
        &self,
        key: &TicketKey,
        now_ms: u64,
        window_ms: u64,
        expected_dst: IpAddr,
        expected_port: u16,
    ) -> Result<TicketClaims, AuthError> {
        self.verify_with(&key.keyed(), now_ms, window_ms, expected_dst, expected_port)
    }

    /// [`SealedTicket::verify`] with a key whose MAC state is kept ([`TicketKey::keyed`]): the
    /// same checks, without the key schedule.
    pub fn verify_with(
        &self,
        key: &TicketMac,
        now_ms: u64,
        window_ms: u64,
        expected_dst: IpAddr,
        expected_port: u16,
    ) -> Result<TicketClaims, AuthError> {
        if !key.verify(&self.signed, &self.mac) {
            return Err(AuthError::BadMac { kind: Kind::Ticket });
        }
        let c = &self.claims;
        if c.dst.to_canonical() != expected_dst.to_canonical() || c.dst_port != expected_port {
            return Err(AuthError::WrongDestination { dst: c.dst, dst_port: c.dst_port, expected_dst, expected_port });
        }
        check_window(Kind::Ticket, c.issued_at_ms, now_ms, window_ms)?;
        Ok(self.claims.clone())
    }
}

/// Decodes a ticket as sent (base64url without padding), checking its structure only: version,
/// lengths, protocol and UTF-8 identity. No key is needed; see [`SealedTicket::verify`].
pub fn decode_ticket(text: &str) -> Result<SealedTicket, AuthError> {
    decode_ticket_bytes(&decode_text(Kind::Ticket, text, TICKET_MAX_LEN)?)
}

/// Decodes a binary ticket, checking its structure only: version, lengths, protocol and UTF-8
/// identity.
pub fn decode_ticket_bytes(bytes: &[u8]) -> Result<SealedTicket, AuthError> {
    let kind = Kind::Ticket;
    let actual = bytes.len();
    let short = || AuthError::Length { kind, actual, expected: TICKET_MIN_LEN };
    check_version(kind, bytes, TICKET_MIN_LEN)?;
    let (signed, mac) = bytes.split_last_chunk::<TAG_LEN>().ok_or_else(short)?;
    let mut r = Reader(signed);
    let header: [u8; HEADER_LEN] = r.array().ok_or_else(short)?;
    let id_len = usize::from(u16::from_be_bytes(r.array().ok_or_else(short)?));
    if id_len > MAX_IDENTITY_LEN {
        return Err(AuthError::Malformed { kind, detail: "source identity longer than 1024 bytes" });
    }
    let expected = TICKET_MIN_LEN + id_len;
    if actual != expected {
        return Err(AuthError::Length { kind, actual, expected });
    }
    let id = r.slice(id_len).ok_or(AuthError::Length { kind, actual, expected })?;
    let flow = read_header(kind, &header)?;
    let src_identity = std::str::from_utf8(id)
        .map_err(|_| AuthError::Malformed { kind, detail: "source identity is not UTF-8" })?
        .to_owned();
    let claims = TicketClaims {
        epoch: flow.epoch,
        src: flow.src,
        dst: flow.dst,
        dst_port: flow.dst_port,
        protocol: flow.protocol,
        issued_at_ms: flow.issued_at_ms,
        nonce: flow.nonce,
        src_identity,
    };
    Ok(SealedTicket { claims, signed: signed.to_vec(), mac: *mac })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::EpochSecret;
    use crate::auth::token::tests::{SECRET, arb_claims, v4_claims};
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const NOW: u64 = 1_750_000_000_000;
    const W: u64 = 30_000;
    const SRC_ID: &str = "spiffe://cluster.local/ns/shop/sa/cart";

    fn ticket(flow: TokenClaims, src_identity: &str) -> TicketClaims {
        TicketClaims {
            epoch: flow.epoch,
            src: flow.src,
            dst: flow.dst,
            dst_port: flow.dst_port,
            protocol: flow.protocol,
            issued_at_ms: flow.issued_at_ms,
            nonce: flow.nonce,
            src_identity: src_identity.to_owned(),
        }
    }

    fn v4_ticket() -> TicketClaims {
        ticket(v4_claims(), SRC_ID)
    }

    fn v6_ticket() -> TicketClaims {
        TicketClaims {
            src: IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x42)),
            dst: IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 1, 0x43)),
            dst_port: 5000,
            protocol: Protocol::Sctp,
            ..v4_ticket()
        }
    }

    /// The ticket key of the ticket's destination (`api` at the ticket's `dst`).
    fn dst_key(c: &TicketClaims) -> Result<TicketKey, AuthError> {
        SECRET.ticket_key(DST_ID, c.dst, 7)
    }

    const DST_ID: &str = "spiffe://cluster.local/ns/shop/sa/api";

    /// Known answers, cross-checked with the independent reference `policy/fuzz/seeds.py`,
    /// and pinned: a change here is a wire-format change.
    #[test]
    fn known_answers() -> Result<(), AuthError> {
        assert_eq!(
            v4_ticket().seal(&dst_key(&v4_ticket())?)?,
            "AQAAAAcAAAAAAAAAAAAA__8KAQIDAAAAAAAAAAAAAP__CgkIBx-QBgAAAZd0INwAbm9uY2UtMDEyM2FiACZzcGlmZmU6Ly9jbHVzdGVyLmxvY2FsL25zL3Nob3Avc2EvY2FydELNqIE8c3PsYAWvr9eYOKk"
        );
        assert_eq!(
            v6_ticket().seal(&dst_key(&v6_ticket())?)?,
            "AQAAAAf9AAAAAAAAAAAAAAAAAABC_QAAAAAAAAAAAAAAAAEAQxOIhAAAAZd0INwAbm9uY2UtMDEyM2FiACZzcGlmZmU6Ly9jbHVzdGVyLmxvY2FsL25zL3Nob3Avc2EvY2FydIux73lV2JqkVFBz3i24qLY"
        );
        Ok(())
    }

    #[test]
    fn v4_and_v6_round_trip() -> Result<(), AuthError> {
        let key = dst_key(&v4_ticket())?;
        for c in [v4_ticket(), v6_ticket()] {
            let t = decode_ticket(&c.seal(&key)?)?;
            assert_eq!(t.claims(), &c);
            assert_eq!(t.verify(&key, NOW, W, c.dst, c.dst_port)?, c);
            assert_eq!(decode_ticket_bytes(&c.seal_bytes(&key)?)?, t);
        }
        Ok(())
    }

    #[test]
    fn identity_length_limits() -> Result<(), AuthError> {
        let key = dst_key(&v4_ticket())?;
        for (len, total) in [(0, TICKET_MIN_LEN), (MAX_IDENTITY_LEN, TICKET_MAX_LEN)] {
            let c = ticket(v4_claims(), &"a".repeat(len));
            let bytes = c.seal_bytes(&key)?;
            assert_eq!(bytes.len(), total);
            assert_eq!(decode_ticket_bytes(&bytes)?.verify(&key, NOW, W, c.dst, c.dst_port)?, c);
        }
        assert_eq!((TICKET_MIN_LEN, TICKET_MAX_LEN), (78, 1102));
        // A multi-byte identity counts bytes, not characters.
        let c = ticket(v4_claims(), &"é".repeat(MAX_IDENTITY_LEN / 2 + 1));
        assert_eq!(c.seal(&key), Err(AuthError::IdentityTooLong { len: MAX_IDENTITY_LEN + 2 }));
        let c = ticket(v4_claims(), &"a".repeat(MAX_IDENTITY_LEN + 1));
        assert_eq!(c.seal_bytes(&key).map_err(|e| e.reason()), Err("identity-too-long"));
        let c = ticket(v4_claims(), &"a".repeat(70_000));
        assert_eq!(c.seal_bytes(&key), Err(AuthError::IdentityTooLong { len: 70_000 }));
        Ok(())
    }

    #[test]
    fn window_edges() -> Result<(), AuthError> {
        let key = dst_key(&v4_ticket())?;
        let c = v4_ticket();
        let t = decode_ticket(&c.seal(&key)?)?;
        let reason = |now| t.verify(&key, now, W, c.dst, c.dst_port).map(|_| ()).map_err(|e| e.reason());
        assert_eq!(reason(NOW - W), Ok(()));
        assert_eq!(reason(NOW + W), Ok(()));
        assert_eq!(reason(NOW + W + 1), Err("ticket-expired"));
        assert_eq!(reason(NOW - W - 1), Err("ticket-future"));
        Ok(())
    }

    #[test]
    fn destination_binding() -> Result<(), AuthError> {
        let key = dst_key(&v4_ticket())?;
        let c = v4_ticket();
        let t = decode_ticket(&c.seal(&key)?)?;
        let other_ip = IpAddr::V4(Ipv4Addr::new(10, 9, 8, 8));
        assert_eq!(
            t.verify(&key, NOW, W, other_ip, c.dst_port),
            Err(AuthError::WrongDestination {
                dst: c.dst,
                dst_port: c.dst_port,
                expected_dst: other_ip,
                expected_port: c.dst_port
            })
        );
        let reason = |dst, port, now| t.verify(&key, now, W, dst, port).map(|_| ()).map_err(|e| e.reason());
        assert_eq!(reason(c.dst, c.dst_port + 1, NOW), Err("ticket-wrong-destination"));
        // Destination is checked before time, MAC before both.
        assert_eq!(reason(other_ip, c.dst_port, 0), Err("ticket-wrong-destination"));
        let other_dst = SECRET.ticket_key(DST_ID, other_ip, 7)?;
        assert_eq!(t.verify(&other_dst, 0, W, other_ip, 1).map_err(|e| e.reason()), Err("ticket-mac"));
        // The connection may see its address in v4-mapped form.
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 9, 8, 7).to_ipv6_mapped());
        assert_eq!(t.verify(&key, NOW, W, mapped, c.dst_port)?, c);
        Ok(())
    }

    #[test]
    fn wrong_keys_fail_the_mac() -> Result<(), AuthError> {
        let c = v4_ticket();
        let t = decode_ticket(&c.seal(&dst_key(&c)?)?)?;
        for key in [
            // Another workload's key (its own bundle): the attack of a pod minting for others.
            SECRET.ticket_key(SRC_ID, c.src, 7)?,
            SECRET.ticket_key(DST_ID, c.src, 7)?,
            SECRET.ticket_key(DST_ID, c.dst, 8)?,
            EpochSecret::from_bytes([8; 32]).ticket_key(DST_ID, c.dst, 7)?,
            TicketKey::from_bytes(*SECRET.workload_key(SRC_ID, c.src, 7)?.as_bytes()),
        ] {
            assert_eq!(t.verify(&key, NOW, W, c.dst, c.dst_port), Err(AuthError::BadMac { kind: Kind::Ticket }));
        }
        Ok(())
    }

    #[test]
    fn structural_errors() -> Result<(), AuthError> {
        let key = dst_key(&v4_ticket())?;
        let good = v4_ticket().seal_bytes(&key)?;
        let n = good.len();
        let with = |i: usize, b: u8| {
            let mut v = good.clone();
            if let Some(x) = v.get_mut(i) {
                *x = b;
            }
            v
        };
        let k = Kind::Ticket;
        let len = |actual, expected| AuthError::Length { kind: k, actual, expected };
        let cases: Vec<(Vec<u8>, AuthError)> = vec![
            (vec![], len(0, TICKET_MIN_LEN)),
            (vec![1], len(1, TICKET_MIN_LEN)),
            (vec![1; TICKET_MIN_LEN - 1], len(TICKET_MIN_LEN - 1, TICKET_MIN_LEN)),
            (good[..n - 1].to_vec(), len(n - 1, n)),
            ([good.as_slice(), &[0]].concat(), len(n + 1, n)),
            (with(0, 0), AuthError::Version { kind: k, found: 0 }),
            (with(0, 255), AuthError::Version { kind: k, found: 255 }),
            (with(39, 2), AuthError::UnknownProtocol { kind: k, number: 2 }),
            // Identity length field: high byte at 60, low byte at 61.
            (with(61, 0), len(n, TICKET_MIN_LEN)),
            (with(60, 4), AuthError::Malformed { kind: k, detail: "source identity longer than 1024 bytes" }),
            (with(62, 0xff), AuthError::Malformed { kind: k, detail: "source identity is not UTF-8" }),
        ];
        for (bytes, err) in cases {
            assert_eq!(decode_ticket_bytes(&bytes), Err(err.clone()), "{bytes:?}");
            assert_eq!(decode_ticket(&URL_SAFE_NO_PAD.encode(&bytes)), Err(err.clone()));
            assert!(err.reason().starts_with("ticket-"), "{err}");
        }
        assert_eq!(decode_ticket("%%").map_err(|e| e.reason()), Err("ticket-malformed"));
        assert_eq!(decode_ticket("A").map_err(|e| e.reason()), Err("ticket-malformed"));
        assert_eq!(
            decode_ticket(&"A".repeat(10_000)),
            Err(AuthError::Length { kind: k, actual: 7_500, expected: TICKET_MAX_LEN })
        );
        Ok(())
    }

    fn arb_ticket() -> impl Strategy<Value = TicketClaims> {
        (arb_claims(), "\\PC{0,40}").prop_map(|(flow, id)| ticket(flow, &id))
    }

    proptest! {
        #[test]
        fn round_trip(c in arb_ticket(), secret in any::<[u8; 32]>()) {
            let key = TicketKey::from_bytes(secret);
            let text = c.seal(&key);
            let verified = text
                .and_then(|t| decode_ticket(&t))
                .and_then(|t| t.verify(&key, c.issued_at_ms, 0, c.dst, c.dst_port));
            let canonical = TicketClaims { src: c.src.to_canonical(), dst: c.dst.to_canonical(), ..c };
            prop_assert_eq!(verified, Ok(canonical));
        }

        #[test]
        fn a_kept_mac_state_verifies_like_a_fresh_one(
            a in arb_ticket(),
            b in arb_ticket(),
            secret in any::<[u8; 32]>(),
            other in any::<[u8; 32]>(),
        ) {
            // One state verifying ticket after ticket (as the filter keeps it), good or forged,
            // decides each as a fresh key would.
            let key = TicketKey::from_bytes(secret);
            let kept = key.keyed();
            let forger = TicketKey::from_bytes(other);
            for (c, sealer) in [(&a, &key), (&b, &forger), (&a, &key), (&b, &key)] {
                let Ok(t) = c.seal(sealer).and_then(|t| decode_ticket(&t)) else {
                    return Err(TestCaseError::fail("seal failed"));
                };
                let kept_verdict = t.verify_with(&kept, c.issued_at_ms, 0, c.dst, c.dst_port);
                prop_assert_eq!(&kept_verdict, &t.verify(&key, c.issued_at_ms, 0, c.dst, c.dst_port));
                prop_assert_eq!(kept_verdict.is_ok(), secret == other || std::ptr::eq(sealer, &key));
            }
        }

        #[test]
        fn any_bit_flip_is_refused(c in arb_ticket(), bit in any::<prop::sample::Index>()) {
            let key = TicketKey::from_bytes([5; 32]);
            let Ok(mut bytes) = c.seal_bytes(&key) else {
                return Err(TestCaseError::fail("seal failed"));
            };
            let bit = bit.index(bytes.len() * 8);
            if let Some(b) = bytes.get_mut(bit / 8) {
                *b ^= 1 << (bit % 8);
            }
            // Whatever destination the flipped ticket names, it must not verify.
            let verdict = decode_ticket_bytes(&bytes).and_then(|t| {
                let (dst, port) = (t.claims().dst, t.claims().dst_port);
                t.verify(&key, c.issued_at_ms, u64::MAX, dst, port)
            });
            prop_assert!(verdict.is_err());
        }

        #[test]
        fn decoders_are_total(bytes in proptest::collection::vec(any::<u8>(), 0..1200), text in ".{0,300}") {
            let _ = decode_ticket_bytes(&bytes);
            let _ = decode_ticket(&text);
            let _ = decode_ticket(&URL_SAFE_NO_PAD.encode(&bytes));
        }

        #[test]
        fn well_framed_garbage_never_verifies(
            head in proptest::collection::vec(any::<u8>(), HEADER_LEN),
            id in proptest::collection::vec(any::<u8>(), 0..50),
            mac in any::<[u8; 16]>(),
        ) {
            let mut bytes = head;
            if let Some(v) = bytes.first_mut() {
                *v = 1;
            }
            bytes.extend_from_slice(&u16::try_from(id.len()).unwrap_or(0).to_be_bytes());
            bytes.extend_from_slice(&id);
            bytes.extend_from_slice(&mac);
            let key = TicketKey::from_bytes([5; 32]);
            if let Ok(t) = decode_ticket_bytes(&bytes) {
                let (dst, port) = (t.claims().dst, t.claims().dst_port);
                prop_assert!(t.verify(&key, t.claims().issued_at_ms, 0, dst, port).is_err());
            }
        }
    }
}
