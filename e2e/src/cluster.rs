//! The whole overlay of a test or of the demo, built from `samples/shop`: three zones, two
//! gateway replicas per zone (real `keyway gateway` processes), every workload of the sample as a
//! pod with the sample app and a real Envoy sidecar running the real keyway filter, the impairment
//! relay carrying the overlay between zones, and an "internet" host outside the overlay.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use keyway_gateway::config::{
    DEFAULT_ADMIN_PORT, DEFAULT_EDGE_PORT, DEFAULT_OVERLAY_PORT, DEFAULT_TUNNEL_PORT, Listen, MeshFiles,
};
use keyway_gateway::proxy::route::DEVICE_KIND;
use keyway_policy::engine::Peer;
use keyway_policy::{Engine, Protocol, Verdict};

use crate::app::ProbeResult;
use crate::envoy::{ENVOY_UID, HEALTH_PORT, Ready, Sidecar};
use crate::gateway::{self as gwconfig, Files, ZoneLayout};
use crate::proc::Proc;
use crate::topology::{Pod, Topology, ns_get, ns_sh, require_root, sh};
use crate::wait::wait_until;

/// The zones of the sample, in index order (zone-a is 1).
pub const ZONES: [&str; 3] = ["zone-a", "zone-b", "zone-c"];
/// Gateway replicas per zone.
pub const REPLICAS: [&str; 2] = ["gw-1", "gw-2"];
/// The zones, their replicas and their failover order.
const LAYOUT: [ZoneLayout<'static>; 3] = [
    ZoneLayout { name: ZONES[0], gateways: &REPLICAS, failover: &[ZONES[1], ZONES[2]] },
    ZoneLayout { name: ZONES[1], gateways: &REPLICAS, failover: &[ZONES[2], ZONES[0]] },
    ZoneLayout { name: ZONES[2], gateways: &REPLICAS, failover: &[ZONES[1], ZONES[0]] },
];
/// The host outside the overlay (in the router namespace), inside the sample's partner range.
pub const INTERNET: &str = "172.31.250.10";
/// Ports the internet host serves.
pub const INTERNET_PORTS: [u16; 2] = [443, 8443];
/// The overlay's address range: what agents carry.
pub const OVERLAY_CIDR: &str = "10.128.0.0/16";
/// Where every agent of the bed serves its admin endpoint (in its own namespace).
pub const AGENT_ADMIN_PORT: u16 = 15191;
/// The DNS port: the internet host answers UDP there too, to stand in for a cluster resolver
/// ([`Options::resolver`]).
pub use crate::envoy::DNS_PORT;

/// Where the pieces are.
#[derive(Debug, Clone)]
pub struct Options {
    /// The repository root.
    pub repo: PathBuf,
    /// The sample manifest directory.
    pub samples: PathBuf,
    /// The `keyway` binary.
    pub keyway: PathBuf,
    /// The `keyway-e2e` binary (app, probe, relay).
    pub e2e: PathBuf,
    /// The Envoy binary.
    pub envoy: PathBuf,
    /// The filter module.
    pub wasm: PathBuf,
    /// Namespace name prefix of this run.
    pub prefix: String,
    /// The cluster resolver: the one destination enforced pods may send UDP to (its port
    /// [`DNS_PORT`]). None (the default): every UDP datagram of an enforced pod is refused.
    pub resolver: Option<IpAddr>,
    /// What the sidecars run on.
    pub sidecars: SidecarConfig,
}

/// What the bed's sidecars run on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum SidecarConfig {
    /// The hand-written bootstrap ([`Sidecar::bootstrap`]).
    #[default]
    HandWritten,
    /// What Istio's own pilot generates from `istio/` for each pod: the harness's dump of one pin
    /// (`KEYWAY_XDS_DUMP=<dir> make istio-xds` writes `<dir>/<pin>/`), converted by
    /// [`crate::envoy::istio`]; the capture leaves Istio's own ports alone as istio-iptables does
    /// ([`ISTIO_UNCAPTURED_PORTS`]).
    Istio(PathBuf),
}

impl SidecarConfig {
    /// From `KEYWAY_SIDECAR` (`e2e`, the default, or `istio`) and, for `istio`, `KEYWAY_XDS_DUMP`
    /// (a pin's dump directory, `<dir>/<pin>`).
    pub fn from_env() -> anyhow::Result<SidecarConfig> {
        match std::env::var("KEYWAY_SIDECAR").as_deref() {
            Err(_) | Ok("" | "e2e") => Ok(SidecarConfig::HandWritten),
            Ok("istio") => {
                let dump = std::env::var_os("KEYWAY_XDS_DUMP").context(
                    "KEYWAY_SIDECAR=istio needs KEYWAY_XDS_DUMP=<dir>/<pin> (`KEYWAY_XDS_DUMP=<dir> make istio-xds` writes it)",
                )?;
                Ok(SidecarConfig::Istio(PathBuf::from(dump)))
            }
            Ok(other) => bail!("KEYWAY_SIDECAR={other}: `e2e` (the hand-written sidecar) or `istio`"),
        }
    }
}

/// Inbound ports istio-iptables never captures (pilot-agent 15020, health 15021, Envoy's
/// Prometheus port 15090): with Istio's configuration, the bed's capture leaves them alone too.
pub const ISTIO_UNCAPTURED_PORTS: [u16; 3] = [15020, 15021, 15090];

