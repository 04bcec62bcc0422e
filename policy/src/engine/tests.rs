//! Table tests of the semantics, one small case per rule.

use super::*;
use crate::manifest::{SourceFile, load};

fn engine(yaml: &str) -> Engine {
    let m = load(&[SourceFile { path: "t.yaml".into(), text: yaml.into() }]).unwrap();
    Engine::compile(m.inventory, m.policies).unwrap()
}

fn w(e: &Engine, ns: &str, name: &str) -> Peer {
    Peer::Workload(e.inventory().find(ns, name).unwrap())
}

const PODS: &str = r#"
kind: Namespace
metadata: {name: shop, labels: {team: shop}}
---
kind: Namespace
metadata: {name: ops, labels: {team: ops}}
---
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {containers: [{ports: [{name: http, containerPort: 8080}, {name: dns, containerPort: 53, protocol: UDP}]}]}
---
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec: {containers: [{ports: [{name: sql, containerPort: 5432}]}]}
---
kind: Pod
metadata: {name: mon, namespace: ops, labels: {app: mon}}
"#;

fn with(policies: &str) -> Engine {
    engine(&format!("{PODS}\n---\n{policies}"))
}

#[track_caller]
fn check(e: &Engine, src: Peer, dst: Peer, proto: Protocol, port: u16, want: bool) {
    let d = e.decide(src, dst, proto, port);
    assert_eq!(d.verdict == Verdict::Allow, want, "{}", e.explain(src, dst, proto, port).text);
    // The set evaluation must agree with the per-port one.
    assert_eq!(e.allowed(src, dst).contains(proto, port), want);
}

#[test]
fn no_policy_allows_everything() {
    let e = with("");
    check(&e, w(&e, "shop", "web"), w(&e, "shop", "db"), Protocol::Tcp, 1, true);
    let d = e.decide(w(&e, "shop", "web"), w(&e, "shop", "db"), Protocol::Tcp, 1);
    assert_eq!(d.ingress.decider, Decider::NotIsolated);
}

#[test]
fn selected_pod_is_isolated_for_that_direction_only() {
    let e = with(
        "kind: NetworkPolicy\nmetadata: {name: deny, namespace: shop}\nspec: {podSelector: {matchLabels: {app: db}}}",
    );
    let (web, db) = (w(&e, "shop", "web"), w(&e, "shop", "db"));
    check(&e, web, db, Protocol::Tcp, 5432, false);
    check(&e, db, web, Protocol::Tcp, 8080, true); // egress of db not in effect
    let d = e.decide(web, db, Protocol::Tcp, 5432);
    assert!(matches!(d.ingress.decider, Decider::Isolated { .. }));
    assert!(e.describe(&d.ingress).contains("shop/deny"));
}

#[test]
fn pod_selector_alone_is_own_namespace_only() {
    let e = with(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: db}}\n  ingress: [{from: [{podSelector: {}}]}]",
    );
    check(&e, w(&e, "shop", "web"), w(&e, "shop", "db"), Protocol::Tcp, 5432, true);
    check(&e, w(&e, "ops", "mon"), w(&e, "shop", "db"), Protocol::Tcp, 5432, false);
}

#[test]
fn namespace_and_pod_selector_together_are_and() {
    let e = with(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: shop}\nspec:\n  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: ops}}, podSelector: {matchLabels: {app: web}}}]}]",
    );
    check(&e, w(&e, "ops", "mon"), w(&e, "shop", "db"), Protocol::Tcp, 1, false);
    let e = with(
        "kind: NetworkPolicy\nmetadata: {name: p, namespace: shop}\nspec:\n  podSelector: {}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: ops}}, podSelector: {matchLabels: {app: mon}}}]}]",
    );
    check(&e, w(&e, "ops", "mon"), w(&e, "shop", "db"), Protocol::Tcp, 1, true);
    check(&e, w(&e, "shop", "web"), w(&e, "shop", "db"), Protocol::Tcp, 1, false);
}

