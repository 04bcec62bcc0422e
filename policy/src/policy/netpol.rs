//! Kubernetes NetworkPolicy (`networking.k8s.io/v1`), validated (the loader decodes it from manifests).

use super::{IpPeer, PodPeer, PortSpec};
use crate::selector::Selector;

/// A validated NetworkPolicy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetworkPolicy {
    /// Namespace (`default` when unset).
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The file it came from.
    pub file: String,
    /// `spec.podSelector`.
    pub pod_selector: Selector,
    /// Whether the policy isolates selected pods for ingress (from `policyTypes` or its default).
    pub ingress_in_effect: bool,
    /// Whether the policy isolates selected pods for egress.
    pub egress_in_effect: bool,
    /// `spec.ingress`, in order (kept even when ingress is not in effect).
    pub ingress_rules: Vec<Rule>,
    /// `spec.egress`, in order.
    pub egress_rules: Vec<Rule>,
}

/// One ingress or egress rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// `from`/`to`; `None` when empty or absent, which matches every peer.
    pub peers: Option<Vec<Peer>>,
    /// `ports`; empty means every port of every protocol.
    pub ports: Vec<PortSpec>,
}

/// A rule peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// Pods by selectors.
    Pods(PodPeer),
    /// Addresses outside the cluster.
    Ip(IpPeer),
}
