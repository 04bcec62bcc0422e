//! The one loader for Kubernetes manifests: YAML (multi-document) and JSON, `*List` flattening
//! with inherited kind, lenient decoding of the kinds that count, defaults, owners and workload
//! peers. The conformance harness, `keyway policy` and the gateway all load through here.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{LoadError, Origin, Warning};
use crate::inventory::{
    ContainerPort, Inventory, NAMESPACE_NAME_LABEL, Namespace, OVERLAY_IPS_ANNOTATION, SIDECAR_IPS_ANNOTATION, Service,
    Workload, ZONE_ANNOTATION, ZONE_LABEL,
};
use crate::policy::{self, PolicySet};
use crate::ports::Protocol;
use crate::selector::Labels;

/// One input file: its path (for messages) and its text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceFile {
    /// The path, as it should appear in messages.
    pub path: String,
    /// The whole text.
    pub text: String,
}

/// What a set of manifests describes.
#[derive(Clone, Debug, Default)]
pub struct Manifests {
    /// Namespaces and workloads.
    pub inventory: Inventory,
    /// NetworkPolicies and admin tiers.
    pub policies: PolicySet,
    /// Things that load but probably do not do what was meant.
    pub warnings: Vec<Warning>,
}

/// The workload kinds whose pod template becomes a workload.
const WORKLOAD_KINDS: [&str; 7] =
    ["Deployment", "ReplicaSet", "ReplicationController", "StatefulSet", "DaemonSet", "Job", "CronJob"];

/// One Kubernetes object, flattened out of its file and lists.
#[derive(Debug)]
struct Object {
    file: String,
    value: Value,
}

/// Splits the files into objects: documents of YAML files, the object of a JSON file, and the items
/// of every `List`/`*List`, which inherit the list's kind (without `List`) and apiVersion.
fn objects(files: &[SourceFile]) -> Result<Vec<Object>, LoadError> {
    let mut out = Vec::new();
    for f in files {
        let is_json = f.path.ends_with(".json");
        let docs: Vec<Value> = if is_json {
            let v: Value = serde_json::from_str(&f.text).map_err(|e| LoadError::Syntax {
                file: f.path.clone(),
                document: 1,
                format: "JSON",
                reason: e.to_string(),
            })?;
            vec![v]
        } else {
            let mut docs = Vec::new();
            for (i, d) in serde_yaml_ng::Deserializer::from_str(&f.text).enumerate() {
                let v = Value::deserialize(d).map_err(|e| LoadError::Syntax {
                    file: f.path.clone(),
                    document: i + 1,
                    format: "YAML",
                    reason: e.to_string(),
                })?;
                docs.push(v);
            }
            docs
        };
        for (i, v) in docs.into_iter().enumerate() {
            flatten(&f.path, i + 1, v, &mut out)?;
        }
    }
    Ok(out)
}

fn flatten(file: &str, document: usize, v: Value, out: &mut Vec<Object>) -> Result<(), LoadError> {
    let not_object =
        |reason: &str| LoadError::NotAnObject { file: file.to_owned(), document, reason: reason.to_owned() };
    let mut map = match v {
        Value::Null => return Ok(()),
        Value::Object(m) => m,
        _ => return Err(not_object("expected a Kubernetes object (a mapping with apiVersion and kind)")),
    };
    let kind = match map.get("kind") {
        Some(Value::String(k)) => k.clone(),
        Some(_) => return Err(not_object("`kind` must be a string")),
        None => return Err(not_object("expected a Kubernetes object: `kind` is missing")),
    };
    if kind == "List" || kind.ends_with("List") {
        let item_kind = kind.strip_suffix("List").unwrap_or_default().to_owned();
        let api_version = map.get("apiVersion").cloned();
        let items = match map.remove("items") {
            Some(Value::Array(items)) => items,
            Some(Value::Null) | None => Vec::new(),
            Some(_) => return Err(not_object(&format!("{kind}: `items` must be a list"))),
        };
        for item in items {
            let item = match item {
                Value::Object(mut m) => {
                    if !m.contains_key("kind") && !item_kind.is_empty() {
                        m.insert("kind".into(), Value::String(item_kind.clone()));
                    }
                    if !m.contains_key("apiVersion")
                        && let Some(a) = &api_version
                    {
                        m.insert("apiVersion".into(), a.clone());
                    }
                    Value::Object(m)
                }
                other => other,
            };
            flatten(file, document, item, out)?;
        }
        return Ok(());
    }
    out.push(Object { file: file.to_owned(), value: Value::Object(map) });
    Ok(())
}