#[test]
fn union_of_policies_and_port_forms() {
    let e = with(
        r#"kind: NetworkPolicy
metadata: {name: a, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{ports: [{port: 80}]}]
---
kind: NetworkPolicy
metadata: {name: b, namespace: shop}
spec:
  podSelector: {}
  ingress: [{ports: [{port: 9000, endPort: 9010, protocol: UDP}, {port: http}]}]
"#,
    );
    let (mon, web) = (w(&e, "ops", "mon"), w(&e, "shop", "web"));
    check(&e, mon, web, Protocol::Tcp, 80, true);
    check(&e, mon, web, Protocol::Tcp, 8080, true);
    check(&e, mon, web, Protocol::Udp, 9005, true);
    check(&e, mon, web, Protocol::Udp, 9011, false);
    check(&e, mon, web, Protocol::Tcp, 9005, false);
    assert_eq!(e.allowed(mon, web).to_string(), "TCP 80,8080,UDP 9000-9010");
}

#[test]
fn named_port_resolves_on_destination_with_protocol() {
    let e = with(
        r#"kind: NetworkPolicy
metadata: {name: a, namespace: shop}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress: [{to: [{podSelector: {}}], ports: [{port: sql}, {port: dns}]}]
"#,
    );
    let (web, db) = (w(&e, "shop", "web"), w(&e, "shop", "db"));
    // db defines sql (TCP 5432); `dns` is UDP on web, so TCP dns resolves nowhere.
    assert_eq!(e.allowed(web, db).to_string(), "TCP 5432");
    assert!(e.allowed(db, web).is_empty());
    assert!(e.warnings().iter().any(|w| w.message.contains("\"dns\"")));
}

#[test]
fn egress_and_ingress_intersect_and_ip_peers() {
    let e = with(
        r#"kind: NetworkPolicy
metadata: {name: e, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}, {podSelector: {matchLabels: {app: db}}}], ports: [{port: 5432}]}]
"#,
    );
    let web = w(&e, "shop", "web");
    let ip = |s: &str| Peer::Ip(s.parse().unwrap());
    check(&e, web, ip("10.2.3.4"), Protocol::Tcp, 5432, true);
    check(&e, web, ip("10.1.3.4"), Protocol::Tcp, 5432, false);
    check(&e, web, ip("11.0.0.1"), Protocol::Tcp, 5432, false);
    check(&e, web, w(&e, "shop", "db"), Protocol::Tcp, 5432, true);
    check(&e, web, w(&e, "ops", "mon"), Protocol::Tcp, 5432, false);
    // IP sources are never selected: their side is open; db is not selected by any policy.
    check(&e, ip("10.2.3.4"), w(&e, "shop", "db"), Protocol::Tcp, 1, true);
    // Without policyTypes, Ingress is always in effect: web is isolated for ingress too.
    check(&e, ip("10.2.3.4"), web, Protocol::Tcp, 1, false);
}

#[test]
fn named_port_in_egress_to_ips_is_refused() {
    let text = format!(
        "{PODS}\n---\nkind: NetworkPolicy\nmetadata: {{name: e, namespace: shop}}\nspec:\n  podSelector: {{}}\n  egress: [{{ports: [{{port: http}}]}}]\n"
    );
    let m = load(&[SourceFile { path: "t.yaml".into(), text }]).unwrap();
    let err = Engine::compile(m.inventory, m.policies).unwrap_err().to_string();
    assert!(err.contains("spec.egress[0].ports[0].port") && err.contains("named port"), "{err}");
}

