//! The one loader for Kubernetes manifests: YAML (multi-document) and JSON text, or objects
//! already parsed (the gateway's Kubernetes source); `*List` flattening with inherited kind; then
//! the kinds that count, decoded leniently by the private `k8s` module, into an inventory and a
//! policy set, with defaults, owners and workload peers. The conformance harness, `keyway policy`
//! and the gateway all load through here.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{LoadError, Origin, Warning};
use crate::inventory::{Inventory, NAMESPACE_NAME_LABEL, Namespace, Workload};
use crate::k8s;
use crate::policy::PolicySet;
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

/// One parsed document: a Kubernetes object or a `List` of them, with where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Object {
    /// Its source, as it should appear in messages: a file path, or a name such as
    /// `kubernetes:pods/shop/cart-1`.
    pub source: String,
    /// Its 1-based document number within the source (1 for a JSON file or a single object).
    pub document: usize,
    /// The parsed document.
    pub value: Value,
}

impl Object {
    /// The only document of `source`.
    pub fn new(source: impl Into<String>, value: Value) -> Object {
        Object { source: source.into(), document: 1, value }
    }

    /// Whether the document looks like a Kubernetes object or list: a mapping with `apiVersion` or
    /// `kind`. Other JSON and YAML (an analysis output saved next to the manifests, say) does not.
    pub fn is_kubernetes(&self) -> bool {
        self.value.as_object().is_some_and(|m| m.contains_key("apiVersion") || m.contains_key("kind"))
    }
}

/// Parses a file into its documents: the value of a `.json` file, the documents of YAML (empty
/// documents left out).
pub fn documents(file: &SourceFile) -> Result<Vec<Object>, LoadError> {
    let syntax = |document: usize, format: &'static str, reason: String| LoadError::Syntax {
        file: file.path.clone(),
        document,
        format,
        reason,
    };
    let values = if file.path.ends_with(".json") {
        vec![serde_json::from_str::<Value>(&file.text).map_err(|e| syntax(1, "JSON", e.to_string()))?]
    } else {
        let mut docs = Vec::new();
        for (i, d) in serde_yaml_ng::Deserializer::from_str(&file.text).enumerate() {
            docs.push(Value::deserialize(d).map_err(|e| syntax(i + 1, "YAML", e.to_string()))?);
        }
        docs
    };
    Ok(values
        .into_iter()
        .enumerate()
        .filter(|(_, v)| !v.is_null())
        .map(|(i, value)| Object { source: file.path.clone(), document: i + 1, value })
        .collect())
}

/// The documents of manifest files, leaving out each file none of whose documents is a Kubernetes
/// object or list (JSON or YAML that is something else: an analysis output saved next to the
/// manifests, say), with a warning naming it; upstream's analyzer skips such files too. A file
/// that is not valid JSON or YAML is still an error, and so is a file that mixes Kubernetes objects
/// with other documents.
pub fn kubernetes_documents(files: &[SourceFile]) -> Result<(Vec<Object>, Vec<Warning>), LoadError> {
    let mut out = Vec::new();
    let mut warnings = Vec::new();
    for f in files {
        let docs = documents(f)?;
        if !docs.is_empty() && !docs.iter().any(Object::is_kubernetes) {
            warnings.push(Warning {
                file: f.path.clone(),
                object: String::new(),
                field: String::new(),
                message: "skipped: not a Kubernetes manifest (no document has apiVersion or kind)".to_owned(),
            });
            continue;
        }
        out.extend(docs);
    }
    Ok((out, warnings))
}

