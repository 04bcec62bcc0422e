//! The `keyway agent` of every enforced pod of samples/shop (docs/install-istio.md, "UDP of
//! enforced pods"): its configuration, written by the init container `keyway-agent-config` from the
//! pod's own annotations, is one the agent accepts, in pod mode, with the pod's overlay address,
//! zone and the name of every gateway replica's edge (the headless Service `keyway-gateway`), and
//! the socket mark the pod's rules let its QUIC out by; the container runs it with NET_ADMIN only,
//! the TUN device and the pod's mesh certificate from its own istio-proxy (`OUTPUT_CERTS`).

use std::collections::BTreeSet;
use std::path::PathBuf;

use keyway_gateway::agent::config::{AgentConfig, DEFAULT_EDGE_PORT, DEFAULT_SOCKET_MARK, Mode};
use keyway_istio_check::load_file;
use serde_json::{Value, json};

const MESH_DIR: &str = "/etc/istio-output-certs";
const CONFIG: &str = "/etc/keyway-agent/agent.yaml";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn containers<'a>(pod: &'a Value, list: &str, name: &str) -> Vec<&'a Value> {
    pod["spec"][list].as_array().into_iter().flatten().filter(|c| c["name"] == name).collect()
}

fn env<'a>(c: &'a Value, name: &str) -> &'a Value {
    c["env"].as_array().into_iter().flatten().find(|e| e["name"] == name).unwrap_or(&Value::Null)
}

fn mount<'a>(c: &'a Value, path: &str) -> &'a Value {
    c["volumeMounts"].as_array().into_iter().flatten().find(|m| m["mountPath"] == path).unwrap_or(&Value::Null)
}

fn volume<'a>(pod: &'a Value, name: &Value) -> &'a Value {
    pod["spec"]["volumes"].as_array().into_iter().flatten().find(|v| &v["name"] == name).unwrap_or(&Value::Null)
}

/// The name the pods' agents follow: the headless Service of istio/base/service.yaml that carries
/// the edge port (`listen.edge`, UDP), so that it resolves to every ready gateway replica; the only
/// Service with that port (no ClusterIP in front of the edge pins an agent to one replica). The
/// same name as the sidecars' gateway clusters (istio/base/envoyfilters.yaml).
fn edge_name() -> String {
    let path = repo().join("istio/base/service.yaml");
    let objects = load_file(&path, "istio/base/service.yaml").unwrap_or_else(|e| panic!("{e}"));
    let edge = json!({"name": "edge", "port": DEFAULT_EDGE_PORT, "targetPort": "edge", "protocol": "UDP"});
    let with_edge: Vec<_> = objects
        .iter()
        .filter(|o| o.kind() == "Service")
        .filter(|o| o.value["spec"]["ports"].as_array().into_iter().flatten().any(|p| p["port"] == DEFAULT_EDGE_PORT))
        .collect();
    assert_eq!(
        with_edge.len(),
        1,
        "one Service carries the edge port: {:?}",
        with_edge.iter().map(|o| o.describe()).collect::<Vec<_>>()
    );
    let service = &with_edge[0].value;
    let what = with_edge[0].describe();
    assert_eq!(service["spec"]["clusterIP"], "None", "{what}: headless, a DNS record per replica");
    let ports = service["spec"]["ports"].as_array().into_iter().flatten();
    assert_eq!(ports.filter(|p| **p == edge).count(), 1, "{what}: the edge port as {edge}");
    let name = format!(
        "{}.{}.svc.cluster.local",
        service["metadata"]["name"].as_str().unwrap_or_default(),
        service["metadata"]["namespace"].as_str().unwrap_or_default()
    );
    let envoyfilters = std::fs::read_to_string(repo().join("istio/base/envoyfilters.yaml")).unwrap_or_default();
    assert!(envoyfilters.contains(&format!("address: {name},")), "{name}: not the sidecars' gateway name");
    name
}

/// A scratch directory with recorders in place of `ip`, `iptables` and `ip6tables`.
struct Shims {
    dir: PathBuf,
}

impl Shims {
    fn new() -> Shims {
        let dir = std::env::temp_dir().join(format!("keyway-pod-agent-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        for tool in ["ip", "iptables", "ip6tables"] {
            let shim = dir.join(tool);
            let log = dir.join("log");
            std::fs::write(&shim, format!("#!/bin/sh\necho \"{tool} $*\" >> '{}'\n", log.display()))
                .unwrap_or_else(|e| panic!("{e}"));
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).unwrap_or_else(|e| panic!("{e}"));
        }
        Shims { dir }
    }