#[test]
fn admin_tiers_first_match_pass_and_baseline() {
    let e = with(
        r#"kind: AdminNetworkPolicy
metadata: {name: ops-first}
spec:
  priority: 1
  subject: {namespaces: {matchLabels: {team: shop}}}
  ingress:
  - {name: allow-mon, action: Allow, from: [{namespaces: {matchLabels: {team: ops}}}], ports: [{portNumber: {port: 9090}}]}
  - {name: pass-shop, action: Pass, from: [{namespaces: {matchLabels: {team: shop}}}]}
  - {name: deny-rest, action: Deny, from: [{namespaces: {}}]}
---
kind: NetworkPolicy
metadata: {name: web-only, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]
---
kind: BaselineAdminNetworkPolicy
metadata: {name: default}
spec:
  subject: {namespaces: {}}
  egress: [{name: no-egress-to-ops, action: Deny, to: [{namespaces: {matchLabels: {team: ops}}}]}]
"#,
    );
    let (web, db, mon) = (w(&e, "shop", "web"), w(&e, "shop", "db"), w(&e, "ops", "mon"));
    check(&e, mon, db, Protocol::Tcp, 9090, true); // ANP allow beats NetworkPolicy isolation
    check(&e, mon, db, Protocol::Tcp, 9091, false); // ANP deny
    check(&e, web, db, Protocol::Tcp, 1, true); // Pass, then NetworkPolicy allows
    let d = e.decide(web, db, Protocol::Tcp, 1);
    assert_eq!(e.describe(&d.ingress), "ANP ops-first rule 1: Pass → NetworkPolicy shop/web-only rule 0: Allow");
    check(&e, db, web, Protocol::Tcp, 1, true); // Pass; web not isolated; baseline has no ingress rules
    check(&e, web, mon, Protocol::Tcp, 1, false); // baseline egress deny
    let d = e.decide(web, mon, Protocol::Tcp, 1);
    assert_eq!(e.describe(&d.egress), "BANP default rule 0: Deny");
}

#[test]
fn overlay_addresses_resolve_to_workloads() {
    let e = engine(
        "kind: Pod\nmetadata: {name: a, annotations: {keyway.io/overlay-ips: '10.99.0.1,fd00::1'}}\n---\nkind: Pod\nmetadata: {name: b}\n",
    );
    assert_eq!(e.peer_for("10.99.0.1".parse().unwrap()), w(&e, "default", "a"));
    assert_eq!(e.peer_for("fd00::1".parse().unwrap()), w(&e, "default", "a"));
    assert_eq!(e.peer_for("10.99.0.2".parse().unwrap()), Peer::Ip("10.99.0.2".parse().unwrap()));
}

#[test]
fn pods_of_one_workload_told_apart_is_an_error() {
    let text = r#"
kind: Pod
metadata: {name: p1, labels: {app: a, v: "1"}, ownerReferences: [{kind: ReplicaSet, name: rs, controller: true}]}
---
kind: Pod
metadata: {name: p2, labels: {app: a, v: "2"}, ownerReferences: [{kind: ReplicaSet, name: rs, controller: true}]}
---
kind: NetworkPolicy
metadata: {name: p}
spec: {podSelector: {matchLabels: {v: "1"}}}
"#;
    let m = load(&[SourceFile { path: "t.yaml".into(), text: text.into() }]).unwrap();
    let err = Engine::compile(m.inventory, m.policies).unwrap_err().to_string();
    assert!(err.contains("default/rs[ReplicaSet]") && err.contains("NetworkPolicy default/p"), "{err}");
}

#[test]
fn hot_records_stay_small() {
    assert!(std::mem::size_of::<CPeer>() <= 12);
    assert!(std::mem::size_of::<CPort>() <= 8);
    assert!(std::mem::size_of::<Entry>() <= 24);
    assert!(std::mem::size_of::<Table>() <= 32);
    assert_eq!(std::mem::size_of::<Node>(), 128);
}

/// Random small clusters, for the property that the per-port decision and the connection sets
/// agree.
mod random {
    use crate::inventory::{ContainerPort, Inventory, NAMESPACE_NAME_LABEL, Namespace, Workload};
    use crate::ip::{IpSet, parse_cidr};
    use crate::policy::netpol::{Peer as NpPeer, Rule};
    use crate::policy::{
        AdminAction, AdminPeer, AdminPolicy, AdminRule, BaselinePolicy, IpPeer, NamespaceMatch, NetworkPolicy, PodPeer,
        PolicySet, PortSpec, Subject,
    };
    use crate::ports::Protocol;
    use crate::selector::{Labels, Operator, Requirement, Selector};

    /// SplitMix64.
    pub(super) struct Rng(pub(super) u64);

    impl Rng {
        pub(super) fn below(&mut self, n: usize) -> usize {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            ((z ^ (z >> 31)) % n.max(1) as u64) as usize
        }

