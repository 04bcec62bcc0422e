//! Overlay addresses for the pods of this zone that do not carry `keyway.io/overlay-ips`.
//!
//! A pod's address is stable: the first time, it is the address at a deterministic hash (FNV-1a,
//! 64 bits) of `namespace/name` within the zone's prefix, or the next free one after it (linear
//! probing, wrapping; IPv4 network and broadcast addresses and IPv6's all-zero host are never
//! given). The choice is recorded in a ConfigMap (default `keyway-system/keyway-overlay-addresses`,
//! one key `<namespace>.<pod>` per pod: a namespace has no dot, so the key splits unambiguously),
//! and a recorded address is kept as long as its pod exists, across restarts and replicas.
//! Writes are compare-and-swap on the ConfigMap's `resourceVersion`: when another replica wrote
//! first, its record is read again and wins. Entries of pods that no longer exist are dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::ConfigMap;
use keyway_policy::ip::{Addr, Cidr, V4_FIRST, V4_LAST, addr, ip};
use kube::api::{Api, ObjectMeta, PostParams};

/// Attempts at a compare-and-swap write before giving up for this round.
const WRITE_ATTEMPTS: usize = 5;

/// The record key of a pod.
pub fn record_key(namespace: &str, name: &str) -> String {
    format!("{namespace}.{name}")
}

/// FNV-1a, 64 bits: small, fixed forever (a change would move every unrecorded pod).
fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Whether `a` may be given out in `prefix` (not the IPv4 network or broadcast address, not the
/// IPv6 all-zero host; prefixes of fewer than 4 addresses are used whole).
fn usable(prefix: &Cidr, a: Addr) -> bool {
    let r = prefix.range;
    if r.last - r.first < 3 {
        return true;
    }
    let is_v4 = r.first >= V4_FIRST && r.last <= V4_LAST;
    a != r.first && !(is_v4 && a == r.last)
}

/// The result of an allocation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Allocation {
    /// Address of every wanted pod that got one, by record key.
    pub addresses: BTreeMap<String, IpAddr>,
    /// Wanted pods left without an address: the prefix is full.
    pub exhausted: Vec<String>,
}

/// Allocates addresses in `prefix` for `wanted` (record keys of pods), keeping the `previous`
/// address of every pod that still fits, never giving out one of `taken` (addresses that
/// `keyway.io/overlay-ips` annotations and the static inventory already use) and never one
/// address twice. Deterministic: the same inputs give the same result.
pub fn allocate(
    prefix: &Cidr,
    previous: &BTreeMap<String, IpAddr>,
    wanted: &BTreeSet<String>,
    taken: &BTreeSet<IpAddr>,
) -> Allocation {
    let r = prefix.range;
    let mut used: BTreeSet<Addr> = taken.iter().map(|i| addr(*i)).collect();
    let mut out = Allocation::default();
    let mut todo = Vec::new();
    for key in wanted {
        match previous.get(key).map(|i| addr(*i)) {
            Some(a) if a >= r.first && a <= r.last && usable(prefix, a) && used.insert(a) => {
                out.addresses.insert(key.clone(), ip(a));
            }
            _ => todo.push(key),
        }
    }
    let span = r.last - r.first; // size - 1, no overflow even for ::/0
    for key in todo {
        let start = match span.checked_add(1) {
            Some(size) => u128::from(fnv1a(key)) % size,
            None => u128::from(fnv1a(key)),
        };
        let in_prefix = used.range(r.first..=r.last).count() as u128;
        // Linear probing finds a free slot within `in_prefix + 3` steps if there is one.
        let steps = span.min(in_prefix + 3);
        let mut found = None;
        let mut offset = start;
        for _ in 0..=steps {
            let a = r.first + offset;
            if usable(prefix, a) && !used.contains(&a) {
                found = Some(a);
                break;
            }
            offset = if offset == span { 0 } else { offset + 1 };
        }
        match found {
            Some(a) => {
                used.insert(a);
                out.addresses.insert(key.clone(), ip(a));
            }
            None => out.exhausted.push(key.clone()),
        }
    }
    out
}

/// The address record as read from the cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    /// Address by record key.
    pub entries: BTreeMap<String, IpAddr>,
    /// The ConfigMap's `resourceVersion`; `None` when it does not exist yet.
    pub resource_version: Option<String>,
}

/// Why the record could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The API server refused or could not be reached.
    #[error("address record {namespace}/{name}: {source}")]
    Api {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// What kube-rs said.
        #[source]
        source: kube::Error,
    },
    /// Other replicas kept writing first.
    #[error("address record {namespace}/{name}: still changing under us after {WRITE_ATTEMPTS} attempts")]
    Contended {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
}

/// The ConfigMap that records the addresses.
#[derive(Clone, Debug)]
pub struct RecordStore {
    api: Api<ConfigMap>,
    namespace: String,
    name: String,
}

impl RecordStore {
    /// The record `namespace/name`.
    pub fn new(client: kube::Client, namespace: &str, name: &str) -> RecordStore {
        RecordStore { api: Api::namespaced(client, namespace), namespace: namespace.to_owned(), name: name.to_owned() }
    }

    fn err(&self, source: kube::Error) -> RecordError {
        RecordError::Api { namespace: self.namespace.clone(), name: self.name.clone(), source }
    }

