//! Checks of keyway's Kubernetes and Istio manifests (`istio/`, `samples/`): rendering with
//! kustomize (`kubectl kustomize`, offline), strict validation of every object against the real
//! schemas in `testdata/schemas/` (Istio CRDs' structural OpenAPI schemas, Kubernetes v1.34 JSON
//! schemas), and errors that name the file, the object and the field.
//!
//! What the schemas cannot say is said here too: the CRDs' CEL rules
//! (`x-kubernetes-validations`) are not evaluated, and kinds without a schema in `testdata/schemas/`
//! (AdminNetworkPolicy, BaselineAdminNetworkPolicy) are reported as [`Outcome::NoSchema`] so that
//! a test can list them explicitly instead of passing them silently.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use jsonschema::error::ValidationErrorKind;
use jsonschema::{Draft, Retrieve, Uri, Validator};
use serde_json::{Map, Value, json};

pub mod render;

/// The `$id` of the Kubernetes schemas' shared definitions.
pub const K8S_DEFINITIONS_URI: &str = "https://kubernetes.io/api/_definitions.json";
/// ObjectMeta in the shared definitions (used for the metadata of custom resources too).
const OBJECT_META_REF: &str =
    "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta";

/// Why a check could not run (not: an object is invalid; that is [`Outcome::Invalid`]).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// A file could not be read.
    #[error("{path}: cannot read: {reason}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// A file is not YAML or JSON.
    #[error("{path}: document {document}: not YAML: {reason}")]
    Syntax {
        /// The file.
        path: String,
        /// 1-based document number.
        document: usize,
        /// Why.
        reason: String,
    },
    /// A schema file is broken or a schema does not compile.
    #[error("schema {path}: {reason}")]
    Schema {
        /// The schema file.
        path: String,
        /// Why.
        reason: String,
    },
    /// kustomize failed.
    #[error("kustomize {dir}: {reason}")]
    Render {
        /// The kustomization directory.
        dir: String,
        /// Its error output.
        reason: String,
    },
}

/// One Kubernetes object and where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Object {
    /// The file (or rendered kustomization) it came from, as it should appear in messages.
    pub file: String,
    /// The object.
    pub value: Value,
}

impl Object {
    /// `apiVersion`.
    pub fn api_version(&self) -> &str {
        self.value.get("apiVersion").and_then(Value::as_str).unwrap_or_default()
    }

    /// `kind`.
    pub fn kind(&self) -> &str {
        self.value.get("kind").and_then(Value::as_str).unwrap_or_default()
    }

    /// `metadata.name`.
    pub fn name(&self) -> &str {
        self.value.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("(unnamed)")
    }

    /// `metadata.namespace`, if any.
    pub fn namespace(&self) -> Option<&str> {
        self.value.pointer("/metadata/namespace").and_then(Value::as_str)
    }

    /// `Kind namespace/name` (or `Kind name`), as messages name an object.
    pub fn describe(&self) -> String {
        match self.namespace() {
            Some(ns) => format!("{} {ns}/{}", self.kind(), self.name()),
            None => format!("{} {}", self.kind(), self.name()),
        }
    }

    /// Whether this is a Kubernetes object at all (has `apiVersion` and `kind`).
    pub fn is_kubernetes_object(&self) -> bool {
        !self.api_version().is_empty() && !self.kind().is_empty()
    }
}

/// Splits YAML text (several documents) into objects, flattening `List`/`*List` items. Empty
/// documents are dropped.
pub fn parse_yaml(file: &str, text: &str) -> Result<Vec<Object>, CheckError> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value: Value = serde::Deserialize::deserialize(doc).map_err(|e| CheckError::Syntax {
            path: file.to_owned(),
            document: i + 1,
            reason: e.to_string(),
        })?;
        flatten(file, value, &mut out);
    }
    Ok(out)
}

fn flatten(file: &str, value: Value, out: &mut Vec<Object>) {
    if value.is_null() {
        return;
    }
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or_default().to_owned();
    if kind.ends_with("List")
        && let Some(items) = value.get("items").and_then(Value::as_array)
    {
        for item in items.clone() {
            flatten(file, item, out);
        }
        return;
    }
    out.push(Object { file: file.to_owned(), value });
}

/// Reads and parses one YAML file.
pub fn load_file(path: &Path, shown_as: &str) -> Result<Vec<Object>, CheckError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CheckError::Read { path: shown_as.to_owned(), reason: e.to_string() })?;
    parse_yaml(shown_as, &text)
}

/// What validation said about one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Valid against its schema (named).
    Valid {
        /// The schema used.
        schema: String,
    },
    /// Invalid: one line per error, `file: Kind ns/name: field: message`.
    Invalid(Vec<String>),
    /// No schema for this kind in `testdata/schemas/`.
    NoSchema,
}

