//! The test bed: two zones as network namespaces (the end-to-end harness's topology), and in them
//! one client pod and one server pod per compared path, so every path crosses the same router:
//!
//! | path | client pod (zone 1) | server pod | in between |
//! |---|---|---|---|
//! | `direct` | `cdirect` | `sdirect` (zone 2) | nothing |
//! | `envoy_baseline` | `cbase` + Envoy | `sbase` (zone 2) + Envoy | plain TCP between the sidecars |
//! | `envoy_hbone` | `chbone` + Envoy | `shbone` (zone 2) + Envoy | HTTP/2 CONNECT over mutual TLS, sidecar to sidecar |
//! | `keyway_same_zone` | `ckw` + Envoy + filter | `skwa` (zone 1) + Envoy + filter | the zone's gateway |
//! | `keyway_cross_zone` | `ckw` + Envoy + filter | `skwb` (zone 2) + Envoy + filter | gateway, QUIC, gateway |
//! | `boringtun` | `cwg` + boringtun | `swg` (zone 2) + boringtun | WireGuard (userspace) |
//! | `agent` | `cwg` + `keyway agent` | `swg` (zone 2) + `keyway agent` | agent, gateway, QUIC, gateway, agent |
//!
//! `agent` and `boringtun` share their two namespaces: two devices (Istio WorkloadEntries of the
//! bench's inventory, a NetworkPolicy allowing the client's TCP and UDP to the server) whose agents
//! join their zone's gateway on its edge listener; WireGuard's interface and the agents' TUN
//! devices sit side by side, so both paths cross the same links.
//!
//! Each server pod runs the 1 KiB HTTP server on 8080 and `iperf3 -s` on 5201; `swg` also runs the
//! UDP echo server on 7007. Every Envoy runs
//! with one worker (`--concurrency 1`), as the end-to-end sidecars do.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use keyway_e2e::envoy::{ENVOY_UID, Ready, Sidecar};
use keyway_e2e::gateway::{
    self as gwconfig, DEFAULT_ADMIN_PORT, DEFAULT_OVERLAY_PORT, DEFAULT_TUNNEL_PORT, Files, Listen, ZoneLayout,
};
use keyway_e2e::proc::Proc;
use keyway_e2e::topology::{Topology, ns_get, ns_sh, require_root, sh};
use keyway_e2e::wait::wait_until;

use crate::envoycfg;

/// The HTTP server's port in every server pod.
pub const HTTP_PORT: u16 = 8080;
/// iperf3's port in every server pod.
pub const IPERF_PORT: u16 = 5201;
/// The UDP echo server's port (in `swg`).
pub const UDP_ECHO_PORT: u16 = 7007;
const WG_PORT: u16 = 51820;
/// The overlay addresses of the two devices (`cwg`'s agent, `swg`'s agent).
pub const AGENT_CLIENT_OVERLAY: &str = "10.128.1.50";
/// The server device's overlay address.
pub const AGENT_SERVER_OVERLAY: &str = "10.128.2.50";
/// Where each agent serves its admin endpoint (in its own namespace).
const AGENT_ADMIN_PORT: u16 = 15191;
/// The gateways' edge port.
const EDGE_PORT: u16 = 15444;

/// The programs the bed runs.
#[derive(Debug, Clone)]
pub struct Tools {
    /// This program (server, load generator).
    pub me: PathBuf,
    /// `keyway`.
    pub keyway: PathBuf,
    /// `keyway-e2e` (its `get`).
    pub e2e: PathBuf,
    /// Envoy.
    pub envoy: PathBuf,
    /// The filter module.
    pub wasm: PathBuf,
    /// iperf3.
    pub iperf3: PathBuf,
    /// boringtun-cli, when installed.
    pub boringtun: Option<PathBuf>,
}

/// One compared path: where its client runs and what it connects to.
#[derive(Debug, Clone)]
pub struct PathDef {
    /// Name as in `latest.json`.
    pub name: &'static str,
    /// The client's namespace.
    pub client_ns: String,
    /// The address the client uses (the server's pod, overlay or tunnel address).
    pub server_ip: String,
}

impl PathDef {
    /// The HTTP server through this path.
    pub fn http(&self) -> anyhow::Result<SocketAddr> {
        Ok(format!("{}:{HTTP_PORT}", self.server_ip).parse()?)
    }

