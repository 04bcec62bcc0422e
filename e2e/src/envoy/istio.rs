//! The e2e sidecar run on what Istio generates: one pod's LDS, CDS, RDS, EDS and ECDS as Istio's
//! own pilot code generates them from `istio/` and `samples/shop` (the harness of
//! `istio-check/xds`, `KEYWAY_XDS_DUMP`), turned into a static Envoy bootstrap the namespace bed can
//! run with real Envoy and the real keyway filter. Only what ties the configuration to a cluster
//! changes:
//!
//! * SDS references (istio-agent's `default` and `ROOTCA` over `sds-grpc`) become references to
//!   static secrets of the same names, made from the bed's mesh certificate files;
//! * every ECDS `config_discovery` becomes the extension configuration pilot serves under that
//!   name, inlined, with the module as istio-agent would hand it to Envoy after fetching it: its
//!   remote `oci://` code replaced by the bed's local `keyway_filter.wasm`, the plugin
//!   configuration kept as served;
//! * EDS clusters become STATIC with the endpoints pilot generates, DNS clusters (the keyway
//!   gateway and key service) STATIC with the zone's gateway replicas; RDS becomes inline routes;
//! * pod addresses: the harness's pod IPs become the bed's pod addresses of the same workloads
//!   (the node's `INSTANCE_IPS` and id, endpoints), [`Addresses`];
//! * extensions that exist only in Istio's proxy build are removed, each listed in [`ISTIO_ONLY`]
//!   with the reason (istio/README.md, "The e2e data path through Istio's output", has the same
//!   table).
//!
//! Nothing keyway's enforcement depends on is touched, and [`convert`] checks it: every keyway
//! filter of the dump is in the result with the configuration served for it, the keyway inbound
//! listener is there, every TLS context is kept, no dynamic source is left.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail, ensure};
use keyway_gateway::config::MeshFiles;
use serde_json::{Value, json};

use super::ADMIN_PORT;

/// The names of the keyway clusters the gateways' addresses go into.
pub const GATEWAY_CLUSTERS: [&str; 2] = ["keyway_gateway", "keyway_keyservice"];
/// The keyway inbound listener's name in `istio/base/envoyfilters.yaml`.
pub const KEYWAY_INBOUND_LISTENER: &str = "keyway_inbound";
/// The SDS secrets istio-agent serves a sidecar: its workload certificate and the mesh root.
pub const SDS_CERTIFICATE: &str = "default";
/// See [`SDS_CERTIFICATE`].
pub const SDS_ROOT: &str = "ROOTCA";

/// An extension of Istio's proxy build that upstream Envoy does not have.
#[derive(Debug, Clone, Copy)]
pub struct IstioOnly {
    /// Its configuration's type URL (inside a `TypedStruct` where Istio wraps it).
    pub type_url: &'static str,
    /// Where Istio puts it.
    pub place: &'static str,
    /// Why removing it changes nothing keyway enforces.
    pub reason: &'static str,
}

/// Every extension of Istio's proxy build the conversion removes, and why: the one list (istio/README.md
/// repeats it). A type of Istio's own packages (`istio.`, `io.istio.`, `envoy.tcp.metadataexchange.`,
/// `stats.`) not listed here fails the conversion, so a new one is noticed, never dropped silently.
pub const ISTIO_ONLY: &[IstioOnly] = &[
    IstioOnly {
        type_url: "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange",
        place: "`istio.metadata_exchange`: network filter of inbound chains, upstream filter of outbound clusters",
        reason: "exchanges workload metadata with the peer for Istio's telemetry labels (ALPN istio-peer-exchange); \
                 keyway reads no peer metadata (the source is its token and mesh certificate), and keyway's filter \
                 is first in every chain it sits in",
    },
    IstioOnly {
        type_url: "type.googleapis.com/io.istio.http.peer_metadata.Config",
        place: "`istio.peer_metadata`: HTTP filter of inbound HTTP chains",
        reason: "the same metadata exchange over HTTP headers, for telemetry; behind keyway's inbound_plain filter, \
                 which closes those connections first",
    },
    IstioOnly {
        type_url: "type.googleapis.com/stats.PluginConfig",
        place: "`istio.stats`: network and HTTP filter (with Istio's Telemetry)",
        reason: "Istio's standard metrics; keyway's metrics are its filter's own stats",
    },
    IstioOnly {
        type_url: "type.googleapis.com/istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig",
        place: "`istio.alpn`: HTTP filter of outbound HTTP chains",
        reason: "overrides the upstream ALPN for Istio's mTLS clusters; keyway's clusters set ALPN h2 themselves \
                 and keyway replaces every outbound HTTP connection manager",
    },
    IstioOnly {
        type_url: "type.googleapis.com/io.istio.network.authn.Config",
        place: "`istio_authn`: network filter of inbound mTLS chains",
        reason: "records the mTLS peer's principal for Istio's AuthorizationPolicy; keyway applies none and its \
                 inbound_plain filter closes those chains first",
    },
];

