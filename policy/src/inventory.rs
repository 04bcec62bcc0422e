//! The inventory: namespaces and workloads (the peers policies talk about), with keyway's own
//! facts about them (zone, overlay addresses, service account).

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::ports::Protocol;
use crate::selector::Labels;

/// Annotation on a workload (or its pod template, or a pod) naming its zone.
pub const ZONE_ANNOTATION: &str = "keyway.io/zone";
/// Annotation listing a workload's overlay addresses, comma-separated (`10.10.1.5,fd00::5`).
pub const OVERLAY_IPS_ANNOTATION: &str = "keyway.io/overlay-ips";
/// Annotation listing the addresses a workload's sidecars use on the underlay (pod IPs),
/// comma-separated: where the gateway delivers to them, and the only addresses their tunnel
/// connections to the gateway and their key requests are accepted from.
pub const SIDECAR_IPS_ANNOTATION: &str = "keyway.io/sidecar-ips";
/// Namespace label that keyway sets from a namespace's `keyway.io/zone` annotation, so that a
/// policy can select peers by zone.
pub const ZONE_LABEL: &str = "keyway.io/zone";
/// The label every namespace carries with its own name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    /// Name.
    pub name: String,
    /// Labels, always including `kubernetes.io/metadata.name`.
    pub labels: Labels,
}

/// A named container port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerPort {
    /// The port name (`http`), if any.
    pub name: Option<String>,
    /// The number.
    pub port: u16,
    /// The protocol (default TCP).
    pub protocol: Protocol,
}

/// A workload: the pods of one owner, treated alike. It is the unit policies decide for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Namespace.
    pub namespace: String,
    /// Name: the owner's name, or the pod's when it has no controller.
    pub name: String,
    /// `Deployment`, `ReplicaSet`, `StatefulSet`, `DaemonSet`, `Job`, `CronJob`,
    /// `ReplicationController` or `Pod`.
    pub kind: String,
    /// Labels (of the first pod seen).
    pub labels: Labels,
    /// Container ports (init containers excluded).
    pub ports: Vec<ContainerPort>,
    /// The service account its pods run as (`default` when unset).
    pub service_account: String,
    /// The zone (`keyway.io/zone`), when known.
    pub zone: Option<String>,
    /// Overlay addresses (`keyway.io/overlay-ips`) of all its pods.
    pub overlay_ips: Vec<IpAddr>,
    /// Underlay addresses of its sidecars (`keyway.io/sidecar-ips`), if known.
    pub sidecar_ips: Vec<IpAddr>,
    /// The file it was defined in.
    pub file: String,
    /// Label sets of its pods that differ from `labels` (with the pod's name), kept so that
    /// compiling can refuse policies that tell them apart.
    pub label_variants: Vec<(String, Labels)>,
}

impl Workload {
    /// `namespace/name[Kind]`, as the connectivity list prints it.
    pub fn display_name(&self) -> String {
        format!("{}/{}[{}]", self.namespace, self.name, self.kind)
    }

    /// `namespace/name`.
    pub fn short_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The SPIFFE identity of its pods in `trust_domain`.
    pub fn identity(&self, trust_domain: &str) -> String {
        format!("spiffe://{trust_domain}/ns/{}/sa/{}", self.namespace, self.service_account)
    }

    /// Whether `id` is [`Workload::identity`] in `trust_domain`, without building it (the
    /// gateways ask for every datagram an agent sends).
    pub fn has_identity(&self, trust_domain: &str, id: &str) -> bool {
        id.strip_prefix("spiffe://")
            .and_then(|r| r.strip_prefix(trust_domain))
            .and_then(|r| r.strip_prefix("/ns/"))
            .and_then(|r| r.strip_prefix(self.namespace.as_str()))
            .and_then(|r| r.strip_prefix("/sa/"))
            == Some(self.service_account.as_str())
    }

    /// The container port called `name`, if any.
    pub fn named_port(&self, name: &str) -> Option<&ContainerPort> {
        self.ports.iter().find(|p| p.name.as_deref() == Some(name))
    }
}

/// A Service with an overlay address (`keyway.io/overlay-ips` on the Service): connections to
/// that address go to one of the workloads its selector picks, preferring the nearest zone that
/// is reachable (locality failover). Services without the annotation are ignored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Its overlay addresses.
    pub overlay_ips: Vec<IpAddr>,
    /// `spec.selector` (equality on labels, in its namespace).
    pub selector: Labels,
    /// The file it was defined in.
    pub file: String,
}

/// Namespaces and workloads, in a stable order (workloads sorted by display name).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inventory {
    /// Namespaces by name.
    pub namespaces: BTreeMap<String, Namespace>,
    /// Workloads, sorted by [`Workload::display_name`].
    pub workloads: Vec<Workload>,
    /// Services with overlay addresses.
    pub services: Vec<Service>,
}

impl Inventory {
    /// The service whose overlay address is `ip`.
    pub fn service_for(&self, ip: IpAddr) -> Option<&Service> {
        let ip = ip.to_canonical();
        self.services.iter().find(|s| s.overlay_ips.iter().any(|a| a.to_canonical() == ip))
    }

    /// The workloads a service selects (indices into `workloads`).
    pub fn endpoints(&self, s: &Service) -> Vec<usize> {
        self.workloads
            .iter()
            .enumerate()
            .filter(|(_, w)| {
                w.namespace == s.namespace
                    && !s.selector.is_empty()
                    && s.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// The workload `namespace/name` (any kind; the first in order when names repeat across
    /// kinds).
    pub fn find(&self, namespace: &str, name: &str) -> Option<usize> {
        self.workloads.iter().position(|w| w.namespace == namespace && w.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn has_identity_is_exactly_identity() {
        let w = Workload {
            namespace: "shop".into(),
            name: "cart".into(),
            kind: "Deployment".into(),
            labels: Labels::default(),
            ports: Vec::new(),
            service_account: "cart".into(),
            zone: None,
            overlay_ips: Vec::new(),
            sidecar_ips: Vec::new(),
            file: String::new(),
            label_variants: Vec::new(),
        };
        let td = "cluster.local";
        for id in [
            "spiffe://cluster.local/ns/shop/sa/cart",
            "spiffe://cluster.local/ns/shop/sa/carts",
            "spiffe://cluster.local/ns/shopx/sa/cart",
            "spiffe://cluster.local/ns/shop/sa/car",
            "spiffe://cluster.localx/ns/shop/sa/cart",
            "spiffe://other.local/ns/shop/sa/cart",
            "spiffe://cluster.local/ns/shop/sa/cart/",
            "spiffe://cluster.local/sa/cart/ns/shop",
            "",
        ] {
            assert_eq!(w.has_identity(td, id), w.identity(td) == id, "{id}");
        }
        assert!(w.has_identity(td, &w.identity(td)));
    }
}