        fn chance(&mut self, percent: usize) -> bool {
            self.below(100) < percent
        }

        fn pick<T: Clone>(&mut self, items: &[T]) -> T {
            items[self.below(items.len())].clone()
        }
    }

    const NAMESPACES: [&str; 3] = ["ns-a", "ns-b", "ns-c"];
    /// Port numbers the rules and the container ports use; the test probes around them.
    pub(super) const PORTS: [u16; 6] = [1, 53, 80, 443, 8080, 9090];
    const PORT_NAMES: [&str; 4] = ["http", "dns", "metrics", "undefined"];
    const CIDRS: [(&str, &[&str]); 3] = [("10.0.0.0/8", &["10.1.0.0/16"]), ("192.168.0.0/16", &[]), ("0.0.0.0/0", &[])];
    /// Addresses probed as peers: in and out of the CIDRs above.
    pub(super) const ADDRESSES: [&str; 4] = ["10.2.0.1", "10.1.0.1", "192.168.1.1", "8.8.8.8"];

    fn labels(pairs: &[(&str, String)]) -> Labels {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect()
    }

    fn selector(rng: &mut Rng, keys: &[(&str, &[&str])]) -> Selector {
        let (key, values) = rng.pick(keys);
        let value = rng.pick(values).to_owned();
        match rng.below(6) {
            0 | 1 => Selector::everything(),
            2 | 3 => Selector { match_labels: labels(&[(key, value)]), expressions: Vec::new() },
            n => {
                let operator =
                    [Operator::In, Operator::NotIn, Operator::Exists, Operator::DoesNotExist][n % 2 * 2 + rng.below(2)];
                let values = if matches!(operator, Operator::In | Operator::NotIn) { vec![value] } else { Vec::new() };
                Selector {
                    match_labels: Labels::new(),
                    expressions: vec![Requirement { key: key.to_owned(), operator, values }],
                }
            }
        }
    }

    fn pod_selector(rng: &mut Rng) -> Selector {
        selector(rng, &[("app", &["a", "b", "c"]), ("tier", &["web", "db"])])
    }

    fn ns_selector(rng: &mut Rng) -> Selector {
        selector(rng, &[("team", &["x", "y"]), (NAMESPACE_NAME_LABEL, &NAMESPACES)])
    }

    fn protocol(rng: &mut Rng) -> Protocol {
        rng.pick(&[Protocol::Tcp, Protocol::Tcp, Protocol::Udp, Protocol::Sctp])
    }

    /// 0..3 port entries; `named`: `None` for none, `Some(required protocol)` otherwise.
    fn ports(rng: &mut Rng, named: Option<bool>) -> Vec<PortSpec> {
        (0..rng.below(3))
            .map(|_| match named {
                Some(with_protocol) if rng.chance(40) => PortSpec::Named {
                    protocol: with_protocol.then(|| protocol(rng)),
                    name: rng.pick(&PORT_NAMES).to_owned(),
                },
                _ => {
                    let first = rng.pick(&PORTS);
                    let last = if rng.chance(30) { first.saturating_add(rng.pick(&[1, 100, 65535])) } else { first };
                    PortSpec::Numbers { protocol: protocol(rng), first, last }
                }
            })
            .collect()
    }

    fn ip_peer(rng: &mut Rng) -> IpPeer {
        let (cidr, except) = rng.pick(&CIDRS);
        let mut set = IpSet::from_range(parse_cidr(cidr).unwrap().range);
        for e in except {
            set = set.subtract_range(parse_cidr(e).unwrap().range);
        }
        IpPeer { set, text: cidr.to_owned() }
    }

