//! Reading a directory of manifests (the only I/O in this crate, behind the `fs` feature).

use std::path::Path;

use crate::error::LoadError;
use crate::manifest::{self, SourceFile};

/// Reads every `*.yaml`, `*.yml` and `*.json` file under `dir`, recursively, sorted by path.
pub fn read_dir(dir: &Path) -> Result<Vec<SourceFile>, LoadError> {
    let meta = std::fs::metadata(dir)
        .map_err(|e| LoadError::NotADirectory { path: dir.display().to_string(), reason: e.to_string() })?;
    if !meta.is_dir() {
        return Err(LoadError::NotADirectory {
            path: dir.display().to_string(),
            reason: "it is a file; give the directory that holds the manifests".to_owned(),
        });
    }
    let mut paths = Vec::new();
    walk(dir, &mut paths)?;
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p)
                .map_err(|e| LoadError::Read { path: p.display().to_string(), reason: e.to_string() })?;
            Ok(SourceFile { path: p.display().to_string(), text })
        })
        .collect()
}

fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) -> Result<(), LoadError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| LoadError::Read { path: dir.display().to_string(), reason: e.to_string() })?;
    for entry in entries {
        let entry = entry.map_err(|e| LoadError::Read { path: dir.display().to_string(), reason: e.to_string() })?;
        let path = entry.path();
        if path.is_dir() {
            walk(&path, out)?;
        } else if path.extension().and_then(|e| e.to_str()).is_some_and(|e| matches!(e, "yaml" | "yml" | "json")) {
            out.push(path);
        }
    }
    Ok(())
}

/// Loads and compiles a directory of manifests. JSON and YAML files that are not Kubernetes
/// manifests are skipped with a warning ([`manifest::kubernetes_documents`]).
pub fn load_dir(dir: &Path) -> Result<(crate::Engine, Vec<crate::Warning>), LoadError> {
    let files = read_dir(dir)?;
    let (documents, mut warnings) = manifest::kubernetes_documents(&files)?;
    let m = manifest::load_objects(documents)?;
    let engine = crate::Engine::compile(m.inventory, m.policies)?;
    warnings.extend(m.warnings);
    warnings.extend(engine.warnings().iter().cloned());
    Ok((engine, warnings))
}
