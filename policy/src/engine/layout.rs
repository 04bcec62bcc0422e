//! Building the flat tables a decision walks: interned peer, port and address lists and, per
//! workload and direction, one [`Entry`] per applicable rule in evaluation order, so that a
//! decision reads a few contiguous cache lines instead of chasing a pointer per rule.

use std::collections::{HashMap, HashSet};

use super::{CPeer, CPort, Entry, Layout, NamedPort, RuleRef, Span, Table, TableInfo};
use crate::ip::IpSet;
use crate::policy::AdminAction;
use crate::ports::{ConnSet, PortRanges, Protocol};

/// A compiled rule, before it is laid out per workload.
#[derive(Debug)]
pub(super) struct SrcRule {
    pub(super) id: RuleRef,
    pub(super) action: AdminAction,
    /// Interned peer list (empty when `any_peer`).
    pub(super) peers: Span,
    pub(super) any_peer: bool,
    /// Whether no peer can match (only `nodes` peers): the rule is left out of the tables.
    pub(super) no_peer: bool,
    pub(super) all_ports: bool,
    pub(super) numeric: ConnSet,
    /// `(required protocol, port-name id)`.
    pub(super) named: Vec<(Option<Protocol>, u32)>,
    /// Interned port list: `numeric` then `named` (empty when `all_ports`).
    pub(super) ports: Span,
}

/// Interned lists shared by every table.
#[derive(Debug, Default)]
pub(super) struct Lists {
    pub(super) peers: Vec<CPeer>,
    peer_ids: HashMap<Vec<CPeer>, Span>,
    pub(super) ports: Vec<CPort>,
    port_ids: HashMap<Vec<CPort>, Span>,
    pub(super) ip_sets: Vec<IpSet>,
    ip_ids: HashMap<IpSet, u32>,
}

fn intern<T: Clone + Eq + std::hash::Hash>(store: &mut Vec<T>, ids: &mut HashMap<Vec<T>, Span>, list: Vec<T>) -> Span {
    if let Some(&span) = ids.get(&list) {
        return span;
    }
    let span = Span { start: store.len() as u32, len: list.len() as u32 };
    store.extend_from_slice(&list);
    ids.insert(list, span);
    span
}

impl Lists {
    /// The index of an address set.
    pub(super) fn ip_set(&mut self, set: &IpSet) -> u32 {
        if let Some(&id) = self.ip_ids.get(set) {
            return id;
        }
        let id = self.ip_sets.len() as u32;
        self.ip_sets.push(set.clone());
        self.ip_ids.insert(set.clone(), id);
        id
    }

    /// Interns a rule's peers, duplicates and `Nothing` left out; `None` when one of them is `Any`.
    pub(super) fn peer_list(&mut self, peers: &[CPeer]) -> Option<Span> {
        if peers.contains(&CPeer::Any) {
            return None;
        }
        let mut list: Vec<CPeer> = Vec::with_capacity(peers.len());
        for p in peers {
            if *p != CPeer::Nothing && !list.contains(p) {
                list.push(*p);
            }
        }
        Some(intern(&mut self.peers, &mut self.peer_ids, list))
    }

    /// Interns a port list: the ranges of `numeric`, then the named ports.
    pub(super) fn port_list(&mut self, numeric: &ConnSet, named: &[(Option<Protocol>, u32)]) -> Span {
        let mut list = Vec::new();
        for proto in Protocol::ALL {
            for &(lo, hi) in numeric.ports(proto).ranges() {
                list.push(CPort::Range { proto, lo, hi });
            }
        }
        for &(proto, name) in named {
            let p = CPort::Named { proto, name };
            if !list.contains(&p) {
                list.push(p);
            }
        }
        intern(&mut self.ports, &mut self.port_ids, list)
    }
}

/// The ports a rule's named ports resolve to on a workload with these named ports.
pub(super) fn resolve_named(named: &[(Option<Protocol>, u32)], defined: &[NamedPort]) -> ConnSet {
    let mut out = ConnSet::empty();
    for &(want, name) in named {
        if let Some(&(_, port, proto)) = defined.iter().find(|(n, _, _)| *n == name)
            && want.is_none_or(|p| p == proto)
        {
            out.add(&ConnSet::of(proto, PortRanges::range(port, port)));
        }
    }
    out
}