    /// Runs `script` with `vars` (and nothing else of keyway's) and the configuration path moved
    /// here: the exit status, stderr, the commands recorded and the configuration written.
    fn run(&self, script: &str, vars: &[(&str, &str)]) -> (bool, String, Vec<String>, String) {
        let (log, config) = (self.dir.join("log"), self.dir.join("agent.yaml"));
        let _ = std::fs::remove_file(&log);
        let _ = std::fs::remove_file(&config);
        let mut cmd = std::process::Command::new("sh");
        cmd.arg("-c").arg(script.replace(CONFIG, &config.display().to_string()));
        cmd.env("PATH", format!("{}:{}", self.dir.display(), std::env::var("PATH").unwrap_or_default()));
        for v in ["KEYWAY_OVERLAY_IPS", "KEYWAY_ZONE", "KEYWAY_GATEWAYS", "KEYWAY_OVERLAY_CIDRS"] {
            cmd.env_remove(v);
        }
        cmd.envs(vars.iter().copied());
        let out = cmd.output().unwrap_or_else(|e| panic!("sh: {e}"));
        let commands = std::fs::read_to_string(&log).unwrap_or_default().lines().map(str::to_owned).collect();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            commands,
            std::fs::read_to_string(&config).unwrap_or_default(),
        )
    }
}