/// Type URL prefixes of Istio's own extension packages.
const ISTIO_PACKAGES: [&str; 4] = [
    "type.googleapis.com/istio.",
    "type.googleapis.com/io.istio.",
    "type.googleapis.com/envoy.tcp.metadataexchange.",
    "type.googleapis.com/stats.",
];

/// The wrappers Istio puts some extensions in.
const TYPED_STRUCTS: [&str; 2] =
    ["type.googleapis.com/udpa.type.v1.TypedStruct", "type.googleapis.com/xds.type.v3.TypedStruct"];

/// The stats tags of the bed's sidecars (what `extraStatTags` gives an Istio install).
const STATS_TAGS: [&str; 4] = ["direction", "verdict", "reason", "outcome"];

/// One pod's dump as the harness writes it (`<dump>/<ns>-<pod>/`).
#[derive(Debug, Clone)]
pub struct PodDump {
    /// Its directory.
    pub dir: PathBuf,
    /// Listeners.
    pub lds: Vec<Value>,
    /// Clusters.
    pub cds: Vec<Value>,
    /// Route configurations (when a listener uses RDS).
    pub rds: Vec<Value>,
    /// Endpoints of the EDS clusters.
    pub eds: Vec<Value>,
    /// Extension configurations.
    pub ecds: Vec<Value>,
    /// The node (id, cluster, metadata).
    pub node: Value,
}

impl PodDump {
    /// The workload (`ns/name`) the pod belongs to, from its node metadata.
    pub fn workload(&self) -> String {
        let meta = &self.node["metadata"];
        format!(
            "{}/{}",
            meta["NAMESPACE"].as_str().unwrap_or_default(),
            meta["WORKLOAD_NAME"].as_str().unwrap_or_default()
        )
    }
}

/// A pin's dump (`<dump>/<pin>/`): every pod's, and the harness's addresses.
#[derive(Debug, Clone)]
pub struct Dump {
    /// Its directory.
    pub dir: PathBuf,
    /// The harness's pod IP of each workload (`ns/name`).
    pub pod_ips: BTreeMap<String, IpAddr>,
    /// The pods, by workload.
    pub pods: BTreeMap<String, PodDump>,
}

fn read_json(path: &Path) -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))
}

fn read_array(path: &Path) -> anyhow::Result<Vec<Value>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    match read_json(path)? {
        Value::Array(a) => Ok(a),
        _ => bail!("{} is not a JSON array", path.display()),
    }
}

