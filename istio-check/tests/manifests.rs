//! Every kustomization under `istio/` renders with kustomize, and every object it renders and
//! every manifest under `samples/` validates strictly against the real schemas in
//! `testdata/schemas/`; the rendered gateway configuration is accepted by the gateway, the
//! inventory by the policy loader, the plugin configurations by the filter; what the objects refer
//! to (ConfigMaps, Secrets, ServiceAccount, selectors, ports) exists.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use keyway_istio_check::render::{copy_tree, kubectl, kustomizations, placeholder_secrets, render};
use keyway_istio_check::{Object, Outcome, Schemas, load_file, yaml_files};
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn schemas() -> Schemas {
    let dir = repo().join("testdata").join("schemas");
    Schemas::load(&dir).unwrap_or_else(|e| panic!("the schemas of testdata/schemas: {e}"))
}

/// Kinds that `testdata/schemas/` has no schema for: validated nowhere, listed here so that a new
/// one fails this test until somebody decides about it.
const NO_SCHEMA: [&str; 2] = [
    "policy.networking.k8s.io/v1alpha1 AdminNetworkPolicy",
    "policy.networking.k8s.io/v1alpha1 BaselineAdminNetworkPolicy",
];

fn validate_all(schemas: &mut Schemas, objects: &[Object], errors: &mut Vec<String>, no_schema: &mut BTreeSet<String>) {
    for o in objects {
        if !o.is_kubernetes_object() {
            errors.push(format!("{}: a document without apiVersion and kind", o.file));
            continue;
        }
        match schemas.validate(o) {
            Ok(Outcome::Valid { .. }) => {}
            Ok(Outcome::Invalid(lines)) => errors.extend(lines),
            Ok(Outcome::NoSchema) => {
                no_schema.insert(format!("{} {}", o.api_version(), o.kind()));
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
}

struct Rendered {
    /// Repository path of each rendered kustomization → its objects.
    sets: BTreeMap<String, Vec<Object>>,
}

fn render_all() -> Rendered {
    let repo = repo();
    let kubectl = kubectl(&repo).unwrap_or_else(|e| panic!("{e}"));
    // One scratch copy per call: the tests that render run in parallel in this process.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let scratch = std::env::temp_dir().join(format!("keyway-istio-check-{}-{call}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    copy_tree(&repo.join("istio"), &scratch.join("istio")).unwrap_or_else(|e| panic!("copy istio/: {e}"));
    let mut sets = BTreeMap::new();
    let all = kustomizations(&scratch.join("istio"));
    assert!(all.len() >= 5, "expected base, three zone overlays and a component under istio/, found {all:?}");
    for (dir, component) in all {
        let rel = dir.strip_prefix(&scratch).unwrap_or(&dir).display().to_string();
        if component {
            continue;
        }
        placeholder_secrets(&dir).unwrap_or_else(|e| panic!("{e}"));
        let objects = render(&kubectl, &dir, &rel).unwrap_or_else(|e| panic!("{e}"));
        sets.insert(rel, objects);
    }
    let _ = std::fs::remove_dir_all(&scratch);
    Rendered { sets }
}

#[test]
fn every_istio_kustomization_renders_and_validates_against_the_real_schemas() {
    let rendered = render_all();
    let mut schemas = schemas();
    let mut errors = Vec::new();
    let mut no_schema = BTreeSet::new();
    for (dir, objects) in &rendered.sets {
        validate_all(&mut schemas, objects, &mut errors, &mut no_schema);
        println!("{dir}: {} objects rendered and valid", objects.len());
    }
    assert!(errors.is_empty(), "invalid objects:\n{}", errors.join("\n"));
    // cert-manager's ClusterIssuer has no schema here: checked by hand below.
    no_schema.remove("cert-manager.io/v1 ClusterIssuer");
    assert!(no_schema.is_empty(), "istio/ renders kinds without a schema in testdata/schemas: {no_schema:?}");
    for (dir, objects) in &rendered.sets {
        for o in objects.iter().filter(|o| o.kind() == "ClusterIssuer") {
            let spec = o.value["spec"].as_object().cloned().unwrap_or_default();
            assert_eq!(spec.keys().collect::<Vec<_>>(), ["ca"], "{dir}: {}: a CA issuer, nothing else", o.describe());
            let secret = spec["ca"]["secretName"].as_str().unwrap_or_default();
            assert!(!secret.is_empty(), "{dir}: {}: spec.ca.secretName", o.describe());
            assert_eq!(spec["ca"].as_object().map(|m| m.len()), Some(1), "{dir}: {}: spec.ca", o.describe());
        }
    }
    let expected = [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "EnvoyFilter",
        "ConfigMap",
        "Secret",
    ];
    for zone in ["zone-a", "zone-b", "zone-c"] {
        let set = &rendered.sets[&format!("istio/overlays/{zone}")];
        let kinds: BTreeSet<&str> = set.iter().map(Object::kind).collect();
        for k in expected {
            assert!(kinds.contains(k), "istio/overlays/{zone} renders no {k}");
        }
    }
}

#[test]
fn every_sample_manifest_validates_and_kinds_without_schema_are_listed() {
    let mut schemas = schemas();
    let mut errors = Vec::new();
    let mut no_schema = BTreeSet::new();
    let mut gateway_configs = 0;
    let samples = repo().join("samples");
    for path in yaml_files(&samples) {
        let shown = format!("samples/{}", path.strip_prefix(&samples).unwrap_or(&path).display());
        let objects = load_file(&path, &shown).unwrap_or_else(|e| panic!("{e}"));
        // Gateway configurations are not Kubernetes objects: the gateway's own parser checks them.
        if objects.len() == 1 && !objects[0].is_kubernetes_object() && objects[0].value.get("zones").is_some() {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if let Err(e) = keyway_gateway::config::Config::parse(&text, &shown) {
                errors.push(e.to_string());
            }
            gateway_configs += 1;
            continue;
        }
        validate_all(&mut schemas, &objects, &mut errors, &mut no_schema);
    }
    assert!(errors.is_empty(), "invalid samples:\n{}", errors.join("\n"));
    assert!(gateway_configs >= 1, "samples/gateway holds a gateway configuration");
    let listed: BTreeSet<String> = NO_SCHEMA.iter().map(|s| (*s).to_owned()).collect();
    assert!(
        no_schema.is_subset(&listed),
        "samples use kinds without a schema that are not listed: {:?}",
        no_schema.difference(&listed).collect::<Vec<_>>()
    );
    println!("not validated (no schema in testdata/schemas): {no_schema:?}");
}

fn find<'a>(set: &'a [Object], kind: &str, name: &str) -> Option<&'a Object> {
    set.iter().find(|o| o.kind() == kind && o.name() == name)
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector.as_object().is_some_and(|s| s.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

#[test]
fn rendered_overlays_hang_together_and_the_gateway_accepts_their_configuration() {
    let rendered = render_all();
    for zone in ["zone-a", "zone-b", "zone-c"] {
        let dir = format!("istio/overlays/{zone}");
        let set = &rendered.sets[&dir];
        let deploy = find(set, "Deployment", "keyway-gateway").unwrap_or_else(|| panic!("{dir}: no Deployment"));
        let pod = &deploy.value["spec"]["template"];
        let labels = &pod["metadata"]["labels"];
        // Every ConfigMap and Secret a volume names is rendered (generated names included).
        for v in pod["spec"]["volumes"].as_array().into_iter().flatten() {
            if let Some(cm) = v.pointer("/configMap/name").and_then(Value::as_str) {
                assert!(
                    find(set, "ConfigMap", cm).is_some(),
                    "{dir}: volume {} names ConfigMap {cm}, not rendered",
                    v["name"]
                );
            }
            if let Some(s) = v.pointer("/secret/secretName").and_then(Value::as_str) {
                assert!(find(set, "Secret", s).is_some(), "{dir}: volume {} names Secret {s}, not rendered", v["name"]);
                // 0440: what kubelet makes of any mode once fsGroup gives the non-root gateway
                // the files' group (istio/base/deployment.yaml).
                assert_eq!(
                    v.pointer("/secret/defaultMode"),
                    Some(&Value::from(0o440)),
                    "{dir}: Secret volume {s} mode 0440"
                );
            }
        }
        let sa = pod["spec"]["serviceAccountName"].as_str().unwrap_or_default();
        assert!(find(set, "ServiceAccount", sa).is_some(), "{dir}: ServiceAccount {sa}");
        // Selectors of the Services, the PDB and the Deployment pick the pods; the HPA scales it.
        for o in set.iter().filter(|o| o.kind() == "Service") {
            assert!(
                labels_match(&o.value["spec"]["selector"], labels),
                "{dir}: {} selects no gateway pod",
                o.describe()
            );
        }
        let pdb = find(set, "PodDisruptionBudget", "keyway-gateway").unwrap_or_else(|| panic!("{dir}: no PDB"));
        assert!(labels_match(&pdb.value["spec"]["selector"]["matchLabels"], labels), "{dir}: PDB selector");
        assert!(labels_match(&deploy.value["spec"]["selector"]["matchLabels"], labels), "{dir}: Deployment selector");
        let hpa = find(set, "HorizontalPodAutoscaler", "keyway-gateway").unwrap_or_else(|| panic!("{dir}: no HPA"));
        assert_eq!(hpa.value["spec"]["scaleTargetRef"]["name"], deploy.value["metadata"]["name"]);
        assert!(hpa.value["spec"]["minReplicas"].as_u64() >= Some(2), "{dir}: at least two replicas");
        // The container: the command, the probes, the hardening.
        let c = &pod["spec"]["containers"][0];
        assert_eq!(c["args"], serde_json::json!(["gateway", "--config", "/etc/keyway/gateway.yaml"]));
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
        assert_eq!(c["securityContext"]["capabilities"]["drop"], serde_json::json!(["ALL"]));
        assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"], true);
        // The gateway configuration parses with the gateway's strict parser, for this zone; its
        // files lie in the mounted volumes, under keys the ConfigMaps and Secrets have.
        let config_cm = set
            .iter()
            .find(|o| o.kind() == "ConfigMap" && o.name().starts_with("keyway-gateway-config"))
            .unwrap_or_else(|| panic!("{dir}: no gateway ConfigMap"));
        let text = config_cm.value["data"]["gateway.yaml"].as_str().unwrap_or_default();
        let config = keyway_gateway::config::Config::parse(text, &format!("{dir}/gateway.yaml"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.zone, zone);
        let mounts: BTreeMap<String, String> = c["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                (
                    m["mountPath"].as_str().unwrap_or_default().to_owned(),
                    m["name"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        let volume_of = |path: &Path| -> (String, String) {
            let dir_of = path.parent().map(|p| p.display().to_string()).unwrap_or_default();
            let key = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
            (
                mounts
                    .get(&dir_of)
                    .cloned()
                    .unwrap_or_else(|| panic!("{dir}: {} is in no mounted volume", path.display())),
                key,
            )
        };
        let zone_cas: Vec<&std::path::PathBuf> = config.zones.iter().filter_map(|z| z.ca.as_ref()).collect();
        for file in [&config.tls.ca, &config.secrets].into_iter().chain(zone_cas) {
            let (volume, key) = volume_of(file);
            let v = pod["spec"]["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|v| v["name"] == volume.as_str())
                .unwrap_or_else(|| panic!("volume {volume}"));
            let secret = v
                .pointer("/secret/secretName")
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("{dir}: {} must come from a Secret", file.display()));
            let s = find(set, "Secret", secret).unwrap_or_else(|| panic!("Secret {secret}"));
            assert!(
                s.value["data"].get(&key).is_some(),
                "{dir}: Secret {secret} has no key {key} for {}",
                file.display()
            );
        }
        assert_eq!(mounts.get(&config.inventory.display().to_string()).map(String::as_str), Some("inventory"));
        mesh_certificates_come_from_the_istio_agent(&dir, set, pod, &config, &volume_of);
        overlay_certificates_are_one_per_replica(&dir, set, pod, &config, &volume_of);
        // The ports: container, Services and gateway configuration agree.
        let port_of = |name: &str| {
            c["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["name"] == name)
                .and_then(|p| p["containerPort"].as_u64())
        };
        assert_eq!(port_of("tunnel"), Some(u64::from(config.listen.tunnel.port())));
        assert_eq!(port_of("overlay"), Some(u64::from(config.listen.overlay.port())));
        assert_eq!(port_of("admin"), Some(u64::from(config.listen.admin.port())));
        let overlay =
            find(set, "Service", "keyway-gateway-overlay").unwrap_or_else(|| panic!("{dir}: overlay Service"));
        assert_eq!(overlay.value["spec"]["ports"][0]["protocol"], "UDP");
        let ty = overlay.value["spec"]["type"].as_str().unwrap_or_default();
        assert!(ty == "LoadBalancer" || ty == "NodePort", "{dir}: overlay Service type {ty}");
        // The inventory loads with the policy loader.
        let inv = find(set, "ConfigMap", "keyway-inventory").unwrap_or_else(|| panic!("{dir}: inventory"));
        let files: Vec<keyway_policy::manifest::SourceFile> = inv.value["data"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| keyway_policy::manifest::SourceFile {
                path: format!("{dir}/inventory/{k}"),
                text: v.as_str().unwrap_or_default().to_owned(),
            })
            .collect();
        keyway_policy::manifest::load(&files).unwrap_or_else(|e| panic!("{e}"));
        // Every plugin configuration (the EnvoyFilters' extension configurations) is accepted by
        // the filter's own parser, and a module that cannot be fetched fails closed.
        let mut extensions = 0;
        for ef in set.iter().filter(|o| o.kind() == "EnvoyFilter") {
            for p in ef.value["spec"]["configPatches"].as_array().into_iter().flatten() {
                if p["applyTo"] != "EXTENSION_CONFIG" {
                    continue;
                }
                extensions += 1;
                let config = &p["patch"]["value"]["typed_config"]["config"];
                let text = config["configuration"]["value"].as_str().unwrap_or_default();
                if let Err(e) = keyway_filter::config::parse(text.as_bytes()) {
                    panic!("{dir}: {}: {}: configuration: {e}", ef.describe(), p["patch"]["value"]["name"]);
                }
                assert_eq!(config["failure_policy"], "FAIL_CLOSED", "{dir}: {}", ef.describe());
            }
        }
        assert_eq!(extensions, 3, "{dir}: one extension configuration per filter mode");
        assert!(deploy.value["spec"].get("replicas").is_none(), "{dir}: the HPA owns the replica count");
        assert_eq!(c["startupProbe"]["httpGet"]["path"], "/healthz", "{dir}: startup probe");
    }
}

/// The gateway's mesh workload certificate (`mesh:` in its configuration, issue 11) is the one the
/// istio-proxy sidecar of the gateway pod writes: the pod asks for the sidecar (the namespace does
/// not refuse it), the sidecar intercepts nothing, its agent writes `OUTPUT_CERTS` into the volume
/// the gateway reads `mesh.ca`, `mesh.cert` and `mesh.key` from (an in-memory emptyDir shared by
/// the two containers), under the names the agent uses.
fn mesh_certificates_come_from_the_istio_agent(
    dir: &str,
    set: &[Object],
    pod: &Value,
    config: &keyway_gateway::config::Config,
    volume_of: &dyn Fn(&Path) -> (String, String),
) {
    let ns = find(set, "Namespace", "keyway-system").unwrap_or_else(|| panic!("{dir}: no Namespace keyway-system"));
    assert!(
        ns.value["metadata"]["labels"].get("istio-injection").is_none(),
        "{dir}: the namespace must not refuse the gateway's certificate sidecar (istio-injection label)"
    );
    assert_eq!(pod["metadata"]["labels"]["sidecar.istio.io/inject"], "true", "{dir}: the certificate sidecar");
    let notes = &pod["metadata"]["annotations"];
    assert_eq!(
        notes["traffic.sidecar.istio.io/includeInboundPorts"], "",
        "{dir}: the sidecar intercepts no inbound port"
    );
    assert_eq!(notes["traffic.sidecar.istio.io/includeOutboundIPRanges"], "", "{dir}: nor any outbound range");
    let proxy_config: Value = serde_yaml_ng::from_str(notes["proxy.istio.io/config"].as_str().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{dir}: proxy.istio.io/config: {e}"));
    let out_dir = proxy_config["proxyMetadata"]["OUTPUT_CERTS"]
        .as_str()
        .unwrap_or_else(|| panic!("{dir}: no proxyMetadata OUTPUT_CERTS in proxy.istio.io/config"));
    let user_mounts: Value =
        serde_json::from_str(notes["sidecar.istio.io/userVolumeMount"].as_str().unwrap_or_default())
            .unwrap_or_else(|e| panic!("{dir}: sidecar.istio.io/userVolumeMount: {e}"));
    let mut volumes = BTreeSet::new();
    for (file, agent_name) in
        [(&config.mesh.ca, "root-cert.pem"), (&config.mesh.cert, "cert-chain.pem"), (&config.mesh.key, "key.pem")]
    {
        let (volume, key) = volume_of(file);
        assert_eq!(key, agent_name, "{dir}: {} is not a file istio-agent writes", file.display());
        let v = pod["spec"]["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == volume.as_str())
            .unwrap_or_else(|| panic!("{dir}: volume {volume}"));
        assert_eq!(v["emptyDir"]["medium"], "Memory", "{dir}: {volume}: the key stays in memory");
        assert_eq!(
            user_mounts[volume.as_str()]["mountPath"],
            out_dir,
            "{dir}: the sidecar does not mount {volume} at OUTPUT_CERTS {out_dir} (userVolumeMount: a map of volume name to mount): {user_mounts}"
        );
        volumes.insert(volume);
    }
    assert_eq!(volumes.len(), 1, "{dir}: the three files in one volume");
    assert!(
        !config.tls.cert.starts_with(out_dir),
        "{dir}: the overlay certificate is the overlay CA's, not the mesh's"
    );
}

/// Each gateway replica has its own overlay certificate (issue 11, finding 2): the configuration
/// names no gateway (the certificate does), reaches every zone through its `entry` and pins each
/// zone to its own CA, which lies in the CA Secret; the certificate and key come from
/// cert-manager's csi-driver, issued per pod by the rendered ClusterIssuer with the pod's name in
/// the gateway identity of this zone and trust domain, and the DNS names of the replica and the
/// zone; no CA key is mounted.
fn overlay_certificates_are_one_per_replica(
    dir: &str,
    set: &[Object],
    pod: &Value,
    config: &keyway_gateway::config::Config,
    volume_of: &dyn Fn(&Path) -> (String, String),
) {
    assert!(config.name.is_empty(), "{dir}: the configuration names a gateway: replicas would share its certificate");
    for z in &config.zones {
        assert!(z.entry.is_some(), "{dir}: zone {} has no entry address", z.name);
        assert!(z.gateways.is_empty(), "{dir}: zone {} lists replicas by name", z.name);
        assert!(z.ca.is_some(), "{dir}: zone {} is not pinned to its own CA", z.name);
    }
    let (cert_volume, cert_key) = volume_of(&config.tls.cert);
    let (key_volume, key_key) = volume_of(&config.tls.key);
    assert_eq!(cert_volume, key_volume, "{dir}: certificate and key in one volume");
    assert_eq!((cert_key.as_str(), key_key.as_str()), ("tls.crt", "tls.key"), "{dir}: csi-driver's file names");
    let v = pod["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == cert_volume.as_str())
        .unwrap_or_else(|| panic!("{dir}: volume {cert_volume}"));
    assert_eq!(v["csi"]["driver"], "csi.cert-manager.io", "{dir}: {cert_volume}: cert-manager's csi-driver");
    let attrs = &v["csi"]["volumeAttributes"];
    let attr = |k: &str| attrs[format!("csi.cert-manager.io/{k}")].as_str().unwrap_or_default().to_owned();
    assert_eq!(
        attr("uri-sans"),
        format!("spiffe://{}/zone/{}/gateway/${{POD_NAME}}", config.trust_domain, config.zone),
        "{dir}: each replica's gateway identity"
    );
    let dns: BTreeSet<String> = attr("dns-names").split(',').map(str::to_owned).collect();
    let want: BTreeSet<String> =
        [format!("${{POD_NAME}}.{}.gateway.keyway", config.zone), format!("{}.gateway.keyway", config.zone)].into();
    assert_eq!(dns, want, "{dir}: the replica's and the zone's server names");
    let usages: BTreeSet<&str> =
        attrs["csi.cert-manager.io/key-usages"].as_str().unwrap_or_default().split(',').collect();
    assert!(usages.contains("server auth") && usages.contains("client auth"), "{dir}: both ends of QUIC: {usages:?}");
    assert_eq!(attr("issuer-kind"), "ClusterIssuer");
    let issuer = find(set, "ClusterIssuer", &attr("issuer-name"))
        .unwrap_or_else(|| panic!("{dir}: the issuer {} is not rendered", attr("issuer-name")));
    assert!(issuer.value["spec"]["ca"]["secretName"].is_string(), "{dir}: a CA issuer");
    assert_eq!(
        attr("fs-group"),
        pod["spec"]["securityContext"]["fsGroup"].as_u64().map(|g| g.to_string()).unwrap_or_default(),
        "{dir}: the non-root gateway reads its key through the pod's fsGroup"
    );
    for s in set.iter().filter(|o| o.kind() == "Secret") {
        for k in s.value["data"].as_object().into_iter().flatten().map(|(k, _)| k) {
            assert!(!k.contains("key"), "{dir}: {} holds {k}: no key is mounted from a Secret", s.describe());
        }
    }
}

/// The errors name the file, the object and the field.
#[test]
fn errors_name_the_file_the_object_and_the_field() {
    let mut schemas = schemas();
    let cases = [
        (
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: a}\nspec:\n  podSelector: {}\n  ingres: []\n",
            "bad.yaml: NetworkPolicy a/p: spec.ingres: unknown field",
        ),
        (
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d, namespace: a}\nspec:\n  selector: {matchLabels: {a: b}}\n  template:\n    metadata: {labels: {a: b}}\n    spec:\n      containers:\n      - name: c\n        image: i\n        ports: [{containerPort: \"http\"}]\n",
            "bad.yaml: Deployment a/d: spec.template.spec.containers[0].ports[0].containerPort:",
        ),
        (
            "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: w, namespace: istio-system}\nspec:\n  url: oci://x/y:1\n  failStrategy: FAIL_CLOSED\n",
            "bad.yaml: WasmPlugin istio-system/w: spec.failStrategy:",
        ),
        (
            "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: w, namespace: istio-system}\nspec:\n  url: oci://x/y:1\n  match: [{mode: CLIENT, port: 1}]\n",
            "bad.yaml: WasmPlugin istio-system/w: spec.match[0].port: unknown field",
        ),
        (
            "apiVersion: networking.istio.io/v1alpha3\nkind: EnvoyFilter\nmetadata: {name: e, namespace: istio-system, labelz: {}}\nspec:\n  configPatches: [{applyTo: LISTENER, patch: {operation: ADD, value: {anything: [1]}}}]\n",
            "bad.yaml: EnvoyFilter istio-system/e: metadata.labelz: unknown field",
        ),
    ];
    for (text, want) in cases {
        let objects = keyway_istio_check::parse_yaml("bad.yaml", text).unwrap_or_else(|e| panic!("{e}"));
        match schemas.validate(&objects[0]) {
            Ok(Outcome::Invalid(lines)) => {
                assert!(lines.iter().any(|l| l.starts_with(want)), "want a line starting {want:?}, got {lines:#?}");
            }
            other => panic!("{want}: expected invalid, got {other:?}"),
        }
    }
    // Preserved-unknown-fields (EnvoyFilter patch values, WasmPlugin pluginConfig) take anything.
    let ok = "apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\nmetadata: {name: w, namespace: istio-system}\nspec:\n  url: oci://x/y:1\n  pluginConfig: {anything: {at: [all]}}\n";
    let objects = keyway_istio_check::parse_yaml("ok.yaml", ok).unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(schemas.validate(&objects[0]), Ok(Outcome::Valid { .. })));
}

/// Every workload of samples/shop that keyway enforces (label `keyway.io/enforce: "true"`) carries
/// what an Istio install needs of an enforced pod (docs/install-istio.md): Istio's inbound capture
/// leaves the keyway inbound port alone, and the init container `keyway-refuse-non-tcp`, the same in
/// every pod, installs exactly the end-to-end sidecar's rules for UDP, SCTP and ICMP
/// (`Sidecar::non_tcp_rules`), then, with `KEYWAY_AGENT=1` (set in every pod, each of which runs
/// its keyway agent), the rules that let the agent's UDP through (`Sidecar::agent_udp_rules`: the
/// app's UDP into `kw0`, the agent's own QUIC by its firewall mark, no gateway address): its
/// script, run here with `iptables` and `ip6tables` replaced by a recorder, issues those commands
/// in that order, for no resolver, an IPv4 one, an IPv6 one, and the nameservers of the pod's
/// resolv.conf by default; with `KEYWAY_AGENT` unset, empty, `0` and `1`.
#[test]
fn enforced_sample_pods_refuse_udp_sctp_and_icmp_as_the_e2e_sidecar_does() {
    use keyway_e2e::envoy::Sidecar;
    let path = repo().join("samples/shop/workloads.yaml");
    let objects = load_file(&path, "samples/shop/workloads.yaml").unwrap_or_else(|e| panic!("{e}"));
    let mut scripts = BTreeSet::new();
    let mut enforced = 0;
    for d in objects.iter().filter(|o| o.kind() == "Deployment") {
        let pod = &d.value["spec"]["template"];
        if pod["metadata"]["labels"]["keyway.io/enforce"] != "true" {
            continue;
        }
        enforced += 1;
        let what = d.describe();
        assert_eq!(
            pod["metadata"]["annotations"]["traffic.sidecar.istio.io/excludeInboundPorts"],
            keyway_e2e::envoy::KEYWAY_INBOUND_PORT.to_string(),
            "{what}: Istio's inbound capture must leave the keyway inbound port alone"
        );
        let init: Vec<&Value> = pod["spec"]["initContainers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["name"] == "keyway-refuse-non-tcp")
            .collect();
        assert_eq!(init.len(), 1, "{what}: no init container keyway-refuse-non-tcp");
        let c = init[0];
        assert_eq!(c["command"], serde_json::json!(["sh", "-c"]), "{what}");
        let caps = &c["securityContext"]["capabilities"];
        assert_eq!(caps["add"], serde_json::json!(["NET_ADMIN", "NET_RAW"]), "{what}: what iptables needs, no more");
        assert_eq!(caps["drop"], serde_json::json!(["ALL"]), "{what}");
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false, "{what}");
        scripts.insert(c["args"][0].as_str().unwrap_or_default().to_owned());
        let agents = pod["spec"]["containers"].as_array().into_iter().flatten();
        assert_eq!(agents.filter(|a| a["name"] == "keyway-agent").count(), 1, "{what}: no container keyway-agent");
        assert_eq!(
            c["env"],
            serde_json::json!([{"name": "KEYWAY_AGENT", "value": "1"}]),
            "{what}: keyway-refuse-non-tcp takes KEYWAY_AGENT only, \"1\" for the pod's agent"
        );
    }
    assert!(enforced >= 8, "samples/shop enforces its workloads ({enforced} labelled)");
    assert_eq!(scripts.len(), 1, "one script for every enforced pod");
    let script = scripts.pop_first().unwrap_or_default();

    let dir = std::env::temp_dir().join(format!("keyway-non-tcp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let log = dir.join("log");
    for tool in ["iptables", "ip6tables"] {
        let shim = dir.join(tool);
        std::fs::write(&shim, format!("#!/bin/sh\necho \"{tool} $*\" >> '{}'\n", log.display()))
            .unwrap_or_else(|e| panic!("{e}"));
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&shim, std::fs::Permissions::from_mode(0o755)).unwrap_or_else(|e| panic!("{e}"));
    }
    let resolv = dir.join("resolv.conf");
    std::fs::write(
        &resolv,
        "search shop.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(script.contains("/etc/resolv.conf"), "the default resolver comes from the pod's resolv.conf");
    let script_here = script.replace("/etc/resolv.conf", &resolv.display().to_string());
    let run = |dns: Option<&str>, agent: Option<&str>| -> Vec<String> {
        let _ = std::fs::remove_file(&log);
        let mut cmd = std::process::Command::new("sh");
        cmd.arg("-c").arg(&script_here);
        cmd.env("PATH", format!("{}:{}", dir.display(), std::env::var("PATH").unwrap_or_default()));
        cmd.env_remove("KEYWAY_DNS").env_remove("KEYWAY_AGENT");
        if let Some(d) = dns {
            cmd.env("KEYWAY_DNS", d);
        }
        if let Some(a) = agent {
            cmd.env("KEYWAY_AGENT", a);
        }
        let out = cmd.output().unwrap_or_else(|e| panic!("sh: {e}"));
        assert!(out.status.success(), "the script failed: {}", String::from_utf8_lossy(&out.stderr));
        std::fs::read_to_string(&log).unwrap_or_default().lines().map(str::to_owned).collect()
    };
    let want = |resolver: Option<&str>, agent: bool| -> Vec<String> {
        let parse = |a: &str| -> std::net::IpAddr { a.parse().unwrap_or_else(|e| panic!("{a}: {e}")) };
        let mut rules = Sidecar::non_tcp_rules(resolver.map(parse));
        if agent {
            rules.extend(Sidecar::agent_udp_rules());
        }
        rules.iter().map(|r| r.join(" ")).collect()
    };
    assert_eq!(run(Some(""), None), want(None, false), "KEYWAY_DNS=\"\": all UDP refused");
    assert_eq!(run(Some("10.96.0.10"), None), want(Some("10.96.0.10"), false), "an IPv4 resolver");
    assert_eq!(run(Some("fd00::a"), None), want(Some("fd00::a"), false), "an IPv6 resolver");
    assert_eq!(run(None, None), want(Some("10.96.0.10"), false), "by default, the pod's resolv.conf nameserver");
    assert_eq!(run(None, Some("")), want(Some("10.96.0.10"), false), "KEYWAY_AGENT=\"\": no agent, no agent rules");
    assert_eq!(run(None, Some("0")), want(Some("10.96.0.10"), false), "KEYWAY_AGENT=0: no agent, no agent rules");
    assert_eq!(run(None, Some("1")), want(Some("10.96.0.10"), true), "the pod's agent: its TUN device and its mark");
    assert_eq!(run(Some(""), Some("1")), want(None, true), "the pod's agent, all other UDP refused");
    let mark = format!("-m mark --mark {:#x} -j RETURN", keyway_gateway::agent::config::DEFAULT_SOCKET_MARK);
    assert!(
        run(None, Some("1")).iter().any(|r| r.ends_with(&mark)),
        "the agent's QUIC is let out by the agent's default socket_mark ({mark})"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
