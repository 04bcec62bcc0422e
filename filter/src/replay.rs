//! The ticket replay set shared by every worker thread of one Envoy: a ticket's nonce is accepted
//! once per Envoy, whichever worker (VM instance) sees it.
//!
//! It lives in proxy-wasm shared data (one store per Envoy process and `vm_id`), reached through
//! the narrow [`Store`] trait so the logic here is tested on the host. The set is split into
//! [`SHARDS`] keys `keyway.replay.v1.<overlay ip>.<shard>`; an entry (source address, nonce) goes
//! to the shard its FNV-1a hash picks. A shard's value is
//! `[version 1][high-water now: u64 le][entry: source ip16, nonce, expiry ms u64 le]*`.
//!
//! One check is a read-modify-write of one shard with compare-and-swap: read the value and its CAS
//! token, drop the entries whose ticket expired (`issued_at + window < now`), refuse a replay, a
//! full shard or a source over its share, append the entry, and write with the CAS token. When
//! another worker wrote the shard in between the write fails (`CasMismatch`) and the check starts
//! again from the read, at most [`MAX_ATTEMPTS`] times; then, and whenever the store cannot be
//! read, written or understood, the ticket is refused ([`ReplayError::Unavailable`]): a replay
//! check that cannot be done refuses.
//!
//! Bounds: each shard holds at most `capacity / SHARDS` entries, and of those at most
//! `per_source / SHARDS` (at least 1) from one source address, so one source fills its own share
//! and refuses itself, never flushing or crowding out the entries of others. A shard's
//! high-water `now` never runs backwards, so a clock stepping back revives no forgotten nonce.
//!
//! Creating a shard: the host applies a write to an absent key whatever CAS it carries, and a
//! write with CAS 0 to an existing key unconditionally. So a shard is never written with CAS 0:
//! its first write carries the CAS token of another key (the `sentinel`), a token the host issued
//! to that key's write and so, until its 32-bit counter wraps, the current token of no other key.
//! If another worker created the shard in between, that write fails with `CasMismatch` and the
//! check starts again.

use std::net::IpAddr;

use keyway_policy::auth::token::NONCE_LEN;

/// How many shard keys the set is split into.
pub const SHARDS: usize = 256;
/// How many read-modify-write rounds one check tries before it refuses.
pub const MAX_ATTEMPTS: u32 = 8;

const VERSION: u8 = 1;
const HEADER_LEN: usize = 1 + 8;
const ID_LEN: usize = 16 + NONCE_LEN;
const ENTRY_LEN: usize = ID_LEN + 8;

/// Why the store could not be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("shared data {op} of {key:?} failed: {detail}")]
pub struct StoreError {
    /// `get` or `set`.
    pub op: &'static str,
    /// The key.
    pub key: String,
    /// The host's status.
    pub detail: String,
}

/// The host's shared key-value store (proxy-wasm shared data), as the host implements it: `get`
/// returns the value and its CAS token (`None`, `None` when absent); `set` with `Some(cas)` fails
/// with `Ok(false)` when the key exists with another token, and succeeds on an absent key; `set`
/// with `None` always succeeds.
pub trait Store {
    /// The value and CAS token of `key`.
    fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError>;
    /// Writes `value`: `Ok(true)` when written, `Ok(false)` on a CAS mismatch.
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError>;
}

/// Why a nonce was not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// Issued more than the window before now.
    #[error("ticket expired: issued at {issued_at_ms} ms, now {now_ms} ms")]
    Expired {
        /// Issue time.
        issued_at_ms: u64,
        /// The shard's now.
        now_ms: u64,
    },
    /// Issued more than the window after now.
    #[error("ticket issued in the future: at {issued_at_ms} ms, now {now_ms} ms")]
    Future {
        /// Issue time.
        issued_at_ms: u64,
        /// The shard's now.
        now_ms: u64,
    },
    /// The nonce was already accepted within the window, by this or another worker.
    #[error("ticket replayed: its nonce was already accepted within the window")]
    Replay,
    /// The shard holds its whole share of the capacity.
    #[error("replay set full: the shard holds {0} unexpired nonces; raise replay_cache_capacity")]
    Full(usize),
    /// The shard holds this source's whole share.
    #[error(
        "the replay set holds this source's whole share ({0} nonces in the shard); it takes new ones as old ones leave the window"
    )]
    SourceFull(usize),
    /// The shared store could not be read, written or understood, or stayed contended.
    #[error("replay check impossible: {0}")]
    Unavailable(String),
}

