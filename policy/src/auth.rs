//! Keys, tokens, tickets and replay detection (DESIGN.md, "Wire formats", version 1).
//!
//! * [`keys`] derives a workload key and a zone's ticket key from an epoch secret.
//! * [`token`] seals, decodes and verifies the token an outbound filter hands its gateway.
//! * [`ticket`] seals, decodes and verifies the ticket a destination gateway hands the
//!   destination filter; it carries the source identity and is bound to the destination.
//! * [`replay`] remembers nonces for the validity window in bounded memory.
//!
//! Every decoder is total (any input gives a value or an [`AuthError`]) and nothing here reads a
//! clock or draws randomness: `now_ms` and nonces are arguments.

use std::fmt;
use std::net::IpAddr;

pub mod keys;
pub mod replay;
pub mod ticket;
pub mod token;

pub use keys::{EpochSecret, KEY_LEN, TicketKey, TicketMac, WorkloadKey, WorkloadMac};
pub use replay::ReplayCache;
pub use ticket::{SealedTicket, TicketClaims, decode_ticket, decode_ticket_bytes};
pub use token::{SealedToken, TokenClaims, decode_token, decode_token_bytes};

/// The default validity window of tokens and tickets: issued within ±30 s of `now`.
pub const DEFAULT_WINDOW_MS: u64 = 30_000;

/// The longest source identity (SPIFFE id, in bytes) keyway derives a key for or carries in a
/// ticket. A Kubernetes SPIFFE id (`spiffe://<td>/ns/<ns>/sa/<sa>`) stays well below it.
pub const MAX_IDENTITY_LEN: usize = 1024;

/// The longest zone name keyway derives a ticket key for.
pub const MAX_ZONE_LEN: usize = 253;

/// Which credential an [`AuthError`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A token (outbound filter → source gateway).
    Token,
    /// A ticket (destination gateway → destination filter).
    Ticket,
}

