//! Kubernetes decoding: the `Raw*` shapes of the kinds keyway reads, decoded leniently from
//! parsed objects (unknown fields ignored, a type error names the field), and their conversion
//! into the inventory and policy types, validated as the API server and the reference analyzer
//! validate them. Nothing else in the crate depends on this module but the loader
//! ([`crate::manifest`]); the inventory and policy types know nothing of manifests.

pub(crate) mod admin;
pub(crate) mod device;
pub(crate) mod netpol;
pub(crate) mod selector;
pub(crate) mod workload;

use std::collections::BTreeMap;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{LoadError, Origin};
use crate::selector::Labels;

/// Metadata as far as keyway reads it.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct RawMeta {
    pub(crate) name: String,
    pub(crate) namespace: Option<String>,
    pub(crate) labels: Option<Labels>,
    pub(crate) annotations: Option<BTreeMap<String, String>>,
    pub(crate) owner_references: Option<Vec<RawOwner>>,
}

/// An entry of `metadata.ownerReferences`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(crate) struct RawOwner {
    pub(crate) kind: Option<String>,
    pub(crate) name: String,
    pub(crate) controller: Option<bool>,
}

/// Decodes `value` leniently (unknown fields ignored); a type error names the field.
pub(crate) fn decode<T: DeserializeOwned>(value: Value, origin: &Origin) -> Result<T, LoadError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        origin.invalid(if field == "." { "(object)".to_owned() } else { field }, e.into_inner().to_string())
    })
}
