//! Epoch secrets and the keys derived from them.
//!
//! ```text
//! workload key = HMAC-SHA256(epoch secret, "keyway/v1/workload-key"
//!                            ‖ u16be(len identity) ‖ identity ‖ ip16(overlay IP) ‖ u32be(epoch))
//! ticket key   = HMAC-SHA256(epoch secret, "keyway/v2/ticket-key"
//!                            ‖ u16be(len identity) ‖ identity ‖ ip16(overlay IP) ‖ u32be(epoch))
//! ```
//!
//! The epoch secret is one zone's: each zone's gateways hold only their own zone's secrets. A
//! ticket key belongs to one destination workload (its identity and overlay address): the key
//! service hands each workload only its own, so holding your bundle lets you verify tickets
//! addressed to you and mint none for anyone else. (Version 1 derived one ticket key per zone and
//! handed it to every workload of the zone: any pod could mint tickets every other pod of its
//! zone accepted.)
//!
//! `identity` is the SPIFFE id (`spiffe://<td>/ns/<ns>/sa/<sa>`) as given, `ip16` the overlay
//! address as 16 bytes (IPv4 as `::ffff:a.b.c.d`). The length prefixes refine DESIGN.md, which only
//! says "derived from the epoch secret and the identity (zone)": without them two different
//! identity/address pairs could feed HMAC the same bytes.

use std::fmt;
use std::net::IpAddr;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::{AuthError, MAX_IDENTITY_LEN, ip16};

/// The length in bytes of an epoch secret and of every derived key.
pub const KEY_LEN: usize = 32;

/// The length of a key in base64url without padding.
const KEY_BASE64_LEN: usize = 43;

/// Domain separation label of workload keys.
const WORKLOAD_KEY_LABEL: &[u8] = b"keyway/v1/workload-key";
/// Domain separation label of ticket keys.
const TICKET_KEY_LABEL: &[u8] = b"keyway/v2/ticket-key";

/// The length of the truncated MACs carried in tokens and tickets.
pub(crate) const TAG_LEN: usize = 16;

type HmacSha256 = Hmac<Sha256>;

macro_rules! key_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        ///
        /// Its `Debug` form never shows the bytes; equality is constant-time.
        #[derive(Clone)]
        pub struct $name([u8; KEY_LEN]);

        impl $name {
            /// Wraps 32 bytes.
            pub const fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
                Self(bytes)
            }

            /// The 32 bytes.
            pub const fn as_bytes(&self) -> &[u8; KEY_LEN] {
                &self.0
            }

            #[doc = concat!("Parses a ", $what, " written as 32 bytes in base64url without")]
            /// padding (43 characters, no surrounding whitespace).
            pub fn from_base64url(s: &str) -> Result<Self, AuthError> {
                decode_key(s).map(Self).ok_or(AuthError::KeyMalformed { what: $what })
            }

            /// The 32 bytes in base64url without padding (43 characters).
            pub fn to_base64url(&self) -> String {
                URL_SAFE_NO_PAD.encode(self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), "([redacted])"))
            }
        }

        impl PartialEq for $name {
            fn eq(&self, other: &Self) -> bool {
                self.0.ct_eq(&other.0).into()
            }
        }

        impl Eq for $name {}
    };
}

key_type!(
    /// The secret of one key epoch, shared by the gateways; every key derives from it.
    EpochSecret,
    "epoch secret"
);

key_type!(
    /// The key a workload's filter seals its tokens with, derived for its identity, overlay
    /// address and epoch (see [`EpochSecret::workload_key`]).
    WorkloadKey,
    "workload key"
);

key_type!(
    /// The key a zone's gateway seals tickets with and its filters verify them with (see
    /// [`EpochSecret::ticket_key`]).
    TicketKey,
    "ticket key"
);

impl EpochSecret {
    /// Derives the workload key of `identity` (its SPIFFE id) at `overlay_ip` for `epoch`.
    ///
    /// Refuses an identity longer than [`MAX_IDENTITY_LEN`] bytes, which could not travel in a
    /// ticket either.
    pub fn workload_key(&self, identity: &str, overlay_ip: IpAddr, epoch: u32) -> Result<WorkloadKey, AuthError> {
        self.derive(WORKLOAD_KEY_LABEL, identity, overlay_ip, epoch).map(WorkloadKey)
    }

    /// Derives the ticket key of the destination workload `identity` at `overlay_ip` for `epoch`:
    /// the key its sidecar verifies tickets addressed to it with.
    ///
    /// Refuses an identity longer than [`MAX_IDENTITY_LEN`] bytes.
    pub fn ticket_key(&self, identity: &str, overlay_ip: IpAddr, epoch: u32) -> Result<TicketKey, AuthError> {
        self.derive(TICKET_KEY_LABEL, identity, overlay_ip, epoch).map(TicketKey)
    }