    /// The UDP echo server through this path (`agent` and `boringtun` only).
    pub fn udp_echo(&self) -> anyhow::Result<SocketAddr> {
        Ok(format!("{}:{UDP_ECHO_PORT}", self.server_ip).parse()?)
    }
}

/// The running bed. Dropping it stops every process and removes the namespaces.
#[derive(Debug)]
pub struct Bed {
    /// Processes by role (`gw-a`, `envoy-ckw`, …); dropped before the namespaces.
    pub procs: Vec<(String, Proc)>,
    /// The namespaces.
    pub topo: Topology,
    /// The paths.
    pub paths: Vec<PathDef>,
    /// Run directory.
    pub dir: PathBuf,
    /// Tools.
    pub tools: Tools,
    /// The MTU of every link.
    pub mtu: u16,
}

fn pod_ns(prefix: &str, zone: u8, name: &str) -> String {
    format!("{prefix}-z{zone}-{name}")
}

impl Bed {
    /// The pid of the process with `role`.
    pub fn pid(&self, role: &str) -> Option<u32> {
        self.procs.iter().find(|(r, _)| r == role).and_then(|(_, p)| p.pid())
    }

    /// The path called `name`.
    pub fn path(&self, name: &str) -> anyhow::Result<&PathDef> {
        self.paths.iter().find(|p| p.name == name).with_context(|| format!("no path {name}"))
    }

    fn start(
        &mut self,
        role: &str,
        ns: &str,
        uid: Option<u32>,
        args: &[String],
        env: &[(&str, String)],
    ) -> anyhow::Result<()> {
        let log = self.dir.join(format!("logs/{role}.log"));
        let p = Proc::start(role, ns, uid, args, &log, env)?;
        self.procs.push((role.to_owned(), p));
        Ok(())
    }

    fn tail(&self, role: &str) -> String {
        self.procs.iter().find(|(r, _)| r == role).map(|(_, p)| p.tail(15)).unwrap_or_default()
    }

    /// HTTP GET inside a namespace with the harness's tiny client: (status, body).
    pub fn get(&self, ns: &str, url: &str) -> anyhow::Result<(u16, String)> {
        ns_get(ns, &self.tools.e2e, url)
    }

    fn wait(&self, what: &str, role: &str, deadline: Duration, ok: impl FnMut() -> bool) -> anyhow::Result<()> {
        wait_until(deadline, what, ok).map(drop).with_context(|| format!("log of {role}:\n{}", self.tail(role)))
    }

    /// Waits until the Envoy of pod `name` in `ns` is ready.
    fn wait_envoy(&mut self, ready: Ready, ns: &str, name: &str, deadline: Duration) -> anyhow::Result<()> {
        let role = format!("envoy-{name}");
        let e2e = self.tools.e2e.clone();
        let envoy = self.procs.iter_mut().find(|(r, _)| *r == role).map(|(_, p)| p).context("no such Envoy")?;
        ready.wait(ns, &e2e, deadline, envoy)
    }

