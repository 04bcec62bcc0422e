//! Tokens: what an outbound filter hands its gateway to prove which workload opens a flow.
//!
//! Binary form (76 bytes), sent as base64url without padding (102 characters):
//!
//! ```text
//! version u8 = 1 | epoch u32be | src ip16 | dst ip16 | dst_port u16be | protocol u8 (IANA)
//!   | issued_at_ms u64be | nonce [12] | mac [16]
//! ```
//!
//! `mac` is the first 16 bytes of `HMAC-SHA256(workload key, every byte before it)`. Addresses are
//! 16 bytes, IPv4 as `::ffff:a.b.c.d`; that form decodes as IPv4, so every claim round-trips up to
//! [`IpAddr::to_canonical`].
//!
//! The gateway decodes a token without a key ([`decode_token`]), reads the unverified `src` and
//! `epoch` to find the identity and derive the workload key, then [`SealedToken::verify`]s it.

use std::net::IpAddr;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::keys::{TAG_LEN, WorkloadKey, WorkloadMac};
use super::{AuthError, Kind, check_window, ip_from16, ip16};
use crate::ports::Protocol;

/// The version of the token and ticket formats this build writes and reads.
pub const VERSION: u8 = 1;

/// The length of the nonce of tokens and tickets.
pub const NONCE_LEN: usize = 12;

/// The length of a binary token.
pub const TOKEN_LEN: usize = HEADER_LEN + TAG_LEN;

/// The length of a token in base64url without padding.
pub const TOKEN_TEXT_LEN: usize = 102;

/// The length of the fields tokens and tickets share, before the ticket's identity and the MAC.
pub(crate) const HEADER_LEN: usize = 1 + 4 + 16 + 16 + 2 + 1 + 8 + NONCE_LEN;

/// The most bytes a text decoder decodes: above this the length alone refuses the input. It is
/// well above every version 1 length, so a longer future version is still told by its version.
const MAX_DECODED_LEN: usize = 4096;

/// What a token asserts: the flow, the key epoch, when it was issued and a nonce.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TokenClaims {
    /// The key epoch the token is sealed for.
    pub epoch: u32,
    /// The source workload's overlay address.
    pub src: IpAddr,
    /// The destination address.
    pub dst: IpAddr,
    /// The destination port.
    pub dst_port: u16,
    /// The transport protocol.
    pub protocol: Protocol,
    /// When the filter issued the token (unix ms).
    pub issued_at_ms: u64,
    /// A nonce unique per token, from the filter's randomness.
    pub nonce: [u8; NONCE_LEN],
}

impl TokenClaims {
    /// The binary token: these claims sealed with `key`.
    pub fn seal_bytes(&self, key: &WorkloadKey) -> Vec<u8> {
        self.seal_bytes_with(&key.keyed())
    }

    /// The token as sent: [`TokenClaims::seal_bytes`] in base64url without padding.
    pub fn seal(&self, key: &WorkloadKey) -> String {
        self.seal_with(&key.keyed())
    }

    /// [`TokenClaims::seal_bytes`] with a key whose MAC state is kept ([`WorkloadKey::keyed`]):
    /// the same bytes, without the key schedule.
    pub fn seal_bytes_with(&self, key: &WorkloadMac) -> Vec<u8> {
        let mut out = Vec::with_capacity(TOKEN_LEN);
        write_header(&mut out, self);
        let mac = key.tag(&out);
        out.extend_from_slice(&mac);
        out
    }

    /// [`TokenClaims::seal`] with a key whose MAC state is kept ([`WorkloadKey::keyed`]).
    pub fn seal_with(&self, key: &WorkloadMac) -> String {
        URL_SAFE_NO_PAD.encode(self.seal_bytes_with(key))
    }
}

/// A well-formed token whose MAC and time are not yet checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedToken {
    claims: TokenClaims,
    signed: [u8; HEADER_LEN],
    mac: [u8; TAG_LEN],
}

impl SealedToken {
    /// The claims, unverified: only to find the key (by `src` and `epoch`).
    pub fn claims(&self) -> &TokenClaims {
        &self.claims
    }

