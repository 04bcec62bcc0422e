//! Compiling an inventory and a policy set into an [`Engine`].

use std::collections::{BTreeMap, HashMap};

use super::layout::{Lists, SrcRule, Tiers};
use super::{CNs, CPeer, EVERY_POD, Engine, Layout, NamedPort, Node, RuleRef, Span, Table, WorkloadInfo, dir_index};
use crate::error::{LoadError, Warning};
use crate::inventory::Inventory;
use crate::ip::addr;
use crate::policy::netpol::Peer as NpPeer;
use crate::policy::{AdminAction, AdminPeer, AdminRule, Direction, NamespaceMatch, PolicySet, PortSpec, Subject};
use crate::ports::{ConnSet, PortRanges, Protocol};
use crate::selector::{Labels, Selector};

/// Interned selectors with the name of the first policy that used each (for error messages).
#[derive(Default)]
struct Interner {
    ids: BTreeMap<Selector, u32>,
    list: Vec<(Selector, String)>,
}

impl Interner {
    /// The id of a selector; `None` for the selector that matches everything.
    fn id(&mut self, s: &Selector, user: &str) -> Option<u32> {
        if s.is_everything() {
            return None;
        }
        if let Some(&id) = self.ids.get(s) {
            return Some(id);
        }
        let id = self.list.len() as u32;
        self.ids.insert(s.clone(), id);
        self.list.push((s.clone(), user.to_owned()));
        Some(id)
    }

    /// For each label set, the sorted ids of the selectors it satisfies. Selectors are indexed
    /// by one `key=value` they require, so a label set is checked only against the selectors
    /// that can match it.
    fn match_all<'a>(&self, label_sets: impl Iterator<Item = &'a Labels>) -> Vec<Box<[u32]>> {
        let mut index: HashMap<(&str, &str), Vec<u32>> = HashMap::new();
        let mut unanchored = Vec::new();
        for (id, (s, _)) in self.list.iter().enumerate() {
            match s.anchor() {
                Some(kv) => index.entry(kv).or_default().push(id as u32),
                None => unanchored.push(id as u32),
            }
        }
        let mut out = Vec::new();
        for labels in label_sets {
            let mut m: Vec<u32> = Vec::new();
            let candidates = labels
                .iter()
                .filter_map(|(k, v)| index.get(&(k.as_str(), v.as_str())))
                .flatten()
                .chain(unanchored.iter());
            for &id in candidates {
                if self.list.get(id as usize).is_some_and(|(s, _)| s.matches(labels)) {
                    m.push(id);
                }
            }
            m.sort_unstable();
            m.dedup();
            out.push(m.into_boxed_slice());
        }
        out
    }
}

struct Builder {
    pods: Interner,
    nss: Interner,
    ns_ids: BTreeMap<String, u32>,
    port_names: BTreeMap<String, u32>,
    rules: Vec<SrcRule>,
    lists: Lists,
    warnings: Vec<Warning>,
}

/// Compiled rule ports: every port, or numeric ranges and `(required protocol, port-name id)`
/// pairs (`None` protocol: the container port's own).
struct CPorts {
    all: bool,
    numeric: ConnSet,
    named: Vec<(Option<Protocol>, u32)>,
}

impl Builder {
    fn port_name(&mut self, name: &str) -> u32 {
        let next = self.port_names.len() as u32;
        *self.port_names.entry(name.to_owned()).or_insert(next)
    }

    fn ports(&mut self, specs: Option<&[PortSpec]>) -> CPorts {
        let Some(specs) = specs.filter(|s| !s.is_empty()) else {
            return CPorts { all: true, numeric: ConnSet::all(), named: Vec::new() };
        };
        let mut numeric = ConnSet::empty();
        let mut named = Vec::new();
        for s in specs {
            match s {
                PortSpec::Numbers { protocol, first, last } => {
                    numeric.add(&ConnSet::of(*protocol, PortRanges::range(*first, *last)));
                }
                PortSpec::Named { protocol, name } => named.push((*protocol, self.port_name(name))),
            }
        }
        CPorts { all: numeric.is_all(), numeric, named }
    }

    fn ns_pred(&mut self, sel: &Selector, user: &str) -> CNs {
        match self.nss.id(sel, user) {
            None => CNs::Any,
            Some(id) => CNs::Sel(id),
        }
    }

