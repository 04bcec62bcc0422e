//! The Kubernetes source against the fake API server ([`super::fake_api`]): recorded-style JSON
//! lists and watch events over real HTTP on loopback, through kube-rs's own client and watcher.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keyway_policy::engine::Peer;
use keyway_policy::{Engine, Protocol, Verdict};
use serde_json::{Value, json};

use super::fake_api::{ADMIN, BASELINE, FakeApi, NAMESPACES, NETWORK_POLICIES, PODS, WORKLOAD_ENTRIES};
use super::*;

const DEADLINE: Duration = Duration::from_secs(20);

/// A scratch directory with a static inventory, a secrets file and the configuration.
struct Scratch {
    dir: PathBuf,
    config: Config,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// zone-b's web (app=web, 10.128.2.5), a static copy of shop/db-ingress that allows nothing
/// (the cluster's must win) and a stale zone-a workload (dropped: the cluster owns zone-a).
const STATIC: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: remote-web, namespace: shop}
spec:
  template:
    metadata:
      labels: {app: web}
      annotations: {keyway.io/zone: zone-b, keyway.io/overlay-ips: 10.128.2.5}
    spec: {containers: [{name: c}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-ingress, namespace: shop}
spec: {podSelector: {matchLabels: {app: db}}, policyTypes: [Ingress]}
---
apiVersion: v1
kind: List
items:
- apiVersion: apps/v1
  kind: Deployment
  metadata: {name: stale, namespace: shop}
  spec:
    template:
      metadata: {labels: {app: stale}, annotations: {keyway.io/zone: zone-a, keyway.io/overlay-ips: 10.128.1.9}}
      spec: {containers: [{name: c}]}
"#;

fn scratch(prefix: &str) -> Scratch {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir =
        std::env::temp_dir().join(format!("keyway-kube-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
    std::fs::create_dir_all(dir.join("inventory")).unwrap();
    std::fs::write(dir.join("inventory/remote.yaml"), STATIC).unwrap();
    crate::secrets::EpochSecrets::generate(crate::clock::Clock::now_ms(&crate::clock::SystemClock))
        .unwrap()
        .save(&dir.join("epochs.json"))
        .unwrap();
    // The gateway's mesh certificate (the state loads it), from a mesh CA of the test's own.
    let mesh_ca = crate::ca::Ca::generate("cluster.local", 2, std::time::SystemTime::now()).unwrap();
    let (cert, key) =
        mesh_ca.issue_workload("keyway-system", "keyway-gateway", 1, std::time::SystemTime::now()).unwrap();
    std::fs::write(dir.join("mesh-ca.pem"), mesh_ca.cert_pem()).unwrap();
    std::fs::write(dir.join("mesh.pem"), cert).unwrap();
    std::fs::write(dir.join("mesh-key.pem"), key).unwrap();
    let text = format!(
        r#"
zone: zone-a
name: gw-1
tls: {{ca: ca.pem, cert: gw.pem, key: gw-key.pem}}
mesh: {{ca: {mesh_ca}, cert: {mesh_cert}, key: {mesh_key}}}
secrets: {secrets}
inventory: {inventory}
zones:
- name: zone-a
  gateways: [{{name: gw-1, address: "127.0.0.1:15443"}}]
- name: zone-b
  gateways: [{{name: gw-1, address: "127.0.0.2:15443"}}]
reload_interval_ms: 100
kubernetes: {{prefix: {prefix}, debounce_ms: 20, sync_timeout_ms: 10000}}
"#,
        secrets = dir.join("epochs.json").display(),
        inventory = dir.join("inventory").display(),
        mesh_ca = dir.join("mesh-ca.pem").display(),
        mesh_cert = dir.join("mesh.pem").display(),
        mesh_key = dir.join("mesh-key.pem").display(),
    );
    let config = Config::parse(&text, "test.yaml").unwrap();
    Scratch { dir, config }
}

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": {"team": "shop"}}})
}

/// A pod of ReplicaSet `owner` (or a bare pod when `owner` is empty), enforced (labelled
/// `keyway.io/enforce: "true"`).
fn pod(name: &str, owner: &str, app: &str, port: u16, pod_ip: &str) -> Value {
    let mut meta = json!({"name": name, "namespace": "shop", "labels": {"app": app, "keyway.io/enforce": "true"},
        "uid": format!("uid-{name}"), "creationTimestamp": "2026-01-01T00:00:00Z"});
    if !owner.is_empty() {
        meta["ownerReferences"] = json!([{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": owner,
            "uid": format!("uid-{owner}"), "controller": true}]);
    }
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta,
        "spec": {"containers": [{"name": "c", "image": "x", "ports": [{"containerPort": port, "name": "p"}]}]},
        "status": {"phase": "Running", "podIP": pod_ip, "podIPs": [{"ip": pod_ip}]}})
}

