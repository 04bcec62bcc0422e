//! The Kubernetes source (`keyway gateway --source kubernetes`, cargo feature `kubernetes`): the
//! inventory and policies from the cluster's Namespaces, Pods, NetworkPolicies and, when their
//! CRDs are installed, AdminNetworkPolicies and the BaselineAdminNetworkPolicy, merged with the
//! static inventory directory (the other zones' workloads, which this cluster cannot see).
//!
//! * [`watch`]: one kube-rs watcher per kind into in-memory stores; relists replace a store whole.
//! * [`objects`]: cluster objects to loader inputs (zone, sidecar and overlay addresses filled
//!   in), the static directory split into objects, the merge rule (the cluster wins).
//! * [`addresses`]: overlay addresses for pods without `keyway.io/overlay-ips`, stable per pod and
//!   recorded in a ConfigMap.
//!
//! Every build feeds all objects, parsed once, to [`keyway_policy::manifest::load_objects`], the one loader, and
//! compiles the result. An object that does not load on its own is reported (its source name,
//! the field and the reason, once per `resourceVersion`) and left out; the rest applies. So is an
//! object that makes the whole set fail (an address another workload holds, a pod splitting its
//! workload). A set that still does not load or compile is rejected
//! (`keyway_gateway_reloads_total{what="kubernetes",outcome="rejected"}`) and the running engine
//! stays. A new engine is installed with [`State::install`]: open flows are not touched.
//! [`KubeSource`] is one of the two [`InventorySource`]s (the other is the file source).

pub mod addresses;
pub mod objects;
pub mod watch;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use keyway_policy::ip::Cidr;
use keyway_policy::manifest::Object;
use keyway_policy::{Engine, LoadError, Warning};
use tokio::sync::watch as tokio_watch;

use crate::config::{Config, Kubernetes};
use crate::metrics::Metrics;
use crate::source::{InventorySource, Sink};
use crate::state::State;

use self::addresses::{RecordError, RecordStore};
use self::objects::{LocalObject, StaticObject};
use self::watch::{Kind, Stores};