    /// Builds the namespaces and starts every process; fails loudly when anything is missing.
    /// Every link has MTU `mtu` (WireGuard's interface 80 bytes less, as `wg-quick` sets it).
    pub fn start_all(tools: Tools, prefix: &str, mtu: u16) -> anyhow::Result<Bed> {
        require_root()?;
        let dir = std::env::temp_dir().join(format!("keyway-bench-{prefix}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("logs"))?;
        sh(&["chmod", "0755", dir.to_str().unwrap_or_default()])?;
        let mut topo = Topology::with_mtu(prefix, 2, mtu)?;
        let pods: [(&str, u8, u8); 12] = [
            ("gw", 1, 2),
            ("cdirect", 1, 10),
            ("cbase", 1, 11),
            ("chbone", 1, 12),
            ("ckw", 1, 13),
            ("cwg", 1, 14),
            ("skwa", 1, 20),
            ("gw", 2, 2),
            ("sdirect", 2, 10),
            ("sbase", 2, 11),
            ("shbone", 2, 12),
            ("skwb", 2, 13),
        ];
        for (name, zone, host) in pods {
            topo.pod(name, zone, host)?;
        }
        topo.pod("swg", 2, 14)?;
        let ns = |zone: u8, name: &str| pod_ns(prefix, zone, name);
        let paths = vec![
            PathDef { name: "direct", client_ns: ns(1, "cdirect"), server_ip: "10.61.2.10".into() },
            PathDef { name: "envoy_baseline", client_ns: ns(1, "cbase"), server_ip: "10.61.2.11".into() },
            PathDef { name: "envoy_hbone", client_ns: ns(1, "chbone"), server_ip: "10.61.2.12".into() },
            PathDef { name: "keyway_same_zone", client_ns: ns(1, "ckw"), server_ip: "10.128.1.20".into() },
            PathDef { name: "keyway_cross_zone", client_ns: ns(1, "ckw"), server_ip: "10.128.2.13".into() },
            PathDef { name: "boringtun", client_ns: ns(1, "cwg"), server_ip: "10.99.0.2".into() },
            PathDef { name: "agent", client_ns: ns(1, "cwg"), server_ip: AGENT_SERVER_OVERLAY.into() },
        ];
        let mut bed = Bed { procs: Vec::new(), topo, paths, dir: dir.clone(), tools: tools.clone(), mtu };
        let me = tools.me.display().to_string();
        let iperf = tools.iperf3.display().to_string();

        // Servers.
        for (zone, name) in [(2, "sdirect"), (2, "sbase"), (2, "shbone"), (1, "skwa"), (2, "skwb"), (2, "swg")] {
            let n = ns(zone, name);
            bed.start(
                &format!("http-{name}"),
                &n,
                None,
                &[me.clone(), "serve".into(), "--port".into(), HTTP_PORT.to_string()],
                &[],
            )?;
            bed.start(
                &format!("iperf-{name}"),
                &n,
                None,
                &[iperf.clone(), "-s".into(), "-p".into(), IPERF_PORT.to_string()],
                &[],
            )?;
        }

        bed.start(
            "udp-swg",
            &ns(2, "swg"),
            None,
            &[me.clone(), "udp-serve".into(), "--port".into(), UDP_ECHO_PORT.to_string()],
            &[],
        )?;

        // Plain Envoy pair.
        let envoy = |cfg: &Path| keyway_e2e::envoy::command(&tools.envoy, cfg);
        let base_cfg = dir.join("envoy-baseline.yaml");
        std::fs::write(&base_cfg, envoycfg::baseline())?;
        for (zone, name) in [(1, "cbase"), (2, "sbase")] {
            Sidecar::capture(&ns(zone, name), &[])?;
            bed.start(&format!("envoy-{name}"), &ns(zone, name), Some(ENVOY_UID), &envoy(&base_cfg), &[])?;
        }

        // HBONE-shaped Envoy pair.
        let certs = dir.join("hbone");
        write_hbone_certs(&certs)?;
        let hbone_return =
            format!("iptables -t nat -I KEYWAY_INBOUND 1 -p tcp --dport {} -j RETURN", envoycfg::HBONE_PORT);
        let hc = dir.join("envoy-hbone-client.yaml");
        std::fs::write(&hc, envoycfg::hbone_client("10.61.2.12", &certs.display().to_string()))?;
        let hs = dir.join("envoy-hbone-server.yaml");
        std::fs::write(&hs, envoycfg::hbone_server(&[HTTP_PORT, IPERF_PORT], &certs.display().to_string()))?;
        for (zone, name, cfg) in [(1, "chbone", &hc), (2, "shbone", &hs)] {
            Sidecar::capture(&ns(zone, name), &[hbone_return.as_str()])?;
            bed.start(&format!("envoy-{name}"), &ns(zone, name), Some(ENVOY_UID), &envoy(cfg), &[])?;
        }

        // keyway: one gateway per zone, three sidecars with the filter.
        bed.start_keyway(prefix)?;

        // keyway agents: two devices.
        bed.start_agents(prefix)?;

        // boringtun.
        if tools.boringtun.is_some() {
            bed.start_boringtun(prefix)?;
        }

        // Every Envoy live.
        for (zone, name) in [(1, "cbase"), (2, "sbase"), (1, "chbone"), (2, "shbone")] {
            bed.wait_envoy(Ready::Live, &ns(zone, name), name, Duration::from_secs(30))?;
        }
        Ok(bed)
    }

    fn start_keyway(&mut self, prefix: &str) -> anyhow::Result<()> {
        let dir = self.dir.clone();
        let keyway = self.tools.keyway.display().to_string();
        let files = Files::in_dir(&dir);
        let path = |p: &Path| p.to_str().unwrap_or_default().to_owned();
        sh(&[&keyway, "ca", "init", "--out", &path(&files.ca)])?;
        keyway_e2e::mesh::init_ca_cli(&keyway, &files)?;
        std::fs::create_dir_all(&files.inventory)?;
        std::fs::write(files.inventory.join("bench.yaml"), manifests())?;
        let layout = [
            ZoneLayout { name: "zone-a", gateways: &["gw-1"], failover: &["zone-b"] },
            ZoneLayout { name: "zone-b", gateways: &["gw-1"], failover: &["zone-a"] },
        ];
        // Each zone its own epoch secrets: never one zone's file copied to another.
        std::fs::create_dir_all(&files.secrets_dir)?;
        for z in &layout {
            sh(&[&keyway, "keys", "init", "--out", &path(&files.secrets(z.name))])?;
        }
        let zones = gwconfig::zones(&layout, |z, _| SocketAddr::new(gateway_ip(zone_number(z)), DEFAULT_OVERLAY_PORT));
        for z in layout {
            let zone = z.name;
            let n = zone_number(zone);
            sh(&[
                &keyway,
                "ca",
                "issue",
                "--ca",
                &path(&files.ca),
                "--zone",
                zone,
                "--name",
                "gw-1",
                "--out",
                &path(&files.certs),
            ])?;
            keyway_e2e::mesh::issue_gateway_cli(&keyway, &files, zone, "gw-1")?;
            let listen = Listen { overlay: SocketAddr::new(gateway_ip(n), DEFAULT_OVERLAY_PORT), ..Listen::default() };
            let config = dir.join(format!("gateway-{zone}.yaml"));
            gwconfig::write(&gwconfig::config(zone, "gw-1", listen, &files, &zones)?, &config)?;
            // As shipped: `info` writes the access log (one event per flow).
            let level = std::env::var("KEYWAY_BENCH_GATEWAY_LOG").unwrap_or_else(|_| "info".into());
            self.start(
                &format!("gw-{n}"),
                &pod_ns(prefix, n, "gw"),
                None,
                &[keyway.clone(), "gateway".into(), "--config".into(), config.display().to_string()],
                &[("LOG_FORMAT", "json".into()), ("RUST_LOG", level)],
            )?;
        }
        for (z, other) in [(1u8, "zone-b"), (2, "zone-a")] {
            let n = pod_ns(prefix, z, "gw");
            self.wait(&format!("the gateway of zone {z}"), &format!("gw-{z}"), Duration::from_secs(30), || match self
                .get(&n, &format!("127.0.0.1:{DEFAULT_ADMIN_PORT}/peers"))
            {
                Ok((200, body)) => !gwconfig::peers_up(&body, other).is_empty(),
                _ => false,
            })?;
        }
        let wasm = dir.join("keyway_filter.wasm");
        std::fs::copy(&self.tools.wasm, &wasm)?;
        let sidecars = [
            (1u8, "ckw", "client", "10.128.1.13"),
            (1, "skwa", "server-a", "10.128.1.20"),
            (2, "skwb", "server-b", "10.128.2.13"),
        ];
        for (z, name, sa, overlay) in sidecars {
            let n = pod_ns(prefix, z, name);
            Sidecar::capture(&n, &[])?;
            let sidecar = Sidecar {
                namespace: "bench".into(),
                service_account: sa.into(),
                overlay_ip: overlay.into(),
                app_ports: vec![HTTP_PORT, IPERF_PORT],
                gateways: vec![gateway_ip(z).to_string()],
                tunnel_port: DEFAULT_TUNNEL_PORT,
                mesh: keyway_e2e::mesh::issue_sidecar_cli(&keyway, &files, "bench", sa)?,
                gateway_identity: keyway_e2e::mesh::gateway_identity(keyway_e2e::loopback::TD),
                wasm: wasm.display().to_string(),
            };
            let cfg = dir.join(format!("envoy-{name}.yaml"));
            std::fs::write(&cfg, sidecar.bootstrap())?;
            let envoy = keyway_e2e::envoy::command(&self.tools.envoy, &cfg);
            self.start(&format!("envoy-{name}"), &n, Some(ENVOY_UID), &envoy, &[])?;
        }
        for (z, name, _, _) in sidecars {
            self.wait_envoy(Ready::KeysFetched, &pod_ns(prefix, z, name), name, Duration::from_secs(60))?;
        }
        Ok(())
    }

    /// Two devices, `cwg` (zone-a) and `swg` (zone-b), each running `keyway agent` in device mode
    /// with a certificate from `keyway ca issue-device`, joined to its zone's gateway.
    fn start_agents(&mut self, prefix: &str) -> anyhow::Result<()> {
        let keyway = self.tools.keyway.display().to_string();
        let files = Files::in_dir(&self.dir);
        let certs = self.dir.join("devices");
        let ca_cert = files.ca.join("ca.pem");
        let sides = [
            (1u8, "cwg", "agent-client", "zone-a", AGENT_CLIENT_OVERLAY),
            (2, "swg", "agent-server", "zone-b", AGENT_SERVER_OVERLAY),
        ];
        for (z, name, sa, zone, overlay) in sides {
            sh(&[
                &keyway,
                "ca",
                "issue-device",
                "--ca",
                files.ca.to_str().unwrap_or_default(),
                "--namespace",
                "bench",
                "--service-account",
                sa,
                "--out",
                certs.to_str().unwrap_or_default(),
            ])?;
            let config = format!(
                "zone: {zone}\noverlay_ip: {overlay}\noverlay_cidrs: [10.128.0.0/16]\ngateways: [\"{}:{EDGE_PORT}\"]\n\
                 mode: device\ntls: {{ca: {}, cert: {}, key: {}}}\nadmin: \"127.0.0.1:{AGENT_ADMIN_PORT}\"\n",
                gateway_ip(z),
                ca_cert.display(),
                certs.join(format!("bench-{sa}.pem")).display(),
                certs.join(format!("bench-{sa}-key.pem")).display(),
            );
            let path = self.dir.join(format!("agent-{name}.yaml"));
            std::fs::write(&path, config)?;
            self.start(
                &format!("agent-{name}"),
                &pod_ns(prefix, z, name),
                None,
                &[keyway.clone(), "agent".into(), "--config".into(), path.display().to_string()],
                &[("LOG_FORMAT", "json".into())],
            )?;
        }
        for (z, name, _, _, _) in sides {
            let n = pod_ns(prefix, z, name);
            let url = format!("127.0.0.1:{AGENT_ADMIN_PORT}/healthz");
            self.wait(&format!("the agent in {n}"), &format!("agent-{name}"), Duration::from_secs(30), || {
                matches!(self.get(&n, &url), Ok((200, _)))
            })?;
        }
        Ok(())
    }

    fn start_boringtun(&mut self, prefix: &str) -> anyhow::Result<()> {
        let bt = self.tools.boringtun.clone().context("boringtun")?.display().to_string();
        let keys: Vec<(String, String)> = (0..2)
            .map(|_| {
                let private = sh(&["wg", "genkey"])?.trim().to_owned();
                let public = sh(&["sh", "-c", &format!("echo {private} | wg pubkey")])?.trim().to_owned();
                anyhow::Ok((private, public))
            })
            .collect::<Result<_, _>>()?;
        let sides = [(1u8, "cwg", "wgc", "10.99.0.1", "10.61.1.14"), (2, "swg", "wgs", "10.99.0.2", "10.61.2.14")];
        for (i, (z, name, ifname, _, _)) in sides.iter().enumerate() {
            let n = pod_ns(prefix, *z, name);
            let _ = std::fs::remove_file(format!("/var/run/wireguard/{ifname}.sock"));
            self.start(
                &format!("boringtun-{name}"),
                &n,
                None,
                &[
                    bt.clone(),
                    (*ifname).into(),
                    "--foreground".into(),
                    "--disable-drop-privileges".into(),
                    "--threads".into(),
                    "2".into(),
                ],
                &[],
            )?;
            let key_file = self.dir.join(format!("wg-{i}.key"));
            std::fs::write(&key_file, &keys[i].0)?;
        }
        for (i, (z, name, ifname, ip, _)) in sides.iter().enumerate() {
            let n = pod_ns(prefix, *z, name);
            self.wait(&format!("boringtun in {n}"), &format!("boringtun-{name}"), Duration::from_secs(10), || {
                ns_sh(&n, &["wg", "show", ifname]).is_ok()
            })?;
            let (_, _, _, peer_ip, peer_under) = sides[1 - i];
            let key_file = self.dir.join(format!("wg-{i}.key"));
            ns_sh(
                &n,
                &[
                    "wg",
                    "set",
                    ifname,
                    "private-key",
                    key_file.to_str().unwrap_or_default(),
                    "listen-port",
                    &WG_PORT.to_string(),
                    "peer",
                    &keys[1 - i].1,
                    "endpoint",
                    &format!("{peer_under}:{WG_PORT}"),
                    "allowed-ips",
                    &format!("{peer_ip}/32"),
                ],
            )?;
            ns_sh(&n, &["ip", "addr", "add", &format!("{ip}/24"), "dev", ifname])?;
            ns_sh(&n, &["ip", "link", "set", ifname, "mtu", &(self.mtu - 80).to_string(), "up"])?;
        }
        Ok(())
    }
}

/// Zone `zone-a` is 1, `zone-b` 2.
fn zone_number(zone: &str) -> u8 {
    if zone == "zone-a" { 1 } else { 2 }
}

/// The gateway pod of zone `n` (host .2).
fn gateway_ip(n: u8) -> IpAddr {
    IpAddr::from([10, 61, n, 2])
}

/// A CA and one certificate both HBONE sidecars use (mutual TLS, the CA verifies both ends).
fn write_hbone_certs(dir: &Path) -> anyhow::Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    std::fs::create_dir_all(dir)?;
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "keyway-bench hbone CA");
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let key = KeyPair::generate()?;
    let mut leaf = CertificateParams::new(vec!["hbone.bench.svc".to_owned()])?;
    leaf.distinguished_name.push(DnType::CommonName, "hbone.bench.svc");
    let leaf = leaf.signed_by(&key, &issuer)?;
    std::fs::write(dir.join("ca.pem"), ca.pem())?;
    std::fs::write(dir.join("cert.pem"), leaf.pem())?;
    std::fs::write(dir.join("key.pem"), key.serialize_pem())?;
    sh(&["chmod", "-R", "a+rX", dir.to_str().unwrap_or_default()])?;
    Ok(())
}