    fn derive(&self, label: &[u8], identity: &str, overlay_ip: IpAddr, epoch: u32) -> Result<[u8; KEY_LEN], AuthError> {
        let len =
            length_prefix(identity, MAX_IDENTITY_LEN).ok_or(AuthError::IdentityTooLong { len: identity.len() })?;
        let out = hmac(&self.0)
            .chain_update(label)
            .chain_update(len)
            .chain_update(identity.as_bytes())
            .chain_update(ip16(overlay_ip))
            .chain_update(epoch.to_be_bytes())
            .finalize()
            .into_bytes();
        Ok(out.into())
    }
}

macro_rules! keyed_mac {
    ($(#[$doc:meta])* $name:ident, $key:ident) => {
        $(#[$doc])*
        ///
        /// Its `Debug` form never shows the state.
        #[derive(Clone)]
        pub struct $name(HmacSha256);

        impl $key {
            /// This key's HMAC-SHA256 state with the key schedule done, to keep and reuse.
            pub fn keyed(&self) -> $name {
                $name(hmac(&self.0))
            }
        }

        impl $name {
            /// The truncated MAC of `data` under this key.
            pub(crate) fn tag(&self, data: &[u8]) -> [u8; TAG_LEN] {
                let full: [u8; 32] = self.0.clone().chain_update(data).finalize().into_bytes().into();
                std::array::from_fn(|i| full.get(i).copied().unwrap_or(0))
            }

            /// Whether `tag` is the truncated MAC of `data` under this key, in constant time.
            pub(crate) fn verify(&self, data: &[u8], tag: &[u8; TAG_LEN]) -> bool {
                self.0.clone().chain_update(data).verify_truncated_left(tag).is_ok()
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), "([redacted])"))
            }
        }
    };
}

keyed_mac!(
    /// A [`WorkloadKey`] ready to seal tokens: HMAC-SHA256 with its key schedule (the hashed inner
    /// and outer pads) done once ([`WorkloadKey::keyed`]), so that each token then costs only its
    /// own blocks. A filter keeps one per key for as long as it holds the key.
    WorkloadMac,
    WorkloadKey
);

keyed_mac!(
    /// A [`TicketKey`] ready to verify (or seal) tickets: HMAC-SHA256 with its key schedule done
    /// once ([`TicketKey::keyed`]). A filter keeps one per key for as long as it holds the key.
    TicketMac,
    TicketKey
);

/// `u16be(len s)`, or `None` when `s` is longer than `max` (which is below `u16::MAX`).
fn length_prefix(s: &str, max: usize) -> Option<[u8; 2]> {
    if s.len() > max {
        return None;
    }
    u16::try_from(s.len()).ok().map(u16::to_be_bytes)
}

/// HMAC-SHA256 keyed with `key`.
///
/// HMAC zero-pads a key shorter than the hash block (RFC 2104, 64 bytes for SHA-256), so keying
/// with the padded block is keying with `key`, without the fallible variable-length constructor.
fn hmac(key: &[u8; KEY_LEN]) -> HmacSha256 {
    let block: [u8; 64] = std::array::from_fn(|i| key.get(i).copied().unwrap_or(0));
    <HmacSha256 as KeyInit>::new(&block.into())
}