    /// Reads the record (empty when the ConfigMap does not exist). Values that are not addresses
    /// are dropped with a warning.
    pub async fn read(&self) -> Result<Record, RecordError> {
        let Some(cm) = self.api.get_opt(&self.name).await.map_err(|e| self.err(e))? else {
            return Ok(Record::default());
        };
        let mut entries = BTreeMap::new();
        for (k, v) in cm.data.unwrap_or_default() {
            match v.trim().parse::<IpAddr>() {
                Ok(a) => {
                    entries.insert(k, a);
                }
                Err(_) => tracing::warn!(
                    record = %format!("{}/{}", self.namespace, self.name), key = %k, value = %v,
                    "address record: not an IP address; the entry is ignored"
                ),
            }
        }
        Ok(Record { entries, resource_version: cm.metadata.resource_version })
    }

    /// Writes `entries` if the record is still at `base`'s version. `Ok(false)`: someone wrote
    /// first (409), read again.
    async fn write(&self, base: &Record, entries: &BTreeMap<String, IpAddr>) -> Result<bool, RecordError> {
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                resource_version: base.resource_version.clone(),
                labels: Some(BTreeMap::from([
                    ("app.kubernetes.io/part-of".to_owned(), "keyway".to_owned()),
                    ("app.kubernetes.io/managed-by".to_owned(), "keyway-gateway".to_owned()),
                ])),
                ..ObjectMeta::default()
            },
            data: Some(entries.iter().map(|(k, v)| (k.clone(), v.to_string())).collect()),
            ..ConfigMap::default()
        };
        let pp = PostParams::default();
        let result = match &base.resource_version {
            None => self.api.create(&pp, &cm).await.map(|_| ()),
            Some(_) => self.api.replace(&self.name, &pp, &cm).await.map(|_| ()),
        };
        match result {
            Ok(()) => Ok(true),
            Err(kube::Error::Api(s)) if s.is_conflict() || s.is_already_exists() => Ok(false),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Reads the record, allocates with [`allocate`] and writes the result back when it changed,
    /// again from a fresh read when another writer got there first.
    pub async fn allocate(
        &self,
        prefix: &Cidr,
        wanted: &BTreeSet<String>,
        taken: &BTreeSet<IpAddr>,
    ) -> Result<Allocation, RecordError> {
        for _ in 0..WRITE_ATTEMPTS {
            let record = self.read().await?;
            let allocation = allocate(prefix, &record.entries, wanted, taken);
            if allocation.addresses == record.entries || self.write(&record, &allocation.addresses).await? {
                return Ok(allocation);
            }
            tracing::debug!("address record changed under us; reading it again");
        }
        Err(RecordError::Contended { namespace: self.namespace.clone(), name: self.name.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyway_policy::ip::parse_cidr;

    fn keys(n: usize) -> BTreeSet<String> {
        (0..n).map(|i| record_key("shop", &format!("pod-{i}"))).collect()
    }

    #[test]
    fn deterministic_unique_and_inside_the_prefix() {
        let prefix = parse_cidr("10.128.1.0/24").unwrap();
        let wanted = keys(200);
        let taken = BTreeSet::from(["10.128.1.7".parse().unwrap()]);
        let a = allocate(&prefix, &BTreeMap::new(), &wanted, &taken);
        let b = allocate(&prefix, &BTreeMap::new(), &wanted, &taken);
        assert_eq!(a, b);
        assert!(a.exhausted.is_empty());
        let distinct: BTreeSet<IpAddr> = a.addresses.values().copied().collect();
        assert_eq!(distinct.len(), 200);
        for ip in distinct {
            let s = ip.to_string();
            assert!(s.starts_with("10.128.1."), "{s}");
            assert!(!["10.128.1.0", "10.128.1.255", "10.128.1.7"].contains(&s.as_str()), "{s}");
        }
    }

    #[test]
    fn previous_addresses_stay_and_new_pods_do_not_move_them() {
        let prefix = parse_cidr("10.128.1.0/24").unwrap();
        let first = allocate(&prefix, &BTreeMap::new(), &keys(50), &BTreeSet::new());
        // One pod gone, 30 new ones, an annotation now claims nothing of ours.
        let mut wanted = keys(80);
        wanted.remove(&record_key("shop", "pod-3"));
        let second = allocate(&prefix, &first.addresses, &wanted, &BTreeSet::new());
        for (k, v) in &first.addresses {
            if k != &record_key("shop", "pod-3") {
                assert_eq!(second.addresses.get(k), Some(v), "{k} moved");
            }
        }
        assert!(!second.addresses.contains_key(&record_key("shop", "pod-3")), "a gone pod's entry is dropped");
        let distinct: BTreeSet<IpAddr> = second.addresses.values().copied().collect();
        assert_eq!(distinct.len(), second.addresses.len());
    }

    #[test]
    fn an_address_claimed_by_an_annotation_moves_the_recorded_pod_and_full_prefixes_are_reported() {
        let prefix = parse_cidr("10.128.1.0/30").unwrap();
        let wanted = keys(3);
        let a = allocate(&prefix, &BTreeMap::new(), &wanted, &BTreeSet::new());
        assert_eq!(a.addresses.len(), 2, "a /30 gives 2 addresses");
        assert_eq!(a.exhausted.len(), 1);
        let claimed = *a.addresses.values().next().unwrap();
        let b = allocate(&prefix, &a.addresses, &wanted, &BTreeSet::from([claimed]));
        assert_eq!(b.addresses.len(), 1);
        assert!(!b.addresses.values().any(|v| *v == claimed));
    }

    #[test]
    fn ipv6_prefixes_work() {
        let prefix = parse_cidr("fd00:128::/64").unwrap();
        let a = allocate(&prefix, &BTreeMap::new(), &keys(10), &BTreeSet::new());
        assert_eq!(a.addresses.len(), 10);
        assert!(a.addresses.values().all(|v| v.to_string().starts_with("fd00:128::")));
    }
}