impl ReplayError {
    /// The fixed reason (metric label, deny header).
    pub fn reason(&self) -> &'static str {
        match self {
            ReplayError::Expired { .. } => "ticket-expired",
            ReplayError::Future { .. } => "ticket-future",
            ReplayError::Replay => "ticket-replay",
            ReplayError::Full(_) => "replay-cache-full",
            ReplayError::SourceFull(_) => "replay-cache-source-full",
            ReplayError::Unavailable(_) => "replay-store-unavailable",
        }
    }
}

/// The shared replay set of one workload's inbound tunnel.
#[derive(Clone, Debug)]
pub struct SharedReplay {
    keys: Vec<String>,
    sentinel: String,
    window_ms: u64,
    shard_capacity: usize,
    shard_source_share: usize,
}

impl SharedReplay {
    /// The set of the workload at `overlay_ip`: at most `capacity` nonces in all, `per_source`
    /// from one source address, each kept `window_ms` after its ticket's issue time.
    pub fn new(overlay_ip: IpAddr, capacity: usize, per_source: usize, window_ms: u64) -> Self {
        let prefix = format!("keyway.replay.v1.{overlay_ip}");
        SharedReplay {
            keys: (0..SHARDS).map(|i| format!("{prefix}.{i}")).collect(),
            sentinel: format!("{prefix}.sentinel"),
            window_ms,
            shard_capacity: capacity / SHARDS,
            shard_source_share: (per_source / SHARDS).max(1),
        }
    }

    /// Entries one shard holds at most.
    pub fn shard_capacity(&self) -> usize {
        self.shard_capacity
    }

    /// Entries of one source one shard holds at most.
    pub fn shard_source_share(&self) -> usize {
        self.shard_source_share
    }

    /// Accepts the nonce of a verified ticket from `src` once per Envoy.
    pub fn check_and_insert(
        &self,
        store: &impl Store,
        src: IpAddr,
        nonce: [u8; NONCE_LEN],
        issued_at_ms: u64,
        now_ms: u64,
    ) -> Result<(), ReplayError> {
        let id = entry_id(src, nonce);
        let key = self.keys.get(shard_of(&id)).ok_or_else(|| ReplayError::Unavailable("no shard".into()))?;
        let unavailable = |e: StoreError| ReplayError::Unavailable(e.to_string());
        for _ in 0..MAX_ATTEMPTS {
            let (value, cas) = store.get(key).map_err(unavailable)?;
            let cas = match (&value, cas) {
                (Some(_), Some(cas)) => cas,
                (None, None) => self.creation_cas(store).map_err(unavailable)?,
                _ => return Err(ReplayError::Unavailable(format!("shared data {key:?} has a value without a CAS"))),
            };
            let next = self.admit(key, value.as_deref(), &id, issued_at_ms, now_ms)?;
            if store.set(key, &next, Some(cas)).map_err(unavailable)? {
                return Ok(());
            }
        }
        Err(ReplayError::Unavailable(format!("shard {key:?} stayed contended for {MAX_ATTEMPTS} attempts")))
    }

    /// A CAS token that is not the current token of any shard: the sentinel's, written once.
    fn creation_cas(&self, store: &impl Store) -> Result<u32, StoreError> {
        for _ in 0..2 {
            if let (_, Some(cas)) = store.get(&self.sentinel)? {
                return Ok(cas);
            }
            // Unconditional, and harmless if two workers race: the sentinel holds nothing.
            store.set(&self.sentinel, &[], None)?;
        }
        Err(StoreError { op: "get", key: self.sentinel.clone(), detail: "no CAS after a write".into() })
    }