impl Options {
    /// Finds everything from the environment and the build tree: `KEYWAY_BIN`, `KEYWAY_E2E_BIN`,
    /// `KEYWAY_ENVOY`, `KEYWAY_WASM`, else the binaries beside the running one, Envoy through
    /// `scripts/install-envoy.sh`, the module in `target/wasm32-wasip1/wasm-release/`.
    pub fn discover(prefix: &str) -> anyhow::Result<Options> {
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").canonicalize()?;
        let exe = std::env::current_exe()?;
        let mut bindir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
        if bindir.ends_with("deps") {
            bindir.pop();
        }
        let find = |var: &str, name: &str| -> anyhow::Result<PathBuf> {
            let p = std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| bindir.join(name));
            if !p.exists() {
                bail!(
                    "{} not found ({}): build it with `cargo build -p keyway-gateway -p keyway-e2e` or set {var}",
                    name,
                    p.display()
                );
            }
            Ok(p)
        };
        let keyway = find("KEYWAY_BIN", "keyway")?;
        let e2e = find("KEYWAY_E2E_BIN", "keyway-e2e")?;
        let envoy = match std::env::var_os("KEYWAY_ENVOY") {
            Some(p) => PathBuf::from(p),
            None => PathBuf::from(sh(&[repo.join("scripts/install-envoy.sh").to_str().unwrap_or_default()])?.trim()),
        };
        if !envoy.exists() {
            bail!("Envoy not found at {}: run scripts/install-envoy.sh", envoy.display());
        }
        let wasm = std::env::var_os("KEYWAY_WASM")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo.join("target/wasm32-wasip1/wasm-release/keyway_filter.wasm"));
        if !wasm.exists() {
            bail!("the filter module {} is missing: run `make wasm`", wasm.display());
        }
        Ok(Options {
            samples: repo.join("samples/shop"),
            repo,
            keyway,
            e2e,
            envoy,
            wasm,
            prefix: prefix.to_owned(),
            resolver: None,
            sidecars: SidecarConfig::from_env()?,
        })
    }
}

/// A workload of the sample, running.
#[derive(Debug)]
pub struct WorkloadPod {
    /// Index in the engine's inventory.
    pub index: usize,
    /// `ns/name`.
    pub name: String,
    /// `ns/name[Kind]`.
    pub display: String,
    /// Zone.
    pub zone: String,
    /// Its pod.
    pub pod: Pod,
    /// Overlay address.
    pub overlay: IpAddr,
    /// App ports (from its container ports).
    pub ports: Vec<u16>,
    /// The app.
    pub app: Option<Proc>,
    /// The sidecar.
    pub envoy: Option<Proc>,
    /// Its `keyway agent` (pod mode: the pod's UDP to the overlay).
    pub agent: Option<Proc>,
}

/// A device of the inventory (a WorkloadEntry), running outside the zones.
#[derive(Debug)]
pub struct DevicePod {
    /// Index in the engine's inventory.
    pub index: usize,
    /// `ns/name`.
    pub name: String,
    /// The zone whose gateways its agent connects to.
    pub zone: String,
    /// Its number among the devices (its link to the router).
    pub dev: u8,
    /// Its namespace and underlay address.
    pub pod: Pod,
    /// Its overlay address (on its agent's TUN device).
    pub overlay: IpAddr,
    /// App ports.
    pub ports: Vec<u16>,
    /// Its agent.
    pub agent: Option<Proc>,
    /// The app.
    pub app: Option<Proc>,
}

/// One agent to start: where, for whom, how.
struct AgentSpec<'a> {
    /// Its namespace.
    ns: &'a str,
    /// Its name in file names.
    slug: &'a str,
    /// The zone whose gateways it connects to.
    zone: &'a str,
    /// The overlay address it carries.
    overlay: IpAddr,
    /// `pod` or `device`.
    mode: &'a str,
    /// The certificate it presents (a pod's mesh certificate, a device's of the overlay CA).
    tls: &'a MeshFiles,
}

/// The overlay CA's certificate.
fn files_ca_cert(files: &Files) -> PathBuf {
    keyway_gateway::ca::CaFiles::in_dir(&files.ca).cert
}

/// The addresses of the gateway replicas of zone `z`.
fn zone_gateways(z: u8) -> Vec<IpAddr> {
    (0..REPLICAS.len()).map(|i| gateway_ip(z, i)).collect()
}

/// Copies the manifests (`*.yaml`) of `dirs` into `out`.
fn copy_manifests(dirs: &[&Path], out: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(out);
    std::fs::create_dir_all(out)?;
    for dir in dirs {
        for entry in std::fs::read_dir(dir).with_context(|| format!("{}", dir.display()))? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) == Some("yaml") {
                std::fs::copy(&path, out.join(path.file_name().unwrap_or_default()))?;
            }
        }
    }
    Ok(())
}

/// A gateway replica.
#[derive(Debug)]
pub struct GatewayPod {
    /// Zone.
    pub zone: String,
    /// Name.
    pub name: String,
    /// Its pod.
    pub pod: Pod,
    /// Its configuration file.
    pub config: PathBuf,
    /// The process, while running.
    pub proc: Option<Proc>,
    log_n: u32,
}

/// The running overlay. Dropping it stops every process and removes every namespace.
#[derive(Debug)]
pub struct Cluster {
    // Processes first: fields drop in order, and the namespaces must outlive their processes.
    /// Devices outside the zones.
    pub devices: Vec<DevicePod>,
    /// Workloads.
    pub workloads: Vec<WorkloadPod>,
    /// Gateways.
    pub gateways: Vec<GatewayPod>,
    /// The impairment relay (router namespace).
    pub relay: Option<Proc>,
    /// The host outside the overlay (router namespace).
    pub internet: Option<Proc>,
    /// The namespaces.
    pub topo: Topology,
    /// The run directory (configs, logs, keys).
    pub dir: PathBuf,
    /// The expected verdicts: the engine over the same manifests.
    pub engine: Engine,
    /// The relay's impairment control file.
    pub control: PathBuf,
    /// The gateways' files (each zone's epoch secrets: [`Cluster::secrets`]).
    pub files: Files,
    /// The manifest directory the gateways watch.
    pub inventory: PathBuf,
    /// Where things are.
    pub opts: Options,
}

fn zone_index(zone: &str) -> anyhow::Result<u8> {
    ZONES.iter().position(|z| *z == zone).map(|i| i as u8 + 1).with_context(|| format!("unknown zone {zone}"))
}

/// Where the relay takes the overlay traffic for replica `replica` (from 0) of zone `zone`.
fn relay_ip(zone: u8, replica: usize) -> IpAddr {
    IpAddr::from([10, 62, zone, replica as u8 + 1])
}

/// The underlay address of replica `replica` (from 0) of zone `zone`: hosts .2 and .3.
fn gateway_ip(zone: u8, replica: usize) -> IpAddr {
    IpAddr::from([10, 61, zone, replica as u8 + 2])
}

