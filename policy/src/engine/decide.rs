//! Evaluation of one direction: for one port ([`Engine::direction_port`]) and as a set of
//! connections ([`Engine::direction_set`]). Both walk the same tables in the same order, and the
//! tests hold them to the same answers.
//!
//! Tiers, per direction, with *subject* the pod whose policies apply (the source for egress, the
//! destination for ingress):
//! 1. admin rules (ANP by priority, then rule order), first match: Allow, Deny or Pass;
//! 2. if a NetworkPolicy selects the subject for this direction: allowed iff some rule allows;
//! 3. otherwise the baseline's rules, first match: Allow or Deny;
//! 4. otherwise allowed.

use super::{
    CNs, CPeer, CPort, Decider, DirectionDecision, EVERY_POD, Engine, Entry, NamedPort, Peer, RuleRef, Table, dir_index,
};
use crate::ip::{Addr, addr};
use crate::policy::{AdminAction, Direction};
use crate::ports::{ConnSet, PortRanges, Protocol};

/// The peer on the far side of a flow, with what peer predicates read of it loaded once.
#[derive(Clone, Copy, Debug)]
enum Far<'a> {
    Ip(Addr),
    Workload {
        ns: u32,
        pod_sels: &'a [u32],
        ns_sels: &'a [u32],
        named_ports: &'a [NamedPort],
    },
    /// A workload index outside the inventory.
    Unknown,
}

/// Whether a sorted list holds `id`.
fn has(list: &[u32], id: u32) -> bool {
    if list.len() <= 16 { list.contains(&id) } else { list.binary_search(&id).is_ok() }
}

impl Far<'_> {
    fn named_ports(&self) -> &[NamedPort] {
        match self {
            Far::Workload { named_ports, .. } => named_ports,
            Far::Ip(_) | Far::Unknown => &[],
        }
    }
}

/// Whether a port list holds `(protocol, port)`; named ports resolve in `dst_ports`.
fn ports_contain(list: &[CPort], dst_ports: &[NamedPort], protocol: Protocol, port: u16) -> bool {
    list.iter().any(|p| match *p {
        CPort::Range { proto, lo, hi } => proto == protocol && lo <= port && port <= hi,
        CPort::Named { proto: want, name } => dst_ports
            .iter()
            .find(|(n, _, _)| *n == name)
            .is_some_and(|&(_, p, proto)| p == port && proto == protocol && want.is_none_or(|w| w == proto)),
    })
}

impl Engine {
    fn table(&self, direction: Direction, workload: usize) -> Option<(&Table, &[Entry])> {
        let d = dir_index(direction);
        let t = self.nodes.get(workload)?.tables.get(d)?;
        Some((t, &self.layouts.get(d)?.entries))
    }