    /// Checks the MAC under `key` (in constant time), then that the token was issued within
    /// `window_ms` of `now_ms` either way (both edges included), and returns the claims.
    pub fn verify(&self, key: &WorkloadKey, now_ms: u64, window_ms: u64) -> Result<TokenClaims, AuthError> {
        if !key.keyed().verify(&self.signed, &self.mac) {
            return Err(AuthError::BadMac { kind: Kind::Token });
        }
        check_window(Kind::Token, self.claims.issued_at_ms, now_ms, window_ms)?;
        Ok(self.claims)
    }
}

/// Decodes a token as sent (base64url without padding), checking its structure only: version,
/// length and protocol. No key is needed; see [`SealedToken::verify`].
pub fn decode_token(text: &str) -> Result<SealedToken, AuthError> {
    decode_token_bytes(&decode_text(Kind::Token, text, TOKEN_LEN)?)
}

/// Decodes a binary token, checking its structure only: version, length and protocol.
pub fn decode_token_bytes(bytes: &[u8]) -> Result<SealedToken, AuthError> {
    let kind = Kind::Token;
    let too_short = || AuthError::Length { kind, actual: bytes.len(), expected: TOKEN_LEN };
    check_version(kind, bytes, TOKEN_LEN)?;
    if bytes.len() != TOKEN_LEN {
        return Err(too_short());
    }
    let mut r = Reader(bytes);
    let signed: [u8; HEADER_LEN] = r.array().ok_or_else(too_short)?;
    let mac: [u8; TAG_LEN] = r.array().ok_or_else(too_short)?;
    let claims = read_header(kind, &signed)?;
    Ok(SealedToken { claims, signed, mac })
}

/// Appends the fields tokens and tickets share.
pub(crate) fn write_header(out: &mut Vec<u8>, c: &TokenClaims) {
    out.push(VERSION);
    out.extend_from_slice(&c.epoch.to_be_bytes());
    out.extend_from_slice(&ip16(c.src));
    out.extend_from_slice(&ip16(c.dst));
    out.extend_from_slice(&c.dst_port.to_be_bytes());
    out.push(c.protocol.number());
    out.extend_from_slice(&c.issued_at_ms.to_be_bytes());
    out.extend_from_slice(&c.nonce);
}

/// Reads the fields tokens and tickets share (the version is already checked).
pub(crate) fn read_header(kind: Kind, header: &[u8; HEADER_LEN]) -> Result<TokenClaims, AuthError> {
    let short = || AuthError::Length { kind, actual: header.len(), expected: HEADER_LEN };
    let mut r = Reader(header);
    let [_version] = r.array().ok_or_else(short)?;
    let epoch = u32::from_be_bytes(r.array().ok_or_else(short)?);
    let src = ip_from16(r.array().ok_or_else(short)?);
    let dst = ip_from16(r.array().ok_or_else(short)?);
    let dst_port = u16::from_be_bytes(r.array().ok_or_else(short)?);
    let [number] = r.array().ok_or_else(short)?;
    let protocol = Protocol::from_number(number).ok_or(AuthError::UnknownProtocol { kind, number })?;
    let issued_at_ms = u64::from_be_bytes(r.array().ok_or_else(short)?);
    let nonce = r.array().ok_or_else(short)?;
    Ok(TokenClaims { epoch, src, dst, dst_port, protocol, issued_at_ms, nonce })
}

/// Refuses empty input (as too short: `min_len` bytes were expected) and any version but
/// [`VERSION`]. The version comes first so a future format is told by its version, not its length.
pub(crate) fn check_version(kind: Kind, bytes: &[u8], min_len: usize) -> Result<(), AuthError> {
    match bytes.first() {
        None => Err(AuthError::Length { kind, actual: 0, expected: min_len }),
        Some(&VERSION) => Ok(()),
        Some(&found) => Err(AuthError::Version { kind, found }),
    }
}

/// Decodes base64url without padding, refusing (by length, before decoding, as a
/// [`AuthError::Length`] naming `expected`) anything that would decode to more than
/// [`MAX_DECODED_LEN`] bytes.
pub(crate) fn decode_text(kind: Kind, text: &str, expected: usize) -> Result<Vec<u8>, AuthError> {
    let not_base64 = AuthError::Malformed { kind, detail: "not base64url without padding" };
    // Unpadded base64: 4 characters carry 3 bytes, a final 2 or 3 carry 1 or 2, a final 1 none.
    let n = text.len();
    let decoded_len = match n % 4 {
        1 => return Err(not_base64),
        r => n / 4 * 3 + r.saturating_sub(1),
    };
    if decoded_len > MAX_DECODED_LEN {
        return Err(AuthError::Length { kind, actual: decoded_len, expected });
    }
    URL_SAFE_NO_PAD.decode(text).map_err(|_| not_base64)
}