/// The two devices of the `agent` path (Istio WorkloadEntries) and the NetworkPolicy that lets the
/// client device reach the server device's HTTP, iperf3 and UDP echo ports (nothing else).
fn device_manifests() -> String {
    let entry = |name: &str, zone: &str, overlay: &str| {
        format!(
            r#"apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: {name}
  namespace: bench
  annotations: {{ keyway.io/zone: {zone}, keyway.io/overlay-ips: "{overlay}" }}
spec:
  serviceAccount: {name}
  labels: {{ app: {name} }}
"#
        )
    };
    let policy = format!(
        r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{ name: agent-server-from-agent-client, namespace: bench }}
spec:
  podSelector: {{ matchLabels: {{ app: agent-server }} }}
  ingress:
  - from:
    - podSelector: {{ matchLabels: {{ app: agent-client }} }}
    ports:
    - {{ port: {HTTP_PORT}, protocol: TCP }}
    - {{ port: {IPERF_PORT}, protocol: TCP }}
    - {{ port: {UDP_ECHO_PORT}, protocol: UDP }}
"#
    );
    [
        entry("agent-client", "zone-a", AGENT_CLIENT_OVERLAY),
        entry("agent-server", "zone-b", AGENT_SERVER_OVERLAY),
        policy,
    ]
    .join("---\n")
}