/// shop/db-ingress: app=db accepts app=web on 5432, from any namespace labelled team=shop.
fn db_ingress(port: u16) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "db-ingress", "namespace": "shop"},
        "spec": {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                         "ports": [{"protocol": "TCP", "port": port}]}]}})
}

/// The fake cluster most tests start from: namespace shop, web (2 pods), db, db-ingress.
async fn cluster(crds: bool) -> FakeApi {
    let api = FakeApi::start(crds).await;
    api.apply(NAMESPACES, namespace("shop"));
    api.apply(PODS, pod("web-a1", "web-a", "web", 8080, "10.0.0.11"));
    api.apply(PODS, pod("web-a2", "web-a", "web", 8080, "10.0.0.12"));
    api.apply(PODS, pod("db-0", "", "db", 5432, "10.0.0.20"));
    api.apply(NETWORK_POLICIES, db_ingress(5432));
    api
}

fn peer(engine: &Engine, ns: &str, name: &str) -> Peer {
    match engine.inventory().find(ns, name) {
        Some(i) => Peer::Workload(i),
        None => panic!("{ns}/{name} is not in the inventory: {:?}", names(engine)),
    }
}

fn names(engine: &Engine) -> Vec<String> {
    engine.inventory().workloads.iter().map(|w| w.display_name()).collect()
}

/// The verdict for `src` → `dst:port` (`ns/name` each); `None` when one is not in the inventory.
fn verdict(engine: &Engine, src: &str, dst: &str, port: u16) -> Option<Verdict> {
    let find = |w: &str| {
        let (ns, name) = w.split_once('/')?;
        engine.inventory().find(ns, name).map(Peer::Workload)
    };
    Some(engine.decide(find(src)?, find(dst)?, Protocol::Tcp, port).verdict)
}

const ALLOW: Option<Verdict> = Some(Verdict::Allow);
const DENY: Option<Verdict> = Some(Verdict::Deny);

async fn synced_source(api: &FakeApi, s: &Scratch) -> KubeSource {
    let mut source = KubeSource::start(api.client(), Arc::new(s.config.clone())).unwrap();
    source.wait_synced(DEADLINE).await.unwrap();
    source
}

/// A State and Metrics as the gateway has them, with the running source feeding them (as
/// `app::build_from` starts it: first engine, then `run`).
async fn running(mut source: KubeSource, s: &Scratch) -> (Arc<State>, Arc<Metrics>) {
    let metrics = Arc::new(Metrics::new().unwrap());
    let first = source.first().await.unwrap();
    let state = Arc::new(State::load(Arc::new(s.config.clone()), metrics.clone(), first).unwrap());
    let (requests, reload) = tokio::sync::watch::channel(0u64);
    let sink = Sink { state: state.clone(), metrics: metrics.clone(), reload };
    tokio::spawn(async move {
        let _requests = requests;
        source.run(sink).await;
    });
    (state, metrics)
}

/// Waits until `f` holds for the engine in force, or fails with `what`.
async fn until(state: &State, what: &str, f: impl Fn(&Engine) -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let engine = state.engine();
        if f(&engine) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}; workloads {:?}",
            names(&engine)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn reloads(metrics: &Metrics, outcome: &str) -> u64 {
    metrics.reloads.with_label_values(&["kubernetes", outcome]).get()
}