    fn np_rule(rng: &mut Rng, egress: bool) -> Rule {
        let peers = (!rng.chance(15)).then(|| {
            (0..1 + rng.below(2))
                .map(|_| match rng.below(5) {
                    0 => NpPeer::Ip(ip_peer(rng)),
                    1 | 2 => NpPeer::Pods(PodPeer {
                        namespaces: NamespaceMatch::Named(rng.pick(&NAMESPACES).to_owned()),
                        pods: pod_selector(rng),
                    }),
                    _ => NpPeer::Pods(PodPeer {
                        namespaces: NamespaceMatch::Selected(ns_selector(rng)),
                        pods: pod_selector(rng),
                    }),
                })
                .collect::<Vec<_>>()
        });
        // A named port in an egress rule that reaches addresses is refused by compile.
        let reaches_ips = peers.as_ref().is_none_or(|ps| ps.iter().any(|p| matches!(p, NpPeer::Ip(_))));
        let named = (!(egress && reaches_ips)).then_some(true);
        Rule { peers, ports: ports(rng, named) }
    }

    fn admin_rules(rng: &mut Rng, egress: bool, actions: &[AdminAction]) -> Vec<AdminRule> {
        (0..rng.below(4))
            .map(|i| {
                let peers = (0..1 + rng.below(2))
                    .map(|_| match rng.below(if egress { 5 } else { 3 }) {
                        0 => AdminPeer::Namespaces(ns_selector(rng)),
                        1 | 2 => AdminPeer::Pods { namespaces: ns_selector(rng), pods: pod_selector(rng) },
                        3 => AdminPeer::Networks(ip_peer(rng)),
                        _ => AdminPeer::Nodes,
                    })
                    .collect();
                let ports = rng.chance(60).then(|| ports(rng, Some(false)));
                AdminRule { name: format!("r{i}"), action: rng.pick(actions), peers, ports }
            })
            .collect()
    }

    fn subject(rng: &mut Rng) -> Subject {
        if rng.chance(50) {
            Subject::Namespaces(ns_selector(rng))
        } else {
            Subject::Pods { namespaces: ns_selector(rng), pods: pod_selector(rng) }
        }
    }

    pub(super) fn cluster(rng: &mut Rng) -> (Inventory, PolicySet) {
        let mut inventory = Inventory::default();
        for (i, ns) in NAMESPACES.iter().enumerate() {
            let team = ["x", "y"][i % 2].to_owned();
            let l = labels(&[(NAMESPACE_NAME_LABEL, (*ns).to_owned()), ("team", team)]);
            inventory.namespaces.insert((*ns).to_owned(), Namespace { name: (*ns).to_owned(), labels: l });
        }
        let defined = [("http", 80, Protocol::Tcp), ("dns", 53, Protocol::Udp), ("metrics", 9090, Protocol::Tcp)];
        for i in 0..2 + rng.below(5) {
            let l =
                labels(&[("app", rng.pick(&["a", "b", "c"]).to_owned()), ("tier", rng.pick(&["web", "db"]).into())]);
            let ports = defined
                .iter()
                .filter(|_| rng.chance(50))
                .map(|&(name, port, protocol)| ContainerPort { name: Some(name.into()), port, protocol })
                .collect();
            let namespace = rng.pick(&NAMESPACES).to_owned();
            inventory.workloads.push(Workload {
                name: format!("w{i}"),
                kind: "Deployment".into(),
                labels: l,
                ports,
                service_account: "default".into(),
                zone: None,
                overlay_ips: Vec::new(),
                sidecar_ips: Vec::new(),
                file: format!("{namespace}.yaml"),
                label_variants: Vec::new(),
                namespace,
            });
        }
        inventory.workloads.sort_by_cached_key(Workload::display_name);

        let mut policies = PolicySet::default();
        for i in 0..rng.below(5) {
            let namespace = rng.pick(&NAMESPACES).to_owned();
            let (ingress_in_effect, egress_in_effect) = rng.pick(&[(true, false), (true, true), (false, true)]);
            let ingress_rules = (0..rng.below(3)).map(|_| np_rule(rng, false)).collect();
            let egress_rules = (0..rng.below(3)).map(|_| np_rule(rng, true)).collect();
            policies.network.push(NetworkPolicy {
                namespace: namespace.clone(),
                name: format!("np{i}"),
                file: format!("{namespace}-policies.yaml"),
                pod_selector: pod_selector(rng),
                ingress_in_effect,
                egress_in_effect,
                ingress_rules,
                egress_rules,
            });
        }
        let all = [AdminAction::Allow, AdminAction::Deny, AdminAction::Pass];
        for i in 0..rng.below(3) {
            policies.admin.push(AdminPolicy {
                name: format!("anp{i}"),
                file: "admin.yaml".into(),
                priority: i as u32,
                subject: subject(rng),
                ingress: admin_rules(rng, false, &all),
                egress: admin_rules(rng, true, &all),
            });
        }
        if rng.chance(50) {
            let actions = [AdminAction::Allow, AdminAction::Deny];
            policies.baseline = Some(BaselinePolicy {
                file: "baseline.yaml".into(),
                subject: subject(rng),
                ingress: admin_rules(rng, false, &actions),
                egress: admin_rules(rng, true, &actions),
            });
        }
        (inventory, policies)
    }
}

