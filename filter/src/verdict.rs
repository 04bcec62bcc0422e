//! Every decision the filter makes, as pure functions of what the contexts read from the host.
//!
//! * [`outbound`]: seal a token for this connection, or refuse it;
//! * [`inbound_tunnel`] (with a per-process [`ReplayCache`]) and [`inbound_tunnel_shared`] (with
//!   the [`SharedReplay`] set every worker of one Envoy shares): verify the CONNECT's ticket, or
//!   refuse it with a fixed reason;
//! * [`inbound_plain`]: let an exempt connection through, close every other one.
//!
//! `fail_open` only ever applies to [`outbound`]: when the filter cannot seal a token, the
//! connection goes on without one and the gateway, which requires a token, decides. A ticket is
//! admitted only when it verified with a key and its nonce was recorded; no key, or a replay check
//! that cannot be done, refuses it whatever `fail_open` says.

use std::net::{IpAddr, SocketAddr};

use keyway_policy::Protocol;
use keyway_policy::auth::token::NONCE_LEN;
use keyway_policy::auth::{AuthError, Kind, ReplayCache, TicketClaims, TokenClaims, decode_ticket};
use keyway_policy::ip::{Cidr, addr};
use keyway_policy::wire::TICKET_HEADER;

use crate::keystate::{KeyState, NoKey};
use crate::replay::{SharedReplay, Store};

/// No usable key (none fetched yet, expired, or refresh failing past the grace period).
pub const NO_KEY: &str = "no-key";
/// The downstream connection has no readable destination address.
pub const NO_DESTINATION: &str = "no-destination";
/// The host gave no randomness for the nonce.
pub const NO_RANDOMNESS: &str = "no-randomness";
/// The CONNECT carries no `x-keyway-ticket`.
pub const TICKET_MISSING: &str = "ticket-missing";
/// The CONNECT's `:authority` has no port.
pub const AUTHORITY_MALFORMED: &str = "authority-malformed";
/// A plain inbound connection that no exemption covers.
pub const NOT_EXEMPT: &str = "not-exempt";

/// Every denial reason the filter reports (metric labels, `x-keyway-deny-reason` values).
pub const ALL_REASONS: [&str; 19] = [
    NO_KEY,
    NO_DESTINATION,
    NO_RANDOMNESS,
    TICKET_MISSING,
    AUTHORITY_MALFORMED,
    NOT_EXEMPT,
    "ticket-malformed",
    "ticket-version",
    "ticket-epoch",
    "ticket-expired",
    "ticket-future",
    "ticket-mac",
    "ticket-wrong-destination",
    "ticket-replay",
    "replay-cache-full",
    "replay-cache-source-full",
    "replay-store-unavailable",
    "identity-too-long",
    "key-malformed",
];

/// A refusal: the fixed reason, whether the filter could not work, and a log detail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    /// The fixed reason (metric label, deny header).
    pub reason: &'static str,
    /// The filter could not work (as opposed to: the credential is bad). Only [`outbound`] lets
    /// `fail_open` override such a refusal.
    pub internal: bool,
    /// A human-readable explanation for the log.
    pub detail: String,
}

impl Denial {
    fn internal(reason: &'static str, detail: impl Into<String>) -> Self {
        Denial { reason, internal: true, detail: detail.into() }
    }

    fn auth(e: &AuthError) -> Self {
        Denial { reason: e.reason(), internal: false, detail: e.to_string() }
    }
}

/// What to do with a connection after a decision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action<T> {
    /// Let it through with `T` (a token, the verified ticket, nothing).
    Allow(T),
    /// Let it through without a token although the filter could not seal one: `fail_open` is
    /// set ([`outbound`] only).
    FailOpen(Denial),
    /// Refuse it.
    Deny(Denial),
}

impl<T> Action<T> {
    /// The `verdict` metric label.
    pub fn verdict(&self) -> &'static str {
        match self {
            Action::Allow(_) => "allow",
            Action::FailOpen(_) => "fail_open",
            Action::Deny(_) => "deny",
        }
    }
}

fn conclude<T>(r: Result<T, Denial>, fail_open: bool) -> Action<T> {
    match r {
        Ok(t) => Action::Allow(t),
        Err(d) if d.internal && fail_open => Action::FailOpen(d),
        Err(d) => Action::Deny(d),
    }
}

/// A sealed token and the epoch of the key that sealed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    /// The token text (base64url, a legal header value).
    pub text: String,
    /// The key epoch.
    pub epoch: u32,
}