fn overlay(engine: &Engine, ns: &str, name: &str) -> Vec<IpAddr> {
    engine.inventory().workloads[engine.inventory().find(ns, name).unwrap()].overlay_ips.clone()
}

#[tokio::test]
async fn initial_list_builds_the_inventory_and_merges_the_static_directory() {
    let s = scratch("10.128.1.0/24");
    let api = cluster(false).await;
    let mut source = synced_source(&api, &s).await;
    let built = source.build().await.unwrap();
    let e = &built.engine;
    assert_eq!(
        names(e),
        ["shop/db-0[Pod]", "shop/remote-web[Deployment]", "shop/web-a[ReplicaSet]"],
        "the stale zone-a Deployment of the static directory is dropped"
    );
    assert_eq!(built.skipped, 0);
    // The cluster's db-ingress wins over the static one (which allows nothing).
    assert_eq!(verdict(e, "shop/web-a", "shop/db-0", 5432), ALLOW);
    assert_eq!(verdict(e, "shop/remote-web", "shop/db-0", 5432), ALLOW, "zone-b's web is a peer");
    assert_eq!(verdict(e, "shop/web-a", "shop/db-0", 5433), DENY);
    let web = &e.inventory().workloads[e.inventory().find("shop", "web-a").unwrap()];
    assert_eq!(web.zone.as_deref(), Some("zone-a"), "pods get this gateway's zone");
    assert_eq!(web.sidecar_ips.len(), 2, "sidecar addresses come from status.podIPs");
    assert_eq!(web.overlay_ips.len(), 2, "each pod of the zone gets an overlay address");
    assert!(web.overlay_ips.iter().all(|ip| ip.to_string().starts_with("10.128.1.")));
    assert_eq!(e.peer_for(web.overlay_ips[0]), peer(e, "shop", "web-a"));
    assert_eq!(overlay(e, "shop", "remote-web"), ["10.128.2.5".parse::<IpAddr>().unwrap()]);
}

#[tokio::test]
async fn admin_policy_crds_absent_404_is_not_an_error_and_present_ones_apply() {
    let s = scratch("10.128.1.0/24");
    let api = cluster(false).await;
    let mut source = synced_source(&api, &s).await;
    source.build().await.unwrap();
    let reqs = api.requests();
    assert!(reqs.iter().any(|r| r.starts_with(&format!("GET {ADMIN}"))), "{reqs:?}");
    assert!(reqs.iter().any(|r| r.starts_with(&format!("GET {BASELINE}"))), "{reqs:?}");

    // With the CRDs: a BANP denying web → db is overridden by the NetworkPolicy (it allows), an
    // ANP denying db → web applies.
    let api = cluster(true).await;
    api.apply(
        ADMIN,
        json!({"apiVersion": "policy.networking.k8s.io/v1alpha1", "kind": "AdminNetworkPolicy",
            "metadata": {"name": "no-db-to-web"},
            "spec": {"priority": 10, "subject": {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "web"}}}},
                "ingress": [{"name": "deny-db", "action": "Deny",
                    "from": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "db"}}}}]}]}}),
    );
    let mut source = synced_source(&api, &s).await;
    let built = source.build().await.unwrap();
    assert_eq!(verdict(&built.engine, "shop/db-0", "shop/web-a", 8080), DENY);
    assert_eq!(verdict(&built.engine, "shop/web-a", "shop/db-0", 5432), ALLOW);
}

