//! The keys a filter holds and when to fetch them again: static keys never change; keys from the
//! gateway's key service are refreshed on the bundle's `refresh_ms`, retried with backoff on
//! failure, and stay usable for `grace_ms` after the last successful fetch (each key also has its
//! own `not_after_ms`). During a rotation the bundle lists two epochs: tokens are sealed with the
//! newest usable one ([`KeyBundle::signing_key`]), tickets of any listed usable epoch verify.
//!
//! Each key is decoded and keyed once, when its bundle arrives: the state keeps every key's
//! HMAC-SHA256 state with the key schedule done ([`WorkloadMac`], [`TicketMac`]), so a connection
//! costs only its own MAC blocks.

use std::net::IpAddr;

use keyway_policy::auth::{TicketKey, TicketMac, WorkloadKey, WorkloadMac};
use keyway_policy::keyservice::KeyBundle;
use keyway_policy::wire::KEY_SERVICE_IP_PARAM;

use crate::config::{KeyServiceConfig, MAX_RETRY_MS, MIN_REFRESH_MS};
use crate::identity::Identity;

/// The outcome of one key refresh: the label of `keyway_filter_key_refreshes_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// A valid bundle arrived.
    Ok,
    /// The call could not be dispatched (unknown cluster, …).
    DispatchFailed,
    /// No response (timeout, connection refused, reset).
    NoResponse,
    /// A response other than 200.
    HttpStatus,
    /// A 200 whose body is not a valid bundle.
    Malformed,
    /// A valid bundle for another workload (address or identity).
    Mismatch,
}

impl RefreshOutcome {
    /// Every outcome, for defining the metrics up front.
    pub const ALL: [RefreshOutcome; 6] = [
        RefreshOutcome::Ok,
        RefreshOutcome::DispatchFailed,
        RefreshOutcome::NoResponse,
        RefreshOutcome::HttpStatus,
        RefreshOutcome::Malformed,
        RefreshOutcome::Mismatch,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            RefreshOutcome::Ok => "ok",
            RefreshOutcome::DispatchFailed => "dispatch_failed",
            RefreshOutcome::NoResponse => "no_response",
            RefreshOutcome::HttpStatus => "http_status",
            RefreshOutcome::Malformed => "malformed",
            RefreshOutcome::Mismatch => "mismatch",
        }
    }
}

/// Why no key is usable for a lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoKey {
    /// No usable key at all (none fetched yet, all expired, or stale past the grace period).
    NoKeys,
    /// Keys are usable, but none for this epoch.
    UnknownEpoch,
}

/// The keys of one filter instance and, with a key service, the refresh schedule.
#[derive(Clone, Debug)]
pub struct KeyState {
    bundle: Option<KeyBundle>,
    /// The bundle's keys, keyed, in the bundle's order.
    macs: Macs,
    service: Option<Service>,
}

/// The MAC state of every key of a bundle, index for index (`None`: the key does not decode, so
/// it seals and verifies nothing, as [`KeyBundle::signing_key`] and [`KeyBundle::ticket_key`]
/// would find).
#[derive(Clone, Debug, Default)]
struct Macs {
    workload: Vec<Option<WorkloadMac>>,
    ticket: Vec<Option<TicketMac>>,
}

impl Macs {
    fn of(bundle: &KeyBundle) -> Self {
        Macs {
            workload: bundle
                .workload_keys
                .iter()
                .map(|k| WorkloadKey::from_base64url(&k.key).ok().map(|k| k.keyed()))
                .collect(),
            ticket: bundle
                .ticket_keys
                .iter()
                .map(|k| TicketKey::from_base64url(&k.key).ok().map(|k| k.keyed()))
                .collect(),
        }
    }
}

#[derive(Clone, Debug)]
struct Service {
    grace_ms: u64,
    retry_ms: u64,
    /// When the last valid bundle arrived.
    fetched_at_ms: Option<u64>,
    /// When to fetch next.
    next_fetch_ms: u64,
    /// A request is on its way (its token).
    in_flight: Option<u32>,
    /// Failures since the last success.
    failures: u32,
}