    fn push(&mut self, id: RuleRef, action: AdminAction, peers: &[CPeer], ports: CPorts) -> u32 {
        let peer_list = self.lists.peer_list(peers);
        let port_list = if ports.all { Span::default() } else { self.lists.port_list(&ports.numeric, &ports.named) };
        self.rules.push(SrcRule {
            id,
            action,
            peers: peer_list.unwrap_or_default(),
            any_peer: peer_list.is_none(),
            no_peer: peer_list.is_some_and(|s| s.len == 0),
            all_ports: ports.all,
            numeric: ports.numeric,
            named: ports.named,
            ports: port_list,
        });
        (self.rules.len() - 1) as u32
    }

    fn pods_pred(&mut self, s: &Selector, user: &str) -> u32 {
        self.pods.id(s, user).unwrap_or(EVERY_POD)
    }

    fn admin_rule(&mut self, id: RuleRef, r: &AdminRule, user: &str) -> u32 {
        let peers: Vec<CPeer> = r
            .peers
            .iter()
            .map(|p| match p {
                AdminPeer::Namespaces(s) => CPeer::Pods { ns: self.ns_pred(s, user), pods: EVERY_POD },
                AdminPeer::Pods { namespaces, pods } => {
                    CPeer::Pods { ns: self.ns_pred(namespaces, user), pods: self.pods_pred(pods, user) }
                }
                AdminPeer::Networks(ip) => CPeer::Ip(self.lists.ip_set(&ip.set)),
                AdminPeer::Nodes => CPeer::Nothing,
            })
            .collect();
        let ports = self.ports(r.ports.as_deref());
        self.push(id, r.action, &peers, ports)
    }
}

/// A compiled subject: namespace constraint and pod selector id.
type SubjectPreds = (CNs, Option<u32>);

fn subject_preds(b: &mut Builder, s: &Subject, user: &str) -> SubjectPreds {
    match s {
        Subject::Namespaces(n) => (b.ns_pred(n, user), None),
        Subject::Pods { namespaces, pods } => (b.ns_pred(namespaces, user), b.pods.id(pods, user)),
    }
}

