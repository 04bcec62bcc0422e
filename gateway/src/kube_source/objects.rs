//! From cluster objects and the static inventory directory to the loader's input.
//!
//! Each cluster object becomes one [`SourceFile`] named `kubernetes:<plural>/<namespace>/<name>`
//! (cluster-scoped: `kubernetes:<plural>/<name>`) holding the object as JSON, so every error names
//! the object. Before that, a pod gets what the file source's manifests say by hand: its zone
//! (`keyway.io/zone`, this gateway's zone unless the pod says otherwise), its sidecar addresses
//! (`keyway.io/sidecar-ips`, from `status.podIPs` unless the pod says otherwise) and, once
//! allocated, its overlay address (`keyway.io/overlay-ips`). Pods that have finished
//! (`Succeeded`, `Failed`) and host-network pods are left out.
//!
//! The static directory is split into its objects the same way (YAML documents, JSON files, the
//! items of `*List`s), each named by its file. Merge rule: the cluster wins. A static object with
//! the identity (kind, namespace, name) of a cluster object is dropped, and so is a static workload
//! of this gateway's own zone: this cluster is the authority on its zone's workloads. Devices
//! (WorkloadEntry) are the exception: they run outside every cluster, so a static one stays.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use keyway_policy::LoadError;
use keyway_policy::inventory::{OVERLAY_IPS_ANNOTATION, SIDECAR_IPS_ANNOTATION, ZONE_ANNOTATION};
use keyway_policy::manifest::{self, Manifests, Object, SourceFile};
use kube::api::DynamicObject;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::watch::{Kind, Snapshot};

/// An object's identity for the merge rule: kind, namespace (`default` when unset, empty for
/// cluster-scoped kinds) and name.
pub type Ident = (String, String, String);

fn is_cluster_scoped(kind: &str) -> bool {
    matches!(kind, "Namespace" | "AdminNetworkPolicy" | "BaselineAdminNetworkPolicy")
}

fn ident_of(value: &Value) -> Ident {
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or_default().to_owned();
    let meta = value.get("metadata");
    let name = meta.and_then(|m| m.get("name")).and_then(Value::as_str).unwrap_or_default().to_owned();
    let ns = if is_cluster_scoped(&kind) {
        String::new()
    } else {
        match meta.and_then(|m| m.get("namespace")).and_then(Value::as_str) {
            Some(ns) if !ns.is_empty() => ns.to_owned(),
            _ => "default".to_owned(),
        }
    };
    (kind, ns, name)
}

/// A cluster object, ready for the loader.
#[derive(Clone, Debug)]
pub struct LocalObject {
    /// Its identity.
    pub ident: Ident,
    /// `kubernetes:pods/shop/cart-1`.
    pub source: String,
    /// Its `resourceVersion` (to report a malformed version once).
    pub resource_version: String,
    /// The object, with keyway's annotations filled in.
    pub value: Value,
    /// For a pod of this zone without overlay addresses: its record key.
    pub wants_address: Option<String>,
}

impl LocalObject {
    /// Its `metadata.creationTimestamp` (RFC 3339, UTC, so it sorts as text); objects without one
    /// sort last.
    pub fn created(&self) -> &str {
        self.value.pointer("/metadata/creationTimestamp").and_then(Value::as_str).unwrap_or("~")
    }

    /// The loader's input.
    pub fn object(&self) -> Object {
        Object::new(self.source.clone(), self.value.clone())
    }

    /// Sets the pod's overlay address.
    pub fn set_overlay_ip(&mut self, ip: IpAddr) {
        set_annotation(&mut self.value, OVERLAY_IPS_ANNOTATION, ip.to_string());
    }
}

/// The label a pod opts in with: only pods labelled `keyway.io/enforce: "true"` (the label the
/// Istio manifests select the sidecars to enforce with) get an overlay address from the prefix.
pub const ENFORCE_LABEL: &str = "keyway.io/enforce";

/// Sets `metadata.annotations[key]`, creating the maps when missing. A metadata or annotations
/// value that is not a map is left alone: the loader reports it.
fn set_annotation(value: &mut Value, key: &str, v: String) {
    let meta = value.as_object_mut().map(|o| o.entry("metadata").or_insert_with(|| Value::Object(Map::new())));
    let ann = meta
        .and_then(Value::as_object_mut)
        .map(|m| m.entry("annotations").or_insert_with(|| Value::Object(Map::new())));
    if let Some(ann) = ann.and_then(Value::as_object_mut) {
        ann.insert(key.to_owned(), Value::String(v));
    }
}

