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

use super::{CNs, CPeer, CPorts, CRule, Decider, DirectionDecision, Engine, Peer, Tables, dir_index};
use crate::ip::addr;
use crate::policy::{AdminAction, Direction};
use crate::ports::{ConnSet, Protocol};

impl Engine {
    fn tables(&self, direction: Direction, workload: usize) -> Option<&Tables> {
        self.tables.get(dir_index(direction)).and_then(|t| t.get(workload))
    }

    fn rule(&self, idx: u32) -> Option<&CRule> {
        self.rules.get(idx as usize)
    }

    fn peer_matches(&self, pred: &CPeer, peer: Peer) -> bool {
        match (pred, peer) {
            (CPeer::Any, _) => true,
            (CPeer::Nothing, _) => false,
            (CPeer::Ip(set), Peer::Ip(ip)) => set.contains(addr(ip)),
            (CPeer::Ip(_), Peer::Workload(_)) | (CPeer::Pods { .. }, Peer::Ip(_)) => false,
            (CPeer::Pods { ns, pods }, Peer::Workload(w)) => {
                let ns_ok = match *ns {
                    CNs::Any => true,
                    CNs::Id(id) => self.workload_ns.get(w).is_some_and(|n| *n == id),
                    CNs::Sel(id) => self
                        .workload_ns
                        .get(w)
                        .and_then(|n| self.ns_sels.get(*n as usize))
                        .is_some_and(|l| l.binary_search(&id).is_ok()),
                };
                ns_ok && pods.is_none_or(|id| self.workload_sels.get(w).is_some_and(|l| l.binary_search(&id).is_ok()))
            }
        }
    }

    fn rule_peer_matches(&self, rule: &CRule, peer: Peer) -> bool {
        rule.peers.iter().any(|p| self.peer_matches(p, peer))
    }

    /// The container ports of `dst` that a rule's named ports resolve to.
    fn named_ports(&self, ports: &CPorts, dst: Peer) -> ConnSet {
        let mut out = ConnSet::empty();
        let Peer::Workload(w) = dst else { return out };
        let Some(defined) = self.workload_ports.get(w) else { return out };
        for &(want, name) in &ports.named {
            if let Some(&(_, port, proto)) = defined.iter().find(|(n, _, _)| *n == name)
                && want.is_none_or(|p| p == proto)
            {
                out.add(&ConnSet::single(proto, port));
            }
        }
        out
    }

    fn ports_contain(&self, ports: &CPorts, dst: Peer, protocol: Protocol, port: u16) -> bool {
        if ports.all || ports.numeric.contains(protocol, port) {
            return true;
        }
        let Peer::Workload(w) = dst else { return false };
        let Some(defined) = self.workload_ports.get(w) else { return false };
        ports.named.iter().any(|&(want, name)| {
            defined
                .iter()
                .any(|&(n, p, proto)| n == name && p == port && proto == protocol && want.is_none_or(|w| w == proto))
        })
    }

    fn ports_set(&self, ports: &CPorts, dst: Peer) -> ConnSet {
        if ports.all {
            return ConnSet::all();
        }
        if ports.named.is_empty() {
            return ports.numeric.clone();
        }
        ports.numeric.union(&self.named_ports(ports, dst))
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
        let dst = match direction {
            Direction::Egress => other,
            Direction::Ingress => subject,
        };
        let done = |allowed, decider, passed_by| DirectionDecision { direction, allowed, decider, passed_by };
        let Peer::Workload(w) = subject else { return done(true, Decider::External, None) };
        let Some(t) = self.tables(direction, w) else { return done(true, Decider::External, None) };
        let first_match = |list: &[u32]| {
            list.iter()
                .filter_map(|&i| self.rule(i))
                .find(|r| self.rule_peer_matches(r, other) && self.ports_contain(&r.ports, dst, protocol, port))
        };
        let mut passed_by = None;
        if let Some(r) = first_match(&t.admin) {
            match r.action {
                AdminAction::Allow => return done(true, Decider::Rule(r.id), None),
                AdminAction::Deny => return done(false, Decider::Rule(r.id), None),
                AdminAction::Pass => passed_by = Some(r.id),
            }
        }
        if let Some(rules) = &t.network {
            return match first_match(rules) {
                Some(r) => done(true, Decider::Rule(r.id), passed_by),
                None => done(false, Decider::Isolated { workload: w as u32 }, passed_by),
            };
        }
        match first_match(&t.baseline) {
            Some(r) => done(r.action != AdminAction::Deny, Decider::Rule(r.id), passed_by),
            None => done(true, Decider::NotIsolated, passed_by),
        }
    }

    /// One direction as a set of connections.
    pub(super) fn direction_set(&self, direction: Direction, subject: Peer, other: Peer) -> ConnSet {
        let dst = match direction {
            Direction::Egress => other,
            Direction::Ingress => subject,
        };
        let Peer::Workload(w) = subject else { return ConnSet::all() };
        let Some(t) = self.tables(direction, w) else { return ConnSet::all() };
        let all = ConnSet::all();
        // Admin tier: first match over the still-undecided connections.
        let mut undecided = all.clone();
        let mut allowed = ConnSet::empty();
        let mut denied = ConnSet::empty();
        for r in t.admin.iter().filter_map(|&i| self.rule(i)) {
            if undecided.is_empty() {
                break;
            }
            if !self.rule_peer_matches(r, other) {
                continue;
            }
            let hit = self.ports_set(&r.ports, dst).intersect(&undecided);
            match r.action {
                AdminAction::Allow => allowed.add(&hit),
                AdminAction::Deny => denied.add(&hit),
                AdminAction::Pass => {}
            }
            undecided = undecided.subtract(&hit);
        }
        if let Some(rules) = &t.network {
            let mut np = ConnSet::empty();
            for r in rules.iter().filter_map(|&i| self.rule(i)) {
                if np.is_all() {
                    break;
                }
                if self.rule_peer_matches(r, other) {
                    np.add(&self.ports_set(&r.ports, dst));
                }
            }
            return allowed.union(&np.subtract(&denied));
        }
        let mut base_undecided = all.clone();
        let mut base_denied = ConnSet::empty();
        for r in t.baseline.iter().filter_map(|&i| self.rule(i)) {
            if !self.rule_peer_matches(r, other) {
                continue;
            }
            let hit = self.ports_set(&r.ports, dst).intersect(&base_undecided);
            if r.action == AdminAction::Deny {
                base_denied.add(&hit);
            }
            base_undecided = base_undecided.subtract(&hit);
        }
        allowed.union(&all.subtract(&denied).subtract(&base_denied))
    }
}