#[tokio::test]
async fn watch_events_change_the_verdicts_without_a_restart() {
    let s = scratch("10.128.1.0/24");
    let api = cluster(false).await;
    let source = synced_source(&api, &s).await;
    let (state, metrics) = running(source, &s).await;
    // The running loop installs after its first change; the initial build is the caller's.
    api.apply(PODS, pod("cache-0", "", "cache", 6379, "10.0.0.30"));
    until(&state, "cache-0 added", |e| e.inventory().find("shop", "cache-0").is_some()).await;
    assert_eq!(verdict(&state.engine(), "shop/cache-0", "shop/db-0", 5432), DENY);

    // Modify: cache-0 becomes app=web, so db-ingress now admits it.
    api.apply(PODS, pod("cache-0", "", "web", 6379, "10.0.0.30"));
    until(&state, "cache-0 relabelled", |e| verdict(e, "shop/cache-0", "shop/db-0", 5432) == ALLOW).await;

    // A policy change: db-ingress moves to port 5433.
    api.apply(NETWORK_POLICIES, db_ingress(5433));
    until(&state, "db-ingress on 5433", |e| {
        verdict(e, "shop/web-a", "shop/db-0", 5432) == DENY && verdict(e, "shop/web-a", "shop/db-0", 5433) == ALLOW
    })
    .await;

    // Delete the policy: the static directory's db-ingress, which the cluster's shadowed, is in
    // force again (the merge rule) and allows nothing.
    api.delete(NETWORK_POLICIES, "shop/db-ingress");
    until(&state, "db-ingress deleted", |e| {
        verdict(e, "shop/web-a", "shop/db-0", 5433) == DENY
            && e.policies().network.iter().all(|p| p.file.ends_with("inventory/remote.yaml"))
    })
    .await;

    // Delete the pod.
    api.delete(PODS, "shop/cache-0");
    until(&state, "cache-0 deleted", |e| e.inventory().find("shop", "cache-0").is_none()).await;
    assert!(reloads(&metrics, "ok") >= 5);
    assert_eq!(reloads(&metrics, "rejected"), 0);
}

#[tokio::test]
async fn gone_410_forces_a_relist_that_catches_up_with_lost_events() {
    let s = scratch("10.128.1.0/24");
    let api = cluster(false).await;
    let source = synced_source(&api, &s).await;
    let (state, _metrics) = running(source, &s).await;
    api.apply(PODS, pod("cache-0", "", "cache", 6379, "10.0.0.30"));
    until(&state, "cache-0 added", |e| e.inventory().find("shop", "cache-0").is_some()).await;
    let lists_before =
        api.requests().iter().filter(|r| r.starts_with(&format!("GET {PODS}?")) && !r.contains("watch=")).count();

    // The deletion never reaches the watch; the history is compacted: 410 Gone, then a relist.
    api.delete_silently(PODS, "shop/cache-0");
    api.expire(PODS);
    until(&state, "cache-0 gone after the relist", |e| e.inventory().find("shop", "cache-0").is_none()).await;
    let lists_after =
        api.requests().iter().filter(|r| r.starts_with(&format!("GET {PODS}?")) && !r.contains("watch=")).count();
    assert!(lists_after > lists_before, "pods were listed again ({lists_before} → {lists_after})");
    assert!(state.engine().inventory().find("shop", "web-a").is_some(), "the rest stays");
}

#[tokio::test]
async fn a_malformed_object_is_reported_and_skipped_while_the_rest_applies() {
    let s = scratch("10.128.1.0/24");
    let api = cluster(false).await;
    let mut bad = pod("broken-0", "", "web", 8080, "10.0.0.40");
    bad["metadata"]["annotations"] = json!({"keyway.io/overlay-ips": "not-an-address"});
    api.apply(PODS, bad);
    let mut bad_np = db_ingress(5432);
    bad_np["metadata"]["name"] = json!("bad-cidr");
    bad_np["spec"]["ingress"] = json!([{"from": [{"ipBlock": {"cidr": "10.0.0.0/99"}}]}]);
    api.apply(NETWORK_POLICIES, bad_np);
    let mut source = synced_source(&api, &s).await;
    let built = source.build().await.unwrap();
    assert_eq!(built.skipped, 2);
    assert!(built.engine.inventory().find("shop", "broken-0").is_none());
    assert_eq!(verdict(&built.engine, "shop/web-a", "shop/db-0", 5432), ALLOW, "the rest applies");

    // The error names the object and the field (what the log line carries).
    let objs = objects::local_objects(source.stores.snapshot().unwrap(), "zone-a");
    let broken = objs.iter().find(|o| o.source == "kubernetes:pods/shop/broken-0").unwrap();
    let err = objects::check(&broken.object()).unwrap_err().to_string();
    assert!(
        err.starts_with("kubernetes:pods/shop/broken-0: Pod shop/broken-0: metadata.annotations.keyway.io/overlay-ips"),
        "{err}"
    );
    let np = objs.iter().find(|o| o.source == "kubernetes:networkpolicies/shop/bad-cidr").unwrap();
    let err = objects::check(&np.object()).unwrap_err().to_string();
    assert!(err.contains("NetworkPolicy shop/bad-cidr: spec.ingress[0].from[0].ipBlock.cidr"), "{err}");
}