/// The schemas of `testdata/schemas/`, compiled on first use.
#[derive(Debug)]
pub struct Schemas {
    k8s_dir: PathBuf,
    definitions: Arc<Value>,
    /// (group, version, kind) → the CRD version's openAPIV3Schema, converted to JSON Schema.
    crds: BTreeMap<(String, String, String), Value>,
    compiled: BTreeMap<String, Arc<Validator>>,
}

struct DefinitionsRetriever(Arc<Value>);

impl Retrieve for DefinitionsRetriever {
    fn retrieve(&self, uri: &Uri<String>) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        if uri.as_str().trim_end_matches('#') == K8S_DEFINITIONS_URI {
            Ok((*self.0).clone())
        } else {
            Err(format!("no network access: {} is not among the local schemas", uri.as_str()).into())
        }
    }
}

fn read_json(path: &Path) -> Result<Value, CheckError> {
    let shown = path.display().to_string();
    let text =
        std::fs::read_to_string(path).map_err(|e| CheckError::Read { path: shown.clone(), reason: e.to_string() })?;
    serde_json::from_str(&text).map_err(|e| CheckError::Schema { path: shown, reason: e.to_string() })
}

impl Schemas {
    /// Loads `dir` (the `testdata/schemas` directory): `istio-crds.yaml` and
    /// `k8s/v1.34.0-local-strict/`.
    pub fn load(dir: &Path) -> Result<Schemas, CheckError> {
        let k8s_dir = dir.join("k8s").join("v1.34.0-local-strict");
        let definitions = Arc::new(read_json(&k8s_dir.join("_definitions.json"))?);
        let crd_path = dir.join("istio-crds.yaml");
        let mut crds = BTreeMap::new();
        for crd in load_file(&crd_path, &crd_path.display().to_string())? {
            let spec = &crd.value["spec"];
            let group = spec["group"].as_str().unwrap_or_default().to_owned();
            let kind = spec["names"]["kind"].as_str().unwrap_or_default().to_owned();
            for v in spec["versions"].as_array().into_iter().flatten() {
                let version = v["name"].as_str().unwrap_or_default().to_owned();
                let Some(schema) = v.pointer("/schema/openAPIV3Schema") else { continue };
                crds.insert((group.clone(), version, kind.clone()), crd_schema(schema));
            }
        }
        Ok(Schemas { k8s_dir, definitions, crds, compiled: BTreeMap::new() })
    }

    /// The kinds (`group/version Kind`) of the Istio CRDs.
    pub fn crd_kinds(&self) -> Vec<String> {
        self.crds.keys().map(|(g, v, k)| format!("{g}/{v} {k}")).collect()
    }

    fn validator(
        &mut self,
        key: &str,
        schema: impl FnOnce() -> Result<Value, CheckError>,
    ) -> Result<Arc<Validator>, CheckError> {
        if let Some(v) = self.compiled.get(key) {
            return Ok(v.clone());
        }
        let schema = schema()?;
        let v = jsonschema::options()
            .with_draft(Draft::Draft202012)
            .with_retriever(DefinitionsRetriever(self.definitions.clone()))
            .build(&schema)
            .map_err(|e| CheckError::Schema { path: key.to_owned(), reason: e.to_string() })?;
        let v = Arc::new(v);
        self.compiled.insert(key.to_owned(), v.clone());
        Ok(v)
    }

    /// Validates one object against the schema of its kind.
    pub fn validate(&mut self, obj: &Object) -> Result<Outcome, CheckError> {
        let (group, version) = match obj.api_version().split_once('/') {
            Some((g, v)) => (g.to_owned(), v.to_owned()),
            None => (String::new(), obj.api_version().to_owned()),
        };
        let kind = obj.kind().to_owned();
        let crd_key = (group.clone(), version.clone(), kind.clone());
        let (key, validator) = if let Some(schema) = self.crds.get(&crd_key).cloned() {
            let key = format!("istio-crds.yaml {group}/{version} {kind}");
            let v = self.validator(&key, || Ok(schema))?;
            (key, v)
        } else {
            let prefix = group.split('.').next().unwrap_or_default();
            let file = if prefix.is_empty() {
                format!("{}-{version}.json", kind.to_lowercase())
            } else {
                format!("{}-{prefix}-{version}.json", kind.to_lowercase())
            };
            let path = self.k8s_dir.join(&file);
            // The file name drops the group after its first dot: make sure the schema is the group's.
            if !path.is_file() {
                return Ok(Outcome::NoSchema);
            }
            let schema = read_json(&path)?;
            if !schema_matches_group(&schema, &group, &version, &kind) {
                return Ok(Outcome::NoSchema);
            }
            let key = format!("k8s/v1.34.0-local-strict/{file}");
            let v = self.validator(&key, || Ok(schema))?;
            (key, v)
        };
        let errors: Vec<String> = validator.iter_errors(&obj.value).map(|e| message(obj, &e)).collect();
        Ok(if errors.is_empty() { Outcome::Valid { schema: key } } else { Outcome::Invalid(errors) })
    }
}

