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