/// The configuration of gateway `zone`/`name` at `ip`: the gateways of its own zone at their
/// addresses, those of other zones through the relay; short timers so failures show fast.
fn gateway_config(zone: &str, name: &str, ip: &str, files: &Files) -> anyhow::Result<keyway_gateway::config::Config> {
    let own = zone_index(zone)?;
    let zones = gwconfig::zones(&LAYOUT, |z, n| {
        let zi = zone_index(z).unwrap_or(0);
        let replica = REPLICAS.iter().position(|r| *r == n).unwrap_or(0);
        let ip = if zi == own { gateway_ip(zi, replica) } else { relay_ip(zi, replica) };
        SocketAddr::new(ip, DEFAULT_OVERLAY_PORT)
    });
    let listen = Listen { overlay: SocketAddr::new(ip.parse()?, DEFAULT_OVERLAY_PORT), ..Listen::default() };
    let mut c = gwconfig::config(zone, name, listen, files, &zones)?;
    c.keepalive_ms = 200;
    c.peer_idle_timeout_ms = 1500;
    c.reload_interval_ms = 200;
    c.key_service.refresh_ms = 1000;
    c.limits.connect_timeout_ms = 3000;
    Ok(c)
}

/// Copies the sample manifests, adding each workload's sidecar address.
fn write_inventory(samples: &Path, out: &Path, sidecars: &BTreeMap<String, String>) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    for entry in std::fs::read_dir(samples)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        let mut docs = Vec::new();
        for d in serde_yaml_ng::Deserializer::from_str(&text) {
            let mut v = serde_yaml_ng::Value::deserialize(d)?;
            let key = format!(
                "{}/{}",
                v["metadata"]["namespace"].as_str().unwrap_or("default"),
                v["metadata"]["name"].as_str().unwrap_or_default()
            );
            if v["kind"].as_str() == Some("Deployment")
                && let Some(ip) = sidecars.get(&key)
                && let Some(ann) = v["spec"]["template"]["metadata"]["annotations"].as_mapping_mut()
            {
                ann.insert("keyway.io/sidecar-ips".into(), ip.clone().into());
            }
            if !v.is_null() {
                docs.push(serde_yaml_ng::to_string(&v)?);
            }
        }
        std::fs::write(out.join(path.file_name().unwrap_or_default()), docs.join("---\n"))?;
    }
    Ok(())
}

use serde::Deserialize as _;

