//! Criterion benchmark of [`keyway_policy::Engine::decide`]: one group `decide` with every
//! combination of 10, 1 000 and 10 000 NetworkPolicies over 1 000, 10 000 and 50 000 generated
//! workloads, each deciding a fixed list of random flows in turn. The generator ([`cluster`]) is
//! shared with the `scale` benchmark (percentiles, compile time, memory), which includes this
//! file as a module.
//!
//! Run with `cargo bench -p keyway-policy --bench decide`. Without `--bench` (as `cargo test
//! --benches` runs it) only the smallest combination is built.

// Benchmark harness: a failure to generate or compile the synthetic cluster is a bug to stop on.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use keyway_policy::Engine;

use cluster::Spec;

/// Distinct flows per combination, cycled through.
const FLOWS: usize = 1 << 16;

fn decide(c: &mut Criterion) {
    let specs = if cluster::under_cargo_bench() { cluster::matrix() } else { vec![Spec::new(10, 1_000)] };
    let mut group = c.benchmark_group("decide");
    group
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .throughput(Throughput::Elements(1));
    for spec in specs {
        // One engine per combination, compiled once and dropped before the next.
        let generated = cluster::generate(spec);
        let engine = Engine::compile(generated.inventory, generated.policies).expect("the generated cluster compiles");
        let flows = cluster::flows(&engine, FLOWS, cluster::SEED);
        let mask = flows.len() - 1;
        let id = BenchmarkId::new(format!("{}_policies", spec.policies), format!("{}_workloads", spec.workloads));
        group.bench_function(id, |b| {
            let mut i = 0usize;
            b.iter(|| {
                let f = flows[i & mask];
                i = i.wrapping_add(1);
                engine.decide(black_box(f.src), black_box(f.dst), black_box(f.protocol), black_box(f.port))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, decide);
criterion_main!(benches);

/// A synthetic cluster shaped like real ones: namespaces of ~50 workloads owned by teams; in the
/// namespaces that have policies, a default deny and allow policies per app; and the flows to
/// decide.
pub(crate) mod cluster {
    use std::collections::{BTreeMap, BTreeSet};
    use std::net::{IpAddr, Ipv4Addr};

    use keyway_policy::Engine;
    use keyway_policy::engine::Peer;
    use keyway_policy::inventory::{ContainerPort, Inventory, NAMESPACE_NAME_LABEL, Namespace, Workload, ZONE_LABEL};
    use keyway_policy::ip::{IpSet, parse_cidr};
    use keyway_policy::policy::netpol::{Peer as NpPeer, Rule};
    use keyway_policy::policy::{
        AdminAction, AdminPeer, AdminPolicy, AdminRule, BaselinePolicy, IpPeer, NamespaceMatch, NetworkPolicy, PodPeer,
        PolicySet, PortSpec, Subject,
    };
    use keyway_policy::ports::Protocol;
    use keyway_policy::selector::{Labels, Operator, Requirement, Selector};

    /// Numbers of NetworkPolicies and of workloads the benchmarks combine.
    pub(crate) const POLICIES: [usize; 3] = [10, 1_000, 10_000];
    pub(crate) const WORKLOADS: [usize; 3] = [1_000, 10_000, 50_000];
    /// The seed of every generator.
    pub(crate) const SEED: u64 = 0x6b65_7977_6179;

    const WORKLOADS_PER_NAMESPACE: usize = 50;
    /// A namespace that has policies has at least this many (when there are that many).
    const MIN_POLICIES_PER_NAMESPACE: usize = 5;
    const TEAMS: usize = 40;
    const ENVS: [&str; 4] = ["prod", "prod", "staging", "dev"];
    const ZONES: [&str; 3] = ["zone-a", "zone-b", "zone-c"];
    /// The tier of app `a` is `TIERS[a % 6]`.
    const TIERS: [&str; 6] = ["web", "api", "api", "worker", "db", "cache"];
    const SYSTEM: &str = "kube-system";

    /// One combination.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub(crate) struct Spec {
        /// NetworkPolicies.
        pub(crate) policies: usize,
        /// Workloads.
        pub(crate) workloads: usize,
        /// Whether admin tiers (3 AdminNetworkPolicies, a baseline) are added.
        pub(crate) tiers: bool,
    }

    impl Spec {
        /// A combination; the 10 000-policy ones carry the admin tiers.
        pub(crate) fn new(policies: usize, workloads: usize) -> Spec {
            Spec { policies, workloads, tiers: policies >= 10_000 }
        }
    }

    /// Every combination, policies major.
    pub(crate) fn matrix() -> Vec<Spec> {
        POLICIES.iter().flat_map(|&p| WORKLOADS.iter().map(move |&w| Spec::new(p, w))).collect()
    }

    /// Whether the binary runs under `cargo bench` (which passes `--bench`) rather than as a
    /// smoke test under `cargo test --benches`.
    pub(crate) fn under_cargo_bench() -> bool {
        std::env::args().any(|a| a == "--bench")
    }

    /// SplitMix64.
    #[derive(Debug)]
    pub(crate) struct Rng(u64);

    impl Rng {
        pub(crate) fn new(seed: u64) -> Rng {
            Rng(seed)
        }

        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        /// Uniform in `0..n` (`n > 0`).
        pub(crate) fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        /// True with probability `percent`/100.
        fn chance(&mut self, percent: usize) -> bool {
            self.below(100) < percent
        }

        fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
            &items[self.below(items.len())]
        }
    }

    /// A generated inventory and its policies.
    #[derive(Debug)]
    pub(crate) struct Generated {
        pub(crate) inventory: Inventory,
        pub(crate) policies: PolicySet,
    }

    /// One flow to decide.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct Flow {
        pub(crate) src: Peer,
        pub(crate) dst: Peer,
        pub(crate) protocol: Protocol,
        pub(crate) port: u16,
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn sel(pairs: &[(&str, &str)]) -> Selector {
        Selector { match_labels: labels(pairs), expressions: Vec::new() }
    }

    /// A selector with one expression; `values` sorted, as validation leaves them.
    fn expr(key: &str, operator: Operator, values: &[&str]) -> Selector {
        let values = values.iter().map(|v| (*v).to_owned()).collect();
        Selector {
            match_labels: Labels::new(),
            expressions: vec![Requirement { key: key.to_owned(), operator, values }],
        }
    }

    fn num(protocol: Protocol, port: u16) -> PortSpec {
        PortSpec::Numbers { protocol, first: port, last: port }
    }

    fn named(name: &str) -> PortSpec {
        PortSpec::Named { protocol: Some(Protocol::Tcp), name: name.to_owned() }
    }

    fn ip_peer(cidr: &str, except: &[&str]) -> IpPeer {
        let mut set = IpSet::from_range(parse_cidr(cidr).expect("cidr").range);
        for e in except {
            set = set.subtract_range(parse_cidr(e).expect("cidr").range);
        }
        let text = if except.is_empty() { cidr.to_owned() } else { format!("{cidr} except {}", except.join(", ")) };
        IpPeer { set, text }
    }

    fn pods(namespaces: NamespaceMatch, pods: Selector) -> NpPeer {
        NpPeer::Pods(PodPeer { namespaces, pods })
    }

    fn ns_named(name: &str) -> Selector {
        sel(&[(NAMESPACE_NAME_LABEL, name)])
    }

    fn container_ports(tier: &str) -> Vec<ContainerPort> {
        let p = |name: &str, port, protocol| ContainerPort { name: Some(name.to_owned()), port, protocol };
        let tcp = Protocol::Tcp;
        match tier {
            "web" => vec![p("http", 8080, tcp), p("metrics", 9090, tcp)],
            "api" => vec![p("http", 8080, tcp), p("grpc", 9000, tcp), p("metrics", 9090, tcp)],
            "worker" => vec![p("metrics", 9090, tcp)],
            "db" => vec![p("postgres", 5432, tcp), p("metrics", 9187, tcp)],
            _ => vec![p("redis", 6379, tcp)],
        }
    }

    fn app(a: usize) -> String {
        format!("svc-{a}")
    }

    /// The inventory and policies of one combination.
    pub(crate) fn generate(spec: Spec) -> Generated {
        let mut rng = Rng::new(SEED ^ ((spec.policies as u64) << 32) ^ spec.workloads as u64);
        let ns_count = (spec.workloads / WORKLOADS_PER_NAMESPACE).max(1);
        let mut inventory = Inventory::default();
        let mut workloads = Vec::with_capacity(spec.workloads);
        let mut overlay = 0x0a80_0000u32; // 10.128.0.0/9
        let mut workload = |ns: &str, zone: &str, name: String, kind: &str, labels: Labels, ports| {
            overlay += 1;
            Workload {
                namespace: ns.to_owned(),
                name: name.clone(),
                kind: kind.to_owned(),
                labels,
                ports,
                service_account: name,
                zone: Some(zone.to_owned()),
                overlay_ips: vec![IpAddr::V4(Ipv4Addr::from(overlay))],
                sidecar_ips: Vec::new(),
                file: format!("cluster/{ns}.yaml"),
                label_variants: Vec::new(),
            }
        };

        // kube-system: DNS and the monitoring scraper, which policies name.
        let sys_labels = labels(&[(NAMESPACE_NAME_LABEL, SYSTEM), ("team", "platform"), ("env", "system")]);
        inventory.namespaces.insert(SYSTEM.to_owned(), Namespace { name: SYSTEM.to_owned(), labels: sys_labels });
        let dns_ports = vec![
            ContainerPort { name: Some("dns".into()), port: 53, protocol: Protocol::Udp },
            ContainerPort { name: Some("dns-tcp".into()), port: 53, protocol: Protocol::Tcp },
            ContainerPort { name: Some("metrics".into()), port: 9153, protocol: Protocol::Tcp },
        ];
        let (dns_l, prom_l) = (labels(&[("k8s-app", "kube-dns")]), labels(&[("app", "prometheus")]));
        workloads.push(workload(SYSTEM, ZONES[0], "coredns".into(), "Deployment", dns_l, dns_ports));
        let prom_ports = vec![ContainerPort { name: Some("web".into()), port: 9090, protocol: Protocol::Tcp }];
        workloads.push(workload(SYSTEM, ZONES[0], "prometheus".into(), "StatefulSet", prom_l, prom_ports));

        let app_workloads = spec.workloads.saturating_sub(workloads.len());
        let mut apps_per_ns = Vec::with_capacity(ns_count);
        for i in 0..ns_count {
            let name = format!("ns-{i:05}");
            let zone = ZONES[i % ZONES.len()];
            let team = format!("team-{}", i % TEAMS);
            let ns_labels =
                labels(&[(NAMESPACE_NAME_LABEL, &name), ("team", &team), ("env", ENVS[i % 4]), (ZONE_LABEL, zone)]);
            let n = app_workloads / ns_count + usize::from(i < app_workloads % ns_count);
            for j in 0..n {
                // Two versions of each app: `svc-3-v1`, `svc-3-v2`.
                let (a, version) = (j / 2, ["v1", "v2"][j % 2]);
                let tier = TIERS[a % TIERS.len()];
                let kind = if matches!(tier, "db" | "cache") { "StatefulSet" } else { "Deployment" };
                let l = labels(&[("app", &app(a)), ("tier", tier), ("version", version)]);
                workloads.push(workload(&name, zone, format!("{}-{version}", app(a)), kind, l, container_ports(tier)));
            }
            apps_per_ns.push(n.div_ceil(2).max(1));
            inventory.namespaces.insert(name.clone(), Namespace { name, labels: ns_labels });
        }
        workloads.sort_by_cached_key(Workload::display_name);
        inventory.workloads = workloads;

        // Policies live in the first namespaces of an even spread, at least a few per namespace.
        let mut policies = PolicySet::default();
        let per_ns = spec.policies.div_ceil(ns_count).max(MIN_POLICIES_PER_NAMESPACE.min(spec.policies)).max(1);
        let policed = spec.policies.div_ceil(per_ns);
        let teams = TEAMS.min(ns_count);
        for k in 0..policed {
            let i = k * ns_count / policed;
            let count = per_ns.min(spec.policies - k * per_ns);
            for j in 0..count {
                policies.network.push(network_policy(&mut rng, i, apps_per_ns[i], j, teams));
            }
        }
        if spec.tiers {
            admin_tiers(&mut policies);
        }
        Generated { inventory, policies }
    }

    fn dns_rule() -> Rule {
        let peer = pods(NamespaceMatch::Selected(ns_named(SYSTEM)), sel(&[("k8s-app", "kube-dns")]));
        Rule { peers: Some(vec![peer]), ports: vec![num(Protocol::Udp, 53), num(Protocol::Tcp, 53)] }
    }

    /// Policy `j` of namespace `i`: a default deny first, then allow policies for its apps in
    /// the shapes real clusters have.
    fn network_policy(rng: &mut Rng, i: usize, apps: usize, j: usize, teams: usize) -> NetworkPolicy {
        let ns = format!("ns-{i:05}");
        let here = || NamespaceMatch::Named(format!("ns-{i:05}"));
        let team = |rng: &mut Rng| NamespaceMatch::Selected(sel(&[("team", &format!("team-{}", rng.below(teams)))]));
        let mut np = NetworkPolicy {
            namespace: ns.clone(),
            name: String::new(),
            file: format!("cluster/{ns}-policies.yaml"),
            pod_selector: Selector::everything(),
            ingress_in_effect: true,
            egress_in_effect: false,
            ingress_rules: Vec::new(),
            egress_rules: Vec::new(),
        };
        if j == 0 {
            // One namespace in four also denies egress, except DNS.
            np.name = "default-deny".into();
            if i % 4 == 1 {
                np.egress_in_effect = true;
                np.egress_rules.push(dns_rule());
            }
            return np;
        }
        if j == 1 && i.is_multiple_of(2) {
            np.name = "allow-same-namespace".into();
            np.ingress_rules.push(Rule { peers: Some(vec![pods(here(), Selector::everything())]), ports: Vec::new() });
            return np;
        }
        let a = (j - 1) % apps;
        let target = app(a);
        np.pod_selector = sel(&[("app", &target)]);
        let variant = rng.below(8);
        np.name = format!("p{j:05}-v{variant}-{target}");
        let rule = |peers: Vec<NpPeer>, ports: Vec<PortSpec>| Rule { peers: Some(peers), ports };
        match variant {
            0 => np.ingress_rules.push(rule(vec![pods(here(), sel(&[("tier", "web")]))], vec![named("http")])),
            1 => np
                .ingress_rules
                .push(rule(vec![pods(team(rng), Selector::everything())], vec![num(Protocol::Tcp, 8080)])),
            2 => np.ingress_rules.push(rule(
                vec![pods(team(rng), sel(&[("tier", "web")]))],
                vec![PortSpec::Numbers { protocol: Protocol::Tcp, first: 8000, last: 8100 }],
            )),
            3 => np.ingress_rules.push(rule(
                vec![
                    NpPeer::Ip(ip_peer("10.0.0.0/8", &["10.1.0.0/16"])),
                    pods(NamespaceMatch::Selected(Selector::everything()), expr("tier", Operator::In, &["api", "web"])),
                ],
                vec![num(Protocol::Tcp, 443), num(Protocol::Tcp, 8080)],
            )),
            4 => {
                // Ingress and egress: scraped by its neighbour; talks to its namespace, databases,
                // HTTPS and DNS.
                np.egress_in_effect = true;
                let caller = sel(&[("app", &app((a + 1) % apps))]);
                np.ingress_rules
                    .push(rule(vec![pods(here(), caller)], vec![named("metrics"), num(Protocol::Tcp, 9000)]));
                np.egress_rules
                    .push(Rule { peers: Some(vec![pods(here(), Selector::everything())]), ports: Vec::new() });
                let prod = NamespaceMatch::Selected(sel(&[("env", "prod")]));
                np.egress_rules.push(rule(vec![pods(prod, sel(&[("tier", "db")]))], vec![num(Protocol::Tcp, 5432)]));
                let internet = NpPeer::Ip(ip_peer("0.0.0.0/0", &["10.0.0.0/8", "192.168.0.0/16"]));
                np.egress_rules.push(rule(vec![internet], vec![num(Protocol::Tcp, 443)]));
                np.egress_rules.push(dns_rule());
            }
            5 => {
                let prom = pods(NamespaceMatch::Selected(ns_named(SYSTEM)), sel(&[("app", "prometheus")]));
                np.ingress_rules.push(rule(vec![prom], vec![named("metrics")]));
                let not_dev = NamespaceMatch::Selected(expr("env", Operator::NotIn, &["dev"]));
                np.ingress_rules.push(rule(
                    vec![pods(not_dev, Selector::everything())],
                    vec![num(Protocol::Tcp, 8080), num(Protocol::Tcp, 9000)],
                ));
            }
            6 => {
                // A canary: only v2, from anything with a tier in the namespace.
                np.pod_selector = sel(&[("app", &target), ("version", "v2")]);
                np.ingress_rules.push(rule(
                    vec![pods(here(), expr("tier", Operator::Exists, &[]))],
                    vec![PortSpec::Numbers { protocol: Protocol::Tcp, first: 8080, last: 8090 }],
                ));
            }
            _ => {
                let anyone_here = pods(here(), Selector::everything());
                np.ingress_rules.push(rule(vec![anyone_here], vec![named("http"), named("grpc")]));
            }
        }
        np
    }

    /// Three AdminNetworkPolicies (sorted by priority, unique priorities) and a baseline.
    fn admin_tiers(policies: &mut PolicySet) {
        let rule = |name: &str, action, peers, ports| AdminRule { name: name.to_owned(), action, peers, ports };
        let anp = |name: &str, priority, subject, ingress, egress| AdminPolicy {
            name: name.to_owned(),
            file: "cluster/admin.yaml".to_owned(),
            priority,
            subject,
            ingress,
            egress,
        };
        let env = |e: &str| sel(&[("env", e)]);
        let prometheus = AdminPeer::Pods { namespaces: ns_named(SYSTEM), pods: sel(&[("app", "prometheus")]) };
        let metrics = Some(vec![PortSpec::Named { protocol: None, name: "metrics".into() }]);
        policies.admin = vec![
            anp(
                "allow-monitoring",
                5,
                Subject::Namespaces(Selector::everything()),
                vec![rule("scrape", AdminAction::Allow, vec![prometheus], metrics)],
                Vec::new(),
            ),
            anp(
                "deny-dev-to-prod",
                10,
                Subject::Namespaces(env("prod")),
                vec![rule("from-dev", AdminAction::Deny, vec![AdminPeer::Namespaces(env("dev"))], None)],
                Vec::new(),
            ),
            anp(
                "pass-staging",
                20,
                Subject::Pods { namespaces: env("staging"), pods: Selector::everything() },
                vec![rule("within-staging", AdminAction::Pass, vec![AdminPeer::Namespaces(env("staging"))], None)],
                vec![rule(
                    "no-test-nets",
                    AdminAction::Deny,
                    vec![AdminPeer::Networks(ip_peer("192.0.2.0/24", &[]))],
                    None,
                )],
            ),
        ];
        policies.admin.sort_by_key(|a| a.priority);
        policies.baseline = Some(BaselinePolicy {
            file: "cluster/baseline.yaml".into(),
            subject: Subject::Namespaces(Selector::everything()),
            ingress: vec![rule("from-dev", AdminAction::Deny, vec![AdminPeer::Namespaces(env("dev"))], None)],
            egress: vec![rule(
                "to-cluster",
                AdminAction::Allow,
                vec![AdminPeer::Namespaces(Selector::everything())],
                None,
            )],
        });
    }

    fn v4(rng: &mut Rng, base: [u8; 2]) -> IpAddr {
        let [a, b] = base;
        IpAddr::V4(Ipv4Addr::new(a, b, rng.below(256) as u8, 1 + rng.below(254) as u8))
    }

    /// `n` (a power of two) flows: most to workloads in namespaces with policies, half of those
    /// from the same namespace; some from and to addresses outside the cluster; ports mostly the
    /// destination's own.
    pub(crate) fn flows(engine: &Engine, n: usize, seed: u64) -> Vec<Flow> {
        assert!(n.is_power_of_two(), "flows are cycled with a mask");
        let mut rng = Rng::new(seed);
        let inv = engine.inventory();
        let mut by_ns: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (wi, w) in inv.workloads.iter().enumerate() {
            by_ns.entry(w.namespace.as_str()).or_default().push(wi);
        }
        let policed_ns: BTreeSet<&str> = engine.policies().network.iter().map(|p| p.namespace.as_str()).collect();
        let policed: Vec<usize> =
            policed_ns.iter().flat_map(|ns| by_ns.get(ns).into_iter().flatten().copied()).collect();
        let dns = inv.find(SYSTEM, "coredns").expect("coredns");
        let all = inv.workloads.len();
        let common: [(Protocol, u16); 6] = [
            (Protocol::Tcp, 443),
            (Protocol::Tcp, 22),
            (Protocol::Tcp, 3306),
            (Protocol::Tcp, 5432),
            (Protocol::Tcp, 8050),
            (Protocol::Udp, 53),
        ];
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let roll = rng.below(100);
            if roll < 4 {
                // To the internet, a test network or the pod network's excluded ranges.
                let base = *rng.pick(&[[93, 184], [192, 0], [10, 3], [192, 168]]);
                let dst = v4(&mut rng, base);
                let port = *rng.pick(&[443, 443, 80, 8443]);
                out.push(Flow {
                    src: Peer::Workload(rng.below(all)),
                    dst: Peer::Ip(dst),
                    protocol: Protocol::Tcp,
                    port,
                });
                continue;
            }
            if roll < 12 {
                let (protocol, port) = *rng.pick(&[(Protocol::Udp, 53), (Protocol::Tcp, 53)]);
                out.push(Flow { src: Peer::Workload(rng.below(all)), dst: Peer::Workload(dns), protocol, port });
                continue;
            }
            let d = if !policed.is_empty() && rng.chance(70) { *rng.pick(&policed) } else { rng.below(all) };
            let w = &inv.workloads[d];
            let s = rng.below(100);
            let src = if s < 45 {
                Peer::Workload(*rng.pick(&by_ns[w.namespace.as_str()]))
            } else if s < 50 {
                // Load balancers and nodes: inside the ipBlock, in its except, elsewhere.
                let base = *rng.pick(&[[10, 2], [10, 1], [198, 51]]);
                Peer::Ip(v4(&mut rng, base))
            } else {
                Peer::Workload(rng.below(all))
            };
            let (protocol, port) = if rng.chance(75) && !w.ports.is_empty() {
                let p = rng.pick(&w.ports);
                (p.protocol, p.port)
            } else {
                *rng.pick(&common)
            };
            out.push(Flow { src, dst: Peer::Workload(d), protocol, port });
        }
        out
    }
}