    /// The shard's next value with `id` added, or why it cannot be added.
    fn admit(
        &self,
        key: &str,
        value: Option<&[u8]>,
        id: &[u8; ID_LEN],
        issued_at_ms: u64,
        now_ms: u64,
    ) -> Result<Vec<u8>, ReplayError> {
        let (high, entries) = match value {
            None => (0, &[][..]),
            Some(v) => decode(v).ok_or_else(|| {
                ReplayError::Unavailable(format!(
                    "shared data {key:?} is not a keyway replay shard ({} bytes)",
                    v.len()
                ))
            })?,
        };
        let now = high.max(now_ms);
        if issued_at_ms.abs_diff(now) > self.window_ms {
            return Err(if issued_at_ms < now {
                ReplayError::Expired { issued_at_ms, now_ms: now }
            } else {
                ReplayError::Future { issued_at_ms, now_ms: now }
            });
        }
        let mut next = Vec::with_capacity(HEADER_LEN + entries.len() + ENTRY_LEN);
        next.push(VERSION);
        next.extend_from_slice(&now.to_le_bytes());
        let (mut live, mut mine) = (0usize, 0usize);
        for e in entries.chunks_exact(ENTRY_LEN) {
            let (eid, expiry) = e.split_at(ID_LEN);
            if u64_le(expiry) < now {
                continue;
            }
            if eid == id {
                return Err(ReplayError::Replay);
            }
            mine += usize::from(eid.get(..16) == id.get(..16));
            live += 1;
            next.extend_from_slice(e);
        }
        if live >= self.shard_capacity {
            return Err(ReplayError::Full(self.shard_capacity));
        }
        if mine >= self.shard_source_share {
            return Err(ReplayError::SourceFull(self.shard_source_share));
        }
        next.extend_from_slice(id);
        next.extend_from_slice(&issued_at_ms.saturating_add(self.window_ms).to_le_bytes());
        Ok(next)
    }
}

/// The high-water now and the entries of a shard value, when it is one.
fn decode(v: &[u8]) -> Option<(u64, &[u8])> {
    let (header, entries) = v.split_at_checked(HEADER_LEN)?;
    let (version, high) = header.split_first()?;
    (*version == VERSION && entries.len() % ENTRY_LEN == 0).then(|| (u64_le(high), entries))
}

fn u64_le(b: &[u8]) -> u64 {
    b.try_into().map_or(u64::MAX, u64::from_le_bytes)
}

fn entry_id(src: IpAddr, nonce: [u8; NONCE_LEN]) -> [u8; ID_LEN] {
    let ip = match src {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    };
    std::array::from_fn(|i| match i.checked_sub(16) {
        None => ip.get(i).copied().unwrap_or(0),
        Some(j) => nonce.get(j).copied().unwrap_or(0),
    })
}

