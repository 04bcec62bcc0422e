//! Rendering kustomizations with `kubectl kustomize` (kustomize v5, offline).
//!
//! The zone overlays generate their Secrets from files an operator makes (`secrets/*.pem`,
//! `secrets/epochs.json`) and never commits. To render them here, the `istio/` tree is copied to
//! a scratch directory and each missing secret file is written with placeholder text; nothing in
//! the repository is touched.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::{CheckError, Object, parse_yaml, run};

/// The kubectl to use: `$KEYWAY_KUBECTL`, else what `scripts/install-kubectl.sh` prints (it
/// installs a pinned kubectl when the machine has none with kustomize v5).
pub fn kubectl(repo: &Path) -> Result<PathBuf, CheckError> {
    if let Ok(p) = std::env::var("KEYWAY_KUBECTL")
        && !p.is_empty()
    {
        return Ok(PathBuf::from(p));
    }
    let script = repo.join("scripts").join("install-kubectl.sh");
    let out = run(Command::new("bash").arg(&script).current_dir(repo), &script.display().to_string())
        .map_err(|reason| CheckError::Render { dir: "(kubectl)".to_owned(), reason })?;
    Ok(PathBuf::from(out.trim()))
}

/// Copies a directory tree.
pub fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let target = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_tree(&e.path(), &target)?;
        } else {
            std::fs::copy(e.path(), &target)?;
        }
    }
    Ok(())
}

/// The kustomization directories under `root` (those with a `kustomization.yaml`), with whether
/// each is a `Component` (rendered only through the kustomizations that use it).
pub fn kustomizations(root: &Path) -> Vec<(PathBuf, bool)> {
    let mut out: Vec<(PathBuf, bool)> = crate::yaml_files(root)
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "kustomization.yaml"))
        .filter_map(|p| {
            let text = std::fs::read_to_string(&p).ok()?;
            let component = text.lines().any(|l| l.trim() == "kind: Component");
            Some((p.parent()?.to_path_buf(), component))
        })
        .collect();
    out.sort();
    out
}

/// Writes placeholder content for every file a `secretGenerator` of `dir`'s kustomization names
/// that does not exist (`key=path` or `path`). Returns the files written.
pub fn placeholder_secrets(dir: &Path) -> Result<Vec<PathBuf>, CheckError> {
    let path = dir.join("kustomization.yaml");
    let shown = path.display().to_string();
    let text =
        std::fs::read_to_string(&path).map_err(|e| CheckError::Read { path: shown.clone(), reason: e.to_string() })?;
    let k: Value = serde_yaml_ng::from_str(&text).map_err(|e| CheckError::Syntax {
        path: shown,
        document: 1,
        reason: e.to_string(),
    })?;
    let mut written = Vec::new();
    for generator in k["secretGenerator"].as_array().into_iter().flatten() {
        for f in generator["files"].as_array().into_iter().flatten().filter_map(Value::as_str) {
            let rel = f.split_once('=').map_or(f, |(_, p)| p);
            let p = dir.join(rel);
            if !p.exists() {
                if let Some(parent) = p.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| CheckError::Read { path: parent.display().to_string(), reason: e.to_string() })?;
                }
                std::fs::write(&p, "placeholder written by keyway-istio-check\n")
                    .map_err(|e| CheckError::Read { path: p.display().to_string(), reason: e.to_string() })?;
                written.push(p);
            }
        }
    }
    Ok(written)
}

/// Renders one kustomization; the objects are named after `shown_as` (the repository path).
pub fn render(kubectl: &Path, dir: &Path, shown_as: &str) -> Result<Vec<Object>, CheckError> {
    let out = run(Command::new(kubectl).arg("kustomize").arg(dir), "kubectl kustomize")
        .map_err(|reason| CheckError::Render { dir: shown_as.to_owned(), reason })?;
    parse_yaml(&format!("{shown_as} (rendered)"), &out)
}
