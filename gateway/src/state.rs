//! The gateway's changing state: the compiled policy engine and the epoch secrets, reloaded when
//! their files change (or on SIGHUP). A new set that fails to load or compile is rejected whole:
//! the running one stays, and a metric and an error log say why.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use keyway_policy::Engine;
use keyway_policy::auth::ReplayCache;

use crate::config::Config;
use crate::mesh::MeshTls;
use crate::metrics::Metrics;
use crate::secrets::EpochSecrets;

/// Paths with their sizes and modification times.
pub(crate) type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

/// When files that were loaded are due to be loaded again: they changed and the change has
/// settled (seen the same at two looks in a row, so a file caught mid-write is never loaded), or
/// a reload is forced. Every watcher of files (the inventory directory, the secrets, the mesh and
/// overlay certificates) decides with this.
#[derive(Debug)]
pub(crate) struct FileWatch {
    /// The fingerprint of what was last loaded.
    print: Mutex<Fingerprint>,
    /// A changed fingerprint seen once, waiting to be seen again (settled) before it is loaded.
    pending: Mutex<Option<Fingerprint>>,
}

impl FileWatch {
    /// A watch of files last loaded as `print`.
    pub(crate) fn new(print: Fingerprint) -> FileWatch {
        FileWatch { print: Mutex::new(print), pending: Mutex::new(None) }
    }

    /// Remembers `print` as what was last loaded.
    pub(crate) fn loaded(&self, print: Fingerprint) {
        match self.print.lock() {
            Ok(mut p) => *p = print,
            Err(poisoned) => *poisoned.into_inner() = print,
        }
    }

    /// Whether the files, now `print`, are to be loaded (`force`: yes); if so, `print` is what
    /// counts as loaded from here on.
    pub(crate) fn due(&self, print: Fingerprint, force: bool) -> bool {
        let changed = self.print.lock().map(|p| *p != print).unwrap_or(true);
        if !(force || (changed && self.settled(&print))) {
            return false;
        }
        self.loaded(print);
        true
    }

    /// Whether a changed fingerprint has settled: the same as at the previous look. Remembers it
    /// otherwise.
    fn settled(&self, print: &Fingerprint) -> bool {
        let Ok(mut p) = self.pending.lock() else { return true };
        if p.as_ref() == Some(print) {
            *p = None;
            true
        } else {
            *p = Some(print.clone());
            false
        }
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

/// A value loaded from files, replaced when they change and the change has settled.
#[derive(Debug)]
struct Watched<T> {
    paths: Vec<PathBuf>,
    value: RwLock<Arc<T>>,
    watch: FileWatch,
}

impl<T> Watched<T> {
    fn load<E>(paths: Vec<PathBuf>, load: impl FnOnce() -> Result<T, E>) -> Result<Watched<T>, E> {
        let watch = FileWatch::new(fingerprint(&paths));
        let value = load()?;
        Ok(Watched { paths, value: RwLock::new(Arc::new(value)), watch })
    }

    fn get(&self) -> Arc<T> {
        match self.value.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Loads the files again if they changed and settled (`force`: now): `None` when nothing
    /// was loaded, else whether the new value was installed (an error leaves the old one).
    fn reload<E>(&self, force: bool, load: impl FnOnce() -> Result<T, E>) -> Option<Result<(), E>> {
        if !self.watch.due(fingerprint(&self.paths), force) {
            return None;
        }
        Some(load().map(|v| match self.value.write() {
            Ok(mut g) => *g = Arc::new(v),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(v),
        }))
    }
}

/// Policy, inventory, secrets and the mesh certificate, swapped atomically on reload.
#[derive(Debug)]
pub struct State {
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    engine: RwLock<Arc<Engine>>,
    secrets: Watched<EpochSecrets>,
    mesh: Watched<MeshTls>,
    /// Nonces of tokens seen within the window.
    pub replay: Mutex<ReplayCache>,
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
    /// The mesh certificate.
    #[error("mesh: {0}")]
    Mesh(String),
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
        let secrets = Watched::load(vec![config.secrets.clone()], || EpochSecrets::load(&config.secrets))
            .map_err(|e| StateError::Secrets(e.to_string()))?;
        let m = &config.mesh;
        let mesh = Watched::load(vec![m.ca.clone(), m.cert.clone(), m.key.clone()], || MeshTls::load(m))
            .map_err(|e| StateError::Mesh(e.to_string()))?;
        let replay = ReplayCache::new(keyway_policy::auth::Kind::Token, config.limits.replay_cache, config.window_ms)
            .with_source_share(config.limits.replay_share());
        Ok(State { config, metrics, engine: RwLock::new(Arc::new(engine)), secrets, mesh, replay: Mutex::new(replay) })
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
        self.secrets.get()
    }

    /// The current mesh certificate (the sidecar legs' mutual TLS).
    pub fn mesh(&self) -> Arc<MeshTls> {
        self.mesh.get()
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

    /// Reloads the epoch secrets and the mesh certificate if their files changed and have
    /// settled (`force`: reload now). Returns whether new secrets were installed. A set that
    /// fails to load is rejected (metric, error log); the running one stays in force.
    pub fn reload_secrets(&self, force: bool) -> bool {
        let config = &self.config;
        let mut changed = false;
        match self.secrets.reload(force, || EpochSecrets::load(&config.secrets)) {
            None => {}
            Some(Ok(())) => {
                self.metrics.reloads.with_label_values(&["secrets", "ok"]).inc();
                tracing::info!("epoch secrets reloaded");
                changed = true;
            }
            Some(Err(e)) => {
                self.metrics.reloads.with_label_values(&["secrets", "rejected"]).inc();
                tracing::error!(error = %e, "new epoch secrets rejected; the running ones stay in force");
            }
        }
        match self.mesh.reload(force, || MeshTls::load(&config.mesh)) {
            None => {}
            Some(Ok(())) => {
                self.metrics.reloads.with_label_values(&["mesh", "ok"]).inc();
                tracing::info!(identity = %self.mesh().identity(), "mesh certificate reloaded");
            }
            Some(Err(e)) => {
                self.metrics.reloads.with_label_values(&["mesh", "rejected"]).inc();
                tracing::error!(error = %e, "new mesh certificate rejected; the running one stays in force");
            }
        }
        changed
    }
}