/// The rules of one workload and direction, by tier, as indices into the compiled rules.
#[derive(Debug, Default)]
pub(super) struct Tiers {
    pub(super) admin: Vec<u32>,
    /// `Some` when a NetworkPolicy selects the workload for this direction.
    pub(super) network: Option<Vec<u32>>,
    pub(super) network_policies: Vec<u32>,
    pub(super) baseline: Vec<u32>,
}

/// How one rule is laid out for one workload.
struct Laid {
    entry: Entry,
    /// The numeric ports it allows, `None` when it may allow ports a filter cannot list (all
    /// ports, or named ports resolved only at decision time).
    numeric: Option<ConnSet>,
}

/// Lays out `rule` for a workload; `resolve_on`: the named ports of the destination when it is
/// the workload itself (ingress). `None` when the rule can match nothing there.
fn lay(lists: &mut Lists, rule: &SrcRule, index: u32, resolve_on: Option<&[NamedPort]>) -> Option<Laid> {
    if rule.no_peer {
        return None;
    }
    let mut flags = if rule.any_peer { Entry::ANY_PEER } else { 0 };
    let (ports, numeric) = if rule.all_ports {
        (Span::default(), None)
    } else if rule.named.is_empty() {
        (rule.ports, Some(rule.numeric.clone()))
    } else if let Some(defined) = resolve_on {
        let resolved = rule.numeric.union(&resolve_named(&rule.named, defined));
        if resolved.is_empty() {
            return None;
        }
        if resolved.is_all() { (Span::default(), None) } else { (lists.port_list(&resolved, &[]), Some(resolved)) }
    } else {
        (rule.ports, None)
    };
    if ports.len == 0 && numeric.is_none() {
        flags |= Entry::ALL_PORTS;
    } else if ports.len == 0 {
        // No numeric port and no named port: the rule allows nothing.
        return None;
    }
    Some(Laid { entry: Entry { rule: index, peers: rule.peers, ports, flags }, numeric })
}

impl Layout {
    /// Appends the entries of the next workload and returns its table.
    pub(super) fn push(
        &mut self,
        lists: &mut Lists,
        rules: &[SrcRule],
        tiers: Tiers,
        resolve_on: Option<&[NamedPort]>,
    ) -> Table {
        let mut table = Table { start: self.entries.len() as u32, ..Table::default() };
        lay_tier(&mut self.entries, lists, rules, &tiers.admin, resolve_on);
        table.network = self.entries.len() as u32;
        if let Some(network) = &tiers.network {
            table.isolated = true;
            if let Some(ports) = lay_tier(&mut self.entries, lists, rules, network, resolve_on)
                && !ports.is_all()
            {
                table.net_filtered = true;
                table.net_ports = lists.port_list(&ports, &[]);
            }
        }
        table.baseline = self.entries.len() as u32;
        lay_tier(&mut self.entries, lists, rules, &tiers.baseline, resolve_on);
        table.end = self.entries.len() as u32;
        self.info.push(TableInfo {
            admin: tiers.admin.len() as u32,
            baseline: tiers.baseline.len() as u32,
            network_policies: tiers.network_policies.into(),
        });
        table
    }
}

/// Appends the entries of one tier; a rule that matches every flow ends the tier, and a rule with
/// the same peers and ports as an earlier one is left out (no such later rule can be the first
/// match, or add a connection to the tier's set). Returns the numeric ports the tier can allow,
/// `None` when they cannot be listed.
fn lay_tier(
    entries: &mut Vec<Entry>,
    lists: &mut Lists,
    rules: &[SrcRule],
    list: &[u32],
    resolve_on: Option<&[NamedPort]>,
) -> Option<ConnSet> {
    let mut union = Some(ConnSet::empty());
    let mut seen: HashSet<(Span, Span, u8)> = HashSet::new();
    for &i in list {
        let Some(laid) = rules.get(i as usize).and_then(|r| lay(lists, r, i, resolve_on)) else { continue };
        if !seen.insert((laid.entry.peers, laid.entry.ports, laid.entry.flags)) {
            continue;
        }
        match (&mut union, &laid.numeric) {
            (Some(u), Some(n)) => u.add(n),
            _ => union = None,
        }
        entries.push(laid.entry);
        if laid.entry.flags == Entry::ANY_PEER | Entry::ALL_PORTS {
            break;
        }
    }
    union
}
