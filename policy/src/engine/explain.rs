//! Decisions in words: the rule that decided, the chain of tiers, and `keyway policy explain`.

use std::fmt::Write as _;

use super::{Decider, Decision, DirectionDecision, Engine, Peer, RuleRef, Verdict, dir_index};
use crate::policy::{Direction, PortSpec, netpol};
use crate::ports::Protocol;

/// A decision with everything a person needs to follow it.
#[derive(Clone, Debug)]
pub struct Explanation {
    /// The decision.
    pub decision: Decision,
    /// The text, several lines, ending with a newline.
    pub text: String,
}

impl Engine {
    /// A peer as printed in the connectivity list: `ns/name[Kind]` or the address.
    pub fn peer_name(&self, peer: Peer) -> String {
        match peer {
            Peer::Workload(w) => self.inventory.workloads.get(w).map(|w| w.display_name()).unwrap_or_default(),
            Peer::Ip(ip) => ip.to_string(),
        }
    }

    /// A rule, named as a person finds it in the manifests:
    /// `NetworkPolicy shop/allow-web spec.ingress[0]`,
    /// `AdminNetworkPolicy deny-monitoring (priority 10) spec.egress[1] "deny-all"`.
    pub fn rule_name(&self, r: RuleRef) -> String {
        match r {
            RuleRef::Network { policy, direction, rule } => match self.policies.network.get(policy as usize) {
                Some(p) => format!("NetworkPolicy {}/{} spec.{}[{rule}]", p.namespace, p.name, direction.field()),
                None => "NetworkPolicy (unknown)".to_owned(),
            },
            RuleRef::Admin { policy, direction, rule } => match self.policies.admin.get(policy as usize) {
                Some(p) => {
                    let name = p.rules(direction).get(rule as usize).map(|r| r.name.as_str()).unwrap_or_default();
                    format!(
                        "AdminNetworkPolicy {} (priority {}) spec.{}[{rule}] {name:?}",
                        p.name,
                        p.priority,
                        direction.field()
                    )
                }
                None => "AdminNetworkPolicy (unknown)".to_owned(),
            },
            RuleRef::Baseline { direction, rule } => {
                let name = self
                    .policies
                    .baseline
                    .as_ref()
                    .and_then(|b| b.rules(direction).get(rule as usize))
                    .map(|r| r.name.as_str())
                    .unwrap_or_default();
                format!("BaselineAdminNetworkPolicy default spec.{}[{rule}] {name:?}", direction.field())
            }
        }
    }

    /// A short, stable label of what decided a direction, for access logs and deny-reason headers:
    /// `ANP deny-monitoring rule 2: Pass → NetworkPolicy default/allow-web: Allow`.
    pub fn describe(&self, d: &DirectionDecision) -> String {
        let action = |allowed: bool| if allowed { "Allow" } else { "Deny" };
        let short = |r: RuleRef| match r {
            RuleRef::Network { policy, rule, .. } => {
                let p = self.policies.network.get(policy as usize);
                format!("NetworkPolicy {}/{} rule {rule}", p.map_or("", |p| &p.namespace), p.map_or("", |p| &p.name))
            }
            RuleRef::Admin { policy, rule, .. } => {
                format!("ANP {} rule {rule}", self.policies.admin.get(policy as usize).map_or("", |p| &p.name))
            }
            RuleRef::Baseline { rule, .. } => format!("BANP default rule {rule}"),
        };
        let mut out = String::new();
        if let Some(p) = d.passed_by {
            let _ = write!(out, "{}: Pass → ", short(p));
        }
        match d.decider {
            Decider::External => out.push_str("external peer: Allow"),
            Decider::NotIsolated => out.push_str("default: not isolated: Allow"),
            Decider::Rule(r) => {
                let _ = write!(out, "{}: {}", short(r), action(d.allowed));
            }
            Decider::Isolated { workload } => {
                let names = self.isolating(d.direction, workload as usize);
                let _ = write!(out, "NetworkPolicy {}: isolated, no rule allows: Deny", names.join(", "));
            }
        }
        out
    }

    /// What decided a whole flow, in one line: for a denial, the direction that denied; for an
    /// allowed flow, both directions (`egress: …; ingress: …`), leaving out a side that is an
    /// address outside the inventory.
    pub fn describe_decision(&self, d: &Decision) -> String {
        if d.verdict == Verdict::Deny {
            return self.describe(d.deciding());
        }
        let sides: Vec<String> = [&d.egress, &d.ingress]
            .into_iter()
            .filter(|x| x.decider != Decider::External)
            .map(|x| format!("{}: {}", x.direction.field(), self.describe(x)))
            .collect();
        if sides.is_empty() { self.describe(&d.ingress) } else { sides.join("; ") }
    }

    fn isolating(&self, direction: Direction, workload: usize) -> Vec<String> {
        let list = self
            .layouts
            .get(dir_index(direction))
            .and_then(|l| l.info.get(workload))
            .map(|t| &t.network_policies[..])
            .unwrap_or_default();
        list.iter()
            .filter_map(|&p| self.policies.network.get(p as usize))
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect()
    }

