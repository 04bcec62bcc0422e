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
//!
//! Each server pod runs the 1 KiB HTTP server on 8080 and `iperf3 -s` on 5201. Every Envoy runs
//! with one worker (`--concurrency 1`), as the end-to-end sidecars do.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use keyway_e2e::envoy::{ENVOY_UID, Sidecar};
use keyway_e2e::proc::Proc;
use keyway_e2e::topology::{Topology, ns_sh, require_root, sh};

use crate::envoycfg;

/// The HTTP server's port in every server pod.
pub const HTTP_PORT: u16 = 8080;
/// iperf3's port in every server pod.
pub const IPERF_PORT: u16 = 5201;
const TUNNEL_PORT: u16 = 15180;
const OVERLAY_PORT: u16 = 15443;
const ADMIN_PORT: u16 = 15190;
const WG_PORT: u16 = 51820;

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
        let out = ns_sh(ns, &[self.tools.e2e.to_str().unwrap_or_default(), "get", url])?;
        let (status, body) = out.split_once('\n').unwrap_or((out.as_str(), ""));
        Ok((status.trim().parse().unwrap_or(0), body.to_owned()))
    }

    fn wait(&self, what: &str, role: &str, deadline: Duration, mut ok: impl FnMut() -> bool) -> anyhow::Result<()> {
        let end = Instant::now() + deadline;
        while !ok() {
            if Instant::now() > end {
                bail!("{what} not ready after {deadline:?}; log of {role}:\n{}", self.tail(role));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Builds the namespaces and starts every process; fails loudly when anything is missing.
    pub fn start_all(tools: Tools, prefix: &str) -> anyhow::Result<Bed> {
        require_root()?;
        let dir = std::env::temp_dir().join(format!("keyway-bench-{prefix}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("logs"))?;
        sh(&["chmod", "0755", dir.to_str().unwrap_or_default()])?;
        let mut topo = Topology::new(prefix, 2)?;
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
        ];
        let mut bed = Bed { procs: Vec::new(), topo, paths, dir: dir.clone(), tools: tools.clone() };
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

        // Plain Envoy pair.
        let capture = Sidecar::iptables();
        let envoy_args = |cfg: &Path| -> Vec<String> {
            vec![
                tools.envoy.display().to_string(),
                "-c".into(),
                cfg.display().to_string(),
                "--concurrency".into(),
                "1".into(),
                "--disable-hot-restart".into(),
                "-l".into(),
                "warning".into(),
            ]
        };
        let base_cfg = dir.join("envoy-baseline.yaml");
        std::fs::write(&base_cfg, envoycfg::baseline())?;
        for (zone, name) in [(1, "cbase"), (2, "sbase")] {
            apply(&ns(zone, name), &capture, &[])?;
            bed.start(&format!("envoy-{name}"), &ns(zone, name), Some(ENVOY_UID), &envoy_args(&base_cfg), &[])?;
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
            apply(&ns(zone, name), &capture, &[hbone_return.as_str()])?;
            bed.start(&format!("envoy-{name}"), &ns(zone, name), Some(ENVOY_UID), &envoy_args(cfg), &[])?;
        }

        // keyway: one gateway per zone, three sidecars with the filter.
        bed.start_keyway(prefix, &capture, &envoy_args)?;

        // boringtun.
        if tools.boringtun.is_some() {
            bed.start_boringtun(prefix)?;
        }

        // Every Envoy live.
        for (zone, name) in [(1, "cbase"), (2, "sbase"), (1, "chbone"), (2, "shbone")] {
            let n = ns(zone, name);
            bed.wait(&format!("envoy in {n}"), &format!("envoy-{name}"), Duration::from_secs(30), || {
                matches!(bed.get(&n, "127.0.0.1:15000/ready"), Ok((200, _)))
            })?;
        }
        Ok(bed)
    }

    fn start_keyway(
        &mut self,
        prefix: &str,
        capture: &[Vec<String>],
        envoy_args: &dyn Fn(&Path) -> Vec<String>,
    ) -> anyhow::Result<()> {
        let dir = self.dir.clone();
        let keyway = self.tools.keyway.display().to_string();
        let ca = dir.join("ca");
        sh(&[&keyway, "ca", "init", "--out", ca.to_str().unwrap_or_default()])?;
        let secrets = dir.join("epochs.json");
        sh(&[&keyway, "keys", "init", "--out", secrets.to_str().unwrap_or_default()])?;
        let inventory = dir.join("manifests");
        std::fs::create_dir_all(&inventory)?;
        std::fs::write(inventory.join("bench.yaml"), manifests())?;
        let certs = dir.join("certs");
        let zones = format!(
            "- name: zone-a\n  gateways: [{{name: gw-1, address: \"10.61.1.2:{OVERLAY_PORT}\"}}]\n  failover: [zone-b]\n- name: zone-b\n  gateways: [{{name: gw-1, address: \"10.61.2.2:{OVERLAY_PORT}\"}}]\n  failover: [zone-a]\n"
        );
        for (z, zone) in [(1u8, "zone-a"), (2, "zone-b")] {
            sh(&[
                &keyway,
                "ca",
                "issue",
                "--ca",
                ca.to_str().unwrap_or_default(),
                "--zone",
                zone,
                "--name",
                "gw-1",
                "--out",
                certs.to_str().unwrap_or_default(),
            ])?;
            let config = dir.join(format!("gateway-{zone}.yaml"));
            std::fs::write(
                &config,
                format!(
                    "zone: {zone}\nname: gw-1\nlisten: {{tunnel: \"0.0.0.0:{TUNNEL_PORT}\", overlay: \"10.61.{z}.2:{OVERLAY_PORT}\", admin: \"0.0.0.0:{ADMIN_PORT}\"}}\ntls: {{ca: {ca}, cert: {cert}, key: {key}}}\nsecrets: {secrets}\ninventory: {inv}\nzones:\n{zones}",
                    ca = ca.join("ca.pem").display(),
                    cert = certs.join(format!("{zone}-gw-1.pem")).display(),
                    key = certs.join(format!("{zone}-gw-1-key.pem")).display(),
                    secrets = secrets.display(),
                    inv = inventory.display(),
                ),
            )?;
            // As shipped: `info` writes the access log (one event per flow).
            let level = std::env::var("KEYWAY_BENCH_GATEWAY_LOG").unwrap_or_else(|_| "info".into());
            self.start(
                &format!("gw-{z}"),
                &pod_ns(prefix, z, "gw"),
                None,
                &[keyway.clone(), "gateway".into(), "--config".into(), config.display().to_string()],
                &[("LOG_FORMAT", "json".into()), ("RUST_LOG", level)],
            )?;
        }
        for (z, other) in [(1u8, "zone-b"), (2, "zone-a")] {
            let n = pod_ns(prefix, z, "gw");
            self.wait(&format!("gateway of zone {z}"), &format!("gw-{z}"), Duration::from_secs(30), || {
                match self.get(&n, &format!("127.0.0.1:{ADMIN_PORT}/peers")) {
                    Ok((200, body)) => serde_json::from_str::<serde_json::Value>(&body)
                        .ok()
                        .and_then(|v| v.as_array().cloned())
                        .unwrap_or_default()
                        .iter()
                        .any(|p| p["zone"] == other && p["up"] == true),
                    _ => false,
                }
            })?;
        }
        let wasm = dir.join("keyway_filter.wasm");
        std::fs::copy(&self.tools.wasm, &wasm)?;
        for (z, name, sa, overlay) in [
            (1u8, "ckw", "client", "10.128.1.13"),
            (1, "skwa", "server-a", "10.128.1.20"),
            (2, "skwb", "server-b", "10.128.2.13"),
        ] {
            let n = pod_ns(prefix, z, name);
            apply(&n, capture, &[])?;
            let sidecar = Sidecar {
                namespace: "bench".into(),
                service_account: sa.into(),
                overlay_ip: overlay.into(),
                app_ports: vec![HTTP_PORT, IPERF_PORT],
                gateways: vec![format!("10.61.{z}.2")],
                tunnel_port: TUNNEL_PORT,
                admin_port: ADMIN_PORT,
                wasm: wasm.display().to_string(),
            };
            let cfg = dir.join(format!("envoy-{name}.yaml"));
            std::fs::write(&cfg, sidecar.bootstrap())?;
            self.start(&format!("envoy-{name}"), &n, Some(ENVOY_UID), &envoy_args(&cfg), &[])?;
        }
        for (z, name) in [(1u8, "ckw"), (1, "skwa"), (2, "skwb")] {
            let n = pod_ns(prefix, z, name);
            self.wait(&format!("keyway sidecar in {n}"), &format!("envoy-{name}"), Duration::from_secs(60), || {
                self.get(&n, "127.0.0.1:15000/stats?filter=key_refreshes")
                    .map(|(_, s)| {
                        s.lines()
                            .filter(|l| l.contains("outcome=.=ok"))
                            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                            .any(|v| v > 0)
                    })
                    .unwrap_or(false)
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
            ns_sh(&n, &["ip", "link", "set", ifname, "mtu", "1420", "up"])?;
        }
        Ok(())
    }
}

/// Runs the capture rules (and `extra` iptables lines) in a pod.
fn apply(ns: &str, rules: &[Vec<String>], extra: &[&str]) -> anyhow::Result<()> {
    for rule in rules {
        let args: Vec<&str> = rule.iter().map(String::as_str).collect();
        ns_sh(ns, &args)?;
    }
    for line in extra {
        let args: Vec<&str> = line.split_whitespace().collect();
        ns_sh(ns, &args)?;
    }
    Ok(())
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

/// The bench's inventory: a client and two servers, no NetworkPolicy (not isolated: allowed).
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
    ]
    .join("---\n")
}