impl Kind {
    /// `token` or `ticket`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Token => "token",
            Kind::Ticket => "ticket",
        }
    }

    fn pick(self, token: &'static str, ticket: &'static str) -> &'static str {
        match self {
            Kind::Token => token,
            Kind::Ticket => ticket,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a key could not be derived or a token or ticket was refused.
///
/// [`AuthError::reason`] maps each error to the fixed token used as metric label and as the
/// [`crate::wire::DENY_REASON_HEADER`] value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The text or bytes are not a well-formed credential.
    #[error("malformed {kind}: {detail}")]
    Malformed {
        /// Token or ticket.
        kind: Kind,
        /// What is wrong (a fixed phrase).
        detail: &'static str,
    },
    /// The binary form has the wrong length.
    #[error(
        "malformed {kind}: {actual} bytes where {expected} were expected; \
         the value was probably truncated or padded on the way"
    )]
    Length {
        /// Token or ticket.
        kind: Kind,
        /// The length received.
        actual: usize,
        /// The length the format (and, for a ticket, its identity length) implies; for input too
        /// short to hold the fixed fields, their length.
        expected: usize,
    },
    /// The protocol byte is not TCP, UDP or SCTP.
    #[error(
        "malformed {kind}: unknown protocol number {number}; \
         keyway carries 6 (TCP), 17 (UDP) and 132 (SCTP)"
    )]
    UnknownProtocol {
        /// Token or ticket.
        kind: Kind,
        /// The IANA number received.
        number: u8,
    },
    /// The version byte is not one this build reads.
    #[error(
        "{kind} version {found} is not supported (this build reads version 1); \
         run the same keyway release on both sides"
    )]
    Version {
        /// Token or ticket.
        kind: Kind,
        /// The version received.
        found: u8,
    },
    /// No secret is held for the credential's epoch. The codecs never return it: the caller that
    /// looks up keys by [`TokenClaims::epoch`] or [`TicketClaims::epoch`] does.
    #[error(
        "{kind} epoch {epoch} is not known here; the epoch secret was rotated out or has not \
         arrived yet, check the key distribution"
    )]
    UnknownEpoch {
        /// Token or ticket.
        kind: Kind,
        /// The epoch the credential names.
        epoch: u32,
    },
    /// The credential was issued more than the window before `now`.
    #[error(
        "{kind} expired: issued at {issued_at_ms} ms, now is {now_ms} ms, window is \
         {window_ms} ms; check clock synchronisation between the nodes"
    )]
    Expired {
        /// Token or ticket.
        kind: Kind,
        /// When it says it was issued (unix ms).
        issued_at_ms: u64,
        /// The time it was checked at (unix ms).
        now_ms: u64,
        /// The accepted skew either way.
        window_ms: u64,
    },
    /// The credential was issued more than the window after `now`.
    #[error(
        "{kind} issued in the future: issued at {issued_at_ms} ms, now is {now_ms} ms, window \
         is {window_ms} ms; check clock synchronisation between the nodes"
    )]
    FromFuture {
        /// Token or ticket.
        kind: Kind,
        /// When it says it was issued (unix ms).
        issued_at_ms: u64,
        /// The time it was checked at (unix ms).
        now_ms: u64,
        /// The accepted skew either way.
        window_ms: u64,
    },
    /// The MAC does not match: the credential was altered or sealed with another key.
    #[error(
        "{kind} mac does not verify: it was altered or sealed with another key \
         (different epoch secret, epoch, identity, overlay address or zone)"
    )]
    BadMac {
        /// Token or ticket.
        kind: Kind,
    },
    /// A genuine ticket reached a destination it was not issued for.
    #[error(
        "ticket is for {dst} port {dst_port}, not for this destination {expected_dst} port \
         {expected_port}; the gateway routed it to the wrong workload"
    )]
    WrongDestination {
        /// The destination address the ticket names.
        dst: IpAddr,
        /// The destination port the ticket names.
        dst_port: u16,
        /// The destination address of the connection.
        expected_dst: IpAddr,
        /// The destination port of the connection.
        expected_port: u16,
    },
    /// The nonce was already seen within the window.
    #[error("{kind} replayed: its nonce was already seen within the window")]
    Replay {
        /// Token or ticket.
        kind: Kind,
    },
    /// The replay cache holds `capacity` unexpired nonces and refuses new ones (fail closed).
    #[error(
        "replay cache full: {capacity} unexpired nonces; raise the cache capacity or shorten \
         the window"
    )]
    ReplayCacheFull {
        /// The configured capacity.
        capacity: usize,
    },
    /// The replay cache holds this source's whole share of unexpired nonces: a new nonce from it
    /// cannot be remembered, so it is refused (other sources are not affected).
    #[error(
        "the replay cache holds {share} unexpired nonces of this source, its whole share; it takes new ones as old \
         ones leave the window"
    )]
    ReplaySourceFull {
        /// The per-source share.
        share: usize,
    },
    /// An identity is too long to derive a key for or to carry in a ticket.
    #[error("identity has {len} bytes, more than the {MAX_IDENTITY_LEN} keyway accepts")]
    IdentityTooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// A zone name is too long to derive a ticket key for.
    #[error("zone name has {len} bytes, more than the {MAX_ZONE_LEN} keyway accepts")]
    ZoneTooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// A key or secret given as text is not 32 bytes in base64url without padding.
    #[error("{what} is not 32 bytes in base64url without padding")]
    KeyMalformed {
        /// Which key (`epoch secret`, `workload key`, `ticket key`).
        what: &'static str,
    },
}

impl AuthError {
    /// The short fixed token naming the error: a bounded metric label and the
    /// [`crate::wire::DENY_REASON_HEADER`] value.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Malformed { kind, .. }
            | AuthError::Length { kind, .. }
            | AuthError::UnknownProtocol { kind, .. } => kind.pick("token-malformed", "ticket-malformed"),
            AuthError::Version { kind, .. } => kind.pick("token-version", "ticket-version"),
            AuthError::UnknownEpoch { kind, .. } => kind.pick("token-epoch", "ticket-epoch"),
            AuthError::Expired { kind, .. } => kind.pick("token-expired", "ticket-expired"),
            AuthError::FromFuture { kind, .. } => kind.pick("token-future", "ticket-future"),
            AuthError::BadMac { kind } => kind.pick("token-mac", "ticket-mac"),
            AuthError::WrongDestination { .. } => "ticket-wrong-destination",
            AuthError::Replay { kind } => kind.pick("token-replay", "ticket-replay"),
            AuthError::ReplayCacheFull { .. } => "replay-cache-full",
            AuthError::ReplaySourceFull { .. } => "replay-cache-source-full",
            AuthError::IdentityTooLong { .. } => "identity-too-long",
            AuthError::ZoneTooLong { .. } => "zone-too-long",
            AuthError::KeyMalformed { .. } => "key-malformed",
        }
    }
}