impl KeyState {
    /// Static keys: always usable (each key until its `not_after_ms`).
    pub fn fixed(bundle: KeyBundle) -> Self {
        KeyState { macs: Macs::of(&bundle), bundle: Some(bundle), service: None }
    }

    /// Keys from a key service: none until the first fetch, which is due at once.
    pub fn from_service(config: &KeyServiceConfig) -> Self {
        KeyState {
            bundle: None,
            macs: Macs::default(),
            service: Some(Service {
                grace_ms: config.grace_ms,
                retry_ms: config.retry_ms,
                fetched_at_ms: None,
                next_fetch_ms: 0,
                in_flight: None,
                failures: 0,
            }),
        }
    }

    /// The bundle, when it is usable at `now_ms` (fetched keys: within the grace period).
    pub fn bundle(&self, now_ms: u64) -> Option<&KeyBundle> {
        let bundle = self.bundle.as_ref()?;
        match &self.service {
            None => Some(bundle),
            Some(s) => match s.fetched_at_ms {
                Some(at) if now_ms <= at.saturating_add(s.grace_ms) => Some(bundle),
                _ => None,
            },
        }
    }

    /// The key to seal a token with at `now_ms`, with its epoch: the key
    /// [`KeyBundle::signing_key`] picks (the newest usable epoch), keyed.
    pub fn signing_key(&self, now_ms: u64) -> Option<(u32, &WorkloadMac)> {
        let bundle = self.bundle(now_ms)?;
        bundle
            .workload_keys
            .iter()
            .zip(&self.macs.workload)
            .filter(|(k, _)| k.usable_at(now_ms))
            .max_by_key(|(k, _)| k.epoch)
            .and_then(|(k, mac)| Some((k.epoch, mac.as_ref()?)))
    }

    /// The ticket key of `epoch` at `now_ms` ([`KeyBundle::ticket_key`]), keyed.
    pub fn ticket_key(&self, epoch: u32, now_ms: u64) -> Result<&TicketMac, NoKey> {
        let bundle = self.bundle(now_ms).ok_or(NoKey::NoKeys)?;
        let listed =
            bundle.ticket_keys.iter().zip(&self.macs.ticket).find(|(k, _)| k.epoch == epoch && k.valid_at(now_ms));
        if let Some(mac) = listed.and_then(|(_, mac)| mac.as_ref()) {
            return Ok(mac);
        }
        if bundle.ticket_keys.iter().any(|k| k.usable_at(now_ms)) {
            Err(NoKey::UnknownEpoch)
        } else {
            Err(NoKey::NoKeys)
        }
    }

    /// Whether a fetch should start now (a key service, nothing in flight, and due).
    pub fn fetch_due(&self, now_ms: u64) -> bool {
        self.service.as_ref().is_some_and(|s| s.in_flight.is_none() && now_ms >= s.next_fetch_ms)
    }

    /// Records that the request `token` was dispatched.
    pub fn fetch_started(&mut self, token: u32) {
        if let Some(s) = &mut self.service {
            s.in_flight = Some(token);
        }
    }

    /// Whether `token` is the request in flight.
    pub fn is_in_flight(&self, token: u32) -> bool {
        self.service.as_ref().is_some_and(|s| s.in_flight == Some(token))
    }

    /// Records a failed fetch (or a failed dispatch): retry with exponential backoff.
    pub fn fetch_failed(&mut self, now_ms: u64) {
        if let Some(s) = &mut self.service {
            s.in_flight = None;
            s.failures = s.failures.saturating_add(1);
            let shift = s.failures.saturating_sub(1).min(16);
            let delay = s.retry_ms.saturating_mul(1u64 << shift).min(MAX_RETRY_MS.max(s.retry_ms));
            s.next_fetch_ms = now_ms.saturating_add(delay);
        }
    }

    /// Failures since the last successful fetch.
    pub fn failures(&self) -> u32 {
        self.service.as_ref().map_or(0, |s| s.failures)
    }

    /// Whether the latest failure should be logged: the 1st, 2nd, 4th, 8th… in a row, so a key
    /// service that stays down does not flood the log (every failure is counted in the metrics).
    pub fn log_failure(&self) -> bool {
        self.failures().is_power_of_two()
    }

