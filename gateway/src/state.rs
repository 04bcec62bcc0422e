//! The gateway's changing state: the compiled policy engine and the epoch secrets, reloaded when
//! their files change (or on SIGHUP). A new set that fails to load or compile is rejected whole:
//! the running one stays, and a metric and an error log say why.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use keyway_policy::Engine;
use keyway_policy::auth::ReplayCache;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::secrets::EpochSecrets;

/// Paths with their sizes and modification times.
pub(crate) type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

/// Whether a changed fingerprint has settled: the same as at the previous look. Remembers it
/// otherwise.
pub(crate) fn settled(pending: &Mutex<Option<Fingerprint>>, print: &[(PathBuf, u64, Option<SystemTime>)]) -> bool {
    let Ok(mut p) = pending.lock() else { return true };
    if p.as_deref() == Some(print) {
        *p = None;
        true
    } else {
        *p = Some(print.to_vec());
        false
    }
}

/// A cheap fingerprint of files: paths, sizes and modification times.
pub(crate) fn fingerprint(paths: &[PathBuf]) -> Fingerprint {
    let mut out: Vec<_> = paths
        .iter()
        .map(|p| {
            let m = std::fs::metadata(p).ok();
            (p.clone(), m.as_ref().map_or(0, |m| m.len()), m.and_then(|m| m.modified().ok()))
        })
        .collect();
    out.sort();
    out
}

/// The inventory directory and everything under it (for [`fingerprint`]).
pub(crate) fn manifest_paths(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

/// Policy, inventory and secrets, swapped atomically on reload.
#[derive(Debug)]
pub struct State {
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    engine: RwLock<Arc<Engine>>,
    secrets: RwLock<Arc<EpochSecrets>>,
    /// Nonces of tokens seen within the window.
    pub replay: Mutex<ReplayCache>,
    /// A changed fingerprint seen once, waiting to be seen again (settled) before it is loaded.
    secrets_pending: Mutex<Option<Fingerprint>>,
    secrets_print: Mutex<Fingerprint>,
}

/// Why the initial state could not be built.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The inventory or policies.
    #[error("inventory {path}: {reason}")]
    Inventory {
        /// The directory.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The epoch secrets.
    #[error("secrets: {0}")]
    Secrets(String),
}

/// Loads and compiles the inventory directory, logging the loader's warnings.
pub fn load_engine(dir: &Path) -> Result<Engine, StateError> {
    let (engine, warnings) = keyway_policy::fs::load_dir(dir)
        .map_err(|e| StateError::Inventory { path: dir.display().to_string(), reason: e.to_string() })?;
    for w in warnings {
        tracing::warn!(warning = %w, "inventory");
    }
    Ok(engine)
}

impl State {
    /// The state of a gateway starting with `engine` (from its inventory source) and the secrets
    /// named by the configuration.
    pub fn load(config: Arc<Config>, metrics: Arc<Metrics>, engine: Engine) -> Result<State, StateError> {
        let secrets_print = fingerprint(std::slice::from_ref(&config.secrets));
        let secrets = EpochSecrets::load(&config.secrets).map_err(|e| StateError::Secrets(e.to_string()))?;
        let replay = ReplayCache::new(keyway_policy::auth::Kind::Token, config.limits.replay_cache, config.window_ms)
            .with_source_share(config.limits.replay_share());
        Ok(State {
            config,
            metrics,
            engine: RwLock::new(Arc::new(engine)),
            secrets: RwLock::new(Arc::new(secrets)),
            replay: Mutex::new(replay),
            secrets_pending: Mutex::new(None),
            secrets_print: Mutex::new(secrets_print),
        })
    }

    /// The current engine.
    pub fn engine(&self) -> Arc<Engine> {
        match self.engine.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The current epoch secrets.
    pub fn secrets(&self) -> Arc<EpochSecrets> {
        match self.secrets.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// Installs a compiled engine in place of the running one. Flows already decided keep
    /// going; new decisions use the new engine. Every inventory source installs through here.
    pub fn install(&self, engine: Engine) {
        let engine = Arc::new(engine);
        match self.engine.write() {
            Ok(mut g) => *g = engine,
            Err(poisoned) => *poisoned.into_inner() = engine,
        }
    }

    /// Reloads the epoch secrets if their file changed and has settled (`force`: reload now).
    /// Returns whether new secrets were installed.
    pub fn reload_secrets(&self, force: bool) -> bool {
        let mut changed = false;
        let print = fingerprint(std::slice::from_ref(&self.config.secrets));
        let secrets_changed = self.secrets_print.lock().map(|p| *p != print).unwrap_or(true);
        if force || (secrets_changed && settled(&self.secrets_pending, &print)) {
            if let Ok(mut p) = self.secrets_print.lock() {
                *p = print;
            }
            match EpochSecrets::load(&self.config.secrets) {
                Ok(s) => {
                    if let Ok(mut g) = self.secrets.write() {
                        *g = Arc::new(s);
                    }
                    self.metrics.reloads.with_label_values(&["secrets", "ok"]).inc();
                    tracing::info!("epoch secrets reloaded");
                    changed = true;
                }
                Err(e) => {
                    self.metrics.reloads.with_label_values(&["secrets", "rejected"]).inc();
                    tracing::error!(error = %e, "new epoch secrets rejected; the running ones stay in force");
                }
            }
        }
        changed
    }
}