    fn far(&self, peer: Peer) -> Far<'_> {
        match peer {
            Peer::Ip(ip) => Far::Ip(addr(ip)),
            Peer::Workload(w) => match self.nodes.get(w).map(|n| &n.far) {
                Some(info) => Far::Workload {
                    ns: info.ns,
                    pod_sels: info.pod_sels.of(&self.pod_sels),
                    ns_sels: info.ns_sels.of(&self.ns_sels),
                    named_ports: info.named_ports.of(&self.named_ports),
                },
                None => Far::Unknown,
            },
        }
    }

    fn peer_matches(&self, pred: CPeer, far: Far<'_>) -> bool {
        match (pred, far) {
            (CPeer::Any, _) => true,
            (CPeer::Nothing, _) => false,
            (CPeer::Ip(set), Far::Ip(a)) => self.ip_sets.get(set as usize).is_some_and(|s| s.contains(a)),
            (CPeer::Ip(_), _) | (CPeer::Pods { .. }, Far::Ip(_)) => false,
            (CPeer::Pods { ns, pods }, Far::Unknown) => matches!(ns, CNs::Any) && pods == EVERY_POD,
            (CPeer::Pods { ns, pods }, Far::Workload { ns: w_ns, pod_sels, ns_sels, .. }) => {
                let ns_ok = match ns {
                    CNs::Any => true,
                    CNs::Id(id) => id == w_ns,
                    CNs::Sel(id) => has(ns_sels, id),
                };
                ns_ok && (pods == EVERY_POD || has(pod_sels, pods))
            }
        }
    }

    fn entry_peer_matches(&self, e: &Entry, far: Far<'_>) -> bool {
        e.flags & Entry::ANY_PEER != 0 || e.peers.of(&self.peers).iter().any(|&p| self.peer_matches(p, far))
    }

    fn entry_port_matches(&self, e: &Entry, dst_ports: &[NamedPort], protocol: Protocol, port: u16) -> bool {
        e.flags & Entry::ALL_PORTS != 0 || ports_contain(e.ports.of(&self.ports), dst_ports, protocol, port)
    }

    /// The connections an entry's ports allow; named ports resolve in `dst_ports`.
    fn entry_ports(&self, e: &Entry, dst_ports: &[NamedPort]) -> ConnSet {
        if e.flags & Entry::ALL_PORTS != 0 {
            return ConnSet::all();
        }
        let mut out = ConnSet::empty();
        for p in e.ports.of(&self.ports) {
            match *p {
                CPort::Range { proto, lo, hi } => out.add(&ConnSet::of(proto, PortRanges::range(lo, hi))),
                CPort::Named { proto: want, name } => {
                    if let Some(&(_, port, proto)) = dst_ports.iter().find(|(n, _, _)| *n == name)
                        && want.is_none_or(|w| w == proto)
                    {
                        out.add(&ConnSet::single(proto, port));
                    }
                }
            }
        }
        out
    }

    fn rule_info(&self, e: &Entry) -> Option<(RuleRef, AdminAction)> {
        self.rule_info.get(e.rule as usize).copied()
    }

    /// One direction of one flow on one port. `subject` is the pod whose policies apply;
    /// `other` is the peer on the far side.
    pub(super) fn direction_port(
        &self,
        direction: Direction,
        subject: Peer,
        other: Peer,
        protocol: Protocol,
        port: u16,
    ) -> DirectionDecision {
        let done = |allowed, decider, passed_by| DirectionDecision { direction, allowed, decider, passed_by };
        let Peer::Workload(w) = subject else { return done(true, Decider::External, None) };
        let Some((t, entries)) = self.table(direction, w) else { return done(true, Decider::External, None) };
        let far = self.far(other);
        // Named ports resolve on the destination. Ingress lists hold none: the destination is
        // the subject, on which they were resolved when compiling.
        let dst_ports = match direction {
            Direction::Egress => far.named_ports(),
            Direction::Ingress => &[],
        };
        let tier = |from: u32, to: u32| entries.get(from as usize..to as usize).unwrap_or_default();
        // Ports first: a comparison or two in a hot interned list, before the peer predicates.
        let first_match = |list: &[Entry]| {
            list.iter()
                .filter(|e| self.entry_port_matches(e, dst_ports, protocol, port) && self.entry_peer_matches(e, far))
                .find_map(|e| self.rule_info(e))
        };
        let mut passed_by = None;
        if let Some((id, action)) = first_match(tier(t.start, t.network)) {
            match action {
                AdminAction::Allow => return done(true, Decider::Rule(id), None),
                AdminAction::Deny => return done(false, Decider::Rule(id), None),
                AdminAction::Pass => passed_by = Some(id),
            }
        }
        if t.isolated {
            let unlisted = t.net_filtered && !ports_contain(t.net_ports.of(&self.ports), &[], protocol, port);
            return match first_match(if unlisted { &[] } else { tier(t.network, t.baseline) }) {
                Some((id, _)) => done(true, Decider::Rule(id), passed_by),
                None => done(false, Decider::Isolated { workload: w as u32 }, passed_by),
            };
        }
        match first_match(tier(t.baseline, t.end)) {
            Some((id, action)) => done(action != AdminAction::Deny, Decider::Rule(id), passed_by),
            None => done(true, Decider::NotIsolated, passed_by),
        }
    }

    /// One direction as a set of connections.
    pub(super) fn direction_set(&self, direction: Direction, subject: Peer, other: Peer) -> ConnSet {
        let Peer::Workload(w) = subject else { return ConnSet::all() };
        let Some((t, entries)) = self.table(direction, w) else { return ConnSet::all() };
        let far = self.far(other);
        let dst_ports = match direction {
            Direction::Egress => far.named_ports(),
            Direction::Ingress => &[],
        };
        let tier = |from: u32, to: u32| entries.get(from as usize..to as usize).unwrap_or_default();
        let all = ConnSet::all();
        // Admin tier: first match over the still-undecided connections.
        let mut undecided = all.clone();
        let mut allowed = ConnSet::empty();
        let mut denied = ConnSet::empty();
        for e in tier(t.start, t.network) {
            if undecided.is_empty() {
                break;
            }
            let Some((_, action)) = self.rule_info(e) else { continue };
            if !self.entry_peer_matches(e, far) {
                continue;
            }
            let hit = self.entry_ports(e, dst_ports).intersect(&undecided);
            match action {
                AdminAction::Allow => allowed.add(&hit),
                AdminAction::Deny => denied.add(&hit),
                AdminAction::Pass => {}
            }
            undecided = undecided.subtract(&hit);
        }
        if t.isolated {
            let mut np = ConnSet::empty();
            for e in tier(t.network, t.baseline) {
                if np.is_all() {
                    break;
                }
                if self.rule_info(e).is_some() && self.entry_peer_matches(e, far) {
                    np.add(&self.entry_ports(e, dst_ports));
                }
            }
            return allowed.union(&np.subtract(&denied));
        }
        let mut base_undecided = all.clone();
        let mut base_denied = ConnSet::empty();
        for e in tier(t.baseline, t.end) {
            let Some((_, action)) = self.rule_info(e) else { continue };
            if !self.entry_peer_matches(e, far) {
                continue;
            }
            let hit = self.entry_ports(e, dst_ports).intersect(&base_undecided);
            if action == AdminAction::Deny {
                base_denied.add(&hit);
            }
            base_undecided = base_undecided.subtract(&hit);
        }
        allowed.union(&all.subtract(&denied).subtract(&base_denied))
    }
}
