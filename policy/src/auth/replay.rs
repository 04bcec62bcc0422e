//! Replay detection: every nonce is remembered for as long as its credential could still verify.
//!
//! A credential issued at `t` verifies while `|t - now| <= window`, that is until
//! `now = t + window`, so its `(source address, nonce)` is kept until then and forgotten once
//! `t + window < now`. Memory is bounded by a capacity; when the cache is full of unexpired
//! nonces it refuses new ones ([`AuthError::ReplayCacheFull`]) rather than forget one early.
//!
//! Each source address may hold at most its share of the capacity (all of it unless set with
//! [`ReplayCache::with_source_share`]), so one source flooding genuine credentials fills its own
//! share and refuses itself ([`AuthError::ReplaySourceFull`]), not everyone.
//!
//! Both maps are `BTreeMap`s: no hasher, so no randomness (which `wasm32-wasip1` would take from
//! the host) and no hash flooding; each call costs `O(log n)` plus the evictions it performs,
//! amortised `O(log n)`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::token::NONCE_LEN;
use super::{AuthError, Kind, check_window, ip16};

/// The 16-byte source address followed by the nonce.
type Entry = [u8; 16 + NONCE_LEN];

/// Remembers `(source address, nonce)` pairs for the validity window, in bounded memory.
#[derive(Clone, Debug)]
pub struct ReplayCache {
    kind: Kind,
    capacity: usize,
    window_ms: u64,
    /// The latest `now_ms` seen: time never runs backwards for the cache.
    now_ms: u64,
    /// Each remembered entry and the time after which it is forgotten.
    expiry_of: BTreeMap<Entry, u64>,
    /// The same entries, ordered by that time.
    by_expiry: BTreeSet<(u64, Entry)>,
    /// The most entries one source may hold.
    source_share: usize,
    /// How many entries each source holds.
    per_source: BTreeMap<[u8; 16], usize>,
}

impl ReplayCache {
    /// An empty cache for `kind` credentials (which only names the errors), remembering at most
    /// `capacity` nonces, each for `window_ms` after its credential's issue time.
    pub fn new(kind: Kind, capacity: usize, window_ms: u64) -> Self {
        ReplayCache {
            kind,
            capacity,
            window_ms,
            now_ms: 0,
            expiry_of: BTreeMap::new(),
            by_expiry: BTreeSet::new(),
            source_share: capacity,
            per_source: BTreeMap::new(),
        }
    }

    /// The same cache, each source address holding at most `share` unexpired nonces.
    pub fn with_source_share(mut self, share: usize) -> Self {
        self.source_share = share;
        self
    }

    /// Accepts a credential's nonce once.
    ///
    /// First forgets the nonces whose credentials expired (`issued_at + window < now`). Then
    /// refuses, in this order: a credential outside the window ([`AuthError::Expired`],
    /// [`AuthError::FromFuture`]), a nonce already seen from `src` ([`AuthError::Replay`]), and any
    /// new nonce while `capacity` unexpired ones are held ([`AuthError::ReplayCacheFull`]).
    ///
    /// Call it after the credential verified (so a forger cannot fill the cache) with the same
    /// window. `now_ms` earlier than one already seen counts as that later time, so a clock
    /// stepping back never revives a forgotten nonce.
    pub fn check_and_insert(
        &mut self,
        src: IpAddr,
        nonce: [u8; NONCE_LEN],
        issued_at_ms: u64,
        now_ms: u64,
    ) -> Result<(), AuthError> {
        self.now_ms = self.now_ms.max(now_ms);
        self.evict();
        check_window(self.kind, issued_at_ms, self.now_ms, self.window_ms)?;
        let entry = entry(src, nonce);
        if self.expiry_of.contains_key(&entry) {
            return Err(AuthError::Replay { kind: self.kind });
        }
        if self.expiry_of.len() >= self.capacity {
            return Err(AuthError::ReplayCacheFull { capacity: self.capacity });
        }
        let held = self.per_source.get(&ip16(src)).copied().unwrap_or(0);
        if held >= self.source_share {
            return Err(AuthError::ReplaySourceFull { share: self.source_share });
        }
        let expiry = issued_at_ms.saturating_add(self.window_ms);
        self.expiry_of.insert(entry, expiry);
        self.by_expiry.insert((expiry, entry));
        *self.per_source.entry(ip16(src)).or_default() += 1;
        Ok(())
    }