/// FNV-1a over the entry: which shard it lives in.
fn shard_of(id: &[u8]) -> usize {
    let h = id.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3));
    usize::try_from(h % SHARDS as u64).unwrap_or(0)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};
    use std::collections::HashMap;
    use std::net::Ipv4Addr;

    type Hook = Box<dyn FnMut(&MemStore)>;

    /// Shared data as proxy-wasm-cpp-host implements it (`SharedData::get`/`set`, `nextCas`).
    #[derive(Default)]
    pub(crate) struct MemStore {
        map: RefCell<HashMap<String, (Vec<u8>, u32)>>,
        next_cas: Cell<u32>,
        /// Called once before each `set`: lets a test play another worker in between.
        pub(crate) before_set: RefCell<Option<Hook>>,
        pub(crate) fail: Cell<bool>,
        /// Another worker rewrites this key right before each of our writes to it.
        pub(crate) contend: RefCell<Option<String>>,
    }

    impl MemStore {
        fn cas(&self) -> u32 {
            let c = self.next_cas.get().max(1);
            self.next_cas.set(c.wrapping_add(1).max(1));
            c
        }

        pub(crate) fn raw_set(&self, key: &str, value: &[u8]) {
            let cas = self.cas();
            self.map.borrow_mut().insert(key.to_owned(), (value.to_vec(), cas));
        }
    }

    impl Store for MemStore {
        fn get(&self, key: &str) -> Result<(Option<Vec<u8>>, Option<u32>), StoreError> {
            if self.fail.get() {
                return Err(StoreError { op: "get", key: key.into(), detail: "InternalFailure".into() });
            }
            Ok(self.map.borrow().get(key).map_or((None, None), |(v, c)| (Some(v.clone()), Some(*c))))
        }

        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError> {
            let hook = self.before_set.borrow_mut().take();
            if let Some(mut f) = hook {
                f(self);
            }
            if self.contend.borrow().as_deref() == Some(key) {
                let empty = [VERSION, 0, 0, 0, 0, 0, 0, 0, 0];
                let v = self.map.borrow().get(key).map_or(empty.to_vec(), |(v, _)| v.clone());
                self.raw_set(key, &v);
            }
            let current = self.map.borrow().get(key).map(|(_, c)| *c);
            if let (Some(current), Some(cas)) = (current, cas)
                && cas != current
            {
                return Ok(false);
            }
            self.raw_set(key, value);
            Ok(true)
        }
    }

    const W: u64 = 1_000;
    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
    const ME: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 128, 0, 1));

    fn reason(r: Result<(), ReplayError>) -> Result<(), &'static str> {
        r.map_err(|e| e.reason())
    }

    #[test]
    fn once_across_workers() {
        let store = MemStore::default();
        // Two workers: two sets over one store.
        let w1 = SharedReplay::new(ME, 65_536, 16_384, W);
        let w2 = SharedReplay::new(ME, 65_536, 16_384, W);
        assert_eq!(w1.check_and_insert(&store, A, [1; 12], 5_000, 5_000), Ok(()));
        assert_eq!(reason(w2.check_and_insert(&store, A, [1; 12], 5_000, 5_001)), Err("ticket-replay"));
        assert_eq!(reason(w1.check_and_insert(&store, A, [1; 12], 5_100, 5_100)), Err("ticket-replay"));
        // Another source, or v4-mapped of the same, and other nonces.
        assert_eq!(w2.check_and_insert(&store, B, [1; 12], 5_000, 5_000), Ok(()));
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 2).to_ipv6_mapped());
        assert_eq!(reason(w1.check_and_insert(&store, mapped, [1; 12], 5_000, 5_000)), Err("ticket-replay"));
        for n in 2..100u8 {
            assert_eq!(w1.check_and_insert(&store, A, [n; 12], 5_000, 5_000), Ok(()), "{n}");
            assert_eq!(reason(w2.check_and_insert(&store, A, [n; 12], 5_000, 5_000)), Err("ticket-replay"));
        }
        // Another workload's set is another set.
        let other = SharedReplay::new(IpAddr::V4(Ipv4Addr::new(10, 128, 0, 2)), 65_536, 16_384, W);
        assert_eq!(other.check_and_insert(&store, A, [1; 12], 5_000, 5_000), Ok(()));
        // Keys are bounded: the shards and the sentinel of each workload.
        assert!(store.map.borrow().len() <= 2 * (SHARDS + 1));
    }

    /// A nonce of `ip` whose entry lands in `shard`, the `skip`-th such.
    fn nonce_in(ip: IpAddr, shard: usize, skip: usize) -> [u8; 12] {
        (0u32..)
            .map(|i| {
                let b = i.to_le_bytes();
                std::array::from_fn(|j| b.get(j).copied().unwrap_or(0xee))
            })
            .filter(|n| shard_of(&entry_id(ip, *n)) == shard)
            .nth(skip)
            .unwrap()
    }

    #[test]
    fn expiry_window_and_clock() {
        let store = MemStore::default();
        let r = SharedReplay::new(ME, 65_536, 16_384, W);
        let n1 = nonce_in(A, 0, 0);
        let n2 = nonce_in(A, 0, 1);
        assert_eq!(r.check_and_insert(&store, A, n1, 6_000, 5_000), Ok(()));
        assert_eq!(reason(r.check_and_insert(&store, A, n1, 6_000, 7_000)), Err("ticket-replay"));
        // Past issued + window such a ticket is expired; a write then forgets its entry.
        assert_eq!(reason(r.check_and_insert(&store, A, n1, 6_000, 7_001)), Err("ticket-expired"));
        assert_eq!(reason(r.check_and_insert(&store, A, n2, 9_000, 7_001)), Err("ticket-future"));
        assert_eq!(r.check_and_insert(&store, A, n2, 7_001, 7_001), Ok(()));
        let (value, _) = store.get(&r.keys[0]).unwrap();
        assert_eq!(value.unwrap().len(), HEADER_LEN + ENTRY_LEN, "the expired entry is still held");
        // The shard's clock never runs back: at 6 500 the forgotten ticket would be in its window
        // again, but the shard's now is 7 001.
        assert_eq!(reason(r.check_and_insert(&store, A, n1, 6_000, 6_500)), Err("ticket-expired"));
    }

    #[test]
    fn bounded_and_fair_per_source() {
        let store = MemStore::default();
        // 2 per shard in all, 1 per source per shard.
        let r = SharedReplay::new(ME, 2 * SHARDS, SHARDS, W);
        assert_eq!((r.shard_capacity(), r.shard_source_share()), (2, 1));
        let (n1, n2) = (nonce_in(A, 5, 0), nonce_in(A, 5, 1));
        assert_eq!(r.check_and_insert(&store, A, n1, 5_000, 5_000), Ok(()));
        assert_eq!(reason(r.check_and_insert(&store, A, n2, 5_000, 5_000)), Err("replay-cache-source-full"));
        // Another source still gets the rest of that shard, then it is full for everyone.
        assert_eq!(r.check_and_insert(&store, B, nonce_in(B, 5, 0), 5_000, 5_000), Ok(()));
        let c = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 3));
        assert_eq!(reason(r.check_and_insert(&store, c, nonce_in(c, 5, 0), 5_000, 5_000)), Err("replay-cache-full"));
        // Other shards are untouched.
        assert_eq!(r.check_and_insert(&store, A, nonce_in(A, 6, 0), 5_000, 5_000), Ok(()));
        // Once they expire there is room again.
        assert_eq!(r.check_and_insert(&store, A, n2, 6_001, 6_001), Ok(()));
        // A capacity below the shard count holds nothing: every ticket is refused, none accepted twice.
        let tiny = SharedReplay::new(ME, 10, 10, W);
        assert_eq!(reason(tiny.check_and_insert(&MemStore::default(), A, [1; 12], 0, 0)), Err("replay-cache-full"));
    }

    #[test]
    fn contention_retries_then_refuses() {
        let store = MemStore::default();
        let r = SharedReplay::new(ME, 65_536, 16_384, W);
        assert_eq!(r.check_and_insert(&store, A, [1; 12], 5_000, 5_000), Ok(()));
        // Another worker accepts the same nonce between our read and our write: our write fails
        // its CAS, the retry reads the other worker's entry and refuses.
        let other = r.clone();
        *store.before_set.borrow_mut() = Some(Box::new(move |s: &MemStore| {
            assert_eq!(other.check_and_insert(s, B, [7; 12], 5_000, 5_000), Ok(()));
        }));
        assert_eq!(reason(r.check_and_insert(&store, B, [7; 12], 5_000, 5_000)), Err("ticket-replay"));
        // Another worker writes the shard before every one of our writes: after MAX_ATTEMPTS
        // rounds the ticket is refused, and nothing was written.
        let key = r.keys[shard_of(&entry_id(B, [8; 12]))].clone();
        *store.contend.borrow_mut() = Some(key.clone());
        assert_eq!(reason(r.check_and_insert(&store, B, [8; 12], 5_000, 5_000)), Err("replay-store-unavailable"));
        *store.contend.borrow_mut() = None;
        // Without contention the same ticket is accepted once.
        assert_eq!(r.check_and_insert(&store, B, [8; 12], 5_000, 5_000), Ok(()));
        assert_eq!(reason(r.check_and_insert(&store, B, [8; 12], 5_000, 5_000)), Err("ticket-replay"));
    }

    #[test]
    fn a_racing_creation_loses_nothing() {
        // Two workers find a shard absent; the first creates it; the second's creation write,
        // carrying the sentinel's CAS, fails and its retry sees the first worker's entry.
        let store = MemStore::default();
        let r = SharedReplay::new(ME, 65_536, 16_384, W);
        let other = r.clone();
        *store.before_set.borrow_mut() = Some(Box::new(move |s: &MemStore| {
            // This is the sentinel's own write (the first write of all); play the other worker
            // right after it, before our shard write.
            let other = other.clone();
            *s.before_set.borrow_mut() = Some(Box::new(move |s: &MemStore| {
                assert_eq!(other.check_and_insert(s, A, [1; 12], 5_000, 5_000), Ok(()));
            }));
        }));
        assert_eq!(reason(r.check_and_insert(&store, A, [1; 12], 5_000, 5_000)), Err("ticket-replay"));
    }

    #[test]
    fn store_failures_refuse() {
        let store = MemStore::default();
        let r = SharedReplay::new(ME, 65_536, 16_384, W);
        store.fail.set(true);
        assert_eq!(reason(r.check_and_insert(&store, A, [1; 12], 5_000, 5_000)), Err("replay-store-unavailable"));
        store.fail.set(false);
        // A value keyway does not understand is never overwritten, only refused.
        let key = r.keys[shard_of(&entry_id(A, [1; 12]))].clone();
        store.raw_set(&key, b"garbage");
        assert_eq!(reason(r.check_and_insert(&store, A, [1; 12], 5_000, 5_000)), Err("replay-store-unavailable"));
        assert_eq!(store.get(&key).unwrap().0.unwrap(), b"garbage");
    }
}