pub(super) fn compile(inventory: Inventory, policies: PolicySet) -> Result<Engine, LoadError> {
    let mut b = Builder {
        pods: Interner::default(),
        nss: Interner::default(),
        ns_ids: BTreeMap::new(),
        port_names: BTreeMap::new(),
        rules: Vec::new(),
        lists: Lists::default(),
        warnings: Vec::new(),
    };
    for (i, name) in inventory.namespaces.keys().enumerate() {
        b.ns_ids.insert(name.clone(), i as u32);
    }
    let ns_of = |b: &Builder, ns: &str| b.ns_ids.get(ns).copied().unwrap_or(u32::MAX);

    // NetworkPolicies: compile their rules, remember their pod selectors.
    let mut np_rules: Vec<[Vec<u32>; 2]> = Vec::with_capacity(policies.network.len());
    let mut np_selector: Vec<Option<u32>> = Vec::with_capacity(policies.network.len());
    for (pi, np) in policies.network.iter().enumerate() {
        let user = format!("NetworkPolicy {}/{} ({})", np.namespace, np.name, np.file);
        np_selector.push(b.pods.id(&np.pod_selector, &user));
        let mut per_dir: [Vec<u32>; 2] = [Vec::new(), Vec::new()];
        for (direction, rules) in [(Direction::Ingress, &np.ingress_rules), (Direction::Egress, &np.egress_rules)] {
            for (ri, r) in rules.iter().enumerate() {
                let peers: Vec<CPeer> = match &r.peers {
                    None => vec![CPeer::Any],
                    Some(list) => list
                        .iter()
                        .map(|p| match p {
                            NpPeer::Ip(ip) => CPeer::Ip(b.lists.ip_set(&ip.set)),
                            NpPeer::Pods(pp) => {
                                let ns = match &pp.namespaces {
                                    NamespaceMatch::Named(n) => CNs::Id(ns_of(&b, n)),
                                    NamespaceMatch::Selected(s) => b.ns_pred(s, &user),
                                };
                                CPeer::Pods { ns, pods: b.pods_pred(&pp.pods, &user) }
                            }
                        })
                        .collect(),
                };
                let ports = b.ports(Some(&r.ports));
                let id = RuleRef::Network { policy: pi as u32, direction, rule: ri as u32 };
                let idx = b.push(id, AdminAction::Allow, &peers, ports);
                if let Some(slot) = per_dir.get_mut(dir_index(direction)) {
                    slot.push(idx);
                }
            }
        }
        np_rules.push(per_dir);
    }

    // Admin tiers.
    let mut anp_subjects = Vec::new();
    let mut anp_rules: Vec<[Vec<u32>; 2]> = Vec::new();
    for (pi, anp) in policies.admin.iter().enumerate() {
        let user = format!("AdminNetworkPolicy {} ({})", anp.name, anp.file);
        anp_subjects.push(subject_preds(&mut b, &anp.subject, &user));
        let mut per_dir: [Vec<u32>; 2] = [Vec::new(), Vec::new()];
        for direction in [Direction::Ingress, Direction::Egress] {
            for (ri, r) in anp.rules(direction).iter().enumerate() {
                let id = RuleRef::Admin { policy: pi as u32, direction, rule: ri as u32 };
                let idx = b.admin_rule(id, r, &user);
                if let Some(slot) = per_dir.get_mut(dir_index(direction)) {
                    slot.push(idx);
                }
            }
        }
        anp_rules.push(per_dir);
    }
    let mut banp: Option<(SubjectPreds, [Vec<u32>; 2])> = None;
    if let Some(base) = &policies.baseline {
        let user = format!("BaselineAdminNetworkPolicy default ({})", base.file);
        let subject = subject_preds(&mut b, &base.subject, &user);
        let mut per_dir: [Vec<u32>; 2] = [Vec::new(), Vec::new()];
        for direction in [Direction::Ingress, Direction::Egress] {
            for (ri, r) in base.rules(direction).iter().enumerate() {
                let idx = b.admin_rule(RuleRef::Baseline { direction, rule: ri as u32 }, r, &user);
                if let Some(slot) = per_dir.get_mut(dir_index(direction)) {
                    slot.push(idx);
                }
            }
        }
        banp = Some((subject, per_dir));
    }

    // Match every workload and namespace against the interned selectors once.
    let workload_sels = b.pods.match_all(inventory.workloads.iter().map(|w| &w.labels));
    let ns_sels = b.nss.match_all(inventory.namespaces.values().map(|n| &n.labels));
    let workload_ns: Vec<u32> = inventory.workloads.iter().map(|w| ns_of(&b, &w.namespace)).collect();

    // Pods of one workload must not be told apart by any selector.
    for w in &inventory.workloads {
        for (pod, labels) in &w.label_variants {
            for (s, user) in &b.pods.list {
                if s.matches(&w.labels) != s.matches(labels) {
                    return Err(LoadError::WorkloadLabelsDiffer {
                        workload: w.display_name(),
                        pod_a: "the first pod".to_owned(),
                        pod_b: pod.clone(),
                        policy: user.clone(),
                    });
                }
            }
        }
    }

    let has = |list: &[u32], id: Option<u32>| id.is_none_or(|id| list.binary_search(&id).is_ok());
    let ns_ok = |ns: u32, pred: CNs| match pred {
        CNs::Any => true,
        CNs::Id(id) => id == ns,
        CNs::Sel(id) => ns_sels.get(ns as usize).is_some_and(|l| l.binary_search(&id).is_ok()),
    };

    // Which policies select which workloads. NetworkPolicies are grouped by namespace.
    let mut by_ns: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (pi, np) in policies.network.iter().enumerate() {
        by_ns.entry(np.namespace.as_str()).or_default().push(pi);
    }
    // The named container ports of each workload, the first of each name (names are unique in
    // a pod), as `(port-name id, port, protocol)`; names no rule uses are left out.
    let mut named_ports: Vec<NamedPort> = Vec::new();
    let mut named_spans: Vec<Span> = Vec::with_capacity(inventory.workloads.len());
    for w in &inventory.workloads {
        let start = named_ports.len();
        for p in &w.ports {
            let Some(&id) = p.name.as_ref().and_then(|n| b.port_names.get(n)) else { continue };
            if !named_ports.get(start..).unwrap_or_default().iter().any(|(n, _, _)| *n == id) {
                named_ports.push((id, p.port, p.protocol));
            }
        }
        named_spans.push(Span { start: start as u32, len: (named_ports.len() - start) as u32 });
    }

    let mut layouts: [Layout; 2] = [Layout::default(), Layout::default()];
    let mut tables: Vec<[Table; 2]> = vec![[Table::default(); 2]; inventory.workloads.len()];
    let mut np_selects_some = vec![[false; 2]; policies.network.len()];
    for (wi, w) in inventory.workloads.iter().enumerate() {
        let sels = workload_sels.get(wi).map(|b| &b[..]).unwrap_or_default();
        let ns = workload_ns.get(wi).copied().unwrap_or(u32::MAX);
        for direction in [Direction::Ingress, Direction::Egress] {
            let d = dir_index(direction);
            let mut tiers = Tiers::default();
            for (pi, (sns, spods)) in anp_subjects.iter().enumerate() {
                if ns_ok(ns, *sns) && has(sels, *spods) {
                    tiers.admin.extend(anp_rules.get(pi).and_then(|r| r.get(d)).into_iter().flatten());
                }
            }
            for &pi in by_ns.get(w.namespace.as_str()).into_iter().flatten() {
                let Some(np) = policies.network.get(pi) else { continue };
                let in_effect = match direction {
                    Direction::Ingress => np.ingress_in_effect,
                    Direction::Egress => np.egress_in_effect,
                };
                if !in_effect || !has(sels, np_selector.get(pi).copied().flatten()) {
                    continue;
                }
                if let Some(flag) = np_selects_some.get_mut(pi).and_then(|f| f.get_mut(d)) {
                    *flag = true;
                }
                tiers.network_policies.push(pi as u32);
                tiers
                    .network
                    .get_or_insert_with(Vec::new)
                    .extend(np_rules.get(pi).and_then(|r| r.get(d)).into_iter().flatten());
            }
            if let Some(((sns, spods), rules)) = &banp
                && ns_ok(ns, *sns)
                && has(sels, *spods)
            {
                tiers.baseline.extend(rules.get(d).into_iter().flatten());
            }
            // Ingress: the workload is the destination, so named ports resolve now.
            let resolve_on = match direction {
                Direction::Ingress => Some(named_spans.get(wi).copied().unwrap_or_default().of(&named_ports)),
                Direction::Egress => None,
            };
            if let Some(layout) = layouts.get_mut(d)
                && let Some(slot) = tables.get_mut(wi).and_then(|t| t.get_mut(d))
            {
                *slot = layout.push(&mut b.lists, &b.rules, tiers, resolve_on);
            }
        }
    }

    // A named port in an egress rule that can reach addresses cannot be resolved there.
    for (pi, np) in policies.network.iter().enumerate() {
        if !np_selects_some.get(pi).is_some_and(|f| f[1]) {
            continue;
        }
        for (ri, r) in np.egress_rules.iter().enumerate() {
            let reaches_ips = r.peers.as_ref().is_none_or(|ps| ps.iter().any(|p| matches!(p, NpPeer::Ip(_))));
            if let Some((pj, PortSpec::Named { name, .. })) =
                r.ports.iter().enumerate().find(|(_, p)| matches!(p, PortSpec::Named { .. }))
                && reaches_ips
            {
                return Err(LoadError::Invalid {
                    file: np.file.clone(),
                    object: format!("NetworkPolicy {}/{}", np.namespace, np.name),
                    field: format!("spec.egress[{ri}].ports[{pj}].port"),
                    reason: format!(
                        "named port {name:?} in an egress rule that can reach IP addresses: a name resolves only \
                         on a pod; use a port number, or restrict `to` to pod and namespace selectors"
                    ),
                });
            }
        }
    }

    // Named ports that no workload defines (with the protocol the rule asks for) match nothing.
    warn_unresolved_named_ports(&policies, &inventory, &mut b.warnings);

    let mut by_addr = BTreeMap::new();
    for (wi, w) in inventory.workloads.iter().enumerate() {
        for ip in &w.overlay_ips {
            if let Some(prev) = by_addr.insert(addr(*ip), wi as u32) {
                let other = inventory.workloads.get(prev as usize).map(|o| o.display_name()).unwrap_or_default();
                return Err(LoadError::Invalid {
                    file: w.file.clone(),
                    object: w.display_name(),
                    field: format!("metadata.annotations.{}", crate::inventory::OVERLAY_IPS_ANNOTATION),
                    reason: format!("overlay address {ip} is also assigned to {other}"),
                });
            }
        }
    }

    // What a decision reads of the workload on the far side, in flat arrays.
    let mut ns_sel_data: Vec<u32> = Vec::new();
    let mut ns_spans: Vec<Span> = Vec::with_capacity(ns_sels.len());
    for l in &ns_sels {
        ns_spans.push(Span { start: ns_sel_data.len() as u32, len: l.len() as u32 });
        ns_sel_data.extend_from_slice(l);
    }
    let mut pod_sels: Vec<u32> = Vec::new();
    let mut nodes = Vec::with_capacity(inventory.workloads.len());
    for wi in 0..inventory.workloads.len() {
        let sels = workload_sels.get(wi).map(|b| &b[..]).unwrap_or_default();
        let ns = workload_ns.get(wi).copied().unwrap_or(u32::MAX);
        let far = WorkloadInfo {
            ns,
            pod_sels: Span { start: pod_sels.len() as u32, len: sels.len() as u32 },
            ns_sels: ns_spans.get(ns as usize).copied().unwrap_or_default(),
            named_ports: named_spans.get(wi).copied().unwrap_or_default(),
        };
        nodes.push(Node { tables: tables.get(wi).copied().unwrap_or_default(), far });
        pod_sels.extend_from_slice(sels);
    }

    let Builder { rules, lists, warnings, .. } = b;
    Ok(Engine {
        inventory,
        policies,
        warnings,
        nodes,
        pod_sels,
        ns_sels: ns_sel_data,
        named_ports,
        by_addr,
        peers: lists.peers,
        ports: lists.ports,
        ip_sets: lists.ip_sets,
        rule_info: rules.iter().map(|r| (r.id, r.action)).collect(),
        layouts,
    })
}

