//! The compiled engine: inventory and policies compiled once into tables, then one function
//! ([`Engine::decide`]) answers any flow with its verdict and the rule that decided it.
//!
//! Compilation interns every label selector, indexes selectors by one `key=value` they require,
//! and matches each workload and namespace once against the candidates. Each workload then holds,
//! per direction, the lists of admin, NetworkPolicy and baseline rules that apply to it, in
//! evaluation order. A decision walks only those short lists, and peer matching is a binary
//! search in the peer's precomputed selector matches, so its cost does not grow with the number
//! of policies in the cluster.

mod compile;
mod decide;
mod explain;

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::error::{LoadError, Warning};
use crate::inventory::Inventory;
use crate::ip::{Addr, IpSet};
use crate::policy::{AdminAction, Direction, PolicySet};
use crate::ports::{ConnSet, Protocol};

pub use explain::Explanation;

/// One side of a flow: a workload of the inventory or an address outside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Peer {
    /// The workload with this index in [`Inventory::workloads`].
    Workload(usize),
    /// An address that no workload has.
    Ip(IpAddr),
}

/// The final answer for a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Verdict {
    /// Both the source's egress and the destination's ingress allow it.
    Allow,
    /// One of them does not.
    Deny,
}

/// A rule of some policy, by index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RuleRef {
    /// `spec.<direction>[rule]` of NetworkPolicy number `policy` of [`PolicySet::network`].
    Network {
        /// Index into [`PolicySet::network`].
        policy: u32,
        /// Direction.
        direction: Direction,
        /// Rule index.
        rule: u32,
    },
    /// A rule of AdminNetworkPolicy number `policy` of [`PolicySet::admin`].
    Admin {
        /// Index into [`PolicySet::admin`].
        policy: u32,
        /// Direction.
        direction: Direction,
        /// Rule index.
        rule: u32,
    },
    /// A rule of the BaselineAdminNetworkPolicy.
    Baseline {
        /// Direction.
        direction: Direction,
        /// Rule index.
        rule: u32,
    },
}

/// What decided one direction of a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Decider {
    /// This side is an address outside the inventory: no policy applies to it.
    External,
    /// A rule matched: an admin or baseline rule with its action, or a NetworkPolicy rule (allow).
    Rule(RuleRef),
    /// NetworkPolicies select the workload for this direction and none of their rules allows the
    /// flow (Kubernetes default deny once isolated).
    Isolated {
        /// The workload.
        workload: u32,
    },
    /// Nothing selects the workload for this direction: allowed by default.
    NotIsolated,
}

/// One direction's result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DirectionDecision {
    /// `Egress` (at the source) or `Ingress` (at the destination).
    pub direction: Direction,
    /// Whether this direction allows the flow.
    pub allowed: bool,
    /// What decided.
    pub decider: Decider,
    /// The admin rule whose `Pass` sent the decision down to NetworkPolicy or the baseline.
    pub passed_by: Option<RuleRef>,
}

/// The decision for one flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Decision {
    /// Allow or deny.
    pub verdict: Verdict,
    /// The source's egress.
    pub egress: DirectionDecision,
    /// The destination's ingress.
    pub ingress: DirectionDecision,
}

impl Decision {
    /// The direction that decided: the first that denies (egress before ingress), or the ingress
    /// side when both allow.
    pub fn deciding(&self) -> &DirectionDecision {
        if !self.egress.allowed { &self.egress } else { &self.ingress }
    }
}

/// A compiled peer predicate.
#[derive(Clone, Debug)]
enum CPeer {
    /// Every peer, workloads and addresses.
    Any,
    /// Addresses in the set (never workloads).
    Ip(IpSet),
    /// Workloads; `ns`: namespace constraint, `pods`: pod selector id (`None`: every pod).
    Pods { ns: CNs, pods: Option<u32> },
    /// Nothing (an admin `nodes` peer).
    Nothing,
}

/// A compiled namespace constraint.
#[derive(Clone, Copy, Debug)]
enum CNs {
    Any,
    Id(u32),
    Sel(u32),
}