/// Metadata as far as keyway reads it.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub(crate) struct RawMeta {
    pub(crate) name: String,
    pub(crate) namespace: Option<String>,
    pub(crate) labels: Option<Labels>,
    pub(crate) annotations: Option<BTreeMap<String, String>>,
    owner_references: Option<Vec<RawOwner>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawOwner {
    kind: Option<String>,
    name: String,
    controller: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct RawPodSpec {
    containers: Option<Vec<RawContainer>>,
    service_account_name: Option<String>,
    service_account: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawContainer {
    ports: Option<Vec<RawContainerPort>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct RawContainerPort {
    name: Option<String>,
    container_port: Option<i64>,
    protocol: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawPod {
    metadata: RawMeta,
    spec: RawPodSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawTemplate {
    metadata: RawMeta,
    spec: RawPodSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct RawWorkloadSpec {
    template: Option<RawTemplate>,
    job_template: Option<RawJobTemplate>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawJobTemplate {
    spec: RawJobSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawJobSpec {
    template: Option<RawTemplate>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawWorkloadObject {
    metadata: RawMeta,
    spec: RawWorkloadSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawService {
    metadata: RawMeta,
    spec: RawServiceSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawServiceSpec {
    selector: Option<Labels>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawNamespace {
    metadata: RawMeta,
}

/// Decodes `value` leniently (unknown fields ignored); a type error names the field.
pub(crate) fn decode<T: DeserializeOwned>(value: Value, origin: &Origin) -> Result<T, LoadError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let field = e.path().to_string();
        origin.invalid(if field == "." { "(object)".to_owned() } else { field }, e.into_inner().to_string())
    })
}

/// The name and namespace of an object, read before decoding so errors can name it.
fn ident(value: &Value) -> (String, Option<String>) {
    let meta = value.get("metadata");
    let name = meta.and_then(|m| m.get("name")).and_then(Value::as_str).unwrap_or("(unnamed)").to_owned();
    let ns = meta.and_then(|m| m.get("namespace")).and_then(Value::as_str).map(str::to_owned);
    (name, ns)
}

fn namespace_or_default(ns: Option<&str>) -> String {
    match ns {
        Some(ns) if !ns.is_empty() => ns.to_owned(),
        _ => "default".to_owned(),
    }
}

/// Loads manifests into an inventory and a policy set.
pub fn load(files: &[SourceFile]) -> Result<Manifests, LoadError> {
    let mut warnings = Vec::new();
    let mut namespaces: BTreeMap<String, (Namespace, String)> = BTreeMap::new();
    let mut workloads: BTreeMap<(String, String, String), Workload> = BTreeMap::new();
    let mut policies = PolicySet::default();
    let mut services = Vec::new();

    for obj in objects(files)? {
        let kind = obj.value.get("kind").and_then(Value::as_str).unwrap_or_default().to_owned();
        let (name, ns) = ident(&obj.value);
        let namespaced = kind != "Namespace" && kind != "AdminNetworkPolicy" && kind != "BaselineAdminNetworkPolicy";
        let ns_name = namespace_or_default(ns.as_deref());
        let origin = Origin::object(&obj.file, &kind, if namespaced { Some(ns_name.as_str()) } else { None }, &name);
        match kind.as_str() {
            "Namespace" => {
                let raw: RawNamespace = decode(obj.value, &origin)?;
                let mut labels = raw.metadata.labels.unwrap_or_default();
                labels.entry(NAMESPACE_NAME_LABEL.to_owned()).or_insert_with(|| raw.metadata.name.clone());
                if let Some(zone) = raw.metadata.annotations.as_ref().and_then(|a| a.get(ZONE_ANNOTATION)) {
                    labels.insert(ZONE_LABEL.to_owned(), zone.clone());
                }
                let n = Namespace { name: raw.metadata.name.clone(), labels };
                if let Some((_, other)) = namespaces.get(&n.name) {
                    return Err(LoadError::Duplicate {
                        file: obj.file,
                        object: origin.object,
                        other_file: other.clone(),
                        scope: "in the cluster",
                    });
                }
                namespaces.insert(n.name.clone(), (n, obj.file));
            }
            "Pod" => {
                let raw: RawPod = decode(obj.value, &origin)?;
                if raw.metadata.name.starts_with("virt-launcher-") {
                    continue;
                }
                let owner = raw.metadata.owner_references.iter().flatten().find(|o| o.controller == Some(true));
                let (wname, wkind) = match owner {
                    Some(o) if o.kind.as_deref() != Some("Node") => {
                        (o.name.clone(), o.kind.clone().unwrap_or_else(|| "Pod".to_owned()))
                    }
                    _ => (raw.metadata.name.clone(), "Pod".to_owned()),
                };
                let pod_name = raw.metadata.name.clone();
                let w = workload_from(&origin, &ns_name, wname, wkind, &raw.metadata, &raw.metadata, &raw.spec)?;
                merge(&mut workloads, w, &pod_name);
            }
            k if WORKLOAD_KINDS.contains(&k) => {
                let raw: RawWorkloadObject = decode(obj.value, &origin)?;
                let template = if k == "CronJob" {
                    raw.spec.job_template.and_then(|j| j.spec.template)
                } else {
                    raw.spec.template
                };
                let template = template.unwrap_or_default();
                let w = workload_from(
                    &origin,
                    &ns_name,
                    raw.metadata.name.clone(),
                    k.to_owned(),
                    &template.metadata,
                    &raw.metadata,
                    &template.spec,
                )?;
                let pod_name = format!("{}/{} (template)", k, raw.metadata.name);
                merge(&mut workloads, w, &pod_name);
            }
            "Service" if obj.value.pointer("/metadata/annotations/keyway.io~1overlay-ips").is_some() => {
                let raw: RawService = decode(obj.value, &origin)?;
                let ips = raw.metadata.annotations.as_ref().and_then(|a| a.get(OVERLAY_IPS_ANNOTATION));
                if let Some(list) = ips {
                    let mut overlay_ips = Vec::new();
                    for part in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                        overlay_ips.push(part.parse::<IpAddr>().map_err(|_| {
                            origin.invalid(
                                format!("metadata.annotations.{OVERLAY_IPS_ANNOTATION}"),
                                format!("{part:?} is not an IP address"),
                            )
                        })?);
                    }
                    services.push(Service {
                        namespace: ns_name.clone(),
                        name: raw.metadata.name,
                        overlay_ips,
                        selector: raw.spec.selector.unwrap_or_default(),
                        file: obj.file,
                    });
                }
            }
            "NetworkPolicy" => {
                let np = policy::netpol::parse(obj.value, &origin, &ns_name, &mut warnings)?;
                policies.add_network(np, &origin)?;
            }
            "AdminNetworkPolicy" => {
                let anp = policy::admin::parse_admin(obj.value, &origin, &mut warnings)?;
                policies.add_admin(anp, &origin)?;
            }
            "BaselineAdminNetworkPolicy" => {
                let banp = policy::admin::parse_baseline(obj.value, &origin, &mut warnings)?;
                policies.set_baseline(banp, &origin)?;
            }
            _ => {}
        }
    }

    // Namespaces used by workloads (or policies) but never declared exist with their name label.
    let used: Vec<String> = workloads
        .values()
        .map(|w| w.namespace.clone())
        .chain(policies.network.iter().map(|p| p.namespace.clone()))
        .collect();
    for ns in used {
        namespaces.entry(ns.clone()).or_insert_with(|| {
            let labels = Labels::from([(NAMESPACE_NAME_LABEL.to_owned(), ns.clone())]);
            (Namespace { name: ns, labels }, String::new())
        });
    }

    let mut workloads: Vec<Workload> = workloads.into_values().collect();
    workloads.sort_by_cached_key(Workload::display_name);
    let inventory =
        Inventory { namespaces: namespaces.into_iter().map(|(k, (n, _))| (k, n)).collect(), workloads, services };
    Ok(Manifests { inventory, policies, warnings })
}

/// Merges a workload into the map: pods of one owner become one workload; differing labels are
/// remembered as variants.
fn merge(map: &mut BTreeMap<(String, String, String), Workload>, w: Workload, pod_name: &str) {
    let key = (w.namespace.clone(), w.name.clone(), w.kind.clone());
    match map.get_mut(&key) {
        None => {
            map.insert(key, w);
        }
        Some(existing) => {
            for ip in w.overlay_ips {
                if !existing.overlay_ips.contains(&ip) {
                    existing.overlay_ips.push(ip);
                }
            }
            for ip in w.sidecar_ips {
                if !existing.sidecar_ips.contains(&ip) {
                    existing.sidecar_ips.push(ip);
                }
            }
            if existing.zone.is_none() {
                existing.zone = w.zone;
            }
            if w.labels != existing.labels {
                existing.label_variants.push((pod_name.to_owned(), w.labels));
            }
        }
    }
}

fn workload_from(
    origin: &Origin,
    namespace: &str,
    name: String,
    kind: String,
    pod_meta: &RawMeta,
    object_meta: &RawMeta,
    spec: &RawPodSpec,
) -> Result<Workload, LoadError> {
    let mut ports = Vec::new();
    for (ci, c) in spec.containers.iter().flatten().enumerate() {
        for (pi, p) in c.ports.iter().flatten().enumerate() {
            let field = format!("spec.containers[{ci}].ports[{pi}]");
            // A port without a number (a misspelt `containerPort`) does not exist, as upstream.
            let Some(number) = p.container_port else { continue };
            let port = u16::try_from(number).ok().filter(|n| *n >= 1).ok_or_else(|| {
                origin.invalid(format!("{field}.containerPort"), format!("{number} is not a port (1-65535)"))
            })?;
            let protocol = match p.protocol.as_deref() {
                None | Some("") => Protocol::Tcp,
                Some(s) => Protocol::parse(s).ok_or_else(|| {
                    origin.invalid(
                        format!("{field}.protocol"),
                        format!("unknown protocol {s:?}; expected TCP, UDP or SCTP"),
                    )
                })?,
            };
            ports.push(ContainerPort { name: p.name.clone().filter(|n| !n.is_empty()), port, protocol });
        }
    }
    let annotation = |key: &str| {
        pod_meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .or_else(|| object_meta.annotations.as_ref().and_then(|a| a.get(key)))
            .cloned()
    };
    let ip_list = |key: &str| -> Result<Vec<IpAddr>, LoadError> {
        let mut out = Vec::new();
        if let Some(list) = annotation(key) {
            for part in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let ip: IpAddr = part.parse().map_err(|_| {
                    origin.invalid(
                        format!("metadata.annotations.{key}"),
                        format!(
                            "{part:?} is not an IP address; expected a comma-separated list such as 10.10.1.5,fd00::5"
                        ),
                    )
                })?;
                out.push(ip);
            }
        }
        Ok(out)
    };
    let overlay_ips = ip_list(OVERLAY_IPS_ANNOTATION)?;
    let sidecar_ips = ip_list(SIDECAR_IPS_ANNOTATION)?;
    let service_account = spec
        .service_account_name
        .clone()
        .or_else(|| spec.service_account.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_owned());
    Ok(Workload {
        namespace: namespace.to_owned(),
        name,
        kind,
        labels: pod_meta.labels.clone().unwrap_or_default(),
        ports,
        service_account,
        zone: annotation(ZONE_ANNOTATION),
        overlay_ips,
        sidecar_ips,
        file: origin.file.clone(),
        label_variants: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, text: &str) -> SourceFile {
        SourceFile { path: path.to_owned(), text: text.to_owned() }
    }

    #[test]
    fn lists_inherit_kind_and_defaults_apply() {
        let text = r#"
apiVersion: v1
kind: NamespaceList
items:
- metadata: {name: shop, labels: {team: a}}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata:
    name: web-1
    labels: {app: web}
    ownerReferences: [{kind: ReplicaSet, name: web-abc, controller: true}]
  spec:
    containers: [{ports: [{name: http, containerPort: 8080}, {containerport: 9}]}]
- apiVersion: v1
  kind: Pod
  metadata: {name: etcd, namespace: kube-system, ownerReferences: [{kind: Node, name: n1, controller: true}]}
---
"#;
        let m = load(&[file("a.yaml", text)]).unwrap();
        assert_eq!(m.inventory.namespaces["shop"].labels["kubernetes.io/metadata.name"], "shop");
        assert_eq!(m.inventory.namespaces["shop"].labels["team"], "a");
        assert!(m.inventory.namespaces.contains_key("default"));
        assert!(m.inventory.namespaces.contains_key("kube-system"));
        let names: Vec<String> = m.inventory.workloads.iter().map(Workload::display_name).collect();
        assert_eq!(names, ["default/web-abc[ReplicaSet]", "kube-system/etcd[Pod]"]);
        let web = &m.inventory.workloads[0];
        assert_eq!(web.ports.len(), 1, "the misspelt containerport is dropped");
        assert_eq!(web.named_port("http").map(|p| (p.port, p.protocol)), Some((8080, Protocol::Tcp)));
    }

    #[test]
    fn workload_kinds_and_keyway_annotations() {
        let text = r#"{"apiVersion":"batch/v1","kind":"CronJob","metadata":{"name":"report","namespace":"ops"},
          "spec":{"jobTemplate":{"spec":{"template":{"metadata":{"labels":{"app":"report"},
          "annotations":{"keyway.io/zone":"zone-b","keyway.io/overlay-ips":"10.20.0.7, fd00::7"}},
          "spec":{"serviceAccountName":"reporter","containers":[{"ports":[{"containerPort":53,"protocol":"UDP"}]}]}}}}}}"#;
        let m = load(&[file("cj.json", text)]).unwrap();
        let w = &m.inventory.workloads[0];
        assert_eq!(w.display_name(), "ops/report[CronJob]");
        assert_eq!(w.zone.as_deref(), Some("zone-b"));
        assert_eq!(w.overlay_ips.len(), 2);
        assert_eq!(w.identity("cluster.local"), "spiffe://cluster.local/ns/ops/sa/reporter");
        assert_eq!(w.ports[0].protocol, Protocol::Udp);
    }

    #[test]
    fn bad_inputs_name_file_document_and_field() {
        let cases = [
            ("x.yaml", "kind: [\n", "x.yaml: document 1: not valid YAML"),
            ("x.json", "{", "x.json: document 1: not valid JSON"),
            ("x.yaml", "- 1\n- 2\n", "x.yaml: document 1: expected a Kubernetes object"),
            ("x.yaml", "apiVersion: v1\nmetadata: {name: a}\n", "`kind` is missing"),
            (
                "x.yaml",
                "kind: Pod\nmetadata: {name: p}\nspec: {containers: [{ports: [{containerPort: 70000}]}]}\n",
                "x.yaml: Pod default/p: spec.containers[0].ports[0].containerPort: 70000 is not a port",
            ),
            (
                "x.yaml",
                "kind: Pod\nmetadata: {name: p, labels: {app: [1]}}\n",
                "x.yaml: Pod default/p: metadata.labels.app: invalid type",
            ),
            (
                "x.yaml",
                "kind: Namespace\nmetadata: {name: a}\n---\nkind: Namespace\nmetadata: {name: a}\n",
                "x.yaml: Namespace a: defined twice",
            ),
            (
                "x.yaml",
                "kind: Pod\nmetadata: {name: p, annotations: {keyway.io/overlay-ips: 'nope'}}\n",
                "metadata.annotations.keyway.io/overlay-ips: \"nope\" is not an IP address",
            ),
        ];
        for (path, text, want) in cases {
            let err = load(&[file(path, text)]).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}\n got: {err}\nwant: {want}");
        }
    }
}