/// An object that makes the whole set fail to compile (a pod whose labels split its workload
/// under a policy that tells them apart) is left out on its own; the rest applies, updates go on.
#[tokio::test]
async fn a_pod_that_splits_its_workload_is_refused_alone_and_updates_go_on() {
    let s = scratch("10.128.1.0/24");
    let api = cluster(false).await;
    let source = synced_source(&api, &s).await;
    let (state, metrics) = running(source, &s).await;
    api.apply(PODS, pod("cache-0", "", "cache", 6379, "10.0.0.30"));
    until(&state, "cache-0 added", |e| e.inventory().find("shop", "cache-0").is_some()).await;
    // Two pods of web-a with different labels, and a policy that tells them apart: each object
    // loads alone, the set does not compile while web-a3 is in it.
    let mut odd = pod("web-a3", "web-a", "web", 8080, "10.0.0.13");
    odd["metadata"]["labels"]["tier"] = json!("canary");
    api.apply(PODS, odd);
    let mut np = db_ingress(5432);
    np["metadata"]["name"] = json!("canary-only");
    np["spec"]["ingress"] = json!([{"from": [{"podSelector": {"matchLabels": {"tier": "canary"}}}]}]);
    api.apply(NETWORK_POLICIES, np);
    until(&state, "canary-only in force", |e| e.policies().network.len() == 2).await;
    assert_eq!(reloads(&metrics, "rejected"), 0, "no update was rejected whole");
    assert_eq!(metrics.kubernetes_refused.get(), 1);
    let e = state.engine();
    assert_eq!(overlay(&e, "shop", "web-a").len(), 2, "web-a3 is left out, web-a1 and web-a2 stay");
    // And a later change still applies.
    api.apply(PODS, pod("cache-1", "", "cache2", 6379, "10.0.0.31"));
    until(&state, "cache-1 added", |e| e.inventory().find("shop", "cache-1").is_some()).await;
    let mut direct = synced_source(&api, &s).await;
    let built = direct.build().await.unwrap();
    assert_eq!(built.refused.len(), 1, "{:?}", built.refused);
    assert_eq!(built.refused[0].0, "kubernetes:pods/shop/web-a3");
    assert!(built.refused[0].1.contains("its pods have different labels"), "{:?}", built.refused);
}