/// Compiled rule ports.
#[derive(Clone, Debug)]
struct CPorts {
    all: bool,
    numeric: ConnSet,
    /// `(required protocol, port-name id)`; `None` protocol: the container port's own.
    named: Vec<(Option<Protocol>, u32)>,
}

/// A compiled rule.
#[derive(Clone, Debug)]
struct CRule {
    id: RuleRef,
    action: AdminAction,
    peers: Vec<CPeer>,
    ports: CPorts,
}

/// The per-workload tables for one direction.
#[derive(Clone, Debug, Default)]
struct Tables {
    /// Admin rules (ANP by priority, then rule order).
    admin: Box<[u32]>,
    /// NetworkPolicy rules, when any NetworkPolicy selects the workload for this direction.
    network: Option<Box<[u32]>>,
    /// NetworkPolicies selecting the workload for this direction.
    network_policies: Box<[u32]>,
    /// Baseline rules, when the baseline selects the workload.
    baseline: Box<[u32]>,
}

/// The compiled inventory and policies.
#[derive(Debug)]
pub struct Engine {
    inventory: Inventory,
    policies: PolicySet,
    warnings: Vec<Warning>,
    /// Namespace id of each workload.
    workload_ns: Vec<u32>,
    /// Sorted pod-selector ids each workload matches.
    workload_sels: Vec<Box<[u32]>>,
    /// `(port-name id, port, protocol)` of each workload.
    workload_ports: Vec<Box<[(u32, u16, Protocol)]>>,
    /// Sorted namespace-selector ids each namespace matches.
    ns_sels: Vec<Box<[u32]>>,
    /// Overlay address to workload.
    by_addr: BTreeMap<Addr, u32>,
    rules: Vec<CRule>,
    /// `[ingress, egress]` tables per workload.
    tables: [Vec<Tables>; 2],
}

fn dir_index(d: Direction) -> usize {
    match d {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

impl Engine {
    /// Compiles an inventory and its policies. Inputs that cannot be enforced as written (a named
    /// port in an egress rule that reaches addresses, pods of one workload that a selector tells
    /// apart) are errors.
    pub fn compile(inventory: Inventory, policies: PolicySet) -> Result<Engine, LoadError> {
        compile::compile(inventory, policies)
    }

    /// The inventory.
    pub fn inventory(&self) -> &Inventory {
        &self.inventory
    }

    /// The policies.
    pub fn policies(&self) -> &PolicySet {
        &self.policies
    }

    /// Warnings found while compiling (unresolvable named ports and the like).
    pub fn warnings(&self) -> &[Warning] {
        &self.warnings
    }

    /// The peer an address stands for: the workload that has it as an overlay address, or the
    /// address itself.
    pub fn peer_for(&self, ip: IpAddr) -> Peer {
        match self.by_addr.get(&crate::ip::addr(ip)) {
            Some(&w) => Peer::Workload(w as usize),
            None => Peer::Ip(ip),
        }
    }

    /// Decides one flow from `src` to `dst` on `protocol`/`port`.
    pub fn decide(&self, src: Peer, dst: Peer, protocol: Protocol, port: u16) -> Decision {
        let egress = self.direction_port(Direction::Egress, src, dst, protocol, port);
        let ingress = self.direction_port(Direction::Ingress, dst, src, protocol, port);
        let verdict = if egress.allowed && ingress.allowed { Verdict::Allow } else { Verdict::Deny };
        Decision { verdict, egress, ingress }
    }

    /// Every connection allowed from `src` to `dst`.
    pub fn allowed(&self, src: Peer, dst: Peer) -> ConnSet {
        let e = self.direction_set(Direction::Egress, src, dst);
        if e.is_empty() {
            return e;
        }
        e.intersect(&self.direction_set(Direction::Ingress, dst, src))
    }

    /// The connections `direction` allows at `subject` to or from `other` (egress: `subject` is
    /// the source; ingress: the destination).
    pub fn direction_allowed(&self, direction: Direction, subject: Peer, other: Peer) -> ConnSet {
        self.direction_set(direction, subject, other)
    }
}

#[cfg(test)]
mod tests;