/// The outbound decision: a token for (`src`, `dst`, now, `nonce`), sealed with the newest usable
/// workload key.
pub fn outbound(
    keys: &KeyState,
    src: IpAddr,
    dst: Option<SocketAddr>,
    now_ms: u64,
    nonce: Option<[u8; NONCE_LEN]>,
    fail_open: bool,
) -> Action<Token> {
    let r = (|| {
        let dst = dst.ok_or_else(|| Denial::internal(NO_DESTINATION, "the connection has no destination address"))?;
        let (epoch, key) = keys
            .signing_key(now_ms)
            .ok_or_else(|| Denial::internal(NO_KEY, "no usable workload key: keys missing, expired or stale"))?;
        let nonce = nonce.ok_or_else(|| Denial::internal(NO_RANDOMNESS, "the host gave no random bytes"))?;
        let claims = TokenClaims {
            epoch,
            src,
            dst: dst.ip().to_canonical(),
            dst_port: dst.port(),
            protocol: Protocol::Tcp,
            issued_at_ms: now_ms,
            nonce,
        };
        Ok(Token { text: claims.seal_with(key), epoch })
    })();
    conclude(r, fail_open)
}

/// What the inbound tunnel checks tickets against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TunnelCheck {
    /// This workload's overlay address: tickets must name it.
    pub overlay_ip: IpAddr,
    /// Accepted skew either way (ms).
    pub window_ms: u64,
    /// The plugin's `fail_open`. It changes no tunnel decision: a ticket that did not verify, or
    /// could not be verified (no key, no replay check), is refused whatever it says.
    pub fail_open: bool,
}

/// The inbound tunnel decision: the ticket in `header` verified for this workload's overlay
/// address and the CONNECT target port (from `authority`), within the window, its nonce not seen
/// before (when a replay cache is given). Never [`Action::FailOpen`].
pub fn inbound_tunnel(
    check: &TunnelCheck,
    keys: &KeyState,
    replay: Option<&mut ReplayCache>,
    header: Option<&str>,
    authority: Option<&str>,
    now_ms: u64,
) -> Action<TicketClaims> {
    let r = verify_ticket(check, keys, header, authority, now_ms).and_then(|claims| {
        if let Some(cache) = replay {
            cache
                .check_and_insert(claims.src, claims.nonce, claims.issued_at_ms, now_ms)
                .map_err(|e| Denial::auth(&e))?;
        }
        Ok(claims)
    });
    admit(r)
}

/// [`inbound_tunnel`] with the replay set every worker of the Envoy shares, in `store`: the nonce
/// of a verified ticket is accepted once per Envoy. Never [`Action::FailOpen`]: a store that
/// cannot be read or written refuses (`replay-store-unavailable`).
pub fn inbound_tunnel_shared(
    check: &TunnelCheck,
    keys: &KeyState,
    replay: Option<(&SharedReplay, &impl Store)>,
    header: Option<&str>,
    authority: Option<&str>,
    now_ms: u64,
) -> Action<TicketClaims> {
    let r =
        verify_ticket(check, keys, header, authority, now_ms).and_then(|claims| {
            if let Some((set, store)) = replay {
                set.check_and_insert(store, claims.src, claims.nonce, claims.issued_at_ms, now_ms)
                    .map_err(|e| Denial { reason: e.reason(), internal: false, detail: e.to_string() })?;
            }
            Ok(claims)
        });
    admit(r)
}

fn admit(r: Result<TicketClaims, Denial>) -> Action<TicketClaims> {
    match r {
        Ok(claims) => Action::Allow(claims),
        Err(d) => Action::Deny(d),
    }
}

/// The ticket in `header` verified with this workload's ticket key of its epoch, for its
/// overlay address and the CONNECT target port (from `authority`), within the window. No usable
/// ticket key: refused (`no-key`), since nothing can be verified.
pub fn verify_ticket(
    check: &TunnelCheck,
    keys: &KeyState,
    header: Option<&str>,
    authority: Option<&str>,
    now_ms: u64,
) -> Result<TicketClaims, Denial> {
    let TunnelCheck { overlay_ip, window_ms, .. } = *check;
    (|| {
        let text = header.ok_or_else(|| Denial {
            reason: TICKET_MISSING,
            internal: false,
            detail: format!("no {TICKET_HEADER}"),
        })?;
        let port = authority.and_then(authority_port).ok_or_else(|| Denial {
            reason: AUTHORITY_MALFORMED,
            internal: false,
            detail: format!("CONNECT :authority {authority:?} has no port"),
        })?;
        let sealed = decode_ticket(text).map_err(|e| Denial::auth(&e))?;
        let epoch = sealed.claims().epoch;
        let key = keys.ticket_key(epoch, now_ms).map_err(|e| match e {
            NoKey::NoKeys => Denial::internal(NO_KEY, "no usable ticket key: keys missing, expired or stale"),
            NoKey::UnknownEpoch => Denial::auth(&AuthError::UnknownEpoch { kind: Kind::Ticket, epoch }),
        })?;
        sealed.verify_with(key, now_ms, window_ms, overlay_ip, port).map_err(|e| Denial::auth(&e))
    })()
}