/// One namespace bed at a time in a test process: they are heavy for two cores.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A running bed of a test: its turn (held until the bed is gone) and the bed.
pub type TestBed = (std::sync::MutexGuard<'static, ()>, Cluster);

impl Cluster {
    /// For tests: waits until no other bed of this process runs, then starts one whose namespaces
    /// are named `kw<name>-…`; panics with the reason (a test never skips) when it cannot. Bind it
    /// as `let (_turn, c) = Cluster::for_test("x")`: the bed goes first, then the turn.
    pub fn for_test(name: &str) -> TestBed {
        Cluster::for_test_with(name, |_| {})
    }

    /// As [`Cluster::for_test`], with `tweak` applied to the discovered options first.
    pub fn for_test_with(name: &str, tweak: impl FnOnce(&mut Options)) -> TestBed {
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let started = Options::discover(&format!("kw{name}")).and_then(|mut opts| {
            tweak(&mut opts);
            Cluster::start(opts)
        });
        (turn, started.unwrap_or_else(|e| panic!("e2e setup: {e:#}")))
    }

    /// Builds and starts everything; fails loudly (never skips) when it cannot.
    pub fn start(opts: Options) -> anyhow::Result<Cluster> {
        require_root()?;
        let dir = std::env::temp_dir().join(format!("keyway-e2e-{}", opts.prefix));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("logs"))?;
        sh(&["chmod", "0755", dir.to_str().unwrap_or_default()])?;
        let wasm = dir.join("keyway_filter.wasm");
        std::fs::copy(&opts.wasm, &wasm)?;

        // The bed's manifests: the sample and what the bed adds (e2e/bed: a device, UDP policies).
        // Expected verdicts come from them as written.
        let source = dir.join("source");
        copy_manifests(&[&opts.samples, &opts.repo.join("e2e/bed")], &source)?;
        let (engine, _) = keyway_policy::fs::load_dir(&source).map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut topo = Topology::new(&opts.prefix, ZONES.len() as u8)?;

        // Pods: gateways at .2 and .3 of their zone, workloads from .10.
        let mut gateway_pods = Vec::new();
        for zone in ZONES {
            let z = zone_index(zone)?;
            for (i, name) in REPLICAS.iter().enumerate() {
                let pod = topo.pod(&format!("g{}", i + 1), z, 2 + i as u8)?;
                anyhow::ensure!(pod.ip == gateway_ip(z, i).to_string(), "gateway pod at {}", pod.ip);
                gateway_pods.push((zone.to_owned(), (*name).to_owned(), pod));
            }
        }
        let mut next_host: BTreeMap<u8, u8> = BTreeMap::new();
        let mut workload_pods = Vec::new();
        let mut sidecar_ips = BTreeMap::new();
        let mut devices = Vec::new();
        for (index, w) in engine.inventory().workloads.iter().enumerate() {
            let zone = w.zone.clone().with_context(|| format!("{} has no keyway.io/zone", w.display_name()))?;
            let z = zone_index(&zone)?;
            if w.kind == DEVICE_KIND {
                devices.push(index);
                continue;
            }
            let host = next_host.entry(z).or_insert(10);
            let pod = topo.pod(&format!("w{host}"), z, *host)?;
            *host += 1;
            let overlay =
                *w.overlay_ips.first().with_context(|| format!("{} has no overlay address", w.display_name()))?;
            sidecar_ips.insert(w.short_name(), pod.ip.clone());
            let mut ports: Vec<u16> = w.ports.iter().filter(|p| p.protocol == Protocol::Tcp).map(|p| p.port).collect();
            ports.sort_unstable();
            ports.dedup();
            workload_pods.push(WorkloadPod {
                index,
                name: w.short_name(),
                display: w.display_name(),
                zone,
                pod,
                overlay,
                ports,
                app: None,
                envoy: None,
                agent: None,
            });
        }

        // Keys, certificates, inventory.
        let keyway = opts.keyway.to_str().unwrap_or_default().to_owned();
        let files = Files::in_dir(&dir);
        let path = |p: &Path| p.to_str().unwrap_or_default().to_owned();
        sh(&[&keyway, "ca", "init", "--out", &path(&files.ca)])?;
        crate::mesh::init_ca_cli(&keyway, &files)?;
        // Each zone its own epoch secrets: never one zone's file copied to another.
        std::fs::create_dir_all(&files.secrets_dir)?;
        for zone in ZONES {
            sh(&[&keyway, "keys", "init", "--out", &path(&files.secrets(zone))])?;
        }
        write_inventory(&source, &files.inventory, &sidecar_ips)?;

        // The relay in the router namespace carries the overlay between zones.
        let control = dir.join("impairment");
        std::fs::write(&control, "0 0\n")?;
        let mut pairs = Vec::new();
        for zone in ZONES {
            let z = zone_index(zone)?;
            for i in 0..REPLICAS.len() {
                let rip = relay_ip(z, i);
                topo.router_address(&rip.to_string())?;
                pairs.push(format!("{rip}:{DEFAULT_OVERLAY_PORT}={}:{DEFAULT_OVERLAY_PORT}", gateway_ip(z, i)));
            }
        }
        topo.router_address(INTERNET)?;
        let e2e = opts.e2e.to_str().unwrap_or_default().to_owned();
        let mut relay_args = vec![e2e.clone(), "relay".into(), "--control".into(), control.display().to_string()];
        relay_args.extend(pairs);
        let relay = Proc::start("relay", &topo.router, None, &relay_args, &dir.join("logs/relay.log"), &[])?;
        let ports: Vec<String> = INTERNET_PORTS.iter().chain(&[DNS_PORT]).map(u16::to_string).collect();
        let internet = Proc::start(
            "internet",
            &topo.router,
            None,
            &[e2e.clone(), "app".into(), "--workload".into(), "internet".into(), "--ports".into(), ports.join(",")],
            &dir.join("logs/internet.log"),
            &[],
        )?;

        let mut cluster = Cluster {
            devices: Vec::new(),
            workloads: Vec::new(),
            gateways: Vec::new(),
            relay: Some(relay),
            internet: Some(internet),
            topo,
            dir: dir.clone(),
            engine,
            control,
            files: files.clone(),
            inventory: files.inventory.clone(),
            opts: opts.clone(),
        };

        // Gateways.
        for (zone, name, pod) in gateway_pods {
            sh(&[
                &keyway,
                "ca",
                "issue",
                "--ca",
                &path(&files.ca),
                "--zone",
                &zone,
                "--name",
                &name,
                "--out",
                &path(&files.certs),
            ])?;
            crate::mesh::issue_gateway_cli(&keyway, &files, &zone, &name)?;
            let config = dir.join(format!("gateway-{zone}-{name}.yaml"));
            gwconfig::write(&gateway_config(&zone, &name, &pod.ip, &files)?, &config)?;
            cluster.gateways.push(GatewayPod { zone, name, pod, config, proc: None, log_n: 0 });
        }
        for i in 0..cluster.gateways.len() {
            cluster.start_gateway_at(i)?;
        }
        cluster.wait_gateways_ready(Duration::from_secs(30))?;

        // With Istio's configuration: the dump, and the harness's pod addresses mapped to the bed's.
        let istio = match &opts.sidecars {
            SidecarConfig::HandWritten => None,
            SidecarConfig::Istio(dir) => {
                let dump = crate::envoy::istio::Dump::load(dir)?;
                let mut bed = BTreeMap::new();
                for w in &workload_pods {
                    bed.insert(w.name.clone(), w.pod.ip.parse::<IpAddr>()?);
                }
                let addresses = crate::envoy::istio::Addresses::new(&dump.pod_ips, &bed)?;
                Some((dump, addresses))
            }
        };
        let uncaptured: Vec<String> = ISTIO_UNCAPTURED_PORTS
            .iter()
            .map(|p| format!("iptables -t nat -I KEYWAY_INBOUND 1 -p tcp --dport {p} -j RETURN"))
            .collect();
        let uncaptured: Vec<&str> =
            if istio.is_some() { uncaptured.iter().map(String::as_str).collect() } else { Vec::new() };

        // Workloads: iptables capture, the app, the sidecar. One mesh certificate per service
        // account, issued once: issuing it again for a second workload of the account (catalog-c)
        // would replace the files while the first one's Envoy may still be reading them.
        let mut issued: BTreeMap<(String, String), MeshFiles> = BTreeMap::new();
        for mut w in workload_pods {
            Sidecar::capture(&w.pod.ns, &uncaptured)?;
            Sidecar::refuse_non_tcp(&w.pod.ns, cluster.opts.resolver)?;
            let mut app_ports: Vec<String> = w.ports.iter().map(u16::to_string).collect();
            app_ports.push(HEALTH_PORT.to_string());
            let slug = w.name.replace('/', "-");
            w.app = Some(Proc::start(
                &format!("{} app", w.name),
                &w.pod.ns,
                None,
                &[
                    e2e.clone(),
                    "app".into(),
                    "--workload".into(),
                    w.name.clone(),
                    "--ports".into(),
                    app_ports.join(","),
                ],
                &dir.join(format!("logs/app-{slug}.log")),
                &[],
            )?);
            let wl = cluster.engine.inventory().workloads.get(w.index).context("workload")?;
            let z = zone_index(&w.zone)?;
            let sidecar = Sidecar {
                namespace: wl.namespace.clone(),
                service_account: wl.service_account.clone(),
                overlay_ip: w.overlay.to_string(),
                app_ports: w.ports.clone(),
                gateways: (0..REPLICAS.len()).map(|i| gateway_ip(z, i).to_string()).collect(),
                tunnel_port: DEFAULT_TUNNEL_PORT,
                mesh: match issued.get(&(wl.namespace.clone(), wl.service_account.clone())) {
                    Some(m) => m.clone(),
                    None => {
                        let m = crate::mesh::issue_sidecar_cli(
                            &keyway,
                            &cluster.files,
                            &wl.namespace,
                            &wl.service_account,
                        )?;
                        issued.insert((wl.namespace.clone(), wl.service_account.clone()), m.clone());
                        m
                    }
                },
                gateway_identity: crate::mesh::gateway_identity(keyway_gateway::config::DEFAULT_TRUST_DOMAIN),
                wasm: wasm.display().to_string(),
            };
            let cfg = dir.join(format!("envoy-{slug}.yaml"));
            let bootstrap = match &istio {
                None => sidecar.bootstrap(),
                Some((dump, addresses)) => {
                    let gateways: Vec<IpAddr> = (0..REPLICAS.len()).map(|i| gateway_ip(z, i)).collect();
                    let bed = crate::envoy::istio::BedSidecar {
                        mesh: &sidecar.mesh,
                        wasm: &wasm,
                        gateways: &gateways,
                        tunnel_port: sidecar.tunnel_port,
                        addresses,
                    };
                    let (b, report) = crate::envoy::istio::convert(dump.pod(&w.name)?, &bed)
                        .with_context(|| format!("Istio's configuration of {}", w.name))?;
                    std::fs::write(dir.join(format!("envoy-{slug}.istio-report.txt")), format!("{report:#?}\n"))?;
                    serde_json::to_string_pretty(&b)?
                }
            };
            std::fs::write(&cfg, bootstrap)?;
            w.envoy = Some(Proc::start(
                &format!("{} envoy", w.name),
                &w.pod.ns,
                Some(ENVOY_UID),
                &crate::envoy::command(&opts.envoy, &cfg),
                &dir.join(format!("logs/envoy-{slug}.log")),
                &[],
            )?);
            // The pod's UDP to the overlay: its own agent, with the pod's mesh certificate. The
            // pod's overlay address is its own (the bed's pods live on an underlay of their own;
            // in a cluster it is the pod's address).
            ns_sh(&w.pod.ns, &["ip", "addr", "add", &format!("{}/32", w.overlay), "dev", "lo"])?;
            Sidecar::let_agent_udp_through(&w.pod.ns)?;
            let spec = AgentSpec {
                ns: &w.pod.ns,
                slug: &slug,
                zone: &w.zone,
                overlay: w.overlay,
                mode: "pod",
                tls: &sidecar.mesh,
            };
            w.agent = Some(cluster.start_agent(&spec)?);
            cluster.workloads.push(w);
        }
        cluster.wait_sidecars_ready(Duration::from_secs(60))?;
        for (n, index) in devices.into_iter().enumerate() {
            cluster.start_device(index, u8::try_from(n + 1)?)?;
        }
        cluster.wait_agents_ready(Duration::from_secs(30))?;
        Ok(cluster)
    }

    /// Starts device `index` of the inventory (a WorkloadEntry) in a namespace of its own outside
    /// the zones (the `n`-th): its certificate from the overlay CA (`keyway ca issue-device`),
    /// `keyway agent` in device mode, and the app on its ports.
    fn start_device(&mut self, index: usize, n: u8) -> anyhow::Result<()> {
        let w = self.engine.inventory().workloads.get(index).context("device")?.clone();
        let zone = w.zone.clone().context("device zone")?;
        let overlay = *w.overlay_ips.first().context("device overlay address")?;
        let pod = self.topo.device(&format!("dev{n}"), n)?;
        let keyway = self.opts.keyway.display().to_string();
        let certs = self.dir.join("devices");
        sh(&[
            &keyway,
            "ca",
            "issue-device",
            "--ca",
            &self.files.ca.display().to_string(),
            "--namespace",
            &w.namespace,
            "--service-account",
            &w.service_account,
            "--out",
            &certs.display().to_string(),
        ])?;
        let issued = keyway_gateway::ca::IssuedPaths::in_dir(&certs, &w.namespace, &w.service_account);
        let mesh = MeshFiles { ca: files_ca_cert(&self.files), cert: issued.cert, key: issued.key };
        let slug = w.short_name().replace('/', "-");
        let spec = AgentSpec { ns: &pod.ns, slug: &slug, zone: &zone, overlay, mode: "device", tls: &mesh };
        let agent = self.start_agent(&spec)?;
        let mut ports: Vec<u16> = w.ports.iter().filter(|p| p.protocol == Protocol::Tcp).map(|p| p.port).collect();
        ports.sort_unstable();
        ports.dedup();
        let app_ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        let app = Proc::start(
            &format!("{} app", w.short_name()),
            &pod.ns,
            None,
            &[
                self.opts.e2e.display().to_string(),
                "app".into(),
                "--workload".into(),
                w.short_name(),
                "--ports".into(),
                app_ports.join(","),
            ],
            &self.dir.join(format!("logs/app-{slug}.log")),
            &[],
        )?;
        self.devices.push(DevicePod {
            index,
            name: w.short_name(),
            zone,
            dev: n,
            pod,
            overlay,
            ports,
            agent: Some(agent),
            app: Some(app),
        });
        Ok(())
    }

    /// Starts `keyway agent` as `spec` says, connected to every gateway replica of its zone
    /// (checked with the overlay CA), its admin on 127.0.0.1:[`AGENT_ADMIN_PORT`].
    fn start_agent(&self, spec: &AgentSpec<'_>) -> anyhow::Result<Proc> {
        let AgentSpec { ns, slug, zone, overlay, mode, tls } = *spec;
        let gateways: Vec<String> =
            zone_gateways(zone_index(zone)?).iter().map(|g| format!("\"{g}:{DEFAULT_EDGE_PORT}\"")).collect();
        let config = format!(
            "zone: {zone}\noverlay_ip: {overlay}\noverlay_cidrs: [{OVERLAY_CIDR}]\ngateways: [{}]\nmode: {mode}\n\
             tls: {{ca: {}, cert: {}, key: {}}}\nadmin: \"127.0.0.1:{AGENT_ADMIN_PORT}\"\n",
            gateways.join(", "),
            files_ca_cert(&self.files).display(),
            tls.cert.display(),
            tls.key.display(),
        );
        let path = self.dir.join(format!("agent-{slug}.yaml"));
        std::fs::write(&path, config)?;
        Proc::start(
            &format!("{slug} agent"),
            ns,
            None,
            &[self.opts.keyway.display().to_string(), "agent".into(), "--config".into(), path.display().to_string()],
            &self.dir.join(format!("logs/agent-{slug}.log")),
            &[],
        )
    }

    /// Waits until every agent (pods' and devices') has a gateway connection.
    pub fn wait_agents_ready(&mut self, deadline: Duration) -> anyhow::Result<()> {
        let url = format!("http://127.0.0.1:{AGENT_ADMIN_PORT}/healthz");
        let all: Vec<(String, String)> = self
            .workloads
            .iter()
            .map(|w| (w.name.clone(), w.pod.ns.clone()))
            .chain(self.devices.iter().map(|d| (d.name.clone(), d.pod.ns.clone())))
            .collect();
        for (name, ns) in all {
            wait_until(deadline, &format!("the agent of {name} connected"), || {
                matches!(ns_get(&ns, &self.opts.e2e, &url), Ok((200, _)))
            })
            .with_context(|| {
                let log = self.dir.join(format!("logs/agent-{}.log", name.replace('/', "-")));
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(8).collect();
                format!("agent log {}:\n{}", log.display(), tail.into_iter().rev().collect::<Vec<_>>().join("\n"))
            })?;
        }
        Ok(())
    }

    /// The device called `ns/name`.
    pub fn device(&self, name: &str) -> anyhow::Result<&DevicePod> {
        self.devices.iter().find(|d| d.name == name).with_context(|| format!("no device {name}"))
    }

    /// Moves device `name` to another underlay address (the old one removed), as a laptop that
    /// changes networks; its agent's QUIC connections follow (connection migration).
    pub fn roam_device(&mut self, name: &str, host: u8) -> anyhow::Result<()> {
        let d = self.devices.iter_mut().find(|d| d.name == name).with_context(|| format!("no device {name}"))?;
        self.topo.move_device(&mut d.pod, d.dev, host)
    }

    fn start_gateway_at(&mut self, i: usize) -> anyhow::Result<()> {
        let keyway = self.opts.keyway.display().to_string();
        let g = self.gateways.get_mut(i).context("gateway")?;
        g.log_n += 1;
        let log = self.dir.join(format!("logs/gateway-{}-{}.{}.log", g.zone, g.name, g.log_n));
        g.proc = Some(Proc::start(
            &format!("{}/{} gateway", g.zone, g.name),
            &g.pod.ns,
            None,
            &[keyway, "gateway".into(), "--config".into(), g.config.display().to_string()],
            &log,
            &[("LOG_FORMAT", "json".into()), ("RUST_LOG", "info".into())],
        )?);
        Ok(())
    }

    fn gateway_index(&self, zone: &str, name: &str) -> anyhow::Result<usize> {
        self.gateways
            .iter()
            .position(|g| g.zone == zone && g.name == name)
            .with_context(|| format!("no gateway {zone}/{name}"))
    }

    /// Kills a gateway replica at once (SIGKILL).
    pub fn kill_gateway(&mut self, zone: &str, name: &str) -> anyhow::Result<()> {
        let i = self.gateway_index(zone, name)?;
        if let Some(mut p) = self.gateways.get_mut(i).and_then(|g| g.proc.take()) {
            p.kill();
        }
        Ok(())
    }

    /// Sends `signal` (`STOP`, `CONT`, …) to a gateway replica: `STOP` hangs it without closing
    /// anything, as a frozen host would.
    pub fn signal_gateway(&self, zone: &str, name: &str, signal: &str) -> anyhow::Result<()> {
        let g = self.gateways.get(self.gateway_index(zone, name)?).context("gateway")?;
        let pid = g.proc.as_ref().and_then(Proc::pid).with_context(|| format!("{zone}/{name} is not running"))?;
        sh(&["kill", &format!("-{signal}"), &pid.to_string()])?;
        Ok(())
    }

    /// Starts a gateway replica again.
    pub fn start_gateway(&mut self, zone: &str, name: &str) -> anyhow::Result<()> {
        let i = self.gateway_index(zone, name)?;
        self.start_gateway_at(i)
    }

    /// An HTTP GET from inside a namespace: (status, body).
    pub fn http_get(&self, ns: &str, url: &str) -> anyhow::Result<(u16, String)> {
        ns_get(ns, &self.opts.e2e, url)
    }

    /// The gateway's admin endpoint `path`.
    pub fn gateway_admin(&self, zone: &str, name: &str, path: &str) -> anyhow::Result<(u16, String)> {
        let g = self.gateways.get(self.gateway_index(zone, name)?).context("gateway")?;
        self.http_get(&g.pod.ns, &format!("127.0.0.1:{DEFAULT_ADMIN_PORT}{path}"))
    }

    /// Waits until every running gateway is ready and connected to every running gateway of the
    /// other zones.
    pub fn wait_gateways_ready(&mut self, deadline: Duration) -> anyhow::Result<()> {
        let running: Vec<(String, String)> =
            self.gateways.iter().filter(|g| g.proc.is_some()).map(|g| (g.zone.clone(), g.name.clone())).collect();
        let mut missing = Vec::new();
        let ready = wait_until(deadline, "the gateways to be ready", || {
            missing.clear();
            for (zone, name) in &running {
                match self.gateway_admin(zone, name, "/peers") {
                    Ok((200, body)) => {
                        for (pz, pn) in running.iter().filter(|(z, _)| z != zone) {
                            if !gwconfig::peers_up(&body, pz).contains(pn) {
                                missing.push(format!("{zone}/{name} → {pz}/{pn}"));
                            }
                        }
                    }
                    other => missing.push(format!("{zone}/{name} admin: {other:?}")),
                }
            }
            missing.is_empty()
        });
        ready.map(drop).with_context(|| {
            let logs: Vec<String> = self
                .gateways
                .iter()
                .filter_map(|g| g.proc.as_ref().map(|p| format!("--- {}\n{}", p.name, p.tail(5))))
                .collect();
            format!("not connected: {}\n{}", missing.join(", "), logs.join("\n"))
        })
    }

    /// Waits until every sidecar is live and has fetched its keys (its stats show a successful
    /// refresh of a keyway plugin).
    pub fn wait_sidecars_ready(&mut self, deadline: Duration) -> anyhow::Result<()> {
        for w in &mut self.workloads {
            let envoy = w.envoy.as_mut().with_context(|| format!("{} has no sidecar", w.name))?;
            Ready::KeysFetched
                .wait(&w.pod.ns, &self.opts.e2e, deadline, envoy)
                .with_context(|| format!("the sidecar of {}", w.name))?;
        }
        Ok(())
    }

    /// The workload called `ns/name`.
    pub fn workload(&self, name: &str) -> anyhow::Result<&WorkloadPod> {
        self.workloads.iter().find(|w| w.name == name).with_context(|| format!("no workload {name}"))
    }

    /// What `keyway policy` says about `src` → `dst`:`port` over TCP (dst: a workload or an
    /// address).
    pub fn expected(&self, src: &WorkloadPod, dst: Peer, port: u16) -> (Verdict, String) {
        self.expected_for(src.index, dst, Protocol::Tcp, port)
    }

    /// What `keyway policy` says about the workload or device `src` (its inventory index) →
    /// `dst`:`port`/`protocol`.
    pub fn expected_for(&self, src: usize, dst: Peer, protocol: Protocol, port: u16) -> (Verdict, String) {
        let d = self.engine.decide(Peer::Workload(src), dst, protocol, port);
        (d.verdict, self.engine.describe_decision(&d))
    }

    /// Tries connections from `src` (inside its pod, so through its sidecar) to each target.
    pub fn probe(
        &self,
        src: &WorkloadPod,
        targets: &[SocketAddr],
        bytes: u64,
        timeout: Duration,
    ) -> anyhow::Result<Vec<ProbeResult>> {
        self.probe_in(&src.pod.ns, targets, bytes, timeout)
    }

    /// Sends one UDP datagram from namespace `ns` to each target, all at once, and waits for
    /// each answer up to `timeout`.
    pub fn udp_in(
        &self,
        ns: &str,
        targets: &[SocketAddr],
        timeout: Duration,
    ) -> anyhow::Result<Vec<crate::datagram::DatagramResult>> {
        if targets.is_empty() {
            return Ok(Vec::new());
        }
        let mut args = vec![self.opts.e2e.display().to_string(), "udp".into(), "--timeout-ms".into()];
        args.push(timeout.as_millis().to_string());
        args.extend(targets.iter().map(ToString::to_string));
        let out = ns_sh(ns, &args.iter().map(String::as_str).collect::<Vec<_>>())?;
        out.lines().map(|l| serde_json::from_str(l).with_context(|| format!("udp probe output {l:?}"))).collect()
    }

    /// Tries connections from namespace `ns` (a pod's, through its sidecar; a device's, through
    /// its agent) to each target.
    pub fn probe_in(
        &self,
        ns: &str,
        targets: &[SocketAddr],
        bytes: u64,
        timeout: Duration,
    ) -> anyhow::Result<Vec<ProbeResult>> {
        let mut args = vec![
            self.opts.e2e.display().to_string(),
            "probe".into(),
            "--bytes".into(),
            bytes.to_string(),
            "--timeout-ms".into(),
            timeout.as_millis().to_string(),
        ];
        args.extend(targets.iter().map(ToString::to_string));
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = ns_sh(ns, &argv)?;
        out.lines().map(|l| serde_json::from_str(l).with_context(|| format!("probe output {l:?}"))).collect()
    }

    /// Sends what keyway does not carry from `src`'s pod as its app container can (root): one
    /// UDP datagram to each of `udp`, and an ICMP echo request and an SCTP INIT to each of `raw`.
    pub fn datagrams(
        &self,
        src: &WorkloadPod,
        udp: &[SocketAddr],
        raw: &[IpAddr],
        timeout: Duration,
    ) -> anyhow::Result<Vec<crate::datagram::DatagramResult>> {
        let e2e = self.opts.e2e.display().to_string();
        let ms = timeout.as_millis().to_string();
        let mut out = String::new();
        if !udp.is_empty() {
            let mut args = vec![e2e.clone(), "udp".into(), "--timeout-ms".into(), ms.clone()];
            args.extend(udp.iter().map(ToString::to_string));
            out += &ns_sh(&src.pod.ns, &args.iter().map(String::as_str).collect::<Vec<_>>())?;
        }
        if !raw.is_empty() {
            let mut args = vec![e2e, "raw".into(), "--timeout-ms".into(), ms];
            args.extend(raw.iter().map(ToString::to_string));
            out += &ns_sh(&src.pod.ns, &args.iter().map(String::as_str).collect::<Vec<_>>())?;
        }
        out.lines().map(|l| serde_json::from_str(l).with_context(|| format!("datagram probe output {l:?}"))).collect()
    }

    /// Tries one connection from a pod's namespace straight at an address, bypassing nothing on
    /// the client side (used for underlay bypass attempts from a pod without a sidecar capture:
    /// the router namespace).
    pub fn probe_from_ns(&self, ns: &str, target: SocketAddr, timeout: Duration) -> anyhow::Result<ProbeResult> {
        let out = ns_sh(
            ns,
            &[
                self.opts.e2e.to_str().unwrap_or_default(),
                "probe",
                "--timeout-ms",
                &timeout.as_millis().to_string(),
                &target.to_string(),
            ],
        )?;
        serde_json::from_str(out.trim()).context("probe output")
    }

    /// Sets the impairment of the overlay between zones; returns once the relay applies it.
    pub fn impair(&self, delay_ms: u64, loss_percent: f64) -> anyhow::Result<()> {
        let text = format!("{delay_ms} {loss_percent}\n");
        std::fs::write(&self.control, &text)?;
        let applied = crate::app::applied(&self.control);
        wait_until(Duration::from_secs(5), "the relay to apply the impairment", || {
            std::fs::read_to_string(&applied).is_ok_and(|t| t == text)
        })?;
        Ok(())
    }

    /// The address a workload's sidecar and app have on the underlay.
    pub fn underlay(&self, name: &str) -> anyhow::Result<IpAddr> {
        Ok(self.workload(name)?.pod.ip.parse()?)
    }
}