fn annotation<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
    value.get("metadata")?.get("annotations")?.get(key)?.as_str()
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct PodFacts {
    spec: PodSpecFacts,
    status: PodStatusFacts,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct PodSpecFacts {
    host_network: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct PodStatusFacts {
    phase: Option<String>,
    #[serde(rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(rename = "podIPs")]
    pod_ips: Option<Vec<PodIp>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PodIp {
    ip: Option<String>,
}

/// Turns a snapshot of the cluster into loader inputs (see the module docs for what pods get).
pub fn local_objects(snapshot: Snapshot, zone: &str) -> Vec<LocalObject> {
    let mut out = Vec::new();
    for (kind, objects) in snapshot {
        for obj in objects {
            if let Some(o) = local_object(kind, obj, zone) {
                out.push(o);
            }
        }
    }
    out
}

fn local_object(kind: Kind, obj: DynamicObject, zone: &str) -> Option<LocalObject> {
    let name = obj.metadata.name.clone().unwrap_or_default();
    let ns = obj.metadata.namespace.clone().unwrap_or_default();
    let resource_version = obj.metadata.resource_version.clone().unwrap_or_default();
    let source = if kind.namespaced() {
        format!("kubernetes:{}/{ns}/{name}", kind.plural())
    } else {
        format!("kubernetes:{}/{name}", kind.plural())
    };
    let mut value = match serde_json::to_value(&obj) {
        Ok(Value::Object(mut m)) => {
            let ar = kind.api_resource();
            m.insert("apiVersion".to_owned(), Value::String(ar.api_version));
            m.insert("kind".to_owned(), Value::String(ar.kind));
            Value::Object(m)
        }
        _ => return None,
    };
    let mut wants_address = None;
    if kind == Kind::Pod {
        // Lenient: a malformed spec or status must not hide the pod; the loader judges the rest.
        let facts: PodFacts = serde_json::from_value(value.clone()).unwrap_or_default();
        if facts.spec.host_network == Some(true)
            || matches!(facts.status.phase.as_deref(), Some("Succeeded") | Some("Failed"))
        {
            return None;
        }
        let pod_zone = annotation(&value, ZONE_ANNOTATION).map(str::to_owned);
        if pod_zone.is_none() {
            set_annotation(&mut value, ZONE_ANNOTATION, zone.to_owned());
        }
        if annotation(&value, SIDECAR_IPS_ANNOTATION).is_none() {
            let mut ips: Vec<String> =
                facts.status.pod_ips.unwrap_or_default().into_iter().filter_map(|p| p.ip).collect();
            if ips.is_empty()
                && let Some(ip) = facts.status.pod_ip
            {
                ips.push(ip);
            }
            ips.retain(|ip| ip.parse::<IpAddr>().is_ok());
            if !ips.is_empty() {
                set_annotation(&mut value, SIDECAR_IPS_ANNOTATION, ips.join(","));
            }
        }
        let mine = pod_zone.as_deref().is_none_or(|z| z == zone);
        let enforced = value.pointer("/metadata/labels").and_then(|l| l.get(ENFORCE_LABEL)).and_then(Value::as_str)
            == Some("true");
        if mine && enforced && annotation(&value, OVERLAY_IPS_ANNOTATION).is_none_or(|s| s.trim().is_empty()) {
            wants_address = Some(super::addresses::record_key(&ns, &name));
        }
    }
    Some(LocalObject { ident: ident_of(&value), source, resource_version, value, wants_address })
}

/// Loads one object on its own: what it describes, or why it is malformed.
pub fn check(object: &Object) -> Result<Manifests, LoadError> {
    manifest::load_objects(vec![object.clone()])
}

/// The overlay addresses a loaded input claims (workloads' and services').
pub fn claimed(m: &Manifests) -> impl Iterator<Item = IpAddr> + '_ {
    m.inventory
        .workloads
        .iter()
        .flat_map(|w| w.overlay_ips.iter().copied())
        .chain(m.inventory.services.iter().flat_map(|s| s.overlay_ips.iter().copied()))
}

/// An object of the static directory.
#[derive(Clone, Debug)]
pub struct StaticObject {
    /// Its identity.
    pub ident: Ident,
    /// The loader's input, named by its file and document.
    pub object: Object,
    /// Whether it is a workload of this gateway's zone.
    pub own_zone_workload: bool,
    /// The overlay addresses it claims.
    pub claimed: Vec<IpAddr>,
}

/// Splits the static directory's files into objects and loads each on its own (an error in the
/// directory rejects it whole, as with the file source; files that are not Kubernetes manifests
/// are skipped with a warning, as the file source does).
pub fn static_objects(files: &[SourceFile], zone: &str) -> Result<Vec<StaticObject>, LoadError> {
    let (documents, warnings) = manifest::kubernetes_documents(files)?;
    for w in warnings {
        tracing::warn!(warning = %w, "static inventory");
    }
    let mut out = Vec::new();
    for object in manifest::objects(documents)? {
        let m = check(&object)?;
        // Devices (WorkloadEntry) are not pods: the cluster is not their authority, so a static one
        // of this zone stays unless the cluster has the same object.
        let own_zone_workload =
            m.inventory.workloads.iter().any(|w| w.zone.as_deref() == Some(zone) && w.kind != "WorkloadEntry");
        out.push(StaticObject {
            ident: ident_of(&object.value),
            object,
            own_zone_workload,
            claimed: claimed(&m).collect(),
        });
    }
    Ok(out)
}

/// The static objects that stay beside the cluster's (the merge rule in the module docs), with
/// the reason each dropped one went, for the log.
pub fn merge_static<'a>(
    statics: &'a [StaticObject],
    local: &BTreeSet<Ident>,
) -> (Vec<&'a StaticObject>, BTreeMap<&'static str, usize>) {
    let mut kept = Vec::new();
    let mut dropped: BTreeMap<&'static str, usize> = BTreeMap::new();
    for s in statics {
        if local.contains(&s.ident) {
            *dropped.entry("also in the cluster").or_default() += 1;
        } else if s.own_zone_workload {
            *dropped.entry("a workload of this zone").or_default() += 1;
        } else {
            kept.push(s);
        }
    }
    (kept, dropped)
}