impl Dump {
    /// Reads the dump of one pin: `dir` is `<KEYWAY_XDS_DUMP>/<pin>` (it holds `mesh.json`).
    pub fn load(dir: &Path) -> anyhow::Result<Dump> {
        let mesh = read_json(&dir.join("mesh.json")).with_context(|| {
            format!(
                "{} is not a pin's dump: run `KEYWAY_XDS_DUMP=<dir> make istio-xds` and point at <dir>/<pin>",
                dir.display()
            )
        })?;
        let mut pod_ips = BTreeMap::new();
        for (w, ip) in mesh["pods"].as_object().context("mesh.json has no pods")? {
            pod_ips
                .insert(w.clone(), ip.as_str().unwrap_or_default().parse().with_context(|| format!("mesh.json: {w}"))?);
        }
        let mut pods = BTreeMap::new();
        for entry in std::fs::read_dir(dir)? {
            let pod_dir = entry?.path();
            if !pod_dir.join("node.json").exists() {
                continue;
            }
            let p = PodDump {
                lds: read_array(&pod_dir.join("lds.json"))?,
                cds: read_array(&pod_dir.join("cds.json"))?,
                rds: read_array(&pod_dir.join("rds.json"))?,
                eds: read_array(&pod_dir.join("eds.json"))?,
                ecds: read_array(&pod_dir.join("ecds.json"))?,
                node: read_json(&pod_dir.join("node.json"))?,
                dir: pod_dir,
            };
            pods.insert(p.workload(), p);
        }
        ensure!(!pods.is_empty(), "no pod in {}", dir.display());
        Ok(Dump { dir: dir.to_owned(), pod_ips, pods })
    }

    /// The dump of `workload` (`ns/name`).
    pub fn pod(&self, workload: &str) -> anyhow::Result<&PodDump> {
        self.pods.get(workload).with_context(|| format!("no dump of {workload} in {}", self.dir.display()))
    }
}

/// The harness's pod addresses and the bed's, by workload: each harness pod IP in the dump
/// becomes the bed's pod address of the same workload.
#[derive(Debug, Clone, Default)]
pub struct Addresses {
    map: BTreeMap<String, String>,
}

impl Addresses {
    /// From the harness's pod IPs ([`Dump::pod_ips`]) and the bed's (`ns/name` → address); every
    /// workload of the dump must have a bed address.
    pub fn new(harness: &BTreeMap<String, IpAddr>, bed: &BTreeMap<String, IpAddr>) -> anyhow::Result<Addresses> {
        let mut map = BTreeMap::new();
        for (w, ip) in harness {
            let b = bed.get(w).with_context(|| format!("the bed has no pod of {w}"))?;
            map.insert(ip.to_string(), b.to_string());
        }
        Ok(Addresses { map })
    }

    fn text(&self, s: &str) -> Option<String> {
        self.map.get(s).cloned()
    }

    /// Replaces every string that is a harness pod IP (and each address of a comma-separated list
    /// and of a `~`-separated node id) by the bed's.
    fn apply(&self, v: &mut Value) {
        match v {
            Value::String(s) => {
                if let Some(b) = self.text(s) {
                    *s = b;
                } else if s.contains(',') || s.contains('~') {
                    let sep = if s.contains('~') { '~' } else { ',' };
                    let parts: Vec<String> =
                        s.split(sep).map(|p| self.text(p).unwrap_or_else(|| p.to_owned())).collect();
                    *s = parts.join(&sep.to_string());
                }
            }
            Value::Array(a) => a.iter_mut().for_each(|x| self.apply(x)),
            Value::Object(o) => o.values_mut().for_each(|x| self.apply(x)),
            _ => {}
        }
    }
}

/// What the bed gives one sidecar.
#[derive(Debug, Clone)]
pub struct BedSidecar<'a> {
    /// The workload's mesh certificate, key and the mesh root.
    pub mesh: &'a MeshFiles,
    /// The local filter module.
    pub wasm: &'a Path,
    /// The zone's gateway replicas' addresses.
    pub gateways: &'a [IpAddr],
    /// The gateways' tunnel port (the key service's too).
    pub tunnel_port: u16,
    /// Harness pod IPs to the bed's.
    pub addresses: &'a Addresses,
}

/// What a conversion removed and kept, for the bed's log and the tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Removed extensions: (type URL, how many).
    pub removed: BTreeMap<String, usize>,
    /// keyway filters inlined from ECDS (by name).
    pub keyway_filters: BTreeMap<String, usize>,
    /// TLS transport sockets (listener chains and clusters), all kept.
    pub tls_contexts: usize,
}