impl Cluster {
    /// The epoch secrets file of `zone` (its gateways' only).
    pub fn secrets(&self, zone: &str) -> PathBuf {
        self.files.secrets(zone)
    }

    /// A token sealed for `src` (its identity and overlay address) to `dst`:`port`, with the
    /// given epoch (default: current) of `src`'s zone, as the filter would make it.
    pub fn mint_token(&self, src: &WorkloadPod, dst: IpAddr, port: u16, epoch: Option<u32>) -> anyhow::Result<String> {
        let wl = self.engine.inventory().workloads.get(src.index).context("workload")?;
        let identity = wl.identity(keyway_gateway::config::DEFAULT_TRUST_DOMAIN);
        let now = crate::credentials::now_ms();
        crate::credentials::token(
            &self.secrets(&src.zone),
            &identity,
            src.overlay,
            SocketAddr::new(dst, port),
            epoch,
            now,
        )
    }

    /// A ticket for `dst`:`port` naming `src_identity`, sealed as the gateway of `dst`'s zone seals
    /// it (with that zone's ticket key of the workload at `dst`).
    pub fn mint_ticket(&self, src: IpAddr, src_identity: &str, dst: IpAddr, port: u16) -> anyhow::Result<String> {
        let Peer::Workload(w) = self.engine.peer_for(dst) else { anyhow::bail!("{dst} is not a workload's address") };
        let w = self.engine.inventory().workloads.get(w).context("workload")?;
        let key_ip = w.overlay_ips.first().copied().unwrap_or(dst);
        let identity = w.identity(keyway_gateway::config::DEFAULT_TRUST_DOMAIN);
        let zone = w.zone.as_deref().with_context(|| format!("{} has no zone", w.display_name()))?;
        crate::credentials::ticket(
            &self.secrets(zone),
            (&identity, key_ip),
            src,
            src_identity,
            SocketAddr::new(dst, port),
        )
    }

