//! Policies: Kubernetes NetworkPolicy v1 ([`netpol`]) and the admin tiers AdminNetworkPolicy and
//! BaselineAdminNetworkPolicy ([`admin`]), as the engine reads them. The loader
//! ([`crate::manifest`]) decodes them from manifests and validates them as the API server and the
//! reference analyzer validate them.

pub mod admin;
pub mod netpol;

use crate::error::{LoadError, Origin};
use crate::ip::IpSet;
use crate::ports::Protocol;
use crate::selector::Selector;

pub use admin::{AdminAction, AdminPeer, AdminPolicy, AdminPort, AdminRule, BaselinePolicy, Subject};
pub use netpol::NetworkPolicy;

/// A traffic direction, as seen by the pod a policy selects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Direction {
    /// Traffic into the selected pod.
    Ingress,
    /// Traffic out of the selected pod.
    Egress,
}

impl Direction {
    /// `Ingress` or `Egress`.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Ingress => "Ingress",
            Direction::Egress => "Egress",
        }
    }

    /// `ingress` or `egress` (the field name in a spec).
    pub fn field(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which namespaces a pod peer may be in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NamespaceMatch {
    /// Exactly this namespace (a NetworkPolicy `podSelector` without `namespaceSelector`).
    Named(String),
    /// Namespaces whose labels match.
    Selected(Selector),
}

/// A pod peer: pods matching `pods` in namespaces matching `namespaces`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodPeer {
    /// The namespaces.
    pub namespaces: NamespaceMatch,
    /// The pods in them.
    pub pods: Selector,
}

/// A port or port range of a rule; a named port is resolved on the destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortSpec {
    /// Ports `first..=last` of `protocol` (`1..=65535` for a protocol without a port).
    Numbers {
        /// Protocol.
        protocol: Protocol,
        /// First port.
        first: u16,
        /// Last port.
        last: u16,
    },
    /// The destination's container port called `name`. `protocol: None` (admin tiers) takes the
    /// container port's own protocol; `Some(p)` (NetworkPolicy) requires it to equal `p`.
    Named {
        /// Required protocol, if any.
        protocol: Option<Protocol>,
        /// The port name.
        name: String,
    },
}

/// An `ipBlock` or `networks` set, with its text for explanations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpPeer {
    /// The addresses (cidr minus except).
    pub set: IpSet,
    /// How it was written: `10.0.0.0/8 except 10.1.0.0/16`.
    pub text: String,
}

/// Every policy of a manifest set.
#[derive(Clone, Debug, Default)]
pub struct PolicySet {
    /// NetworkPolicies, in load order.
    pub network: Vec<NetworkPolicy>,
    /// AdminNetworkPolicies, sorted by priority.
    pub admin: Vec<AdminPolicy>,
    /// The BaselineAdminNetworkPolicy (`default`), if any.
    pub baseline: Option<BaselinePolicy>,
}

impl PolicySet {
    /// Adds a NetworkPolicy; two with one name in a namespace are an error.
    pub fn add_network(&mut self, np: NetworkPolicy, origin: &Origin) -> Result<(), LoadError> {
        if let Some(other) = self.network.iter().find(|p| p.namespace == np.namespace && p.name == np.name) {
            return Err(LoadError::Duplicate {
                file: origin.file.clone(),
                object: origin.object.clone(),
                other_file: other.file.clone(),
                scope: "in a namespace",
            });
        }
        self.network.push(np);
        Ok(())
    }

    /// Adds an AdminNetworkPolicy; two with one name, or two with one priority, are an error.
    pub fn add_admin(&mut self, anp: AdminPolicy, origin: &Origin) -> Result<(), LoadError> {
        if let Some(other) = self.admin.iter().find(|p| p.name == anp.name) {
            return Err(LoadError::Duplicate {
                file: origin.file.clone(),
                object: origin.object.clone(),
                other_file: other.file.clone(),
                scope: "in the cluster",
            });
        }
        if let Some(other) = self.admin.iter().find(|p| p.priority == anp.priority) {
            return Err(origin.invalid(
                "spec.priority",
                format!(
                    "priority {} is already used by AdminNetworkPolicy {} ({}); two admin policies with one \
                     priority have no defined order",
                    anp.priority, other.name, other.file
                ),
            ));
        }
        let at = self.admin.partition_point(|p| p.priority < anp.priority);
        self.admin.insert(at, anp);
        Ok(())
    }

    /// Sets the BaselineAdminNetworkPolicy; there is at most one.
    pub fn set_baseline(&mut self, banp: BaselinePolicy, origin: &Origin) -> Result<(), LoadError> {
        if let Some(other) = &self.baseline {
            return Err(LoadError::Duplicate {
                file: origin.file.clone(),
                object: origin.object.clone(),
                other_file: other.file.clone(),
                scope: "in the cluster (the baseline is a singleton)",
            });
        }
        self.baseline = Some(banp);
        Ok(())
    }

    /// Every IP set named by a rule of `direction` peers (NetworkPolicy ipBlocks; admin `networks`
    /// too for egress), for the connectivity list's partition.
    pub fn ip_peers(&self, direction: Direction) -> Vec<&IpPeer> {
        let mut out = Vec::new();
        for np in &self.network {
            let rules = match direction {
                Direction::Ingress => &np.ingress_rules,
                Direction::Egress => &np.egress_rules,
            };
            for r in rules {
                for p in r.peers.iter().flatten() {
                    if let netpol::Peer::Ip(ip) = p {
                        out.push(ip);
                    }
                }
            }
        }
        if direction == Direction::Egress {
            let admin_rules = self.admin.iter().flat_map(|a| a.egress.iter());
            let base_rules = self.baseline.iter().flat_map(|b| b.egress.iter());
            for r in admin_rules.chain(base_rules) {
                for p in &r.peers {
                    if let AdminPeer::Networks(ip) = p {
                        out.push(ip);
                    }
                }
            }
        }
        out
    }
}