/// The static bootstrap (JSON, which Envoy reads as YAML) of the pod `pod` of the dump, on the bed.
pub fn convert(pod: &PodDump, bed: &BedSidecar<'_>) -> anyhow::Result<(Value, Report)> {
    let mut report = Report::default();
    let ecds: BTreeMap<&str, &Value> =
        pod.ecds.iter().filter_map(|e| Some((e["name"].as_str()?, &e["typedConfig"]))).collect();
    let routes: BTreeMap<&str, &Value> = pod.rds.iter().filter_map(|r| Some((r["name"].as_str()?, r))).collect();
    let wanted = referenced_keyway_filters(&pod.lds);
    let tls_before = count_tls(&Value::Array(pod.lds.clone())) + count_tls(&Value::Array(pod.cds.clone()));

    let mut listeners = pod.lds.clone();
    for l in &mut listeners {
        let ctx = Ctx { ecds: &ecds, routes: &routes, wasm: bed.wasm };
        ctx.listener(l, &mut report).with_context(|| format!("listener {}", l["name"]))?;
    }
    let mut clusters = Vec::new();
    for c in &pod.cds {
        let mut c = c.clone();
        cluster(&mut c, pod, bed, &mut report).with_context(|| format!("cluster {}", c["name"]))?;
        clusters.push(c);
    }
    let mut resources = json!({ "listeners": listeners, "clusters": clusters });
    static_secrets(&mut resources)?;
    resources["secrets"] = json!([
        { "name": SDS_CERTIFICATE, "tlsCertificate": {
            "certificateChain": { "filename": bed.mesh.cert },
            "privateKey": { "filename": bed.mesh.key } } },
        { "name": SDS_ROOT, "validationContext": { "trustedCa": { "filename": bed.mesh.ca } } },
    ]);
    let mut node = pod.node.clone();
    bed.addresses.apply(&mut node);
    bed.addresses.apply(&mut resources);
    report.tls_contexts = count_tls(&resources["listeners"]) + count_tls(&resources["clusters"]);

    // Nothing keyway's enforcement depends on is gone.
    ensure!(
        report.keyway_filters == wanted,
        "keyway filters referenced {wanted:?}, inlined {:?}",
        report.keyway_filters
    );
    ensure!(report.tls_contexts == tls_before, "TLS contexts: {tls_before} in the dump, {} after", report.tls_contexts);
    let names: Vec<&str> =
        resources["listeners"].as_array().into_iter().flatten().filter_map(|l| l["name"].as_str()).collect();
    ensure!(names.contains(&KEYWAY_INBOUND_LISTENER), "no {KEYWAY_INBOUND_LISTENER} listener in {names:?}");
    let text = resources.to_string();
    for dynamic in ["\"ads\"", "sdsConfig", "configDiscovery", "edsClusterConfig", "\"rds\"", "sds-grpc", "xds-grpc"] {
        ensure!(!text.contains(dynamic), "{dynamic} left in the static configuration");
    }
    for ip in bed.addresses.map.keys() {
        ensure!(!text.contains(&format!("\"{ip}\"")), "the harness's pod address {ip} left");
    }

    let tags: Vec<Value> =
        STATS_TAGS.iter().map(|t| json!({ "tagName": t, "regex": format!("(_?{t}=\\.=(.*?);\\.;)") })).collect();
    let bootstrap = json!({
        "node": node,
        "admin": { "address": { "socketAddress": { "address": "127.0.0.1", "portValue": ADMIN_PORT } } },
        "statsConfig": { "statsTags": tags },
        "staticResources": resources,
    });
    Ok((bootstrap, report))
}

/// The type URL of a filter's configuration, looking inside a `TypedStruct`.
fn type_url(typed: &Value) -> &str {
    let outer = typed["@type"].as_str().unwrap_or_default();
    if TYPED_STRUCTS.contains(&outer) { typed["typeUrl"].as_str().unwrap_or_default() } else { outer }
}

/// Whether to remove an extension of this type: listed in [`ISTIO_ONLY`]; an unlisted type of
/// Istio's own packages is an error.
fn istio_only(type_url: &str) -> anyhow::Result<bool> {
    if ISTIO_ONLY.iter().any(|e| e.type_url == type_url) {
        return Ok(true);
    }
    if ISTIO_PACKAGES.iter().any(|p| type_url.starts_with(p)) {
        bail!(
            "{type_url} exists only in Istio's proxy build and is not in ISTIO_ONLY: add it with the reason it can go"
        )
    }
    Ok(false)
}