/// The semantics read straight off the policy objects, without compiling: the oracle of the
/// property test below.
mod reference {
    use super::*;
    use crate::inventory::Workload;
    use crate::policy::netpol::Peer as NpPeer;
    use crate::policy::{AdminPeer, AdminRule, NamespaceMatch, PortSpec, Subject};
    use crate::selector::Selector;

    struct Flow<'a> {
        inv: &'a Inventory,
        other: Peer,
        /// The destination workload, where named ports resolve.
        dst: Option<&'a Workload>,
        proto: Protocol,
        port: u16,
    }

    impl Flow<'_> {
        fn workload(&self, p: Peer) -> Option<&Workload> {
            match p {
                Peer::Workload(w) => self.inv.workloads.get(w),
                Peer::Ip(_) => None,
            }
        }

        fn ns_matches(&self, w: &Workload, s: &Selector) -> bool {
            self.inv.namespaces.get(&w.namespace).is_some_and(|n| s.matches(&n.labels))
        }

        fn other_in(&self, ns: &Selector, pods: &Selector) -> bool {
            self.workload(self.other).is_some_and(|o| self.ns_matches(o, ns) && pods.matches(&o.labels))
        }

        fn other_ip_in(&self, set: &crate::ip::IpSet) -> bool {
            matches!(self.other, Peer::Ip(ip) if set.contains(crate::ip::addr(ip)))
        }

        fn port_in(&self, specs: &[PortSpec]) -> bool {
            specs.is_empty()
                || specs.iter().any(|s| match s {
                    PortSpec::Numbers { protocol, first, last } => {
                        *protocol == self.proto && (*first).max(1) <= self.port && self.port <= *last
                    }
                    PortSpec::Named { protocol, name } => self.dst.and_then(|d| d.named_port(name)).is_some_and(|p| {
                        p.port == self.port && p.protocol == self.proto && protocol.is_none_or(|w| w == p.protocol)
                    }),
                })
        }

        fn admin_first_match<'r>(&self, rules: &'r [AdminRule]) -> Option<&'r AdminRule> {
            rules.iter().find(|r| {
                r.ports.as_deref().is_none_or(|p| self.port_in(p))
                    && r.peers.iter().any(|p| match p {
                        AdminPeer::Namespaces(ns) => self.other_in(ns, &Selector::everything()),
                        AdminPeer::Pods { namespaces, pods } => self.other_in(namespaces, pods),
                        AdminPeer::Networks(ip) => self.other_ip_in(&ip.set),
                        AdminPeer::Nodes => false,
                    })
            })
        }
    }

    /// Whether `direction` allows the flow at `subject` (the source for egress).
    pub(super) fn allows(
        e: &Engine,
        direction: Direction,
        subject: Peer,
        other: Peer,
        proto: Protocol,
        port: u16,
    ) -> bool {
        let inv = e.inventory();
        let Peer::Workload(wi) = subject else { return true };
        let Some(w) = inv.workloads.get(wi) else { return true };
        let dst = match direction {
            Direction::Ingress => Some(w),
            Direction::Egress => match other {
                Peer::Workload(o) => inv.workloads.get(o),
                Peer::Ip(_) => None,
            },
        };
        let f = Flow { inv, other, dst, proto, port };
        let selects = |s: &Subject| match s {
            Subject::Namespaces(ns) => f.ns_matches(w, ns),
            Subject::Pods { namespaces, pods } => f.ns_matches(w, namespaces) && pods.matches(&w.labels),
        };
        for anp in e.policies().admin.iter().filter(|a| selects(&a.subject)) {
            if let Some(r) = f.admin_first_match(anp.rules(direction)) {
                match r.action {
                    AdminAction::Allow => return true,
                    AdminAction::Deny => return false,
                    AdminAction::Pass => break,
                }
            }
        }
        let selecting: Vec<_> = e
            .policies()
            .network
            .iter()
            .filter(|np| np.namespace == w.namespace && np.pod_selector.matches(&w.labels))
            .filter(|np| match direction {
                Direction::Ingress => np.ingress_in_effect,
                Direction::Egress => np.egress_in_effect,
            })
            .collect();
        if !selecting.is_empty() {
            return selecting.iter().any(|np| {
                let rules = match direction {
                    Direction::Ingress => &np.ingress_rules,
                    Direction::Egress => &np.egress_rules,
                };
                rules.iter().any(|r| {
                    f.port_in(&r.ports)
                        && r.peers.as_ref().is_none_or(|ps| {
                            ps.iter().any(|p| match p {
                                NpPeer::Ip(ip) => f.other_ip_in(&ip.set),
                                NpPeer::Pods(pp) => f.workload(other).is_some_and(|o| {
                                    let ns_ok = match &pp.namespaces {
                                        NamespaceMatch::Named(n) => &o.namespace == n,
                                        NamespaceMatch::Selected(s) => f.ns_matches(o, s),
                                    };
                                    ns_ok && pp.pods.matches(&o.labels)
                                }),
                            })
                        })
                })
            });
        }
        match e.policies().baseline.as_ref().filter(|b| selects(&b.subject)) {
            Some(b) => f.admin_first_match(b.rules(direction)).is_none_or(|r| r.action != AdminAction::Deny),
            None => true,
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]

    /// On random clusters, `decide` (the flat per-port walk) agrees with `allowed` and
    /// `direction_allowed` (the set evaluation) and with the uncompiled reference on every flow, at and around every port the
    /// policies and workloads name, for every protocol.
    #[test]
    fn decide_agrees_with_connection_sets(seed in proptest::prelude::any::<u64>()) {
        let (inventory, policies) = random::cluster(&mut random::Rng(seed));
        let e = Engine::compile(inventory, policies).unwrap();
        let mut peers: Vec<Peer> = (0..e.inventory().workloads.len()).map(Peer::Workload).collect();
        peers.extend(random::ADDRESSES.iter().map(|a| Peer::Ip(a.parse().unwrap())));
        let mut ports: Vec<u16> = random::PORTS
            .iter()
            .flat_map(|&p| [p.saturating_sub(1).max(1), p, p.saturating_add(1)])
            .chain([100, 101, 543, 8180, 65534, 65535])
            .collect();
        ports.sort_unstable();
        ports.dedup();
        for &src in &peers {
            for &dst in &peers {
                let both = e.allowed(src, dst);
                let egress = e.direction_allowed(Direction::Egress, src, dst);
                let ingress = e.direction_allowed(Direction::Ingress, dst, src);
                for proto in Protocol::ALL {
                    for &port in &ports {
                        let d = e.decide(src, dst, proto, port);
                        let at = || format!("{} => {} {proto} {port}", e.peer_name(src), e.peer_name(dst));
                        proptest::prop_assert_eq!(d.verdict == Verdict::Allow, both.contains(proto, port), "{}", at());
                        proptest::prop_assert_eq!(d.egress.allowed, egress.contains(proto, port), "egress {}", at());
                        proptest::prop_assert_eq!(d.ingress.allowed, ingress.contains(proto, port), "ingress {}", at());
                        let want_egress = reference::allows(&e, Direction::Egress, src, dst, proto, port);
                        let want_ingress = reference::allows(&e, Direction::Ingress, dst, src, proto, port);
                        proptest::prop_assert_eq!(d.egress.allowed, want_egress, "reference egress {}", at());
                        proptest::prop_assert_eq!(d.ingress.allowed, want_ingress, "reference ingress {}", at());
                    }
                }
            }
        }
    }
}