#[tokio::test]
async fn overlay_addresses_are_recorded_stable_across_a_restart_and_never_collide() {
    let s = scratch("10.128.1.0/27");
    let api = cluster(false).await;
    // A pod that brings its own address inside the prefix, and one recorded before (by an
    // earlier gateway): both must be kept and never given to another pod.
    let mut own = pod("own-0", "", "own", 80, "10.0.0.50");
    own["metadata"]["annotations"] = json!({"keyway.io/overlay-ips": "10.128.1.3"});
    api.apply(PODS, own);
    api.set_configmap("keyway-overlay-addresses", json!({"shop.db-0": "10.128.1.29", "shop.gone-pod": "10.128.1.4"}));
    for i in 0..12 {
        api.apply(PODS, pod(&format!("batch-{i}"), "", "batch", 80, &format!("10.0.1.{i}")));
    }
    let mut first = synced_source(&api, &s).await;
    let built = first.build().await.unwrap();
    let recorded = api.configmap_data("keyway-overlay-addresses").unwrap();
    assert_eq!(recorded.get("shop.db-0").map(String::as_str), Some("10.128.1.29"), "the record is read back");
    assert!(!recorded.contains_key("shop.gone-pod"), "entries of pods that no longer exist are dropped");
    assert!(!recorded.contains_key("shop.own-0"), "annotated pods are not recorded");
    assert_eq!(recorded.len(), 15, "web-a1, web-a2, db-0 and 12 batch pods: {recorded:?}");
    let mut all: Vec<IpAddr> = recorded.values().map(|v| v.parse().unwrap()).collect();
    all.push("10.128.1.3".parse().unwrap());
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 16, "no two pods share an address: {recorded:?}");
    assert!(!recorded.values().any(|v| v == "10.128.1.0" || v == "10.128.1.31"));
    assert_eq!(overlay(&built.engine, "shop", "db-0"), ["10.128.1.29".parse::<IpAddr>().unwrap()]);
    drop(first);

    // A restart: the same addresses, and nothing written.
    let writes_before = api.requests().iter().filter(|r| r.starts_with("PUT") || r.starts_with("POST")).count();
    let mut second = synced_source(&api, &s).await;
    let again = second.build().await.unwrap();
    let writes_after = api.requests().iter().filter(|r| r.starts_with("PUT") || r.starts_with("POST")).count();
    assert_eq!(writes_before, writes_after, "an unchanged record is not rewritten");
    let by_name = |e: &Engine| -> BTreeMap<String, Vec<IpAddr>> {
        e.inventory().workloads.iter().map(|w| (w.short_name(), w.overlay_ips.clone())).collect()
    };
    assert_eq!(by_name(&built.engine), by_name(&again.engine));
}

/// Attacker: whoever deploys a pod (any namespace) and annotates it with another workload's
/// overlay address, to receive its traffic or to break the zone's inventory. Expected: the
/// claiming pod alone is left out (logged, counted); the address stays with its holder (the one
/// keyway recorded, or the older claim), and the rest of the inventory applies.
#[tokio::test]
async fn a_pod_claiming_another_workloads_overlay_address_is_refused_alone() {
    let s = scratch("10.128.1.0/27");
    let api = cluster(false).await;
    api.set_configmap("keyway-overlay-addresses", json!({"shop.db-0": "10.128.1.29"}));
    let claim = |name: &str, ip: &str, created: &str| {
        let mut p = pod(name, "", name, 80, "10.0.0.60");
        p["metadata"]["annotations"] = json!({"keyway.io/overlay-ips": ip});
        p["metadata"]["creationTimestamp"] = json!(created);
        p
    };
    // db-0's recorded address, claimed by a newcomer.
    api.apply(PODS, claim("evil-0", "10.128.1.29", "2026-06-01T00:00:00Z"));
    // Two annotated pods claiming one address: the older keeps it.
    api.apply(PODS, claim("own-0", "10.128.1.3", "2026-02-01T00:00:00Z"));
    api.apply(PODS, claim("copy-0", "10.128.1.3", "2026-06-01T00:00:00Z"));
    let mut source = synced_source(&api, &s).await;
    let built = source.build().await.unwrap();
    let e = &built.engine;
    assert_eq!(overlay(e, "shop", "db-0"), ["10.128.1.29".parse::<IpAddr>().unwrap()]);
    assert_eq!(overlay(e, "shop", "own-0"), ["10.128.1.3".parse::<IpAddr>().unwrap()]);
    assert!(e.inventory().find("shop", "evil-0").is_none(), "{:?}", names(e));
    assert!(e.inventory().find("shop", "copy-0").is_none(), "{:?}", names(e));
    let refused: Vec<&str> = built.refused.iter().map(|(source, _)| source.as_str()).collect();
    assert_eq!(refused, ["kubernetes:pods/shop/copy-0", "kubernetes:pods/shop/evil-0"]);
    assert!(built.refused.iter().all(|(_, why)| why.contains("overlay address")), "{:?}", built.refused);
}