impl Drop for Shims {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn enforced_sample_pods_carry_their_udp_through_their_own_keyway_agent() {
    let path = repo().join("samples/shop/workloads.yaml");
    let objects = load_file(&path, "samples/shop/workloads.yaml").unwrap_or_else(|e| panic!("{e}"));
    let envoyfilters = std::fs::read_to_string(repo().join("istio/base/envoyfilters.yaml")).unwrap_or_default();
    let shims = Shims::new();
    let edge = edge_name();
    let mut scripts = BTreeSet::new();
    let mut enforced = 0;
    for d in objects.iter().filter(|o| o.kind() == "Deployment") {
        let pod = &d.value["spec"]["template"];
        if pod["metadata"]["labels"]["keyway.io/enforce"] != "true" {
            continue;
        }
        enforced += 1;
        let what = d.describe();
        let notes = &pod["metadata"]["annotations"];

        // The pod's mesh certificate: its istio-proxy writes it to the shared in-memory volume.
        let proxy: Value = serde_yaml_ng::from_str(notes["proxy.istio.io/config"].as_str().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{what}: proxy.istio.io/config: {e}"));
        assert_eq!(proxy["proxyMetadata"]["OUTPUT_CERTS"], MESH_DIR, "{what}");
        assert_eq!(proxy["holdApplicationUntilProxyStarts"], true, "{what}: the agent starts once the proxy runs");
        let user: Value = serde_json::from_str(notes["sidecar.istio.io/userVolumeMount"].as_str().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{what}: sidecar.istio.io/userVolumeMount: {e}"));
        assert_eq!(user, json!({"istio-certs": {"mountPath": MESH_DIR}}), "{what}");
        assert_eq!(volume(pod, &json!("istio-certs"))["emptyDir"], json!({"medium": "Memory"}), "{what}");

        // The configuration, written from the pod's own annotations.
        let init = containers(pod, "initContainers", "keyway-agent-config");
        assert_eq!(init.len(), 1, "{what}: no init container keyway-agent-config");
        let c = init[0];
        assert_eq!(c["command"], json!(["sh", "-c"]), "{what}");
        assert_eq!(c["securityContext"]["capabilities"], json!({"drop": ["ALL"], "add": ["NET_ADMIN"]}), "{what}");
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false, "{what}");
        for (var, key) in [("KEYWAY_OVERLAY_IPS", "keyway.io/overlay-ips"), ("KEYWAY_ZONE", "keyway.io/zone")] {
            assert_eq!(
                env(c, var)["valueFrom"]["fieldRef"]["fieldPath"],
                format!("metadata.annotations['{key}']"),
                "{what}: {var} comes from the pod's annotation {key}"
            );
        }
        let refuse = containers(pod, "initContainers", "keyway-refuse-non-tcp");
        let gateways = env(c, "KEYWAY_GATEWAYS")["value"].as_str().unwrap_or_default();
        assert_eq!(gateways, edge, "{what}: KEYWAY_GATEWAYS names every gateway replica");
        assert_eq!(
            refuse.first().map(|r| &env(r, "KEYWAY_AGENT")["value"]),
            Some(&json!("1")),
            "{what}: the pod lets its agent's UDP out (keyway-refuse-non-tcp, KEYWAY_AGENT)"
        );
        let cidrs = env(c, "KEYWAY_OVERLAY_CIDRS")["value"].as_str().unwrap_or_default();
        assert!(envoyfilters.contains(cidrs), "{what}: the overlay prefix {cidrs:?} is not the EnvoyFilters'");
        let config_mount = mount(c, "/etc/keyway-agent");
        assert_eq!(config_mount["readOnly"], Value::Null, "{what}: keyway-agent-config writes the configuration");
        scripts.insert(c["args"][0].as_str().unwrap_or_default().to_owned());

        let overlay = notes["keyway.io/overlay-ips"].as_str().unwrap_or_default();
        let zone = notes["keyway.io/zone"].as_str().unwrap_or_default();
        let script = c["args"][0].as_str().unwrap_or_default();
        let (ok, stderr, commands, text) = shims.run(
            script,
            &[
                ("KEYWAY_OVERLAY_IPS", overlay),
                ("KEYWAY_ZONE", zone),
                ("KEYWAY_GATEWAYS", gateways),
                ("KEYWAY_OVERLAY_CIDRS", cidrs),
            ],
        );
        assert!(ok, "{what}: keyway-agent-config failed: {stderr}");
        assert_eq!(commands, vec![format!("ip -4 addr add {overlay}/32 dev lo")], "{what}: the overlay address on lo");
        let config = AgentConfig::parse(&text, CONFIG).unwrap_or_else(|e| panic!("{what}: {e}\n{text}"));
        assert_eq!(config.mode, Mode::Pod, "{what}");
        assert_eq!(config.zone, zone, "{what}");
        assert_eq!(config.overlay_ip.to_string(), overlay, "{what}");
        assert_eq!(config.overlay_cidrs, vec![cidrs.to_owned()], "{what}");
        let want: Vec<String> = gateways.split_whitespace().map(|g| format!("{g}:{DEFAULT_EDGE_PORT}")).collect();
        assert_eq!(config.gateways, want, "{what}");
        assert_eq!(config.socket_mark, DEFAULT_SOCKET_MARK, "{what}: the mark the pod's rules let the agent out by");
        assert_eq!(
            config.tls.cert,
            PathBuf::from(format!("{MESH_DIR}/cert-chain.pem")),
            "{what}: the mesh certificate"
        );
        assert_eq!(config.tls.key, PathBuf::from(format!("{MESH_DIR}/key.pem")), "{what}");

        // The agent: NET_ADMIN only, the TUN device, the files above.
        let agent = containers(pod, "containers", "keyway-agent");
        assert_eq!(agent.len(), 1, "{what}: no container keyway-agent");
        let a = agent[0];
        assert_eq!(a["args"], json!(["agent", "--config", CONFIG]), "{what}");
        let sc = &a["securityContext"];
        assert_eq!(sc["capabilities"], json!({"drop": ["ALL"], "add": ["NET_ADMIN"]}), "{what}: NET_ADMIN only");
        assert_eq!(sc["privileged"], false, "{what}");
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}");
        let mounted = |dir: &str| &mount(a, dir)["name"];
        assert_eq!(mounted("/etc/keyway-agent"), &config_mount["name"], "{what}: the configuration written");
        assert_eq!(mounted(MESH_DIR), &json!("istio-certs"), "{what}: the mesh certificate");
        let ca_dir = config.tls.ca.parent().map(|p| p.display().to_string()).unwrap_or_default();
        assert_eq!(volume(pod, mounted(&ca_dir))["configMap"]["name"], "keyway-overlay-ca", "{what}: the overlay CA");
        assert_eq!(
            volume(pod, mounted("/dev/net/tun"))["hostPath"],
            json!({"path": "/dev/net/tun", "type": "CharDevice"}),
            "{what}: the TUN device"
        );
    }
    assert!(enforced >= 8, "samples/shop enforces its workloads ({enforced} labelled)");
    assert_eq!(scripts.len(), 1, "one keyway-agent-config script for every enforced pod");

    // A pod without an overlay address annotation fails loudly, and nothing is written.
    let script = scripts.pop_first().unwrap_or_default();
    let (ok, stderr, commands, text) = shims.run(
        &script,
        &[
            ("KEYWAY_OVERLAY_IPS", ""),
            ("KEYWAY_ZONE", "zone-a"),
            ("KEYWAY_GATEWAYS", "keyway-gateway.keyway-system.svc.cluster.local"),
            ("KEYWAY_OVERLAY_CIDRS", "10.128.0.0/16"),
        ],
    );
    assert!(!ok && stderr.contains("no keyway.io/overlay-ips"), "no annotation: {ok} {stderr}");
    assert!(commands.is_empty() && text.is_empty(), "no annotation: {commands:?} {text:?}");
}