fn is_keyway(name: &str) -> bool {
    name.starts_with("keyway-")
}

/// The keyway filters the listeners reference over ECDS, counted by name.
fn referenced_keyway_filters(lds: &[Value]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    walk(&Value::Array(lds.to_vec()), &mut |v| {
        if v.get("configDiscovery").is_some()
            && let Some(n) = v["name"].as_str().filter(|n| is_keyway(n))
        {
            *out.entry(n.to_owned()).or_default() += 1;
        }
    });
    out
}

fn count_tls(v: &Value) -> usize {
    let mut n = 0;
    walk(v, &mut |x| {
        if x.get("name").and_then(Value::as_str) == Some("envoy.transport_sockets.tls")
            && x.get("typedConfig").is_some()
        {
            n += 1;
        }
    });
    n
}

fn walk(v: &Value, f: &mut impl FnMut(&Value)) {
    f(v);
    match v {
        Value::Array(a) => a.iter().for_each(|x| walk(x, f)),
        Value::Object(o) => o.values().for_each(|x| walk(x, f)),
        _ => {}
    }
}

/// What a listener's conversion needs.
struct Ctx<'a> {
    ecds: &'a BTreeMap<&'a str, &'a Value>,
    routes: &'a BTreeMap<&'a str, &'a Value>,
    wasm: &'a Path,
}

const HCM: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";

impl Ctx<'_> {
    fn listener(&self, l: &mut Value, report: &mut Report) -> anyhow::Result<()> {
        if let Some(filters) = l.get_mut("listenerFilters") {
            self.filters(filters, report)?;
        }
        for key in ["filterChains", "defaultFilterChain"] {
            let chains: Vec<&mut Value> = match l.get_mut(key) {
                Some(Value::Array(a)) => a.iter_mut().collect(),
                Some(v @ Value::Object(_)) => vec![v],
                _ => Vec::new(),
            };
            for fc in chains {
                if let Some(filters) = fc.get_mut("filters") {
                    self.filters(filters, report).with_context(|| format!("chain {}", fc["name"]))?;
                }
            }
        }
        Ok(())
    }

    /// A filter list (network, listener or HTTP): ECDS inlined, Istio-only ones removed, HTTP
    /// connection managers converted.
    fn filters(&self, filters: &mut Value, report: &mut Report) -> anyhow::Result<()> {
        let Some(list) = filters.as_array_mut() else { return Ok(()) };
        let mut kept = Vec::new();
        for mut f in std::mem::take(list) {
            let name = f["name"].as_str().unwrap_or_default().to_owned();
            if f.get("configDiscovery").is_some() {
                let typed = self.ecds.get(name.as_str()).with_context(|| format!("{name}: not served over ECDS"))?;
                f = json!({ "name": name, "typedConfig": self.served(typed)? });
                if is_keyway(&name) {
                    *report.keyway_filters.entry(name.clone()).or_default() += 1;
                }
            }
            let url = type_url(&f["typedConfig"]).to_owned();
            if istio_only(&url)? {
                ensure!(!is_keyway(&name), "{name} would be removed");
                *report.removed.entry(url).or_default() += 1;
                continue;
            }
            if url == HCM {
                self.connection_manager(&mut f["typedConfig"], report).with_context(|| name.clone())?;
            }
            kept.push(f);
        }
        *list = kept;
        Ok(())
    }

    fn connection_manager(&self, hcm: &mut Value, report: &mut Report) -> anyhow::Result<()> {
        if let Some(rds) = hcm.as_object_mut().and_then(|o| o.remove("rds")) {
            let name = rds["routeConfigName"].as_str().unwrap_or_default();
            let rc = self.routes.get(name).with_context(|| format!("route configuration {name} not in rds.json"))?;
            hcm["routeConfig"] = (*rc).clone();
        }
        if let Some(filters) = hcm.get_mut("httpFilters") {
            self.filters(filters, report)?;
        }
        Ok(())
    }

    /// An extension configuration as istio-agent hands it to Envoy once the module is fetched:
    /// remote code replaced by the local module, everything else as served.
    fn served(&self, typed: &Value) -> anyhow::Result<Value> {
        let mut t = typed.clone();
        let code = &mut t["config"]["vmConfig"]["code"];
        if code.get("remote").is_some() {
            *code = json!({ "local": { "filename": self.wasm } });
        }
        Ok(t)
    }
}

