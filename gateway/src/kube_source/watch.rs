//! Watching the cluster: one kube-rs watcher per kind, each feeding a store of the objects as the
//! API server last described them. A relist (at start, after a `410 Gone`, after any watch
//! failure) replaces a kind's store whole when it completes, so objects deleted while the watch
//! was down disappear. AdminNetworkPolicy, BaselineAdminNetworkPolicy and Istio's WorkloadEntry
//! (devices, `networking.istio.io/v1`) are optional: a `404` on
//! their list means the CRD is not installed (logged once) and counts as an empty, synced kind;
//! the watcher keeps trying with its backoff, so installing the CRD later is picked up.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use tokio::sync::watch;

/// A kind of object the Kubernetes source watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// `v1` Namespace.
    Namespace,
    /// `v1` Pod.
    Pod,
    /// `networking.k8s.io/v1` NetworkPolicy.
    NetworkPolicy,
    /// `policy.networking.k8s.io/v1alpha1` AdminNetworkPolicy (a CRD, optional).
    AdminNetworkPolicy,
    /// `policy.networking.k8s.io/v1alpha1` BaselineAdminNetworkPolicy (a CRD, optional).
    BaselineAdminNetworkPolicy,
    /// `networking.istio.io/v1` WorkloadEntry: a device outside the clusters (Istio's CRD,
    /// optional: absent where Istio is not installed).
    WorkloadEntry,
}

impl Kind {
    /// Every kind, in the order objects are handed to the loader.
    pub const ALL: [Kind; 6] = [
        Kind::Namespace,
        Kind::Pod,
        Kind::WorkloadEntry,
        Kind::NetworkPolicy,
        Kind::AdminNetworkPolicy,
        Kind::BaselineAdminNetworkPolicy,
    ];

    /// `(group, version, kind, plural)`.
    fn gvkp(self) -> (&'static str, &'static str, &'static str, &'static str) {
        match self {
            Kind::Namespace => ("", "v1", "Namespace", "namespaces"),
            Kind::Pod => ("", "v1", "Pod", "pods"),
            Kind::NetworkPolicy => ("networking.k8s.io", "v1", "NetworkPolicy", "networkpolicies"),
            Kind::AdminNetworkPolicy => {
                ("policy.networking.k8s.io", "v1alpha1", "AdminNetworkPolicy", "adminnetworkpolicies")
            }
            Kind::BaselineAdminNetworkPolicy => {
                ("policy.networking.k8s.io", "v1alpha1", "BaselineAdminNetworkPolicy", "baselineadminnetworkpolicies")
            }
            Kind::WorkloadEntry => ("networking.istio.io", "v1", "WorkloadEntry", "workloadentries"),
        }
    }

    /// The API resource (for the dynamic API).
    pub fn api_resource(self) -> ApiResource {
        let (group, version, kind, plural) = self.gvkp();
        let api_version = if group.is_empty() { version.to_owned() } else { format!("{group}/{version}") };
        ApiResource {
            group: group.to_owned(),
            version: version.to_owned(),
            api_version,
            kind: kind.to_owned(),
            plural: plural.to_owned(),
        }
    }

    /// The kind's name (`Pod`).
    pub fn name(self) -> &'static str {
        self.gvkp().2
    }

    /// The plural resource name (`pods`), used in source names such as `kubernetes:pods/ns/name`.
    pub fn plural(self) -> &'static str {
        self.gvkp().3
    }

    /// Whether the kind is a CRD that may be missing from the cluster.
    pub fn optional(self) -> bool {
        matches!(self, Kind::AdminNetworkPolicy | Kind::BaselineAdminNetworkPolicy | Kind::WorkloadEntry)
    }

    /// Whether objects of the kind live in a namespace.
    pub fn namespaced(self) -> bool {
        matches!(self, Kind::Pod | Kind::NetworkPolicy | Kind::WorkloadEntry)
    }
}

/// The objects of one kind.
#[derive(Debug, Default)]
struct Store {
    /// By `namespace/name` (or `name`).
    objects: BTreeMap<String, DynamicObject>,
    /// A relist in progress: replaces `objects` when it completes.
    relist: Option<BTreeMap<String, DynamicObject>>,
    /// A complete list has been seen (or the optional kind is not installed).
    synced: bool,
    /// The optional kind's CRD is missing (and that was logged).
    absent: bool,
}

/// The stores of every kind, shared between the watcher tasks and the builder.
#[derive(Debug, Default)]
pub struct Stores {
    kinds: Mutex<BTreeMap<Kind, Store>>,
}