/// Checks `|issued_at_ms - now_ms| <= window_ms`, telling expired from issued in the future.
pub(crate) fn check_window(kind: Kind, issued_at_ms: u64, now_ms: u64, window_ms: u64) -> Result<(), AuthError> {
    if issued_at_ms.abs_diff(now_ms) <= window_ms {
        Ok(())
    } else if issued_at_ms < now_ms {
        Err(AuthError::Expired { kind, issued_at_ms, now_ms, window_ms })
    } else {
        Err(AuthError::FromFuture { kind, issued_at_ms, now_ms, window_ms })
    }
}

/// The 16-byte wire form of an address: IPv6 as is, IPv4 as `::ffff:a.b.c.d`.
pub(crate) fn ip16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

/// The address of a 16-byte wire form: `::ffff:a.b.c.d` is IPv4, anything else IPv6.
pub(crate) fn ip_from16(bytes: [u8; 16]) -> IpAddr {
    std::net::Ipv6Addr::from(bytes).to_canonical()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn addresses_round_trip_exactly() {
        for ip in [
            IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1)),
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            // IPv4-compatible (deprecated) stays IPv6: only the mapped form means IPv4.
            IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0x0a01, 0x0203)),
        ] {
            assert_eq!(ip_from16(ip16(ip)), ip);
        }
        let mapped = Ipv4Addr::new(192, 0, 2, 1).to_ipv6_mapped();
        assert_eq!(ip_from16(mapped.octets()), IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)));
    }

    #[test]
    fn window_edges() {
        let w = 30_000;
        assert_eq!(check_window(Kind::Token, 100_000, 100_000, w), Ok(()));
        assert_eq!(check_window(Kind::Token, 70_000, 100_000, w), Ok(()));
        assert_eq!(check_window(Kind::Token, 130_000, 100_000, w), Ok(()));
        assert_eq!(check_window(Kind::Token, 69_999, 100_000, w).map_err(|e| e.reason()), Err("token-expired"));
        assert_eq!(check_window(Kind::Ticket, 130_001, 100_000, w).map_err(|e| e.reason()), Err("ticket-future"));
        // No overflow at the ends of the clock.
        assert_eq!(check_window(Kind::Token, u64::MAX, 0, u64::MAX), Ok(()));
        assert!(check_window(Kind::Token, u64::MAX, 0, 0).is_err());
        assert!(check_window(Kind::Token, 0, u64::MAX, 0).is_err());
    }

    #[test]
    fn every_reason_is_a_fixed_label() {
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let t = Kind::Token;
        let k = Kind::Ticket;
        let table: Vec<(AuthError, &str)> = vec![
            (AuthError::Malformed { kind: t, detail: "x" }, "token-malformed"),
            (AuthError::Length { kind: k, actual: 1, expected: 2 }, "ticket-malformed"),
            (AuthError::UnknownProtocol { kind: t, number: 1 }, "token-malformed"),
            (AuthError::Version { kind: t, found: 2 }, "token-version"),
            (AuthError::Version { kind: k, found: 2 }, "ticket-version"),
            (AuthError::UnknownEpoch { kind: t, epoch: 9 }, "token-epoch"),
            (AuthError::UnknownEpoch { kind: k, epoch: 9 }, "ticket-epoch"),
            (AuthError::Expired { kind: t, issued_at_ms: 0, now_ms: 9, window_ms: 1 }, "token-expired"),
            (AuthError::Expired { kind: k, issued_at_ms: 0, now_ms: 9, window_ms: 1 }, "ticket-expired"),
            (AuthError::FromFuture { kind: t, issued_at_ms: 9, now_ms: 0, window_ms: 1 }, "token-future"),
            (AuthError::BadMac { kind: t }, "token-mac"),
            (AuthError::BadMac { kind: k }, "ticket-mac"),
            (
                AuthError::WrongDestination { dst: ip, dst_port: 1, expected_dst: ip, expected_port: 2 },
                "ticket-wrong-destination",
            ),
            (AuthError::Replay { kind: t }, "token-replay"),
            (AuthError::Replay { kind: k }, "ticket-replay"),
            (AuthError::ReplayCacheFull { capacity: 3 }, "replay-cache-full"),
            (AuthError::ReplaySourceFull { share: 2 }, "replay-cache-source-full"),
            (AuthError::IdentityTooLong { len: 2000 }, "identity-too-long"),
            (AuthError::ZoneTooLong { len: 300 }, "zone-too-long"),
            (AuthError::KeyMalformed { what: "workload key" }, "key-malformed"),
        ];
        for (err, reason) in table {
            assert_eq!(err.reason(), reason, "{err:?}");
            let msg = err.to_string();
            assert!(msg.starts_with(|c: char| c.is_lowercase()), "{msg}");
            assert!(reason.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'), "{reason}");
        }
    }
}
