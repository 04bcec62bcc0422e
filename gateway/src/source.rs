//! Where the inventory and the policies come from. A gateway is built with one
//! [`InventorySource`]: the [`FileSource`] (a manifest directory, reloaded when it changes) or,
//! with the `kubernetes` feature, the cluster (`crate::kube_source::KubeSource`). The source
//! gives the first engine before any listener opens, then installs every new engine in the
//! [`State`] until the gateway stops. A new set that does not load or compile is rejected whole
//! and the running engine stays.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use keyway_policy::Engine;
use tokio::sync::watch;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::state::{FileWatch, State, fingerprint, load_engine, manifest_paths};

/// What a running source is given: where to install engines, what to count, and the reload
/// requests (SIGHUP) as a counter that changes on every request.
#[derive(Debug, Clone)]
pub struct Sink {
    /// Where new engines go.
    pub state: Arc<State>,
    /// `keyway_gateway_reloads_total` and friends.
    pub metrics: Arc<Metrics>,
    /// Changes on every reload request.
    pub reload: watch::Receiver<u64>,
}

/// A source of inventory and policies.
pub trait InventorySource: Send + 'static {
    /// The first engine, before any listener opens; an error stops the gateway's start.
    fn first(&mut self) -> impl Future<Output = anyhow::Result<Engine>> + Send;

    /// Keeps the engine current until the gateway stops (the future is then dropped).
    fn run(self, sink: Sink) -> impl Future<Output = ()> + Send;
}

/// The manifest directory named by the configuration's `inventory`, checked every
/// `reload_interval_ms` and on request; a change is loaded once it has been seen unchanged for
/// one whole interval (a file caught mid-write could load as a valid, different policy set).
#[derive(Debug)]
pub struct FileSource {
    dir: PathBuf,
    interval: Duration,
    watch: FileWatch,
}

impl FileSource {
    /// The source for `config.inventory`.
    pub fn new(config: &Config) -> FileSource {
        FileSource {
            dir: config.inventory.clone(),
            interval: Duration::from_millis(config.reload_interval_ms.max(1)),
            watch: FileWatch::new(Vec::new()),
        }
    }

    /// Loads the directory now (blocking).
    pub fn load(&mut self) -> anyhow::Result<Engine> {
        self.watch.loaded(fingerprint(&manifest_paths(&self.dir)));
        Ok(load_engine(&self.dir)?)
    }

    async fn reload(&mut self, force: bool, sink: &Sink) {
        let dir = self.dir.clone();
        let Ok(print) = tokio::task::spawn_blocking(move || fingerprint(&manifest_paths(&dir))).await else { return };
        if !self.watch.due(print, force) {
            return;
        }
        let dir = self.dir.clone();
        match tokio::task::spawn_blocking(move || load_engine(&dir)).await {
            Ok(Ok(engine)) => {
                sink.state.install(engine);
                sink.metrics.reloads.with_label_values(&["inventory", "ok"]).inc();
                tracing::info!(path = %self.dir.display(), "inventory and policies reloaded");
            }
            Ok(Err(e)) => {
                sink.metrics.reloads.with_label_values(&["inventory", "rejected"]).inc();
                tracing::error!(error = %e, "new inventory or policies rejected; the running set stays in force");
            }
            Err(e) => tracing::error!(error = %e, "inventory reload task failed"),
        }
    }
}

impl InventorySource for FileSource {
    async fn first(&mut self) -> anyhow::Result<Engine> {
        self.load()
    }

    async fn run(mut self, mut sink: Sink) {
        sink.reload.borrow_and_update();
        loop {
            let force = tokio::select! {
                _ = tokio::time::sleep(self.interval) => false,
                r = sink.reload.changed() => {
                    if r.is_err() {
                        return; // the gateway's handle is gone: it is stopping
                    }
                    true
                }
            };
            self.reload(force, &sink).await;
        }
    }
}
