//! The compiled engine: inventory and policies compiled once into tables, then one function
//! ([`Engine::decide`]) answers any flow with its verdict and the rule that decided it.
//!
//! Compilation interns every label selector, indexes selectors by one `key=value` they require,
//! and matches each workload and namespace once against the candidates. Each workload then holds,
//! per direction, the admin, NetworkPolicy and baseline rules that apply to it, in evaluation
//! order, as fixed-size entries laid out contiguously: a decision reads one table,
//! one run of entries, interned peer and port lists, and what peer matching needs of the far
//! side, so its cost does not grow with the number of policies in the cluster. Ports are checked
//! before peers; an ingress rule's named ports are resolved on the workload when compiling; a
//! port that no NetworkPolicy rule of an isolated workload names is denied without a walk.

mod compile;
mod decide;
mod explain;
mod layout;

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

/// A range of a flat array: `len` items from `start`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
struct Span {
    start: u32,
    len: u32,
}

impl Span {
    /// The items of `list` this span covers (empty when out of bounds).
    fn of<T>(self, list: &[T]) -> &[T] {
        let start = self.start as usize;
        list.get(start..start.saturating_add(self.len as usize)).unwrap_or_default()
    }
}

/// A compiled peer predicate (12 bytes, see the size test).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum CPeer {
    /// Every peer, workloads and addresses.
    Any,
    /// Addresses in the IP set with this index in [`Engine::ip_sets`] (never workloads).
    Ip(u32),
    /// Workloads; `ns`: namespace constraint, `pods`: pod selector id ([`EVERY_POD`]: every pod).
    Pods { ns: CNs, pods: u32 },
    /// Nothing (an admin `nodes` peer).
    Nothing,
}

/// The pod selector id of a peer that selects every pod.
const EVERY_POD: u32 = u32::MAX;

/// A compiled namespace constraint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum CNs {
    Any,
    Id(u32),
    Sel(u32),
}

/// One entry of a compiled port list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum CPort {
    /// `lo..=hi` of one protocol.
    Range { proto: Protocol, lo: u16, hi: u16 },
    /// A port name resolved on the destination workload; `proto` `None`: the container port's own.
    Named { proto: Option<Protocol>, name: u32 },
}

/// A rule as a decision walks it: one entry per (workload, direction, rule), laid out
/// contiguously per workload and direction in evaluation order. Peer and port lists are interned
/// in [`Engine::peers`] and [`Engine::ports`]; an ingress rule's named ports are already resolved
/// on the workload (its destination), so only egress lists hold [`CPort::Named`].
#[derive(Clone, Copy, Debug)]
struct Entry {
    /// Index into [`Engine::rule_info`].
    rule: u32,
    /// Peer predicates; empty when [`Entry::ANY_PEER`] is set.
    peers: Span,
    /// Port entries; empty when [`Entry::ALL_PORTS`] is set.
    ports: Span,
    flags: u8,
}

impl Entry {
    /// The rule matches every peer.
    const ANY_PEER: u8 = 1;
    /// The rule matches every port.
    const ALL_PORTS: u8 = 2;
}

/// A workload's table for one direction: ranges of [`Layout::entries`].
#[derive(Clone, Copy, Debug, Default)]
struct Table {
    /// Admin rules (ANP by priority, then rule order): `start..network`.
    start: u32,
    /// NetworkPolicy rules: `network..baseline`, when `isolated`.
    network: u32,
    /// Baseline rules: `baseline..end`.
    baseline: u32,
    end: u32,
    /// Whether a NetworkPolicy selects the workload for this direction.
    isolated: bool,
    /// Whether `net_ports` holds every port any NetworkPolicy rule of this table can allow (no
    /// rule allows all ports or has an unresolved named port): a port outside it is denied
    /// without walking the rules.
    net_filtered: bool,
    /// Numeric port list in [`Engine::ports`] (when `net_filtered`).
    net_ports: Span,
}

/// What `explain` needs of a table, kept apart from the hot data.
#[derive(Clone, Debug, Default)]
struct TableInfo {
    /// Admin rules that apply.
    admin: u32,
    /// Baseline rules that apply.
    baseline: u32,
    /// NetworkPolicies selecting the workload for this direction.
    network_policies: Box<[u32]>,
}

/// One direction's entries.
#[derive(Debug, Default)]
struct Layout {
    entries: Vec<Entry>,
    info: Vec<TableInfo>,
}

/// What a decision needs of a workload on the far side of a flow.
#[derive(Clone, Copy, Debug, Default)]
struct WorkloadInfo {
    /// Namespace id (`u32::MAX`: a namespace the inventory does not list).
    ns: u32,
    /// Sorted pod-selector ids it matches, in [`Engine::pod_sels`].
    pod_sels: Span,
    /// Sorted namespace-selector ids its namespace matches, in [`Engine::ns_sels`].
    ns_sels: Span,
    /// Its named container ports, in [`Engine::named_ports`].
    named_ports: Span,
}

/// Everything a decision reads of one workload, in one record: its tables (when it is the
/// subject) and what peer matching needs of it (when it is the far side). A flow reads the
/// records of its source (egress table, and far side of the ingress) and of its destination
/// only; the alignment keeps each record in one 128-byte pair of cache lines.
#[derive(Clone, Copy, Debug, Default)]
#[repr(align(128))]
struct Node {
    /// `[ingress, egress]`.
    tables: [Table; 2],
    far: WorkloadInfo,
}

/// A named container port: `(port-name id, port, protocol)`, the first port of each name.
type NamedPort = (u32, u16, Protocol);

/// The compiled inventory and policies.
#[derive(Debug)]
pub struct Engine {
    inventory: Inventory,
    policies: PolicySet,
    warnings: Vec<Warning>,
    /// Per workload.
    nodes: Vec<Node>,
    pod_sels: Vec<u32>,
    ns_sels: Vec<u32>,
    named_ports: Vec<NamedPort>,
    /// Overlay address to workload.
    by_addr: BTreeMap<Addr, u32>,
    /// Interned peer lists.
    peers: Vec<CPeer>,
    /// Interned port lists.
    ports: Vec<CPort>,
    /// Interned `ipBlock` and network sets.
    ip_sets: Vec<IpSet>,
    /// Id and action of every compiled rule.
    rule_info: Vec<(RuleRef, AdminAction)>,
    /// `[ingress, egress]`.
    layouts: [Layout; 2],
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