/// Reads fixed-size fields off the front of a byte string without ever panicking.
pub(crate) struct Reader<'a>(pub(crate) &'a [u8]);

impl<'a> Reader<'a> {
    /// The next `N` bytes, or `None` when fewer remain.
    pub(crate) fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }

    /// The next `n` bytes, or `None` when fewer remain.
    pub(crate) fn slice(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::auth::EpochSecret;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    pub(crate) const SECRET: EpochSecret = EpochSecret::from_bytes([7u8; 32]);
    pub(crate) const ID: &str = "spiffe://cluster.local/ns/shop/sa/cart";
    const NOW: u64 = 1_750_000_000_000;
    const W: u64 = 30_000;

    pub(crate) fn v4_claims() -> TokenClaims {
        TokenClaims {
            epoch: 7,
            src: IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
            dst: IpAddr::V4(Ipv4Addr::new(10, 9, 8, 7)),
            dst_port: 8080,
            protocol: Protocol::Tcp,
            issued_at_ms: NOW,
            nonce: *b"nonce-0123ab",
        }
    }

    fn v6_claims() -> TokenClaims {
        TokenClaims {
            src: IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x42)),
            dst: IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 1, 0x43)),
            dst_port: 53,
            protocol: Protocol::Udp,
            ..v4_claims()
        }
    }

    fn key_for(c: &TokenClaims) -> Result<WorkloadKey, AuthError> {
        SECRET.workload_key(ID, c.src, c.epoch)
    }

    /// Known answers, cross-checked with the independent reference `policy/fuzz/seeds.py`,
    /// and pinned: a change here is a wire-format change.
    #[test]
    fn known_answers() -> Result<(), AuthError> {
        let c = v4_claims();
        assert_eq!(
            c.seal(&key_for(&c)?),
            "AQAAAAcAAAAAAAAAAAAA__8KAQIDAAAAAAAAAAAAAP__CgkIBx-QBgAAAZd0INwAbm9uY2UtMDEyM2Fim6Vol5ULDigsysr24WQ7ng"
        );
        let c = v6_claims();
        assert_eq!(
            c.seal(&key_for(&c)?),
            "AQAAAAf9AAAAAAAAAAAAAAAAAABC_QAAAAAAAAAAAAAAAAEAQwA1EQAAAZd0INwAbm9uY2UtMDEyM2FiJntTCHOeW3w_afWkBZmOaQ"
        );
        Ok(())
    }

    #[test]
    fn lengths() -> Result<(), AuthError> {
        let c = v4_claims();
        assert_eq!(HEADER_LEN, 60);
        assert_eq!(TOKEN_LEN, 76);
        assert_eq!(c.seal_bytes(&key_for(&c)?).len(), TOKEN_LEN);
        assert_eq!(c.seal(&key_for(&c)?).len(), TOKEN_TEXT_LEN);
        Ok(())
    }

    #[test]
    fn v4_and_v6_round_trip() -> Result<(), AuthError> {
        for c in [v4_claims(), v6_claims()] {
            let key = key_for(&c)?;
            let sealed = decode_token(&c.seal(&key))?;
            assert_eq!(sealed.claims(), &c);
            assert_eq!(sealed.verify(&key, NOW, W)?, c);
            assert_eq!(decode_token_bytes(&c.seal_bytes(&key))?, sealed);
        }
        Ok(())
    }

    #[test]
    fn window_edges() -> Result<(), AuthError> {
        let c = v4_claims();
        let key = key_for(&c)?;
        let t = decode_token(&c.seal(&key))?;
        let reason = |now| t.verify(&key, now, W).map(|_| ()).map_err(|e| e.reason());
        assert_eq!(reason(NOW - W), Ok(()));
        assert_eq!(reason(NOW + W), Ok(()));
        assert_eq!(reason(NOW + W + 1), Err("token-expired"));
        assert_eq!(reason(NOW - W - 1), Err("token-future"));
        assert_eq!(
            t.verify(&key, NOW + W + 1, W),
            Err(AuthError::Expired { kind: Kind::Token, issued_at_ms: NOW, now_ms: NOW + W + 1, window_ms: W })
        );
        Ok(())
    }

    #[test]
    fn wrong_keys_fail_the_mac() -> Result<(), AuthError> {
        let c = v4_claims();
        let t = decode_token(&c.seal(&key_for(&c)?))?;
        let other_id = SECRET.workload_key("spiffe://cluster.local/ns/shop/sa/other", c.src, 7)?;
        let other_ip = SECRET.workload_key(ID, IpAddr::V4(Ipv4Addr::new(10, 1, 2, 4)), 7)?;
        let other_epoch = SECRET.workload_key(ID, c.src, 8)?;
        let other_secret = EpochSecret::from_bytes([8; 32]).workload_key(ID, c.src, 7)?;
        for key in [&other_id, &other_ip, &other_epoch, &other_secret] {
            assert_eq!(t.verify(key, NOW, W), Err(AuthError::BadMac { kind: Kind::Token }));
        }
        // The MAC is checked before the time: a forged stale token says `token-mac`.
        assert_eq!(t.verify(&other_epoch, 0, 0).map_err(|e| e.reason()), Err("token-mac"));
        Ok(())
    }

    #[test]
    fn structural_errors() -> Result<(), AuthError> {
        let c = v4_claims();
        let good = c.seal_bytes(&key_for(&c)?);
        let with = |i: usize, b: u8| {
            let mut v = good.clone();
            if let Some(x) = v.get_mut(i) {
                *x = b;
            }
            v
        };
        let len = |actual| AuthError::Length { kind: Kind::Token, actual, expected: TOKEN_LEN };
        let cases: Vec<(Vec<u8>, AuthError)> = vec![
            (vec![], len(0)),
            (vec![1], len(1)),
            (good[..TOKEN_LEN - 1].to_vec(), len(TOKEN_LEN - 1)),
            ([good.as_slice(), &[0]].concat(), len(TOKEN_LEN + 1)),
            (with(0, 0), AuthError::Version { kind: Kind::Token, found: 0 }),
            (with(0, 2), AuthError::Version { kind: Kind::Token, found: 2 }),
            (vec![2; 300], AuthError::Version { kind: Kind::Token, found: 2 }),
            (with(39, 1), AuthError::UnknownProtocol { kind: Kind::Token, number: 1 }),
            (with(39, 0), AuthError::UnknownProtocol { kind: Kind::Token, number: 0 }),
        ];
        for (bytes, err) in cases {
            assert_eq!(decode_token_bytes(&bytes), Err(err.clone()), "{bytes:?}");
            assert_eq!(decode_token(&URL_SAFE_NO_PAD.encode(&bytes)), Err(err), "{bytes:?}");
        }
        for p in [6u8, 17, 132] {
            assert!(decode_token_bytes(&with(39, p)).is_ok());
        }
        Ok(())
    }

    #[test]
    fn text_errors() -> Result<(), AuthError> {
        let c = v4_claims();
        let good = c.seal(&key_for(&c)?);
        let malformed = AuthError::Malformed { kind: Kind::Token, detail: "not base64url without padding" };
        let not_base64 = [
            format!("{good}="),     // padding
            good.replace('A', "+"), // standard alphabet (if any 'A')
            format!(" {}", &good[1..]),
            format!("{}\n", &good[..101]),
            format!("{}B", &good[..101]), // the last character's low bits must be zero
        ];
        for text in not_base64 {
            if text == good {
                continue;
            }
            assert_eq!(decode_token(&text), Err(malformed.clone()), "{text:?}");
            assert_eq!(decode_token(&text).map_err(|e| e.reason()), Err("token-malformed"));
        }
        // One more character completes the last byte: a length error, not a base64 one.
        assert_eq!(
            decode_token(&format!("{good}A")),
            Err(AuthError::Length { kind: Kind::Token, actual: 77, expected: 76 })
        );
        assert_eq!(
            decode_token(&"A".repeat(100_000)),
            Err(AuthError::Length { kind: Kind::Token, actual: 75_000, expected: 76 })
        );
        assert_eq!(decode_token(""), Err(AuthError::Length { kind: Kind::Token, actual: 0, expected: 76 }));
        Ok(())
    }

    pub(crate) fn arb_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(|b| IpAddr::V4(Ipv4Addr::from(b))),
            any::<[u8; 16]>().prop_map(|b| IpAddr::V6(Ipv6Addr::from(b))),
        ]
    }

    pub(crate) fn arb_protocol() -> impl Strategy<Value = Protocol> {
        prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp), Just(Protocol::Sctp)]
    }

    pub(crate) fn arb_claims() -> impl Strategy<Value = TokenClaims> {
        (any::<u32>(), arb_ip(), arb_ip(), any::<u16>(), arb_protocol(), any::<u64>(), any::<[u8; 12]>()).prop_map(
            |(epoch, src, dst, dst_port, protocol, issued_at_ms, nonce)| TokenClaims {
                epoch,
                src,
                dst,
                dst_port,
                protocol,
                issued_at_ms,
                nonce,
            },
        )
    }

    fn canonical(c: TokenClaims) -> TokenClaims {
        TokenClaims { src: c.src.to_canonical(), dst: c.dst.to_canonical(), ..c }
    }

    proptest! {
        #[test]
        fn round_trip(c in arb_claims(), secret in any::<[u8; 32]>()) {
            let key = WorkloadKey::from_bytes(secret);
            let sealed = decode_token(&c.seal(&key));
            prop_assert_eq!(sealed.as_ref().map(SealedToken::claims), Ok(&canonical(c)));
            let verified = sealed.and_then(|t| t.verify(&key, c.issued_at_ms, 0));
            prop_assert_eq!(verified, Ok(canonical(c)));
        }

        #[test]
        fn a_kept_mac_state_seals_like_a_fresh_one(a in arb_claims(), b in arb_claims(), secret in any::<[u8; 32]>()) {
            // One state sealing token after token (as the filter keeps it) never carries anything
            // from one token to the next.
            let key = WorkloadKey::from_bytes(secret);
            let kept = key.keyed();
            for c in [a, b, a] {
                prop_assert_eq!(c.seal_with(&kept), c.seal(&key));
                prop_assert_eq!(c.seal_bytes_with(&kept), c.seal_bytes(&key));
            }
        }

        #[test]
        fn any_bit_flip_is_refused(c in arb_claims(), bit in 0..TOKEN_LEN * 8) {
            let key = WorkloadKey::from_bytes([3; 32]);
            let mut bytes = c.seal_bytes(&key);
            if let Some(b) = bytes.get_mut(bit / 8) {
                *b ^= 1 << (bit % 8);
            }
            let verdict = decode_token_bytes(&bytes).and_then(|t| t.verify(&key, c.issued_at_ms, u64::MAX));
            prop_assert!(verdict.is_err());
        }

        #[test]
        fn any_character_change_is_refused(c in arb_claims(), pos in 0..TOKEN_TEXT_LEN, to in "[A-Za-z0-9_-]") {
            let key = WorkloadKey::from_bytes([3; 32]);
            let text = c.seal(&key);
            let changed: String = text
                .char_indices()
                .map(|(i, ch)| if i == pos { to.clone() } else { ch.to_string() })
                .collect();
            prop_assume!(changed != text);
            let verdict = decode_token(&changed).and_then(|t| t.verify(&key, c.issued_at_ms, u64::MAX));
            prop_assert!(verdict.is_err());
        }

        #[test]
        fn decoders_are_total(bytes in proptest::collection::vec(any::<u8>(), 0..200), text in ".{0,200}") {
            let _ = decode_token_bytes(&bytes);
            let _ = decode_token(&text);
            let _ = decode_token(&URL_SAFE_NO_PAD.encode(&bytes));
        }

        #[test]
        fn well_framed_garbage_never_verifies(mut bytes in proptest::collection::vec(any::<u8>(), TOKEN_LEN)) {
            if let Some(v) = bytes.first_mut() {
                *v = VERSION;
            }
            let key = WorkloadKey::from_bytes([3; 32]);
            if let Ok(t) = decode_token_bytes(&bytes) {
                prop_assert!(t.verify(&key, t.claims().issued_at_ms, 0).is_err());
            }
        }
    }
}
