//! What a filter needs to know about keys, in one JSON shape shared by the gateway's key service
//! (`GET /v1/keys?ip=<overlay address>` on the gateway's admin port; the names are in
//! [`crate::wire`]), the filter's static configuration (written by `keyway keys issue`) and the
//! filter itself.
//!
//! ```json
//! {
//!   "identity": "spiffe://cluster.local/ns/shop/sa/cart",
//!   "overlay_ip": "10.128.1.11",
//!   "zone": "zone-a",
//!   "workload_keys": [{"epoch": 7, "key": "<base64url>", "not_after_ms": 1790000000000},
//!                     {"epoch": 8, "key": "<base64url>", "not_after_ms": null, "not_before_ms": 1789999990000}],
//!   "ticket_keys":   [{"epoch": 7, "key": "<base64url>", "not_after_ms": null}],
//!   "refresh_ms": 10000
//! }
//! ```
//!
//! During a rotation both epochs are listed; a filter seals new tokens with the newest usable
//! workload key (activated: past `not_before_ms`) and accepts tickets of any listed, unexpired
//! epoch. Gateways seal tickets by the same activation rule, so nobody seals with an epoch that
//! a peer may not know yet.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::auth::{TicketKey, WorkloadKey};

/// The refresh interval a key service suggests when it has no reason to suggest another.
pub const DEFAULT_REFRESH_MS: u64 = 10_000;

/// One key of one epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpochKey {
    /// The epoch.
    pub epoch: u32,
    /// The 32-byte key, base64url without padding.
    pub key: String,
    /// After this instant (unix ms) the key must not be used; `None`: until replaced.
    #[serde(default)]
    pub not_after_ms: Option<u64>,
    /// Before this instant (unix ms) the key is not used to seal: a new epoch is handed out early
    /// so every filter and gateway knows it before anyone seals with it. `None`: at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before_ms: Option<u64>,
}

impl EpochKey {
    /// Whether the key may seal at `now_ms`: activated and not expired.
    pub fn usable_at(&self, now_ms: u64) -> bool {
        self.not_before_ms.is_none_or(|t| now_ms >= t) && self.valid_at(now_ms)
    }

    /// Whether a credential sealed with this key is still accepted at `now_ms` (not expired;
    /// activation does not matter for verifying).
    pub fn valid_at(&self, now_ms: u64) -> bool {
        self.not_after_ms.is_none_or(|t| now_ms <= t)
    }
}

/// The keys of one workload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyBundle {
    /// The workload's SPIFFE identity.
    pub identity: String,
    /// The workload's overlay address.
    pub overlay_ip: IpAddr,
    /// The workload's zone.
    pub zone: String,
    /// Its workload keys (tokens), oldest epoch first.
    pub workload_keys: Vec<EpochKey>,
    /// Its zone's ticket keys (tickets), oldest epoch first.
    pub ticket_keys: Vec<EpochKey>,
    /// How often to fetch again (ms).
    #[serde(default = "default_refresh")]
    pub refresh_ms: u64,
}

fn default_refresh() -> u64 {
    DEFAULT_REFRESH_MS
}

impl KeyBundle {
    /// The key to seal a token with at `now_ms`: the usable key of the highest epoch.
    pub fn signing_key(&self, now_ms: u64) -> Option<(u32, WorkloadKey)> {
        self.workload_keys
            .iter()
            .filter(|k| k.usable_at(now_ms))
            .max_by_key(|k| k.epoch)
            .and_then(|k| WorkloadKey::from_base64url(&k.key).ok().map(|key| (k.epoch, key)))
    }

    /// The ticket key of `epoch`, when listed and not expired at `now_ms`.
    pub fn ticket_key(&self, epoch: u32, now_ms: u64) -> Option<TicketKey> {
        self.ticket_keys
            .iter()
            .find(|k| k.epoch == epoch && k.valid_at(now_ms))
            .and_then(|k| TicketKey::from_base64url(&k.key).ok())
    }

    /// Checks that every key decodes; the first bad one is named.
    pub fn validate(&self) -> Result<(), String> {
        for (i, k) in self.workload_keys.iter().enumerate() {
            WorkloadKey::from_base64url(&k.key).map_err(|e| format!("workload_keys[{i}].key: {e}"))?;
        }
        for (i, k) in self.ticket_keys.iter().enumerate() {
            TicketKey::from_base64url(&k.key).map_err(|e| format!("ticket_keys[{i}].key: {e}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bundle() -> KeyBundle {
        let k = |b: u8| WorkloadKey::from_bytes([b; 32]).to_base64url();
        KeyBundle {
            identity: "spiffe://td/ns/a/sa/b".into(),
            overlay_ip: "10.0.0.1".parse().unwrap(),
            zone: "z".into(),
            workload_keys: vec![
                EpochKey { epoch: 1, key: k(1), not_after_ms: Some(1000), not_before_ms: None },
                EpochKey { epoch: 2, key: k(2), not_after_ms: None, not_before_ms: None },
            ],
            ticket_keys: vec![EpochKey { epoch: 2, key: k(3), not_after_ms: Some(5000), not_before_ms: Some(100) }],
            refresh_ms: 500,
        }
    }

    #[test]
    fn newest_usable_epoch_signs() {
        let mut b = bundle();
        assert_eq!(b.signing_key(10).map(|k| k.0), Some(2));
        b.workload_keys[1].not_after_ms = Some(5);
        assert_eq!(b.signing_key(3).map(|k| k.0), Some(2));
        assert_eq!(b.signing_key(10).map(|k| k.0), Some(1));
        assert_eq!(b.signing_key(1001), None);
        assert!(b.ticket_key(2, 5000).is_some());
        assert!(b.ticket_key(2, 50).is_some(), "verifying ignores activation");
        let mut b2 = bundle();
        b2.workload_keys[1].not_before_ms = Some(500);
        assert_eq!(b2.signing_key(499).map(|k| k.0), Some(1), "not activated yet");
        assert_eq!(b2.signing_key(500).map(|k| k.0), Some(2));
        assert!(b.ticket_key(2, 5001).is_none());
        assert!(b.ticket_key(1, 0).is_none());
    }

    #[test]
    fn json_round_trip_and_strictness() {
        let b = bundle();
        let text = serde_json::to_string(&b).unwrap();
        assert_eq!(serde_json::from_str::<KeyBundle>(&text).unwrap(), b);
        assert!(serde_json::from_str::<KeyBundle>(&text.replace("\"zone\"", "\"zone\":\"z\",\"extra\"")).is_err());
        let mut bad = b;
        bad.ticket_keys[0].key = "short".into();
        assert!(bad.validate().unwrap_err().starts_with("ticket_keys[0].key"));
    }
}