/// Only pods that opt in (labelled `keyway.io/enforce: "true"`) get an overlay address.
#[tokio::test]
async fn only_enforced_pods_get_an_overlay_address() {
    let s = scratch("10.128.1.0/27");
    let api = cluster(false).await;
    let mut plain = pod("plain-0", "", "plain", 80, "10.0.0.70");
    plain["metadata"]["labels"] = json!({"app": "plain"});
    api.apply(PODS, plain);
    let mut source = synced_source(&api, &s).await;
    let built = source.build().await.unwrap();
    assert!(overlay(&built.engine, "shop", "plain-0").is_empty(), "a pod that did not opt in got an address");
    assert_eq!(overlay(&built.engine, "shop", "db-0").len(), 1);
    let recorded = api.configmap_data("keyway-overlay-addresses").unwrap();
    assert!(!recorded.contains_key("shop.plain-0"), "{recorded:?}");
}

/// A device of zone-b in namespace shop, as an Istio WorkloadEntry.
fn device(name: &str, app: &str, overlay_ip: &str) -> Value {
    json!({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
        "metadata": {"name": name, "namespace": "shop",
            "annotations": {"keyway.io/zone": "zone-b", "keyway.io/overlay-ips": overlay_ip}},
        "spec": {"labels": {"app": app}, "serviceAccount": name, "ports": {"ssh": 22}}})
}

#[tokio::test]
async fn devices_come_from_the_clusters_workload_entries_and_the_static_directory() {
    let s = scratch("10.128.1.0/24");
    // A device of this gateway's own zone in the static directory stays: the cluster is the
    // authority on its zone's pods, not on devices.
    std::fs::write(
        s.dir.join("inventory/devices.yaml"),
        "apiVersion: networking.istio.io/v1beta1\nkind: WorkloadEntry\nmetadata:\n  name: kiosk\n  namespace: shop\n  \
         annotations: {keyway.io/zone: zone-a, keyway.io/overlay-ips: 10.128.9.1}\nspec: {labels: {app: web}}\n",
    )
    .unwrap();
    let api = cluster(true).await;
    api.apply(WORKLOAD_ENTRIES, device("laptop-7", "web", "10.128.2.77"));
    let source = synced_source(&api, &s).await;
    assert!(api.requests().iter().any(|r| r.starts_with(&format!("GET {WORKLOAD_ENTRIES}"))));
    let (state, _) = running(source, &s).await;
    let e = state.engine();
    let laptop = &e.inventory().workloads[e.inventory().find("shop", "laptop-7").unwrap()];
    assert_eq!(laptop.display_name(), "shop/laptop-7[WorkloadEntry]");
    assert_eq!(laptop.identity("cluster.local"), "spiffe://cluster.local/ns/shop/sa/laptop-7");
    assert_eq!(laptop.overlay_ips, ["10.128.2.77".parse::<IpAddr>().unwrap()], "no address is allocated to a device");
    // db-ingress selects devices by their labels as it selects pods.
    assert_eq!(verdict(&e, "shop/laptop-7", "shop/db-0", 5432), ALLOW);
    assert_eq!(verdict(&e, "shop/kiosk", "shop/db-0", 5432), ALLOW, "the static device of this zone is kept");
    assert_eq!(verdict(&e, "shop/db-0", "shop/laptop-7", 22), ALLOW, "nothing selects the laptop's ingress");

    // Watched: a relabelled device loses its access, a deleted one leaves.
    api.apply(WORKLOAD_ENTRIES, device("laptop-7", "guest", "10.128.2.77"));
    until(&state, "laptop-7 relabelled", |e| verdict(e, "shop/laptop-7", "shop/db-0", 5432) == DENY).await;
    api.delete(WORKLOAD_ENTRIES, "shop/laptop-7");
    until(&state, "laptop-7 deleted", |e| e.inventory().find("shop", "laptop-7").is_none()).await;
}
