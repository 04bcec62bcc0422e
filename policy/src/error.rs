//! Errors and warnings of loading and compiling manifests.
//!
//! Every error names where the input is wrong: the file, the object (`Kind namespace/name`) and
//! the field path (`spec.ingress[0].from[1].ipBlock.cidr`), then what was expected.

use std::fmt;

/// Where an object came from: its file and the object's kind and name.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Origin {
    /// The file path, as given to the loader.
    pub file: String,
    /// `Kind namespace/name` (or `Kind name` for cluster-scoped objects); empty for a whole file.
    pub object: String,
}

impl Origin {
    /// An origin for `kind` `ns/name` in `file`.
    pub fn object(file: &str, kind: &str, namespace: Option<&str>, name: &str) -> Origin {
        let object = match namespace {
            Some(ns) => format!("{kind} {ns}/{name}"),
            None => format!("{kind} {name}"),
        };
        Origin { file: file.to_owned(), object }
    }

    /// The error for `field` of this object.
    pub fn invalid(&self, field: impl Into<String>, reason: impl Into<String>) -> LoadError {
        LoadError::Invalid {
            file: self.file.clone(),
            object: self.object.clone(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// A warning about `field` of this object.
    pub fn warning(&self, field: impl Into<String>, message: impl Into<String>) -> Warning {
        Warning { file: self.file.clone(), object: self.object.clone(), field: field.into(), message: message.into() }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.object.is_empty() { f.write_str(&self.file) } else { write!(f, "{}: {}", self.file, self.object) }
    }
}

/// Input that keyway, Kubernetes or the reference analyzer refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    /// A file could not be read.
    #[error("{path}: cannot read: {reason}")]
    Read {
        /// The path.
        path: String,
        /// What the operating system said.
        reason: String,
    },
    /// The input directory does not exist or is not a directory.
    #[error("{path}: not a directory of manifests: {reason}")]
    NotADirectory {
        /// The path.
        path: String,
        /// Why.
        reason: String,
    },
    /// A file that is not YAML or JSON.
    #[error("{file}: document {document}: not valid {format}: {reason}")]
    Syntax {
        /// The file.
        file: String,
        /// The 1-based document number within the file.
        document: usize,
        /// `YAML` or `JSON`.
        format: &'static str,
        /// The parser's message, with line and column.
        reason: String,
    },
    /// A document that is not a Kubernetes object (no `kind`, not a mapping, bad metadata).
    #[error("{file}: document {document}: {reason}")]
    NotAnObject {
        /// The file.
        file: String,
        /// The 1-based document number within the file.
        document: usize,
        /// What was expected.
        reason: String,
    },
    /// A field of an object has a value Kubernetes or keyway refuses.
    #[error("{file}: {object}: {field}: {reason}")]
    Invalid {
        /// The file.
        file: String,
        /// `Kind namespace/name`.
        object: String,
        /// The field path, e.g. `spec.ingress[0].ports[1].endPort`.
        field: String,
        /// What was expected.
        reason: String,
    },
    /// Two objects with one identity.
    #[error("{file}: {object}: defined twice (also in {other_file}); names must be unique {scope}")]
    Duplicate {
        /// The file of the second definition.
        file: String,
        /// `Kind namespace/name`.
        object: String,
        /// The file of the first definition.
        other_file: String,
        /// `in a namespace`, `in the cluster`.
        scope: &'static str,
    },
    /// Pods of one workload differ in labels that a policy selector tells apart.
    #[error(
        "{workload}: its pods have different labels ({pod_a} and {pod_b}) and {policy} selects only some \
         of them; keyway treats the pods of one workload alike, so give them the same labels or split \
         the workload"
    )]
    WorkloadLabelsDiffer {
        /// `ns/name[Kind]`.
        workload: String,
        /// One pod.
        pod_a: String,
        /// Another pod.
        pod_b: String,
        /// The policy (`Kind ns/name` in `file`).
        policy: String,
    },
}

/// Something that loads but is probably not what the author meant (an unresolved named port, an
/// IPv6 network that the connectivity list ignores, a `nodes` peer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    /// The file.
    pub file: String,
    /// `Kind namespace/name`.
    pub object: String,
    /// The field path.
    pub field: String,
    /// What happens because of it.
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "warning: {}: ", self.file)?;
        for part in [&self.object, &self.field] {
            if !part.is_empty() {
                write!(f, "{part}: ")?;
            }
        }
        f.write_str(&self.message)
    }
}