/// How long after a failed build (record unreachable, say) it is tried again without a change.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// Why the Kubernetes source cannot start or a build was rejected.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// `--source kubernetes` needs the `kubernetes` section.
    #[error(
        "the configuration has no `kubernetes` section; `--source kubernetes` needs at least \
         `kubernetes: {{prefix: <this zone's overlay prefix>}}`"
    )]
    NoSection,
    /// The prefix does not parse (the configuration's validation normally catches it).
    #[error("kubernetes.prefix: {0}")]
    Prefix(String),
    /// No client for the API server.
    #[error("cannot reach the Kubernetes API server: {0}")]
    Client(#[source] kube::Error),
    /// No in-cluster or kubeconfig configuration.
    #[error("no Kubernetes client configuration (in-cluster service account or kubeconfig): {0}")]
    ClientConfig(#[source] kube::config::InferConfigError),
    /// The first complete list of every kind did not arrive in time.
    #[error(
        "no complete list of {kinds} within {timeout_ms} ms (API server unreachable, or RBAC: see \
         istio/base/rbac.yaml)"
    )]
    SyncTimeout {
        /// The kinds still missing.
        kinds: String,
        /// The configured timeout.
        timeout_ms: u64,
    },
    /// A build was asked for before every kind was listed.
    #[error("not every kind has been listed yet (missing: {0})")]
    NotSynced(String),
    /// The static inventory directory does not load.
    #[error("static inventory: {0}")]
    Static(#[source] LoadError),
    /// The merged set does not load or compile.
    #[error("{0}")]
    Load(#[source] LoadError),
    /// The address record could not be read or written.
    #[error("{0}")]
    Record(#[source] RecordError),
}

/// A built engine and what went into it.
#[derive(Debug)]
pub struct Built {
    /// The compiled engine.
    pub engine: Engine,
    /// Cluster objects used.
    pub local: usize,
    /// Cluster objects left out as malformed.
    pub skipped: usize,
    /// Static objects used.
    pub from_static: usize,
    /// Pods of this zone left without an overlay address (the prefix is full).
    pub unaddressed: usize,
    /// The loader's and compiler's warnings.
    pub warnings: Vec<Warning>,
    /// Cluster objects refused on their own (their source and why), the rest applied.
    pub refused: Vec<(String, String)>,
}

use crate::state::Fingerprint;

/// The Kubernetes source: watchers running, ready to build engines.
#[derive(Debug)]
pub struct KubeSource {
    config: Arc<Config>,
    settings: Kubernetes,
    prefix: Cidr,
    stores: Arc<Stores>,
    changes: tokio_watch::Receiver<u64>,
    record: RecordStore,
    watchers: Vec<tokio::task::JoinHandle<()>>,
    /// `source@resourceVersion` of malformed objects already reported.
    reported: BTreeSet<String>,
    statics: Option<(Fingerprint, Vec<StaticObject>)>,
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for w in &self.watchers {
            w.abort();
        }
    }
}

impl KubeSource {
    /// Starts the watchers. Must run inside a tokio runtime.
    pub fn start(client: kube::Client, config: Arc<Config>) -> Result<KubeSource, SourceError> {
        let settings = config.kubernetes.clone().ok_or(SourceError::NoSection)?;
        let prefix = settings.prefix_cidr().map_err(SourceError::Prefix)?;
        let stores = Arc::new(Stores::default());
        let (tx, changes) = tokio_watch::channel(0u64);
        let watchers = watch::spawn(client.clone(), stores.clone(), tx);
        let record = RecordStore::new(client, &settings.namespace, &settings.record);
        Ok(KubeSource {
            config,
            settings,
            prefix,
            stores,
            changes,
            record,
            watchers,
            reported: BTreeSet::new(),
            statics: None,
        })
    }

    /// Waits until every kind has been listed completely (an optional kind may be absent).
    pub async fn wait_synced(&mut self, timeout: Duration) -> Result<(), SourceError> {
        let stores = self.stores.clone();
        let waited = tokio::time::timeout(timeout, async {
            while !stores.synced() {
                if self.changes.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        if waited.is_err() || !self.stores.synced() {
            let kinds: Vec<&str> = self.stores.unsynced().into_iter().map(Kind::name).collect();
            return Err(SourceError::SyncTimeout { kinds: kinds.join(", "), timeout_ms: timeout.as_millis() as u64 });
        }
        Ok(())
    }

    /// The static objects, read again when the directory changed.
    fn statics(&mut self) -> Result<Vec<StaticObject>, SourceError> {
        let dir = &self.config.inventory;
        let print = crate::state::fingerprint(&crate::state::manifest_paths(dir));
        if let Some((p, objs)) = &self.statics
            && *p == print
        {
            return Ok(objs.clone());
        }
        let files = keyway_policy::fs::read_dir(dir).map_err(SourceError::Static)?;
        let objs = objects::static_objects(&files, &self.config.zone).map_err(SourceError::Static)?;
        self.statics = Some((print, objs.clone()));
        Ok(objs)
    }

    /// Whether the static directory changed since it was last read.
    fn statics_changed(&self) -> bool {
        let print = crate::state::fingerprint(&crate::state::manifest_paths(&self.config.inventory));
        self.statics.as_ref().is_none_or(|(p, _)| *p != print)
    }

    /// Builds an engine from the objects now in the stores and the static directory, allocating
    /// and recording overlay addresses first.
    pub async fn build(&mut self) -> Result<Built, SourceError> {
        let snapshot = self.stores.snapshot().ok_or_else(|| {
            SourceError::NotSynced(self.stores.unsynced().into_iter().map(Kind::name).collect::<Vec<_>>().join(", "))
        })?;
        let statics = self.statics()?;

        // Each cluster object on its own: the malformed are reported and left out.
        let mut checked: Vec<(LocalObject, Vec<IpAddr>)> = Vec::new();
        let mut skipped = 0;
        let mut reported = BTreeSet::new();
        for obj in objects::local_objects(snapshot, &self.config.zone) {
            match objects::check(&obj.object()) {
                Ok(m) => {
                    let claims = objects::claimed(&m).collect();
                    checked.push((obj, claims));
                }
                Err(e) => {
                    skipped += 1;
                    let tag = format!("{}@{}", obj.source, obj.resource_version);
                    if !self.reported.contains(&tag) {
                        tracing::error!(
                            object = %obj.source, resource_version = %obj.resource_version, error = %e,
                            "malformed object left out of the inventory; the rest applies"
                        );
                    }
                    reported.insert(tag);
                }
            }
        }

        let local_idents: BTreeSet<objects::Ident> = checked.iter().map(|(o, _)| o.ident.clone()).collect();
        let (kept, dropped) = objects::merge_static(&statics, &local_idents);
        for (why, n) in dropped {
            tracing::debug!(count = n, reason = why, "static objects dropped in favour of the cluster");
        }
        let mut taken: BTreeSet<IpAddr> = kept.iter().flat_map(|s| s.claimed.iter().copied()).collect();

        // Overlay addresses claimed by annotations must not take one that is held already: the
        // recorded address of a pod keyway addresses, the static inventory's, or an older claim.
        // A claim that would is refused on its own; the rest applies.
        let record = self.record.read().await.map_err(SourceError::Record)?;
        let wanting: BTreeSet<&String> = checked.iter().filter_map(|(o, _)| o.wants_address.as_ref()).collect();
        let held: BTreeSet<IpAddr> =
            record.entries.iter().filter(|(k, _)| wanting.contains(k)).map(|(_, ip)| *ip).collect();
        checked.sort_by(|(a, _), (b, _)| (a.created(), &a.source).cmp(&(b.created(), &b.source)));
        let mut local: Vec<LocalObject> = Vec::new();
        let mut refused = Vec::new();
        for (obj, claims) in checked {
            if let Some(ip) = claims.iter().find(|ip| taken.contains(ip) || held.contains(ip)) {
                let why = format!("claims overlay address {ip}, which another workload holds");
                let tag = format!("{}@{}#conflict", obj.source, obj.resource_version);
                if !self.reported.contains(&tag) {
                    tracing::error!(object = %obj.source, address = %ip, "{why}; left out of the inventory, the rest applies");
                }
                reported.insert(tag);
                refused.push((obj.source.clone(), why));
                continue;
            }
            taken.extend(claims);
            local.push(obj);
        }
        self.reported = reported;

        let wanted: BTreeSet<String> = local.iter().filter_map(|o| o.wants_address.clone()).collect();
        let allocation = self.record.allocate(&self.prefix, &wanted, &taken).await.map_err(SourceError::Record)?;
        if !allocation.exhausted.is_empty() {
            tracing::error!(
                prefix = %self.settings.prefix, pods = allocation.exhausted.len(), first = %allocation.exhausted[0],
                "the overlay prefix is full: these pods get no overlay address"
            );
        }
        for obj in &mut local {
            if let Some(ip) = obj.wants_address.as_ref().and_then(|k| allocation.addresses.get(k)) {
                obj.set_overlay_ip(*ip);
            }
        }

        // The set as a whole: an error that one cluster object causes (it contradicts another, or
        // splits its workload) leaves that object out, and the rest is tried again.
        let (engine, mut warnings) = loop {
            let mut all: Vec<Object> = local.iter().map(LocalObject::object).collect();
            all.extend(kept.iter().map(|s| s.object.clone()));
            let built = keyway_policy::manifest::load_objects(all)
                .and_then(|m| Engine::compile(m.inventory, m.policies).map(|e| (e, m.warnings)));
            match built {
                Ok(done) => break done,
                Err(e) => {
                    let Some(i) = culprit(&e, &local) else { return Err(SourceError::Load(e)) };
                    let obj = local.remove(i);
                    tracing::error!(object = %obj.source, error = %e, "object left out of the inventory; the rest applies");
                    refused.push((obj.source, e.to_string()));
                }
            }
        };
        refused.sort();
        warnings.extend(engine.warnings().iter().cloned());
        Ok(Built {
            engine,
            local: local.len(),
            skipped,
            from_static: kept.len(),
            unaddressed: allocation.exhausted.len(),
            warnings,
            refused,
        })
    }

    /// Builds and, when the set loads and compiles, installs the engine; counts the outcome.
    /// Returns whether it was installed.
    pub async fn apply(&mut self, state: &State, metrics: &Metrics) -> bool {
        match self.build().await {
            Ok(built) => {
                for w in &built.warnings {
                    tracing::warn!(warning = %w, "inventory");
                }
                metrics.kubernetes_refused.set(built.refused.len() as i64);
                tracing::info!(
                    objects = built.local,
                    skipped = built.skipped,
                    from_static = built.from_static,
                    unaddressed = built.unaddressed,
                    workloads = built.engine.inventory().workloads.len(),
                    "inventory and policies from the cluster installed"
                );
                state.install(built.engine);
                metrics.reloads.with_label_values(&["kubernetes", "ok"]).inc();
                true
            }
            Err(e) => {
                metrics.reloads.with_label_values(&["kubernetes", "rejected"]).inc();
                tracing::error!(error = %e, "new inventory from the cluster rejected; the running set stays in force");
                false
            }
        }
    }

    /// Rebuilds after every change in the cluster (after `debounce_ms` of quiet), in the static
    /// directory (checked every `reload_interval_ms`) and on every reload request; retries a
    /// failed build after a few seconds. Runs until the watchers stop or the gateway stops.
    async fn keep_current(mut self, mut sink: Sink) {
        let debounce = Duration::from_millis(self.settings.debounce_ms);
        let mut statics_tick = tokio::time::interval(Duration::from_millis(self.config.reload_interval_ms.max(1)));
        statics_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.changes.borrow_and_update();
        sink.reload.borrow_and_update();
        let mut reloads_open = true;
        let mut retry: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                r = self.changes.changed() => {
                    if r.is_err() {
                        tracing::error!("every Kubernetes watcher stopped; the inventory is no longer updated");
                        return;
                    }
                    // Quiet time: let a burst of events (a rollout) settle into one build.
                    tokio::time::sleep(debounce).await;
                    self.changes.borrow_and_update();
                }
                _ = statics_tick.tick() => {
                    if !self.statics_changed() {
                        continue;
                    }
                    tracing::info!(path = %self.config.inventory.display(), "static inventory changed");
                }
                r = sink.reload.changed(), if reloads_open => {
                    reloads_open = r.is_ok();
                    if !reloads_open {
                        continue;
                    }
                    tracing::info!("reload requested: rebuilding from the cluster and the static directory");
                }
                _ = async { match retry { Some(at) => tokio::time::sleep_until(at).await, None => std::future::pending().await } } => {}
            }
            if !self.stores.synced() {
                continue;
            }
            retry = if self.apply(&sink.state, &sink.metrics).await {
                None
            } else {
                Some(tokio::time::Instant::now() + RETRY_AFTER)
            };
        }
    }

    /// Connects with the in-cluster service account (or the kubeconfig) and starts the watchers.
    pub async fn connect(config: &Config) -> anyhow::Result<KubeSource> {
        let kube_config = kube::Config::infer().await.map_err(SourceError::ClientConfig)?;
        let client = kube::Client::try_from(kube_config).map_err(SourceError::Client)?;
        Ok(KubeSource::start(client, Arc::new(config.clone()))?)
    }
}

impl InventorySource for KubeSource {
    /// Waits for the first complete list (at most `kubernetes.sync_timeout_ms`, before any
    /// listener opens) and builds the first engine.
    async fn first(&mut self) -> anyhow::Result<Engine> {
        self.wait_synced(Duration::from_millis(self.settings.sync_timeout_ms)).await?;
        let first = self.build().await?;
        tracing::info!(
            objects = first.local,
            skipped = first.skipped,
            from_static = first.from_static,
            "first inventory from the cluster built"
        );
        Ok(first.engine)
    }

    async fn run(self, sink: Sink) {
        self.keep_current(sink).await;
    }
}

/// The cluster object (index in `local`) a whole-set error is about, if it is one: the object an
/// `Invalid`/`Duplicate`/`NotAnObject` error names, or the pod that splits its workload.
fn culprit(e: &LoadError, local: &[LocalObject]) -> Option<usize> {
    let source = match e {
        LoadError::Invalid { file, .. } | LoadError::Duplicate { file, .. } | LoadError::NotAnObject { file, .. } => {
            file.clone()
        }
        LoadError::WorkloadLabelsDiffer { workload, pod_b, .. } => {
            let (namespace, _) = workload.split_once('/')?;
            format!("kubernetes:pods/{namespace}/{pod_b}")
        }
        _ => return None,
    };
    local.iter().position(|o| o.source == source)
}

/// Starts a gateway fed by the cluster (see [`KubeSource`]).
pub async fn start_gateway(config: Config) -> anyhow::Result<crate::app::Handle> {
    let source = KubeSource::connect(&config).await?;
    crate::app::build_from(config, source, crate::clock::system()).await
}

#[cfg(test)]
mod fake_api;
#[cfg(test)]
mod tests;