    /// Decides a flow and explains it: per direction, the tiers visited and what each said.
    pub fn explain(&self, src: Peer, dst: Peer, protocol: Protocol, port: u16) -> Explanation {
        let decision = self.decide(src, dst, protocol, port);
        let mut text = String::new();
        let verdict = match decision.verdict {
            Verdict::Allow => "ALLOW",
            Verdict::Deny => "DENY",
        };
        let _ = writeln!(text, "{verdict}: {} => {} : {protocol} {port}", self.peer_name(src), self.peer_name(dst));
        for (d, subject, other) in [(&decision.egress, src, dst), (&decision.ingress, dst, src)] {
            let _ = writeln!(
                text,
                "  {} of {}: {}",
                d.direction.field(),
                self.peer_name(subject),
                if d.allowed { "allowed" } else { "denied" }
            );
            self.explain_direction(&mut text, d, subject, other);
        }
        Explanation { decision, text }
    }

    fn explain_direction(&self, text: &mut String, d: &DirectionDecision, subject: Peer, other: Peer) {
        let Peer::Workload(w) = subject else {
            let _ = writeln!(text, "    {} is outside the inventory: no policy applies to it", self.peer_name(subject));
            return;
        };
        let t = self.layouts.get(dir_index(d.direction)).and_then(|l| l.info.get(w));
        let admin_count = t.map_or(0, |t| t.admin);
        if let Some(p) = d.passed_by {
            let _ = writeln!(text, "    1. admin tier: {} matches: Pass to NetworkPolicy", self.rule_name(p));
        } else if matches!(d.decider, Decider::Rule(RuleRef::Admin { .. })) {
            // Reported below as the decider.
        } else if admin_count == 0 {
            let _ = writeln!(text, "    1. admin tier: no admin rule applies to its {}", d.direction.field());
        } else {
            let _ =
                writeln!(text, "    1. admin tier: {admin_count} admin rule(s) apply to it; none matches this flow");
        }
        match d.decider {
            Decider::External => {}
            Decider::Rule(r @ RuleRef::Admin { .. }) => {
                let _ = writeln!(text, "    1. admin tier: {} matches: {}", self.rule_name(r), verb(d.allowed));
                let _ = writeln!(text, "       (admin rules are final: NetworkPolicy is not consulted)");
            }
            Decider::Rule(r @ RuleRef::Network { policy, direction, rule }) => {
                let selecting = self.isolating(d.direction, w);
                let _ = writeln!(
                    text,
                    "    2. NetworkPolicy: selected for {} by {}",
                    d.direction.as_str(),
                    selecting.join(", ")
                );
                let _ = writeln!(
                    text,
                    "       {} allows it{}",
                    self.rule_name(r),
                    self.rule_summary(policy, direction, rule)
                );
            }
            Decider::Isolated { .. } => {
                let selecting = self.isolating(d.direction, w);
                let _ = writeln!(
                    text,
                    "    2. NetworkPolicy: selected for {} by {}",
                    d.direction.as_str(),
                    selecting.join(", ")
                );
                let _ = writeln!(
                    text,
                    "       no rule of these policies matches {} on this port: denied (isolated pods allow only what a rule allows)",
                    self.peer_name(other)
                );
            }
            Decider::Rule(r @ RuleRef::Baseline { .. }) => {
                let _ = writeln!(text, "    2. NetworkPolicy: none selects it for {}", d.direction.as_str());
                let _ = writeln!(text, "    3. baseline tier: {} matches: {}", self.rule_name(r), verb(d.allowed));
            }
            Decider::NotIsolated => {
                let _ = writeln!(text, "    2. NetworkPolicy: none selects it for {}", d.direction.as_str());
                let base = t.map_or(0, |t| t.baseline);
                if base > 0 {
                    let _ = writeln!(text, "    3. baseline tier: no rule matches");
                }
                let _ = writeln!(text, "       not isolated: allowed by default");
            }
        }
        let _ = writeln!(text, "    decided by: {}", self.describe(d));
    }

    fn rule_summary(&self, policy: u32, direction: Direction, rule: u32) -> String {
        let Some(np) = self.policies.network.get(policy as usize) else { return String::new() };
        let rules = match direction {
            Direction::Ingress => &np.ingress_rules,
            Direction::Egress => &np.egress_rules,
        };
        let Some(r) = rules.get(rule as usize) else { return String::new() };
        let peers = match &r.peers {
            None => "any peer".to_owned(),
            Some(ps) => ps
                .iter()
                .map(|p| match p {
                    netpol::Peer::Ip(ip) => format!("ipBlock {}", ip.text),
                    netpol::Peer::Pods(pp) => {
                        let ns = match &pp.namespaces {
                            crate::policy::NamespaceMatch::Named(n) => format!("namespace {n}"),
                            crate::policy::NamespaceMatch::Selected(s) => format!("namespaces {s}"),
                        };
                        format!("pods {} in {ns}", pp.pods)
                    }
                })
                .collect::<Vec<_>>()
                .join("; "),
        };
        let ports = if r.ports.is_empty() {
            "all ports".to_owned()
        } else {
            r.ports
                .iter()
                .map(|p| match p {
                    PortSpec::Numbers { protocol, first, last } if first == last => format!("{protocol} {first}"),
                    PortSpec::Numbers { protocol, first: 1, last: 65535 } => format!("{protocol} (all ports)"),
                    PortSpec::Numbers { protocol, first, last } => format!("{protocol} {first}-{last}"),
                    PortSpec::Named { protocol, name } => {
                        format!("{} named port {name}", protocol.map_or("", |p| p.as_str()))
                    }
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(" ({peers}; {ports})")
    }
}

fn verb(allowed: bool) -> &'static str {
    if allowed { "Allow" } else { "Deny" }
}