    /// Adopts a fetched bundle (already checked with [`check_response`]).
    pub fn fetched(&mut self, bundle: KeyBundle, now_ms: u64) {
        if let Some(s) = &mut self.service {
            s.in_flight = None;
            s.failures = 0;
            s.fetched_at_ms = Some(now_ms);
            s.next_fetch_ms = now_ms.saturating_add(bundle.refresh_ms.max(MIN_REFRESH_MS));
        }
        self.macs = Macs::of(&bundle);
        self.bundle = Some(bundle);
    }

    /// The epochs of the usable workload and ticket keys at `now_ms` (for logs).
    pub fn epochs(&self, now_ms: u64) -> (Vec<u32>, Vec<u32>) {
        let Some(b) = self.bundle(now_ms) else { return (Vec::new(), Vec::new()) };
        let usable = |keys: &[keyway_policy::keyservice::EpochKey]| {
            keys.iter().filter(|k| k.usable_at(now_ms)).map(|k| k.epoch).collect::<Vec<_>>()
        };
        (usable(&b.workload_keys), usable(&b.ticket_keys))
    }
}

/// The headers of the key service request for `overlay_ip`.
pub fn request_headers(config: &KeyServiceConfig, overlay_ip: IpAddr) -> Vec<(&'static str, String)> {
    vec![
        (":method", "GET".to_owned()),
        (":path", format!("{}?{KEY_SERVICE_IP_PARAM}={overlay_ip}", config.path)),
        (":authority", config.authority.clone()),
        ("accept", "application/json".to_owned()),
    ]
}