/// Exemptions of plain inbound connections.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exemptions {
    /// Destination ports (sorted).
    pub ports: Vec<u16>,
    /// Source ranges.
    pub cidrs: Vec<Cidr>,
}

/// Whether a plain inbound connection from `src` to `dst_port` is exempt.
pub fn inbound_plain(exempt: &Exemptions, src: Option<IpAddr>, dst_port: Option<u16>) -> Action<()> {
    let by_port = dst_port.is_some_and(|p| exempt.ports.binary_search(&p).is_ok());
    let by_source = src.is_some_and(|ip| {
        let a = addr(ip.to_canonical());
        exempt.cidrs.iter().any(|c| c.range.first <= a && a <= c.range.last)
    });
    if by_port || by_source {
        Action::Allow(())
    } else {
        Action::Deny(Denial {
            reason: NOT_EXEMPT,
            internal: false,
            detail: format!("plain inbound connection from {src:?} to port {dst_port:?} is not exempt"),
        })
    }
}

/// The port of a CONNECT `:authority` (`host:port`, `[v6]:port`).
pub fn authority_port(authority: &str) -> Option<u16> {
    let (host, port) = authority.rsplit_once(':')?;
    if host.is_empty() || (host.contains(':') && !(host.starts_with('[') && host.ends_with(']'))) {
        return None;
    }
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

/// An Envoy address property (`ip:port`, `[v6]:port`).
pub fn parse_address(bytes: &[u8]) -> Option<SocketAddr> {
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keystate::tests::bundle;
    use keyway_policy::auth::{TicketKey, WorkloadKey, decode_token};

    const NOW: u64 = 1_750_000_000_000;
    const W: u64 = 30_000;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn check(me: &str, fail_open: bool) -> TunnelCheck {
        TunnelCheck { overlay_ip: ip(me), window_ms: W, fail_open }
    }

    fn keys() -> KeyState {
        KeyState::fixed(bundle(&[(1, Some(NOW + 1_000)), (2, None)]))
    }

    fn ticket_key(epoch: u8) -> TicketKey {
        TicketKey::from_bytes([100 + epoch; 32])
    }

    fn ticket(epoch: u32, dst: &str, port: u16, at: u64, nonce: u8) -> String {
        TicketClaims {
            epoch,
            src: ip("10.0.0.9"),
            dst: ip(dst),
            dst_port: port,
            protocol: Protocol::Tcp,
            issued_at_ms: at,
            nonce: [nonce; 12],
            src_identity: "spiffe://td/ns/x/sa/y".into(),
        }
        .seal(&ticket_key(epoch as u8))
        .unwrap()
    }

    #[test]
    fn outbound_seals_with_the_newest_key() {
        let dst = Some("10.9.8.7:8080".parse().unwrap());
        let Action::Allow(t) = outbound(&keys(), ip("10.0.0.1"), dst, NOW, Some([5; 12]), false) else { panic!() };
        assert_eq!(t.epoch, 2);
        let claims = decode_token(&t.text).unwrap().verify(&WorkloadKey::from_bytes([2; 32]), NOW, W).unwrap();
        assert_eq!((claims.src, claims.dst, claims.dst_port), (ip("10.0.0.1"), ip("10.9.8.7"), 8080));
        assert_eq!((claims.protocol, claims.issued_at_ms, claims.nonce), (Protocol::Tcp, NOW, [5; 12]));
        // A v4-mapped destination is sealed as IPv4.
        let mapped = Some("[::ffff:10.9.8.7]:1".parse().unwrap());
        let Action::Allow(t) = outbound(&keys(), ip("10.0.0.1"), mapped, NOW, Some([5; 12]), false) else { panic!() };
        assert_eq!(decode_token(&t.text).unwrap().claims().dst, ip("10.9.8.7"));
    }

    #[test]
    fn outbound_failures_close_unless_fail_open() {
        let dst = Some("10.9.8.7:8080".parse().unwrap());
        let expired = KeyState::fixed(bundle(&[(1, Some(NOW - 1))]));
        let reason = |a: Action<Token>| match a {
            Action::Deny(d) => ("deny", d.reason),
            Action::FailOpen(d) => ("fail_open", d.reason),
            Action::Allow(_) => ("allow", ""),
        };
        assert_eq!(reason(outbound(&expired, ip("10.0.0.1"), dst, NOW, Some([0; 12]), false)), ("deny", NO_KEY));
        assert_eq!(reason(outbound(&expired, ip("10.0.0.1"), dst, NOW, Some([0; 12]), true)), ("fail_open", NO_KEY));
        assert_eq!(
            reason(outbound(&keys(), ip("10.0.0.1"), None, NOW, Some([0; 12]), false)),
            ("deny", NO_DESTINATION)
        );
        assert_eq!(reason(outbound(&keys(), ip("10.0.0.1"), dst, NOW, None, false)), ("deny", NO_RANDOMNESS));
        assert_eq!(outbound(&keys(), ip("10.0.0.1"), dst, NOW, None, true).verdict(), "fail_open");
    }

    #[test]
    fn inbound_tunnel_table() {
        let me = "10.0.0.1";
        let good = ticket(2, me, 8080, NOW, 1);
        let old_epoch = ticket(1, me, 8080, NOW, 2);
        let forged = {
            let claims = TicketClaims {
                epoch: 2,
                src: ip("10.0.0.9"),
                dst: ip(me),
                dst_port: 8080,
                protocol: Protocol::Tcp,
                issued_at_ms: NOW,
                nonce: [3; 12],
                src_identity: "spiffe://td/ns/x/sa/y".into(),
            };
            claims.seal(&TicketKey::from_bytes([9; 32])).unwrap()
        };
        let cases: Vec<(Option<String>, &str, Result<(), &str>)> = vec![
            (Some(good.clone()), "10.0.0.1:8080", Ok(())),
            (Some(old_epoch), "10.0.0.1:8080", Ok(())),
            (None, "10.0.0.1:8080", Err("ticket-missing")),
            (Some(good.clone()), "10.0.0.1", Err("authority-malformed")),
            (Some("!!".into()), "10.0.0.1:8080", Err("ticket-malformed")),
            (Some(forged), "10.0.0.1:8080", Err("ticket-mac")),
            (Some(ticket(2, me, 8080, NOW - W - 1, 4)), "10.0.0.1:8080", Err("ticket-expired")),
            (Some(ticket(2, me, 8080, NOW + W + 1, 4)), "10.0.0.1:8080", Err("ticket-future")),
            (Some(ticket(2, "10.0.0.2", 8080, NOW, 5)), "10.0.0.1:8080", Err("ticket-wrong-destination")),
            (Some(ticket(2, me, 9090, NOW, 6)), "10.0.0.1:8080", Err("ticket-wrong-destination")),
            (Some(ticket(3, me, 8080, NOW, 7)), "10.0.0.1:8080", Err("ticket-epoch")),
        ];
        let mut cache = ReplayCache::new(Kind::Ticket, 100, W);
        for (header, authority, want) in cases {
            let got =
                inbound_tunnel(&check(me, true), &keys(), Some(&mut cache), header.as_deref(), Some(authority), NOW);
            let got = match got {
                Action::Allow(_) => Ok(()),
                Action::Deny(d) => Err(d.reason),
                Action::FailOpen(d) => panic!("fail-open on a bad ticket: {d:?}"),
            };
            assert_eq!(got, want, "{header:?} {authority}");
        }
        // The same ticket again is a replay.
        let again = inbound_tunnel(&check(me, false), &keys(), Some(&mut cache), Some(&good), Some("x:8080"), NOW);
        assert!(matches!(again, Action::Deny(Denial { reason: "ticket-replay", .. })), "{again:?}");
        // Without a cache it verifies again.
        let no_cache = inbound_tunnel(&check(me, false), &keys(), None, Some(&good), Some("x:8080"), NOW);
        assert_eq!(no_cache.verdict(), "allow");
    }

    #[test]
    fn inbound_tunnel_without_keys() {
        let none = KeyState::fixed(bundle(&[(2, Some(NOW - 1))]));
        let good = ticket(2, "10.0.0.1", 80, NOW, 1);
        let forged = TicketClaims { nonce: [2; 12], ..decode_ticket(&good).unwrap().claims().clone() }
            .seal(&TicketKey::from_bytes([9; 32]))
            .unwrap();
        // Issue 11: with fail_open and no key, a good ticket and a forged one alike are refused
        // (no-key): nothing that was not verified is admitted.
        for t in [&good, &forged] {
            for fail_open in [false, true] {
                let got = inbound_tunnel(&check("10.0.0.1", fail_open), &none, None, Some(t), Some("h:80"), NOW);
                assert!(matches!(&got, Action::Deny(Denial { reason: NO_KEY, .. })), "{got:?}");
                let store = crate::replay::tests::MemStore::default();
                let set = SharedReplay::new(ip("10.0.0.1"), 65_536, 16_384, W);
                let got = inbound_tunnel_shared(
                    &check("10.0.0.1", fail_open),
                    &none,
                    Some((&set, &store)),
                    Some(t),
                    Some("h:80"),
                    NOW,
                );
                assert!(matches!(&got, Action::Deny(Denial { reason: NO_KEY, .. })), "{got:?}");
            }
        }
        // A missing ticket is never let through, fail-open or not.
        let missing = inbound_tunnel(&check("10.0.0.1", true), &none, None, None, Some("h:80"), NOW);
        assert_eq!(missing.verdict(), "deny");
    }

    #[test]
    fn inbound_tunnel_shared_replay() {
        let me = "10.0.0.1";
        let store = crate::replay::tests::MemStore::default();
        let set = SharedReplay::new(ip(me), 65_536, 16_384, W);
        let good = ticket(2, me, 8080, NOW, 1);
        let run = |t: &str, fail_open| {
            inbound_tunnel_shared(&check(me, fail_open), &keys(), Some((&set, &store)), Some(t), Some("x:8080"), NOW)
        };
        assert_eq!(run(&good, false).verdict(), "allow");
        let again = run(&good, true);
        assert!(matches!(again, Action::Deny(Denial { reason: "ticket-replay", .. })), "{again:?}");
        // A store that cannot be used refuses, fail_open or not.
        store.fail.set(true);
        let other = ticket(2, me, 8080, NOW, 2);
        let got = run(&other, true);
        assert!(matches!(got, Action::Deny(Denial { reason: "replay-store-unavailable", .. })), "{got:?}");
    }

    #[test]
    fn plain_inbound_exemptions() {
        let cidr = keyway_policy::ip::parse_cidr("192.168.0.0/16").unwrap();
        let e = Exemptions { ports: vec![15021, 15090], cidrs: vec![cidr] };
        assert_eq!(inbound_plain(&e, Some(ip("10.0.0.1")), Some(15021)).verdict(), "allow");
        assert_eq!(inbound_plain(&e, Some(ip("192.168.3.4")), Some(8080)).verdict(), "allow");
        assert_eq!(inbound_plain(&e, Some(ip("::ffff:192.168.3.4")), Some(8080)).verdict(), "allow");
        assert_eq!(inbound_plain(&e, Some(ip("10.0.0.1")), Some(8080)).verdict(), "deny");
        assert_eq!(inbound_plain(&e, None, None).verdict(), "deny");
        assert_eq!(inbound_plain(&Exemptions::default(), Some(ip("10.0.0.1")), Some(1)).verdict(), "deny");
    }

    #[test]
    fn parsing_host_values() {
        assert_eq!(authority_port("10.0.0.1:8080"), Some(8080));
        assert_eq!(authority_port("[fd00::1]:443"), Some(443));
        assert_eq!(authority_port("svc.ns:0"), Some(0));
        for bad in ["10.0.0.1", "fd00::1", ":80", "h:", "h:+80", "h:65536", "h:8o", ""] {
            assert_eq!(authority_port(bad), None, "{bad}");
        }
        assert_eq!(parse_address(b"127.0.0.1:80"), Some("127.0.0.1:80".parse().unwrap()));
        assert_eq!(parse_address(b"[::1]:80"), Some("[::1]:80".parse().unwrap()));
        assert_eq!(parse_address(b"\xff"), None);
        assert_eq!(parse_address(b"/tmp/socket"), None);
    }

    #[test]
    fn reasons_are_known() {
        for r in ALL_REASONS {
            assert!(r.bytes().all(|b| b.is_ascii_lowercase() || b == b'-'), "{r}");
        }
    }
}