/// The bench's inventory: a client and two servers, no NetworkPolicy (not isolated: allowed); the
/// two devices of the `agent` path and their policy.
fn manifests() -> String {
    let deploy = |name: &str, zone: &str, overlay: &str, sidecar: &str| {
        format!(
            r#"apiVersion: apps/v1
kind: Deployment
metadata: {{ name: {name}, namespace: bench, labels: {{ app: {name} }} }}
spec:
  selector: {{ matchLabels: {{ app: {name} }} }}
  template:
    metadata:
      labels: {{ app: {name} }}
      annotations: {{ keyway.io/zone: {zone}, keyway.io/overlay-ips: "{overlay}", keyway.io/sidecar-ips: "{sidecar}" }}
    spec:
      serviceAccountName: {name}
      containers:
      - name: {name}
        image: keyway/bench:dev
        ports:
        - {{ name: http, containerPort: {HTTP_PORT}, protocol: TCP }}
        - {{ name: iperf, containerPort: {IPERF_PORT}, protocol: TCP }}
"#
        )
    };
    [
        "apiVersion: v1\nkind: Namespace\nmetadata: { name: bench, labels: { team: bench } }\n".to_owned(),
        deploy("client", "zone-a", "10.128.1.13", "10.61.1.13"),
        deploy("server-a", "zone-a", "10.128.1.20", "10.61.1.20"),
        deploy("server-b", "zone-b", "10.128.2.13", "10.61.2.13"),
        device_manifests(),
    ]
    .join("---\n")
}