fn warn_unresolved_named_ports(policies: &PolicySet, inventory: &Inventory, warnings: &mut Vec<Warning>) {
    let resolves = |proto: Option<crate::ports::Protocol>, name: &str| {
        inventory
            .workloads
            .iter()
            .any(|w| w.named_port(name).is_some_and(|p| proto.is_none_or(|want| p.protocol == want)))
    };
    for np in &policies.network {
        for (direction, rules) in [(Direction::Ingress, &np.ingress_rules), (Direction::Egress, &np.egress_rules)] {
            for (ri, r) in rules.iter().enumerate() {
                for (pj, p) in r.ports.iter().enumerate() {
                    if let PortSpec::Named { protocol, name } = p
                        && !resolves(*protocol, name)
                    {
                        let proto = protocol.map(|p| p.as_str()).unwrap_or("any");
                        warnings.push(Warning {
                            file: np.file.clone(),
                            object: format!("NetworkPolicy {}/{}", np.namespace, np.name),
                            field: format!("spec.{}[{ri}].ports[{pj}].port", direction.field()),
                            message: format!(
                                "named port {name:?} ({proto}) is defined by no workload with that protocol; it allows nothing"
                            ),
                        });
                    }
                }
            }
        }
    }
    let admin =
        policies.admin.iter().map(|a| (format!("AdminNetworkPolicy {}", a.name), &a.file, &a.ingress, &a.egress));
    let base = policies
        .baseline
        .iter()
        .map(|b| ("BaselineAdminNetworkPolicy default".to_owned(), &b.file, &b.ingress, &b.egress));
    for (object, file, ingress, egress) in admin.chain(base) {
        for (direction, rules) in [(Direction::Ingress, ingress), (Direction::Egress, egress)] {
            for (ri, r) in rules.iter().enumerate() {
                for (pj, p) in r.ports.iter().flatten().enumerate() {
                    if let PortSpec::Named { protocol, name } = p
                        && !resolves(*protocol, name)
                    {
                        warnings.push(Warning {
                            file: file.clone(),
                            object: object.clone(),
                            field: format!("spec.{}[{ri}].ports[{pj}].namedPort", direction.field()),
                            message: format!("named port {name:?} is defined by no workload; it matches nothing"),
                        });
                    }
                }
            }
        }
    }
}