/// 32 bytes from exactly 43 characters of canonical base64url without padding.
fn decode_key(s: &str) -> Option<[u8; KEY_LEN]> {
    if s.len() != KEY_BASE64_LEN {
        return None;
    }
    let mut out = [0u8; KEY_LEN];
    match URL_SAFE_NO_PAD.decode_slice(s, &mut out) {
        Ok(KEY_LEN) => Some(out),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const SECRET: EpochSecret = EpochSecret::from_bytes([7u8; 32]);
    const ID: &str = "spiffe://cluster.local/ns/shop/sa/cart";

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn padded_block_keys_like_the_variable_length_constructor() -> Result<(), AuthError> {
        for key in [[0u8; 32], [0xffu8; 32], *SECRET.as_bytes()] {
            let reference = <HmacSha256 as KeyInit>::new_from_slice(&key)
                .map_err(|_| AuthError::KeyMalformed { what: "test key" })?
                .chain_update(b"data")
                .finalize()
                .into_bytes();
            let ours = hmac(&key).chain_update(b"data").finalize().into_bytes();
            assert_eq!(ours, reference);
        }
        Ok(())
    }

    #[test]
    fn hmac_sha256_agrees_with_an_independent_implementation() {
        // hmac.new(bytes(range(32)), b"keyway", "sha256").hexdigest() in Python.
        let key: [u8; 32] = std::array::from_fn(|i| i as u8);
        let full = hmac(&key).chain_update(b"keyway").finalize().into_bytes();
        assert_eq!(hex(&full), "22399d1249c072d0945e8799ba8f901b989a84b0ccf6f5e35dc186c2cddade15");
    }

    /// Known answers, cross-checked with the independent reference `policy/fuzz/seeds.py`,
    /// and pinned: a change here is a wire-format change.
    #[test]
    fn known_answers() -> Result<(), AuthError> {
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));
        let v6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x42));
        assert_eq!(
            hex(SECRET.workload_key(ID, v4, 7)?.as_bytes()),
            "08d5bd88e876408c7b628ea38cc38479625f2daa7fdb1b387b13ad252a41933c"
        );
        assert_eq!(
            hex(SECRET.workload_key(ID, v6, 7)?.as_bytes()),
            "83eeb827676fe878b4315fee71eaa33ca1b0049a9dfaa78854e15b4050352fe3"
        );
        let api = "spiffe://cluster.local/ns/shop/sa/api";
        assert_eq!(
            hex(SECRET.ticket_key(api, IpAddr::V4(Ipv4Addr::new(10, 9, 8, 7)), 7)?.as_bytes()),
            "d5eec2b36eb09b1b0583d76e21d0d97ac5eccc64c6657195381bc5a14117f3fe"
        );
        assert_eq!(
            hex(SECRET.ticket_key(api, IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 1, 0x43)), 7)?.as_bytes()),
            "fe94a999fad72c9f166d5c99a70bf93877efc31f9b8ced3dbe25311391370897"
        );
        Ok(())
    }

    #[test]
    fn v4_is_derived_as_v4_mapped() -> Result<(), AuthError> {
        let v4 = Ipv4Addr::new(10, 1, 2, 3);
        let a = SECRET.workload_key(ID, IpAddr::V4(v4), 1)?;
        let b = SECRET.workload_key(ID, IpAddr::V6(v4.to_ipv6_mapped()), 1)?;
        assert_eq!(a, b);
        Ok(())
    }

    #[test]
    fn every_input_changes_the_key() -> Result<(), AuthError> {
        let ip = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));
        let base = SECRET.workload_key(ID, ip, 1)?;
        let other_secret = EpochSecret::from_bytes([8u8; 32]);
        assert_ne!(other_secret.workload_key(ID, ip, 1)?, base);
        assert_ne!(SECRET.workload_key("spiffe://cluster.local/ns/shop/sa/carts", ip, 1)?, base);
        assert_ne!(SECRET.workload_key(ID, IpAddr::V4(Ipv4Addr::new(10, 1, 2, 4)), 1)?, base);
        assert_ne!(SECRET.workload_key(ID, ip, 2)?, base);
        let other_ip = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 4));
        assert_ne!(SECRET.ticket_key("a", ip, 1)?, SECRET.ticket_key("b", ip, 1)?);
        assert_ne!(SECRET.ticket_key("a", ip, 1)?, SECRET.ticket_key("a", other_ip, 1)?);
        assert_ne!(SECRET.ticket_key("a", ip, 1)?, SECRET.ticket_key("a", ip, 2)?);
        // Workload and ticket keys live in separate domains.
        assert_ne!(SECRET.workload_key(ID, ip, 1)?.as_bytes(), SECRET.ticket_key(ID, ip, 1)?.as_bytes());
        Ok(())
    }

    #[test]
    fn name_length_limits() {
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let at_limit = "a".repeat(MAX_IDENTITY_LEN);
        assert!(SECRET.workload_key(&at_limit, ip, 1).is_ok());
        assert!(SECRET.workload_key("", ip, 1).is_ok());
        let over = "a".repeat(MAX_IDENTITY_LEN + 1);
        assert_eq!(SECRET.workload_key(&over, ip, 1), Err(AuthError::IdentityTooLong { len: MAX_IDENTITY_LEN + 1 }));
        let huge = "a".repeat(70_000);
        assert_eq!(SECRET.workload_key(&huge, ip, 1).map_err(|e| e.reason()), Err("identity-too-long"));
        assert!(SECRET.ticket_key(&at_limit, ip, 1).is_ok());
        assert_eq!(SECRET.ticket_key(&over, ip, 1).map_err(|e| e.reason()), Err("identity-too-long"));
    }

    #[test]
    fn debug_is_redacted() -> Result<(), AuthError> {
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        assert_eq!(format!("{SECRET:?}"), "EpochSecret([redacted])");
        assert_eq!(format!("{:?}", SECRET.workload_key(ID, ip, 1)?), "WorkloadKey([redacted])");
        assert_eq!(format!("{:?}", SECRET.ticket_key(ID, ip, 1)?), "TicketKey([redacted])");
        Ok(())
    }

    #[test]
    fn base64url_round_trip_and_refusals() -> Result<(), AuthError> {
        let key = SECRET.workload_key(ID, IpAddr::V4(Ipv4Addr::LOCALHOST), 1)?;
        let text = key.to_base64url();
        assert_eq!(text.len(), KEY_BASE64_LEN);
        assert_eq!(WorkloadKey::from_base64url(&text)?, key);
        assert_eq!(SECRET.to_base64url(), "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc");
        for bad in [
            "",
            "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBw",   // 42 characters
            "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcA", // 44 characters
            "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwd",  // non-zero trailing bits
            "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBw=",  // padding
            "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBw+",  // standard alphabet
            " BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBw",
        ] {
            assert_eq!(TicketKey::from_base64url(bad), Err(AuthError::KeyMalformed { what: "ticket key" }), "{bad:?}");
        }
        assert_eq!(
            EpochSecret::from_base64url("x").map_err(|e| e.to_string()),
            Err("epoch secret is not 32 bytes in base64url without padding".to_owned())
        );
        Ok(())
    }
}