/// A copy of every object, by kind, taken when every kind is synced.
pub type Snapshot = Vec<(Kind, Vec<DynamicObject>)>;

fn key(obj: &DynamicObject) -> String {
    let name = obj.metadata.name.clone().unwrap_or_default();
    match &obj.metadata.namespace {
        Some(ns) if !ns.is_empty() => format!("{ns}/{name}"),
        _ => name,
    }
}

impl Stores {
    fn with<R>(&self, kind: Kind, f: impl FnOnce(&mut Store) -> R) -> R {
        let mut g = match self.kinds.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(g.entry(kind).or_default())
    }

    /// Whether every kind has been listed completely (or is not installed).
    pub fn synced(&self) -> bool {
        Kind::ALL.iter().all(|k| self.with(*k, |s| s.synced))
    }

    /// The kinds not yet listed completely.
    pub fn unsynced(&self) -> Vec<Kind> {
        Kind::ALL.into_iter().filter(|k| !self.with(*k, |s| s.synced)).collect()
    }

    /// Every object, by kind, or `None` while some kind is not synced.
    pub fn snapshot(&self) -> Option<Snapshot> {
        let g = match self.kinds.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut out = Vec::new();
        for kind in Kind::ALL {
            let store = g.get(&kind)?;
            if !store.synced {
                return None;
            }
            out.push((kind, store.objects.values().cloned().collect()));
        }
        Some(out)
    }

    /// Applies one watcher event; returns whether the visible objects changed.
    fn apply(&self, kind: Kind, event: Event<DynamicObject>) -> bool {
        self.with(kind, |s| match event {
            Event::Init => {
                s.relist = Some(BTreeMap::new());
                false
            }
            Event::InitApply(obj) => {
                s.relist.get_or_insert_with(BTreeMap::new).insert(key(&obj), strip(obj));
                false
            }
            Event::InitDone => {
                s.objects = s.relist.take().unwrap_or_default();
                s.synced = true;
                if s.absent {
                    tracing::info!(kind = kind.name(), "the CRD is installed now; watching it");
                    s.absent = false;
                }
                true
            }
            Event::Apply(obj) => {
                s.objects.insert(key(&obj), strip(obj));
                true
            }
            Event::Delete(obj) => s.objects.remove(&key(&obj)).is_some(),
        })
    }

    /// Records that the optional kind's list answered 404; returns whether that changed anything.
    fn not_installed(&self, kind: Kind) -> bool {
        self.with(kind, |s| {
            let changed = !s.synced || !s.objects.is_empty();
            if !s.absent {
                tracing::info!(
                    kind = kind.name(),
                    "the cluster does not serve this kind (its CRD is not installed): treated as none; \
                     checked again with the watcher's backoff"
                );
                s.absent = true;
            }
            s.relist = None;
            s.objects.clear();
            s.synced = true;
            changed
        })
    }
}

/// Drops what keyway never reads and that changes often (managed fields), to keep the stores
/// small.
fn strip(mut obj: DynamicObject) -> DynamicObject {
    obj.metadata.managed_fields = None;
    obj
}

/// Whether a watcher error is the API server saying it does not serve the resource.
fn is_not_found(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code == 404,
        _ => false,
    }
}

/// Starts one watcher task per kind. Every visible change bumps `changes`. The tasks run until
/// the runtime stops or `changes` has no receiver left.
pub fn spawn(
    client: kube::Client,
    stores: Arc<Stores>,
    changes: watch::Sender<u64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    Kind::ALL
        .into_iter()
        .map(|kind| {
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &kind.api_resource());
            let stores = stores.clone();
            let changes = changes.clone();
            tokio::spawn(async move {
                let mut stream = watcher::watcher(api, watcher::Config::default()).default_backoff().boxed();
                while let Some(item) = stream.next().await {
                    let changed = match item {
                        Ok(event) => stores.apply(kind, event),
                        Err(e) if kind.optional() && is_not_found(&e) => stores.not_installed(kind),
                        Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                            tracing::info!(kind = kind.name(), "watch expired (410 Gone): listing again");
                            false
                        }
                        Err(e) => {
                            tracing::warn!(kind = kind.name(), error = %e, "watch failed; retrying with backoff");
                            false
                        }
                    };
                    if changed {
                        if changes.is_closed() {
                            break;
                        }
                        changes.send_modify(|g| *g = g.wrapping_add(1));
                    }
                }
            })
        })
        .collect()
}