    /// How many nonces are remembered (expired ones are forgotten on the next call).
    pub fn len(&self) -> usize {
        self.expiry_of.len()
    }

    /// Whether no nonce is remembered.
    pub fn is_empty(&self) -> bool {
        self.expiry_of.is_empty()
    }

    /// The most nonces the cache holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How long after its issue time a nonce is remembered.
    pub fn window_ms(&self) -> u64 {
        self.window_ms
    }

    /// Forgets every entry whose expiry is before `self.now_ms`.
    fn evict(&mut self) {
        while let Some(&(expiry, entry)) = self.by_expiry.first() {
            if expiry >= self.now_ms {
                break;
            }
            self.by_expiry.pop_first();
            self.expiry_of.remove(&entry);
            let src: [u8; 16] = std::array::from_fn(|i| entry.get(i).copied().unwrap_or(0));
            if let Some(n) = self.per_source.get_mut(&src) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.per_source.remove(&src);
                }
            }
        }
    }
}

fn entry(src: IpAddr, nonce: [u8; NONCE_LEN]) -> Entry {
    let ip = ip16(src);
    std::array::from_fn(|i| match i.checked_sub(16) {
        None => ip.get(i).copied().unwrap_or(0),
        Some(j) => nonce.get(j).copied().unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::net::Ipv4Addr;

    const W: u64 = 1_000;
    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));

    fn reason(r: Result<(), AuthError>) -> Result<(), &'static str> {
        r.map_err(|e| e.reason())
    }

    #[test]
    fn refuses_a_nonce_twice_per_source() {
        let mut c = ReplayCache::new(Kind::Token, 10, W);
        assert_eq!(c.check_and_insert(A, [1; 12], 5_000, 5_000), Ok(()));
        assert_eq!(c.check_and_insert(A, [1; 12], 5_000, 5_001), Err(AuthError::Replay { kind: Kind::Token }));
        // Another issue time does not make the nonce new.
        assert_eq!(reason(c.check_and_insert(A, [1; 12], 5_100, 5_100)), Err("token-replay"));
        // Another source may use the same nonce; v4 and v4-mapped are the same source.
        assert_eq!(c.check_and_insert(B, [1; 12], 5_000, 5_000), Ok(()));
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 2).to_ipv6_mapped());
        assert_eq!(reason(c.check_and_insert(mapped, [1; 12], 5_000, 5_000)), Err("token-replay"));
        assert_eq!(c.len(), 2);
        let mut t = ReplayCache::new(Kind::Ticket, 10, W);
        assert_eq!(t.check_and_insert(A, [1; 12], 5_000, 5_000), Ok(()));
        assert_eq!(reason(t.check_and_insert(A, [1; 12], 5_000, 5_000)), Err("ticket-replay"));
    }

    #[test]
    fn remembers_until_the_credential_expires() {
        let mut c = ReplayCache::new(Kind::Token, 10, W);
        // Issued 1 s in the future: valid until issued + window.
        assert_eq!(c.check_and_insert(A, [1; 12], 6_000, 5_000), Ok(()));
        assert_eq!(reason(c.check_and_insert(A, [1; 12], 6_000, 7_000)), Err("token-replay"));
        // Exactly at issued + window the credential still verifies: still remembered.
        assert_eq!(reason(c.check_and_insert(B, [9; 12], 7_000, 7_000)), Ok(()));
        assert_eq!(c.len(), 2);
        // One ms later it is forgotten, and a credential that old is refused as expired.
        assert_eq!(reason(c.check_and_insert(A, [1; 12], 6_000, 7_001)), Err("token-expired"));
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn window_is_enforced() {
        let mut c = ReplayCache::new(Kind::Token, 10, W);
        assert_eq!(reason(c.check_and_insert(A, [1; 12], 3_999, 5_000)), Err("token-expired"));
        assert_eq!(reason(c.check_and_insert(A, [1; 12], 6_001, 5_000)), Err("token-future"));
        assert_eq!(reason(c.check_and_insert(A, [1; 12], 4_000, 5_000)), Ok(()));
        assert_eq!(reason(c.check_and_insert(A, [2; 12], 6_000, 5_000)), Ok(()));
        assert!(c.check_and_insert(A, [3; 12], u64::MAX, u64::MAX).is_ok());
    }

    #[test]
    fn clock_stepping_back_revives_nothing() {
        let mut c = ReplayCache::new(Kind::Token, 10, W);
        assert_eq!(c.check_and_insert(A, [1; 12], 5_000, 5_000), Ok(()));
        assert_eq!(c.check_and_insert(B, [1; 12], 6_001, 6_001), Ok(())); // evicts A's
        assert_eq!(c.len(), 1);
        // Back at 5 500, A's credential would verify again: the cache says it is expired.
        assert_eq!(reason(c.check_and_insert(A, [1; 12], 5_000, 5_500)), Err("token-expired"));
    }

    #[test]
    fn one_source_fills_only_its_share() {
        let mut c = ReplayCache::new(Kind::Token, 4, W).with_source_share(2);
        assert_eq!(reason(c.check_and_insert(A, [1; 12], 5_000, 5_000)), Ok(()));
        assert_eq!(reason(c.check_and_insert(A, [2; 12], 5_000, 5_000)), Ok(()));
        assert_eq!(reason(c.check_and_insert(A, [3; 12], 5_000, 5_000)), Err("replay-cache-source-full"));
        // Another source still gets in, and a replay is still told as a replay.
        assert_eq!(reason(c.check_and_insert(B, [3; 12], 5_000, 5_000)), Ok(()));
        assert_eq!(reason(c.check_and_insert(A, [1; 12], 5_000, 5_000)), Err("token-replay"));
        // Once A's nonces leave the window, A's share is free again.
        assert_eq!(reason(c.check_and_insert(A, [4; 12], 6_001, 6_001)), Ok(()));
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn full_cache_fails_closed_then_recovers() {
        let mut c = ReplayCache::new(Kind::Token, 2, W);
        assert_eq!(c.check_and_insert(A, [1; 12], 5_000, 5_000), Ok(()));
        assert_eq!(c.check_and_insert(A, [2; 12], 5_500, 5_500), Ok(()));
        assert_eq!(c.check_and_insert(A, [3; 12], 5_500, 5_500), Err(AuthError::ReplayCacheFull { capacity: 2 }));
        // A replay is still told as a replay when full.
        assert_eq!(reason(c.check_and_insert(A, [2; 12], 5_500, 5_500)), Err("token-replay"));
        // Once the first expires there is room again.
        assert_eq!(c.check_and_insert(A, [3; 12], 6_001, 6_001), Ok(()));
        assert_eq!(c.len(), 2);
        let mut zero = ReplayCache::new(Kind::Token, 0, W);
        assert_eq!(reason(zero.check_and_insert(A, [1; 12], 0, 0)), Err("replay-cache-full"));
        assert!(zero.is_empty());
        assert_eq!((c.capacity(), c.window_ms()), (2, W));
    }

    proptest! {
        /// Against a model that remembers every accepted nonce forever: the cache never accepts a
        /// nonce a second time while its first acceptance is within the window, never holds more
        /// than its capacity, and only refuses as full when it truly holds `capacity` live ones.
        #[test]
        fn never_accepts_twice_within_the_window(
            capacity in 0usize..8,
            window in 0u64..50,
            steps in proptest::collection::vec((0u8..3, 0u8..6, 0u64..60, -60i64..60), 1..200),
        ) {
            let mut cache = ReplayCache::new(Kind::Token, capacity, window);
            let mut accepted: HashMap<(u8, u8), Vec<u64>> = HashMap::new();
            let mut now = 0u64;
            for (src, nonce, advance, skew) in steps {
                now += advance;
                let issued = now.saturating_add_signed(skew);
                let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, src));
                let result = cache.check_and_insert(ip, [nonce; 12], issued, now);
                prop_assert!(cache.len() <= capacity);
                let live = |t: &u64| t.saturating_add(window) >= now;
                let seen_live = accepted.get(&(src, nonce)).is_some_and(|v| v.iter().any(live));
                if seen_live {
                    prop_assert!(result.is_err(), "accepted a live nonce twice");
                }
                if result.is_ok() {
                    accepted.entry((src, nonce)).or_default().push(issued);
                }
                if let Err(AuthError::ReplayCacheFull { .. }) = result {
                    let live_count = accepted.values().filter(|v| v.iter().any(live)).count();
                    prop_assert_eq!(live_count, capacity);
                }
            }
        }
    }
}