    /// The mesh certificate files of `w`'s sidecar.
    pub fn sidecar_mesh(&self, w: &WorkloadPod) -> anyhow::Result<MeshFiles> {
        let wl = self.engine.inventory().workloads.get(w.index).context("workload")?;
        Ok(self.files.workload_mesh(&wl.namespace, &wl.service_account))
    }

    /// The mesh certificate files of gateway replica `zone`/`name`.
    pub fn gateway_mesh(&self, zone: &str, name: &str) -> MeshFiles {
        self.files.mesh(zone, name)
    }

    /// The `keyway-e2e` command line run inside `ns`: in a workload pod as Envoy's user (so the
    /// capture rules do not apply; it reads the sidecar's mesh key as Envoy does), elsewhere as
    /// root; with `mesh` files as `--cert/--key/--ca`.
    fn e2e_args(&self, ns: &str, mesh: Option<&MeshFiles>, args: &[String]) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        if ns != self.topo.router {
            out.extend(["setpriv".to_owned(), format!("--reuid={ENVOY_UID}"), format!("--regid={ENVOY_UID}")]);
            out.push("--clear-groups".into());
        }
        out.push(self.opts.e2e.display().to_string());
        out.extend(args.iter().cloned());
        if let Some(m) = mesh {
            for (flag, p) in [("--cert", &m.cert), ("--key", &m.key), ("--ca", &m.ca)] {
                out.extend([flag.to_owned(), p.display().to_string()]);
            }
        }
        out
    }

    /// Sends a raw HTTP/2 CONNECT from inside `ns` ([`Cluster::e2e_args`]), with the mesh
    /// certificate `mesh` or in cleartext: returns `status N reason R [banner B]`, or
    /// `refused …` when the connection or TLS handshake fails.
    pub fn raw_connect(
        &self,
        ns: &str,
        mesh: Option<&MeshFiles>,
        to: SocketAddr,
        authority: SocketAddr,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<String> {
        let mut args =
            vec!["connect".to_owned(), "--to".into(), to.to_string(), "--authority".into(), authority.to_string()];
        for (k, v) in headers {
            args.push("--header".into());
            args.push(format!("{k}={v}"));
        }
        let argv = self.e2e_args(ns, mesh, &args);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        Ok(ns_sh(ns, &argv)?.trim().to_owned())
    }

    /// Asks the key service at `to` (a gateway's tunnel) for the keys of `ip` from inside `ns`
    /// ([`Cluster::e2e_args`]), with `mesh` or in cleartext: status and body; status 0 with the
    /// error when the connection or TLS handshake fails.
    pub fn raw_keys(&self, ns: &str, mesh: Option<&MeshFiles>, to: SocketAddr, ip: IpAddr) -> (u16, String) {
        let args = ["keys".to_owned(), "--to".into(), to.to_string(), "--ip".into(), ip.to_string()];
        let argv = self.e2e_args(ns, mesh, &args);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        match ns_sh(ns, &argv) {
            Ok(out) => {
                let (status, body) = out.split_once('\n').unwrap_or((out.as_str(), ""));
                (status.trim().parse().unwrap_or(0), body.to_owned())
            }
            Err(e) => (0, format!("{e:#}")),
        }
    }

    /// The underlay address of a gateway replica.
    pub fn gateway_ip(&self, zone: &str, name: &str) -> anyhow::Result<IpAddr> {
        let g = self.gateways.get(self.gateway_index(zone, name)?).context("gateway")?;
        Ok(g.pod.ip.parse()?)
    }

    /// Access-log events (JSON `fields`) of a gateway replica's current process.
    pub fn access_log(&self, zone: &str, name: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let g = self.gateways.get(self.gateway_index(zone, name)?).context("gateway")?;
        let Some(p) = &g.proc else { return Ok(Vec::new()) };
        let text = std::fs::read_to_string(&p.log)?;
        Ok(text
            .lines()
            .filter(|l| l.contains("keyway::access"))
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| v["fields"].clone())
            .collect())
    }

    /// Runs `keyway keys rotate` on every zone's secrets file; returns the new epoch (the same
    /// number in every zone: they were made and rotated together).
    pub fn rotate_keys(&self, overlap: &str) -> anyhow::Result<u32> {
        let mut epochs = BTreeMap::new();
        for zone in ZONES {
            let out = sh(&[
                self.opts.keyway.to_str().unwrap_or_default(),
                "keys",
                "rotate",
                "--out",
                self.secrets(zone).to_str().unwrap_or_default(),
                "--overlap",
                overlap,
            ])?;
            epochs.insert(zone, out.trim().parse::<u32>()?);
        }
        let first = epochs.values().next().copied().context("no zone")?;
        anyhow::ensure!(epochs.values().all(|e| *e == first), "the zones rotated to different epochs: {epochs:?}");
        Ok(first)
    }

    /// Cuts or restores a zone's link to the router.
    pub fn set_zone_link(&self, zone: &str, up: bool) -> anyhow::Result<()> {
        self.topo.set_zone_link(zone_index(zone)?, up)
    }
}