/// A cluster made static: EDS with pilot's endpoints, the keyway gateway clusters with the
/// zone's gateways; Istio-only upstream filters removed.
fn cluster(c: &mut Value, pod: &PodDump, bed: &BedSidecar<'_>, report: &mut Report) -> anyhow::Result<()> {
    let name = c["name"].as_str().unwrap_or_default().to_owned();
    let Some(o) = c.as_object_mut() else { bail!("not an object") };
    match o.get("type").and_then(Value::as_str).unwrap_or("EDS") {
        "EDS" if o.contains_key("edsClusterConfig") => {
            let service = o["edsClusterConfig"]["serviceName"].as_str().unwrap_or(&name).to_owned();
            o.remove("edsClusterConfig");
            o.insert("type".into(), "STATIC".into());
            let la = pod.eds.iter().find(|e| e["clusterName"].as_str() == Some(&service));
            let mut la = la.cloned().unwrap_or_else(|| json!({ "clusterName": name }));
            la["clusterName"] = name.clone().into();
            o.insert("loadAssignment".into(), la);
        }
        "STRICT_DNS" | "LOGICAL_DNS" => {
            ensure!(GATEWAY_CLUSTERS.contains(&name.as_str()), "a DNS cluster the bed has no address for");
            let port = o["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]["endpoint"]["address"]["socketAddress"]
                ["portValue"]
                .as_u64();
            ensure!(
                port == Some(u64::from(bed.tunnel_port)),
                "port {port:?}, the bed's gateways are on {}",
                bed.tunnel_port
            );
            for k in ["dnsRefreshRate", "dnsLookupFamily", "respectDnsTtl", "dnsJitter"] {
                o.remove(k);
            }
            o.insert("type".into(), "STATIC".into());
            let endpoints: Vec<Value> = bed
                .gateways
                .iter()
                .map(|ip| json!({ "endpoint": { "address": { "socketAddress": { "address": ip.to_string(), "portValue": bed.tunnel_port } } } }))
                .collect();
            o.insert(
                "loadAssignment".into(),
                json!({ "clusterName": name, "endpoints": [{ "lbEndpoints": endpoints }] }),
            );
        }
        _ => {}
    }
    if let Some(Value::Array(filters)) = o.get_mut("filters") {
        let mut kept = Vec::new();
        for f in std::mem::take(filters) {
            let url = type_url(&f["typedConfig"]).to_owned();
            if istio_only(&url)? {
                *report.removed.entry(url).or_default() += 1;
            } else {
                kept.push(f);
            }
        }
        *filters = kept;
    }
    Ok(())
}

/// Every SDS reference becomes a reference to the static secret of the same name (istio-agent's
/// two); any other secret name is an error.
fn static_secrets(v: &mut Value) -> anyhow::Result<()> {
    match v {
        Value::Object(o) => {
            if let Some(Value::Array(list)) = o.get_mut("tlsCertificateSdsSecretConfigs") {
                for s in list.iter_mut() {
                    *s = sds_name(s, SDS_CERTIFICATE)?;
                }
            }
            if let Some(s) = o.get_mut("validationContextSdsSecretConfig") {
                *s = sds_name(s, SDS_ROOT)?;
            }
            for x in o.values_mut() {
                static_secrets(x)?;
            }
        }
        Value::Array(a) => {
            for x in a {
                static_secrets(x)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn sds_name(s: &Value, want: &str) -> anyhow::Result<Value> {
    let name = s["name"].as_str().unwrap_or_default();
    ensure!(name == want, "SDS secret {name:?} where istio-agent serves {want:?}");
    Ok(json!({ "name": name }))
}

#[cfg(test)]
mod tests;