/// The Kubernetes schema files carry `x-kubernetes-group-version-kind` on their `apiVersion`
/// enum or at the top; where they do, the object's group must be among them.
fn schema_matches_group(schema: &Value, group: &str, version: &str, kind: &str) -> bool {
    let Some(gvks) = schema.get("x-kubernetes-group-version-kind").and_then(Value::as_array) else {
        return true;
    };
    gvks.iter().any(|g| {
        g["group"].as_str() == Some(group) && g["version"].as_str() == Some(version) && g["kind"].as_str() == Some(kind)
    })
}

/// `file: Kind ns/name: field: message`.
fn message(obj: &Object, e: &jsonschema::ValidationError<'_>) -> String {
    let mut field = field_path(e.instance_path().as_str());
    if let ValidationErrorKind::AdditionalProperties { unexpected } = e.kind() {
        let names = unexpected.join(", ");
        field = if field == "(object)" { names } else { format!("{field}.{names}") };
        return format!("{}: {}: {field}: unknown field (not in the schema)", obj.file, obj.describe());
    }
    format!("{}: {}: {field}: {e}", obj.file, obj.describe())
}

/// A JSON pointer as a field path: `/spec/containers/0/name` → `spec.containers[0].name`.
pub fn field_path(pointer: &str) -> String {
    let mut out = String::new();
    for seg in pointer.split('/').skip(1) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&seg);
        }
    }
    if out.is_empty() { "(object)".to_owned() } else { out }
}

/// A CRD version's structural OpenAPI v3.0 schema as a strict JSON Schema (2020-12):
/// `nullable` adds `null`, `x-kubernetes-int-or-string` becomes integer-or-string,
/// `x-kubernetes-preserve-unknown-fields` accepts anything below it, every other object refuses
/// unknown fields (the API server would prune them silently: a typo). `format` (OpenAPI's
/// `int32`, `byte`, …) and the CEL rules (`x-kubernetes-validations`) are dropped: not evaluated.
/// `metadata` is checked as Kubernetes ObjectMeta.
pub fn crd_schema(openapi: &Value) -> Value {
    let mut root = convert(openapi);
    if let Some(props) = root.get_mut("properties").and_then(Value::as_object_mut) {
        props.insert("metadata".to_owned(), json!({ "$ref": OBJECT_META_REF }));
        props.insert("apiVersion".to_owned(), json!({ "type": "string" }));
        props.insert("kind".to_owned(), json!({ "type": "string" }));
    }
    if let Some(m) = root.as_object_mut() {
        m.insert("$schema".to_owned(), json!("https://json-schema.org/draft/2020-12/schema"));
        m.insert("required".to_owned(), json!(["apiVersion", "kind", "metadata", "spec"]));
    }
    root
}

fn convert(schema: &Value) -> Value {
    let Value::Object(m) = schema else { return schema.clone() };
    let flag = |k: &str| m.get(k).and_then(Value::as_bool).unwrap_or(false);
    let preserve = flag("x-kubernetes-preserve-unknown-fields");
    let int_or_string = flag("x-kubernetes-int-or-string");
    let nullable = flag("nullable");
    let mut out = Map::new();
    for (k, v) in m {
        match k.as_str() {
            "properties" => {
                let props = v
                    .as_object()
                    .map(|p| p.iter().map(|(n, s)| (n.clone(), convert(s))).collect::<Map<_, _>>())
                    .unwrap_or_default();
                out.insert(k.clone(), Value::Object(props));
            }
            "items" | "not" => {
                out.insert(k.clone(), convert(v));
            }
            "additionalProperties" => {
                out.insert(k.clone(), if v.is_object() { convert(v) } else { v.clone() });
            }
            "allOf" | "anyOf" | "oneOf" => {
                let list = v.as_array().map(|a| a.iter().map(convert).collect()).unwrap_or_default();
                out.insert(k.clone(), Value::Array(list));
            }
            "enum" => {
                let mut list = v.as_array().cloned().unwrap_or_default();
                if nullable && !list.contains(&Value::Null) {
                    list.push(Value::Null);
                }
                out.insert(k.clone(), Value::Array(list));
            }
            "type" | "nullable" | "format" => {}
            _ if k.starts_with("x-kubernetes-") => {}
            _ => {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    let ty = m.get("type").and_then(Value::as_str);
    if int_or_string {
        let mut alts = vec![json!({"type": "integer"}), json!({"type": "string"})];
        if nullable {
            alts.push(json!({"type": "null"}));
        }
        out.insert("anyOf".to_owned(), Value::Array(alts));
    } else if let Some(t) = ty {
        out.insert("type".to_owned(), if nullable { json!([t, "null"]) } else { json!(t) });
    }
    if ty == Some("object") && !preserve && !out.contains_key("additionalProperties") {
        out.insert("additionalProperties".to_owned(), json!(false));
    }
    Value::Object(out)
}

/// The YAML files under `dir`, recursively, sorted.
pub fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Runs a command and returns its standard output, or its error output as the reason.
fn run(cmd: &mut Command, what: &str) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("cannot run {what}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{what} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
