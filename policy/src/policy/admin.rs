//! AdminNetworkPolicy and BaselineAdminNetworkPolicy (`policy.networking.k8s.io/v1alpha1`),
//! validated (the loader decodes them from manifests).

use super::{Direction, IpPeer, PortSpec};
use crate::selector::Selector;

/// The highest priority an AdminNetworkPolicy may have (lower numbers are evaluated first).
pub const MAX_PRIORITY: i64 = 1000;

/// What an admin rule does with the ports it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum AdminAction {
    /// Allow, whatever lower tiers say.
    Allow,
    /// Deny, whatever lower tiers say.
    Deny,
    /// Leave the decision to NetworkPolicy (then the baseline).
    Pass,
}

impl AdminAction {
    /// `Allow`, `Deny` or `Pass`.
    pub fn as_str(self) -> &'static str {
        match self {
            AdminAction::Allow => "Allow",
            AdminAction::Deny => "Deny",
            AdminAction::Pass => "Pass",
        }
    }
}

/// The pods an admin policy applies to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    /// Every pod of the namespaces whose labels match.
    Namespaces(Selector),
    /// Pods matching `pods` in namespaces matching `namespaces`.
    Pods {
        /// Namespace selector.
        namespaces: Selector,
        /// Pod selector.
        pods: Selector,
    },
}

/// A peer of an admin rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminPeer {
    /// Every pod of the namespaces whose labels match.
    Namespaces(Selector),
    /// Pods matching `pods` in namespaces matching `namespaces`.
    Pods {
        /// Namespace selector.
        namespaces: Selector,
        /// Pod selector.
        pods: Selector,
    },
    /// Egress only: addresses (IPv4 CIDRs; IPv6 ones are reported and left out).
    Networks(IpPeer),
    /// Egress only: nodes, which keyway cannot see; matches nothing (reported).
    Nodes,
}

/// An admin port entry (kept for explanations; compiled to [`PortSpec`]).
pub type AdminPort = PortSpec;

/// One admin rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminRule {
    /// The rule's name.
    pub name: String,
    /// Its action (`Pass` only in AdminNetworkPolicy).
    pub action: AdminAction,
    /// Its peers (at least one).
    pub peers: Vec<AdminPeer>,
    /// Its ports; `None` means every port of every protocol.
    pub ports: Option<Vec<PortSpec>>,
}

/// An AdminNetworkPolicy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdminPolicy {
    /// Name (cluster-scoped).
    pub name: String,
    /// The file it came from.
    pub file: String,
    /// Priority, 0 (first) to 1000.
    pub priority: u32,
    /// The pods it applies to.
    pub subject: Subject,
    /// Ingress rules, in order.
    pub ingress: Vec<AdminRule>,
    /// Egress rules, in order.
    pub egress: Vec<AdminRule>,
}

impl AdminPolicy {
    /// The rules of one direction.
    pub fn rules(&self, d: Direction) -> &[AdminRule] {
        match d {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

/// The BaselineAdminNetworkPolicy (always named `default`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaselinePolicy {
    /// The file it came from.
    pub file: String,
    /// The pods it applies to.
    pub subject: Subject,
    /// Ingress rules, in order (Allow or Deny).
    pub ingress: Vec<AdminRule>,
    /// Egress rules, in order (Allow or Deny).
    pub egress: Vec<AdminRule>,
}

impl BaselinePolicy {
    /// The rules of one direction.
    pub fn rules(&self, d: Direction) -> &[AdminRule] {
        match d {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}