/// Checks a key service response: status 200, a valid [`KeyBundle`] for this workload.
///
/// `status` is `None` when no response arrived (timeout, reset): Envoy then gives no `:status`.
pub fn check_response(
    status: Option<&str>,
    body: Option<&[u8]>,
    identity: &Identity,
    configured_identity: Option<&str>,
) -> Result<KeyBundle, (RefreshOutcome, String)> {
    match status {
        None => return Err((RefreshOutcome::NoResponse, "no response from the key service".to_owned())),
        Some("200") => {}
        Some(other) => return Err((RefreshOutcome::HttpStatus, format!("key service answered {other}"))),
    }
    let body = body.unwrap_or_default();
    let bundle: KeyBundle = serde_json::from_slice(body)
        .map_err(|e| (RefreshOutcome::Malformed, format!("key service body is not a key bundle: {e}")))?;
    bundle.validate().map_err(|e| (RefreshOutcome::Malformed, format!("key service bundle: {e}")))?;
    if bundle.overlay_ip.to_canonical() != identity.overlay_ip {
        return Err((
            RefreshOutcome::Mismatch,
            format!("key service sent keys for {}, this workload is {}", bundle.overlay_ip, identity.overlay_ip),
        ));
    }
    if let Some(id) = configured_identity
        && id != bundle.identity
    {
        let message = format!("key service sent keys for {:?}, this workload is {id:?}", bundle.identity);
        return Err((RefreshOutcome::Mismatch, message));
    }
    Ok(bundle)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use keyway_policy::keyservice::EpochKey;

    pub(crate) fn key(b: u8) -> String {
        WorkloadKey::from_bytes([b; 32]).to_base64url()
    }

    pub(crate) fn bundle(epochs: &[(u32, Option<u64>)]) -> KeyBundle {
        KeyBundle {
            identity: "spiffe://td/ns/a/sa/b".into(),
            overlay_ip: "10.0.0.1".parse().unwrap(),
            zone: "z".into(),
            workload_keys: epochs
                .iter()
                .map(|&(epoch, not_after_ms)| EpochKey {
                    epoch,
                    key: key(epoch as u8),
                    not_after_ms,
                    not_before_ms: None,
                })
                .collect(),
            ticket_keys: epochs
                .iter()
                .map(|&(epoch, not_after_ms)| EpochKey {
                    epoch,
                    key: key(100 + epoch as u8),
                    not_after_ms,
                    not_before_ms: None,
                })
                .collect(),
            refresh_ms: 1_000,
        }
    }

    fn service() -> KeyServiceConfig {
        KeyServiceConfig {
            cluster: "gw".into(),
            authority: "gw".into(),
            path: "/v1/keys".into(),
            timeout_ms: 100,
            grace_ms: 5_000,
            retry_ms: 100,
        }
    }

    fn identity() -> Identity {
        Identity { spiffe: None, overlay_ip: "10.0.0.1".parse().unwrap() }
    }

    #[test]
    fn static_keys_follow_not_after() {
        let s = KeyState::fixed(bundle(&[(1, Some(1_000)), (2, None)]));
        assert_eq!(s.signing_key(0).map(|k| k.0), Some(2));
        assert!(s.ticket_key(1, 1_000).is_ok());
        assert_eq!(s.ticket_key(1, 1_001).err(), Some(NoKey::UnknownEpoch));
        assert_eq!(s.ticket_key(3, 0).err(), Some(NoKey::UnknownEpoch));
        assert!(!s.fetch_due(0));
        let expired = KeyState::fixed(bundle(&[(1, Some(10))]));
        assert!(expired.signing_key(11).is_none());
        assert_eq!(expired.ticket_key(1, 11).err(), Some(NoKey::NoKeys));
        assert_eq!(expired.epochs(5), (vec![1], vec![1]));
    }

    #[test]
    fn kept_mac_states_pick_and_seal_as_the_bundle_does() {
        use keyway_policy::Protocol;
        use keyway_policy::auth::{TicketClaims, TokenClaims, decode_ticket};
        // Rotation with an activation, an expiry, an undecodable key and a repeated epoch.
        let mut b = bundle(&[(1, Some(5_000)), (2, None), (3, None)]);
        b.workload_keys[2].not_before_ms = Some(2_000);
        b.workload_keys.push(EpochKey {
            epoch: 4,
            key: "short".into(),
            not_after_ms: Some(3_000),
            not_before_ms: None,
        });
        b.workload_keys.push(EpochKey { epoch: 3, key: key(33), not_after_ms: None, not_before_ms: None });
        b.ticket_keys.push(EpochKey { epoch: 9, key: "short".into(), not_after_ms: None, not_before_ms: None });
        let fixed = KeyState::fixed(b.clone());
        let mut fetched = KeyState::from_service(&service());
        fetched.fetched(b.clone(), 0);
        let claims = |epoch, now| TokenClaims {
            epoch,
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.0.0.2".parse().unwrap(),
            dst_port: 80,
            protocol: Protocol::Tcp,
            issued_at_ms: now,
            nonce: [7; 12],
        };
        for s in [&fixed, &fetched] {
            for now in [0, 1_999, 2_000, 2_500, 3_001, 5_000, 5_001] {
                let kept = s.signing_key(now).map(|(e, mac)| (e, claims(e, now).seal_with(mac)));
                // What the state did before it kept MAC states: the usable bundle's own pick.
                let reference =
                    s.bundle(now).and_then(|b| b.signing_key(now)).map(|(e, key)| (e, claims(e, now).seal(&key)));
                assert_eq!(kept, reference, "at {now}");
                for epoch in [1, 2, 3, 9, 10] {
                    let ticket = TicketClaims {
                        epoch,
                        src: "10.0.0.3".parse().unwrap(),
                        dst: "10.0.0.1".parse().unwrap(),
                        dst_port: 80,
                        protocol: Protocol::Tcp,
                        issued_at_ms: now,
                        nonce: [8; 12],
                        src_identity: "spiffe://td/ns/a/sa/c".into(),
                    };
                    let sealed = |k: &TicketKey| decode_ticket(&ticket.seal(k).unwrap()).unwrap();
                    let verify =
                        |k| s.ticket_key(epoch, now).map(|mac| sealed(k).verify_with(mac, now, 0, ticket.dst, 80));
                    let reference = |k| {
                        s.bundle(now)
                            .and_then(|b| b.ticket_key(epoch, now))
                            .map(|key| sealed(k).verify(&key, now, 0, ticket.dst, 80))
                    };
                    let genuine = TicketKey::from_base64url(&key(100 + epoch as u8)).unwrap();
                    let forged = TicketKey::from_bytes([1; 32]);
                    for k in [&genuine, &forged] {
                        assert_eq!(verify(k).ok(), reference(k), "epoch {epoch} at {now}");
                    }
                }
            }
        }
    }

    #[test]
    fn service_schedule_rotation_and_grace() {
        let mut s = KeyState::from_service(&service());
        assert!(s.signing_key(0).is_none(), "nothing before the first fetch");
        assert_eq!(s.ticket_key(1, 0).err(), Some(NoKey::NoKeys));
        assert!(s.fetch_due(0));
        s.fetch_started(7);
        assert!(!s.fetch_due(0) && s.is_in_flight(7) && !s.is_in_flight(8));
        s.fetched(bundle(&[(1, None)]), 1_000);
        assert!(!s.fetch_due(1_999) && s.fetch_due(2_000));
        assert_eq!(s.signing_key(1_500).map(|k| k.0), Some(1));
        // Rotation: both epochs listed, the new one signs, both verify.
        s.fetched(bundle(&[(1, Some(10_000)), (2, None)]), 2_000);
        assert_eq!(s.signing_key(2_000).map(|k| k.0), Some(2));
        assert!(s.ticket_key(1, 2_000).is_ok() && s.ticket_key(2, 2_000).is_ok());
        // Failures back off exponentially, capped.
        s.fetch_failed(3_000);
        assert!(s.log_failure());
        assert!(!s.fetch_due(3_099) && s.fetch_due(3_100));
        s.fetch_failed(3_100);
        assert!(!s.fetch_due(3_299) && s.fetch_due(3_300));
        s.fetch_failed(3_300);
        assert_eq!((s.failures(), s.log_failure()), (3, false));
        for _ in 0..40 {
            s.fetch_failed(3_300);
        }
        assert!(!s.fetch_due(3_300 + MAX_RETRY_MS - 1) && s.fetch_due(3_300 + MAX_RETRY_MS));
        // Keys stay usable for the grace period after the last success, then none is.
        assert!(s.signing_key(7_000).is_some());
        assert!(s.signing_key(7_001).is_none());
        assert_eq!(s.ticket_key(2, 7_001).err(), Some(NoKey::NoKeys));
        // A success makes them usable again.
        s.fetched(bundle(&[(2, None)]), 8_000);
        assert_eq!(s.signing_key(8_000).map(|k| k.0), Some(2));
    }

    #[test]
    fn responses() {
        let id = identity();
        let good = serde_json::to_vec(&bundle(&[(1, None)])).unwrap();
        assert!(check_response(Some("200"), Some(&good), &id, None).is_ok());
        assert!(check_response(Some("200"), Some(&good), &id, Some("spiffe://td/ns/a/sa/b")).is_ok());
        let outcome = |s: Option<&str>, b: Option<&[u8]>, cfg: Option<&str>, ip: &str| {
            let id = Identity { spiffe: None, overlay_ip: ip.parse().unwrap() };
            check_response(s, b, &id, cfg).map(|_| ()).map_err(|e| e.0)
        };
        let ip = "10.0.0.1";
        assert_eq!(outcome(None, None, None, ip), Err(RefreshOutcome::NoResponse));
        assert_eq!(outcome(Some("503"), Some(&good), None, ip), Err(RefreshOutcome::HttpStatus));
        assert_eq!(outcome(Some("200"), None, None, ip), Err(RefreshOutcome::Malformed));
        assert_eq!(outcome(Some("200"), Some(b"{}"), None, ip), Err(RefreshOutcome::Malformed));
        let bad_key = String::from_utf8(good.clone()).unwrap().replace(&key(1), "short");
        assert_eq!(outcome(Some("200"), Some(bad_key.as_bytes()), None, ip), Err(RefreshOutcome::Malformed));
        assert_eq!(outcome(Some("200"), Some(&good), None, "10.0.0.2"), Err(RefreshOutcome::Mismatch));
        assert_eq!(outcome(Some("200"), Some(&good), Some("spiffe://td/ns/a/sa/c"), ip), Err(RefreshOutcome::Mismatch));
    }

    #[test]
    fn request() {
        let h = request_headers(&service(), "fd00::1".parse().unwrap());
        assert!(h.contains(&(":path", "/v1/keys?ip=fd00::1".to_owned())));
        assert!(h.contains(&(":authority", "gw".to_owned())));
    }
}