/// The Kubernetes objects of parsed documents: the items of every `List`/`*List`, which inherit
/// the list's kind (without `List`) and apiVersion, in place of the list. A document that is not
/// a Kubernetes object (not a mapping, no `kind`) is an error naming its source and document.
pub fn objects(documents: Vec<Object>) -> Result<Vec<Object>, LoadError> {
    let mut out = Vec::new();
    for d in documents {
        flatten(&d.source, d.document, d.value, &mut out)?;
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
    out.push(Object { source: file.to_owned(), document, value: Value::Object(map) });
    Ok(())
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

/// Loads manifest files into an inventory and a policy set.
pub fn load(files: &[SourceFile]) -> Result<Manifests, LoadError> {
    let mut docs = Vec::new();
    for f in files {
        docs.extend(documents(f)?);
    }
    load_objects(docs)
}

/// Loads already-parsed objects (or `List`s of them) into an inventory and a policy set: what
/// [`load`] does after parsing text. Errors name each object's source.
pub fn load_objects(input: Vec<Object>) -> Result<Manifests, LoadError> {
    let mut warnings = Vec::new();
    let mut namespaces: BTreeMap<String, (Namespace, String)> = BTreeMap::new();
    let mut workloads: BTreeMap<(String, String, String), Workload> = BTreeMap::new();
    let mut policies = PolicySet::default();
    let mut services = Vec::new();

    for obj in objects(input)? {
        let kind = obj.value.get("kind").and_then(Value::as_str).unwrap_or_default().to_owned();
        let (name, ns) = ident(&obj.value);
        let namespaced = kind != "Namespace" && kind != "AdminNetworkPolicy" && kind != "BaselineAdminNetworkPolicy";
        let ns_name = namespace_or_default(ns.as_deref());
        let origin = Origin::object(&obj.source, &kind, if namespaced { Some(ns_name.as_str()) } else { None }, &name);
        match kind.as_str() {
            "Namespace" => {
                let n = k8s::workload::namespace(obj.value, &origin)?;
                if let Some((_, other)) = namespaces.get(&n.name) {
                    return Err(LoadError::Duplicate {
                        file: obj.source,
                        object: origin.object,
                        other_file: other.clone(),
                        scope: "in the cluster",
                    });
                }
                namespaces.insert(n.name.clone(), (n, obj.source));
            }
            "Pod" => {
                if let Some((w, pod_name)) = k8s::workload::pod(obj.value, &origin, &ns_name)? {
                    merge(&mut workloads, w, &pod_name);
                }
            }
            k8s::device::KIND => {
                let w = k8s::device::workload_entry(obj.value, &origin, &ns_name)?;
                let key = (w.namespace.clone(), w.name.clone(), w.kind.clone());
                if let Some(other) = workloads.get(&key) {
                    return Err(LoadError::Duplicate {
                        file: obj.source,
                        object: origin.object,
                        other_file: other.file.clone(),
                        scope: "in a namespace",
                    });
                }
                workloads.insert(key, w);
            }
            k if k8s::workload::WORKLOAD_KINDS.contains(&k) => {
                let (w, template_name) = k8s::workload::workload(k, obj.value, &origin, &ns_name)?;
                merge(&mut workloads, w, &template_name);
            }
            "Service" => services.extend(k8s::workload::service(obj.value, &origin, &ns_name)?),
            "NetworkPolicy" => {
                let np = k8s::netpol::parse(obj.value, &origin, &ns_name, &mut warnings)?;
                policies.add_network(np, &origin)?;
            }
            "AdminNetworkPolicy" => {
                let anp = k8s::admin::parse_admin(obj.value, &origin, &mut warnings)?;
                policies.add_admin(anp, &origin)?;
            }
            "BaselineAdminNetworkPolicy" => {
                let banp = k8s::admin::parse_baseline(obj.value, &origin, &mut warnings)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ports::Protocol;

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

    #[test]
    fn parsed_objects_load_as_their_text_does() {
        let text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\n\
                    apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: cart, namespace: shop}\n\
                    spec: {template: {metadata: {labels: {app: cart}}}}\n";
        let from_text = load(&[file("a.yaml", text)]).unwrap();
        let values = documents(&file("a.yaml", text)).unwrap();
        assert_eq!(values.iter().map(|o| o.document).collect::<Vec<_>>(), [1, 2]);
        let from_objects = load_objects(values).unwrap();
        assert_eq!(from_objects.inventory, from_text.inventory);
        assert_eq!(from_objects.inventory.workloads[0].display_name(), "shop/cart[Deployment]");

        // An object from the API, named by its source; a list's items inherit its kind.
        let list = serde_json::json!({"apiVersion": "v1", "kind": "PodList",
            "items": [{"metadata": {"name": "p", "namespace": "shop", "labels": {"app": [1]}}}]});
        let err = load_objects(vec![Object::new("kubernetes:pods/shop", list)]).unwrap_err().to_string();
        assert_eq!(
            err,
            "kubernetes:pods/shop: Pod shop/p: metadata.labels.app: invalid type: sequence, expected a string"
        );
        let err = load_objects(vec![Object::new("api", serde_json::json!([1]))]).unwrap_err().to_string();
        assert!(err.starts_with("api: document 1: expected a Kubernetes object"), "{err}");
    }

    #[test]
    fn what_counts_as_a_kubernetes_document() {
        let is_k8s = |v: Value| Object::new("f", v).is_kubernetes();
        assert!(is_k8s(serde_json::json!({"apiVersion": "v1", "kind": "Pod"})));
        assert!(is_k8s(serde_json::json!({"kind": "Pod"})));
        assert!(is_k8s(serde_json::json!({"apiVersion": "v1", "metadata": {}})));
        assert!(!is_k8s(serde_json::json!([{"src": "a", "dst": "b", "conn": "All Connections"}])));
        assert!(!is_k8s(serde_json::json!({"src": "a"})));
        assert!(!is_k8s(serde_json::json!("text")));
    }

    #[test]
    fn files_that_are_not_manifests_are_skipped_with_a_warning() {
        let connlist = r#"[{"src":"a/b[Pod]","dst":"c/d[Pod]","conn":"All Connections"}]"#;
        let files = [
            file("ns.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n"),
            file("connlist_output.json", connlist),
            file("notes.yaml", "summary: three workloads\nchecked: true\n---\n- a\n"),
            file("empty.yaml", "---\n"),
        ];
        let (docs, warnings) = kubernetes_documents(&files).unwrap();
        assert_eq!(docs.iter().map(|d| d.source.as_str()).collect::<Vec<_>>(), ["ns.yaml"]);
        let shown: Vec<String> = warnings.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "warning: connlist_output.json: skipped: not a Kubernetes manifest (no document has apiVersion or kind)",
                "warning: notes.yaml: skipped: not a Kubernetes manifest (no document has apiVersion or kind)",
            ]
        );

        // Still errors: text that is not JSON or YAML, a Kubernetes object that is malformed, and a
        // file that mixes objects with something else.
        let bad = [
            ("x.json", "{", "x.json: document 1: not valid JSON"),
            (
                "np.yaml",
                "kind: NetworkPolicy\nmetadata: {name: p}\nspec: {podSelector: 3}\n",
                "np.yaml: NetworkPolicy default/p: spec.podSelector: invalid type",
            ),
            (
                "mixed.yaml",
                "kind: Namespace\nmetadata: {name: a}\n---\nsummary: x\n",
                "mixed.yaml: document 2: expected a Kubernetes object: `kind` is missing",
            ),
        ];
        for (path, text, want) in bad {
            let err = kubernetes_documents(&[file(path, text)])
                .and_then(|(docs, _)| load_objects(docs))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(want), "{path}\n got: {err}\nwant: {want}");
        }
    }
}
