//! The Envoy configuration the end-to-end tests give their sidecars (`e2e/src/envoy.rs`,
//! `Sidecar::bootstrap`) is the one the EnvoyFilters of `istio/base` make Istio produce, field for
//! field: the outbound `tcp_proxy` with its tunnelling, the filter order, the keyway inbound
//! CONNECT listener, the clusters, and each mode's plugin configuration. A change to one side
//! without the other fails here. (What Istio generates from them is checked by Istio's own code:
//! istio-check/xds, `make istio-xds`.)
//!
//! What legitimately differs, and is checked to differ only so: Istio delivers the wasm module
//! over ECDS (a `config_discovery` reference to an `EXTENSION_CONFIG` of the EnvoyFilter
//! `keyway-extensions`, accepting the RBAC filter Istio's agent substitutes when the module cannot
//! be fetched) where the e2e bootstrap inlines it; Istio reaches the gateways through their
//! headless Service (STRICT_DNS) where the e2e lists addresses (STATIC); Istio's plain-inbound
//! filter exempts no port (Istio never captures its own ports; the e2e exempts its apps' health
//! port, which its capture does take); Istio's keyway inbound listener sets `stream_idle_timeout:
//! 0s` (long-lived quiet tunnels; the e2e's flows are short); Istio's outbound chains other than
//! the overlay one reach the same tunnel by replacing Istio's terminal filters, where the e2e has
//! one chain for everything. The sidecar legs' mutual TLS (issue 11) is the e2e's in socket,
//! context type, client certificate requirement, ALPN and accepted peer; the certificates come
//! from istio-agent's SDS (`default`, `ROOTCA`) where the e2e reads files, and Istio's contexts
//! name TLS 1.2 to 1.3 explicitly. The key service on the tunnel port is checked against the design.

use std::path::{Path, PathBuf};

use keyway_e2e::envoy::{KEYWAY_INBOUND_PORT, Sidecar};
use keyway_istio_check::Object;
use keyway_istio_check::render::{kubectl, render};
use serde_json::{Value, json};

/// The mesh identity of the gateways (namespace and service account of istio/base).
const GATEWAY_IDENTITY: &str = "spiffe://cluster.local/ns/keyway-system/sa/keyway-gateway";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn base() -> Vec<Object> {
    let repo = repo();
    let kubectl = kubectl(&repo).unwrap_or_else(|e| panic!("{e}"));
    render(&kubectl, &repo.join("istio").join("base"), "istio/base").unwrap_or_else(|e| panic!("{e}"))
}

fn e2e_bootstrap() -> Value {
    let sidecar = Sidecar {
        namespace: "shop".to_owned(),
        service_account: "cart".to_owned(),
        overlay_ip: "10.128.1.11".to_owned(),
        app_ports: vec![7070, 9090],
        gateways: vec!["10.61.1.2".to_owned(), "10.61.1.3".to_owned()],
        tunnel_port: keyway_gateway::config::DEFAULT_TUNNEL_PORT,
        mesh: keyway_gateway::config::MeshFiles {
            ca: "/mesh/root-cert.pem".into(),
            cert: "/mesh/cert-chain.pem".into(),
            key: "/mesh/key.pem".into(),
        },
        gateway_identity: GATEWAY_IDENTITY.to_owned(),
        wasm: "/keyway_filter.wasm".to_owned(),
    };
    serde_yaml_ng::from_str(&sidecar.bootstrap()).unwrap_or_else(|e| panic!("the e2e bootstrap is not YAML: {e}"))
}

fn named<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array().into_iter().flatten().find(|v| v["name"] == name).unwrap_or_else(|| panic!("no {name:?} in {list}"))
}

fn patches<'a>(objects: &'a [Object], filter: &str, apply_to: &str) -> Vec<&'a Value> {
    let ef = objects
        .iter()
        .find(|o| o.kind() == "EnvoyFilter" && o.name() == filter)
        .unwrap_or_else(|| panic!("no EnvoyFilter {filter}"));
    ef.value["spec"]["configPatches"].as_array().into_iter().flatten().filter(|p| p["applyTo"] == apply_to).collect()
}

/// The extension configuration (EnvoyFilter `keyway-extensions`, `EXTENSION_CONFIG`) that istiod
/// serves over ECDS under `name`.
fn extension<'a>(objects: &'a [Object], name: &str) -> &'a Value {
    patches(objects, "keyway-extensions", "EXTENSION_CONFIG")
        .into_iter()
        .map(|p| &p["patch"]["value"])
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("the ECDS reference {name} names no extension configuration of keyway-extensions"))
}

/// The plugin configuration of an extension configuration, as JSON.
fn extension_config(ext: &Value) -> Value {
    let text = ext["typed_config"]["config"]["configuration"]["value"].as_str().unwrap_or_default();
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{}: plugin configuration: {e}", ext["name"]))
}

/// The e2e wasm filter's plugin configuration, as JSON.
fn inline_config(filter: &Value) -> Value {
    let config = &filter["typed_config"]["config"];
    assert_eq!(config["root_id"], "keyway");
    let text = config["configuration"]["value"].as_str().unwrap_or_else(|| panic!("no configuration in {filter}"));
    serde_json::from_str(text).unwrap_or_else(|e| panic!("e2e plugin configuration: {e}"))
}

/// An ECDS reference of the Istio side: the extension configuration it names, checked for type
/// (the wasm filter, or the RBAC filter Istio's agent sends in its place when the module cannot be
/// fetched) and module.
fn ecds_extension<'a>(objects: &'a [Object], filter: &Value, kind: &str) -> &'a Value {
    let name = filter["name"].as_str().unwrap_or_default();
    let wasm = format!("type.googleapis.com/envoy.extensions.filters.{kind}.wasm.v3.Wasm");
    let rbac = format!("type.googleapis.com/envoy.extensions.filters.{kind}.rbac.v3.RBAC");
    assert_eq!(filter["config_discovery"]["type_urls"], json!([wasm, rbac]), "{name}");
    assert_eq!(filter["config_discovery"]["config_source"]["ads"], json!({}), "{name}: from Istio (ADS)");
    let ext = extension(objects, name);
    assert_eq!(ext["typed_config"]["@type"], wasm.as_str(), "{name}");
    let config = &ext["typed_config"]["config"];
    assert_eq!(config["root_id"], "keyway", "{name}: root id as the e2e's");
    assert_eq!(config["vm_config"]["vm_id"], "keyway", "{name}: one VM as the e2e's");
    assert_eq!(config["failure_policy"], "FAIL_CLOSED", "{name}");
    ext
}

#[test]
fn outbound_tunnel_matches_the_e2e_sidecar() {
    let objects = base();
    let boot = e2e_bootstrap();
    let e2e_chain = &named(&boot["static_resources"]["listeners"], "outbound")["filter_chains"][0];
    let chains = patches(&objects, "keyway-outbound", "FILTER_CHAIN");
    assert_eq!(chains.len(), 1);
    let chain = chains[0];
    assert_eq!(chain["match"]["context"], "SIDECAR_OUTBOUND");
    assert_eq!(chain["patch"]["operation"], "ADD");
    let istio_filters = chain["patch"]["value"]["filters"].as_array().cloned().unwrap_or_default();
    let e2e_filters = e2e_chain["filters"].as_array().cloned().unwrap_or_default();
    assert_eq!(istio_filters.len(), e2e_filters.len(), "same filters: keyway outbound, then tcp_proxy");
    // 1. the keyway outbound filter, same plugin configuration
    let ext = ecds_extension(&objects, &istio_filters[0], "network");
    assert_eq!(extension_config(ext), inline_config(&e2e_filters[0]), "outbound plugin configuration");
    // The same filter leads every other outbound chain (INSERT_FIRST), by the same reference.
    let network = patches(&objects, "keyway-outbound", "NETWORK_FILTER");
    let first: Vec<&&Value> = network.iter().filter(|p| p["patch"]["operation"] == "INSERT_FIRST").collect();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0]["match"], json!({"context": "SIDECAR_OUTBOUND"}));
    assert_eq!(first[0]["patch"]["value"], istio_filters[0], "the outbound filter of every chain");
    // 2. tcp_proxy, identical: cluster, retries, tunneling_config (hostname, x-keyway-token)
    assert_eq!(istio_filters[1], e2e_filters[1], "tcp_proxy of the overlay chain");
    let tunneling = &istio_filters[1]["typed_config"]["tunneling_config"];
    assert_eq!(tunneling["hostname"], "%DOWNSTREAM_LOCAL_ADDRESS%");
    assert_eq!(
        tunneling["headers_to_add"][0]["header"],
        json!({"key": "x-keyway-token", "value": "%FILTER_STATE(wasm.keyway_token:PLAIN)%"})
    );
    // Egress default deny: Istio's own terminal filters of every other outbound chain (its
    // tcp_proxy and its HTTP connection manager) are replaced by the same tunnel, so every
    // destination goes through the gateway as in the e2e sidecar (all outbound TCP to 15001).
    let replaced: Vec<&Value> =
        network.iter().filter(|p| p["patch"]["operation"] == "REPLACE").map(|p| &p["match"]).collect();
    assert_eq!(
        replaced,
        ["envoy.filters.network.tcp_proxy", "envoy.filters.network.http_connection_manager"]
            .map(|f| json!({"context": "SIDECAR_OUTBOUND", "listener": {"filterChain": {"filter": {"name": f}}}}))
            .iter()
            .collect::<Vec<_>>(),
        "Istio's terminal filters replaced"
    );
    for p in network.iter().filter(|p| p["patch"]["operation"] == "REPLACE") {
        assert_eq!(p["patch"]["value"], istio_filters[1], "every outbound chain ends in the overlay chain's tunnel");
    }
    assert_eq!(network.len(), 3, "no other outbound filter patch");
    // The overlay prefix holds every overlay address of the sample.
    let ranges = chain["patch"]["value"]["filter_chain_match"]["prefix_ranges"].as_array().cloned().unwrap_or_default();
    let text: String = ["workloads.yaml", "services.yaml"]
        .iter()
        .map(|f| std::fs::read_to_string(repo().join("samples/shop").join(f)).unwrap_or_default())
        .collect();
    let mut seen = 0;
    for line in text.lines().filter(|l| l.contains("keyway.io/overlay-ips:")) {
        let ips = line.split(':').nth(1).unwrap_or_default().trim().trim_matches('"');
        for ip in ips.split(',').filter_map(|s| s.trim().parse::<std::net::Ipv4Addr>().ok()) {
            seen += 1;
            let inside = ranges.iter().any(|r| {
                let base: std::net::Ipv4Addr =
                    r["address_prefix"].as_str().unwrap_or_default().parse().unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
                let len = r["prefix_len"].as_u64().unwrap_or(0) as u32;
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                u32::from(ip) & mask == u32::from(base) & mask
            });
            assert!(
                inside,
                "overlay address {ip} of samples/shop is outside the EnvoyFilter's overlay prefix {ranges:?}"
            );
        }
    }
    assert!(seen > 5, "found the sample's overlay addresses");
}

/// The sidecars' legs to the gateways: the tunnel cluster as the e2e's (timeouts, HTTP/2, port);
/// the key service on the same port, HTTP/2, as the gateway serves it (issue 11: keys moved from the
/// admin port to the mutual-TLS tunnel port); both mutual TLS with the sidecar's mesh certificate
/// from istio-agent's SDS (what pilot makes of it: istio-check/xds, `tls_test.go`).
#[test]
fn gateway_clusters_match_the_e2e_sidecar() {
    let objects = base();
    let boot = e2e_bootstrap();
    let clusters = &boot["static_resources"]["clusters"];
    let istio: Vec<&Value> =
        patches(&objects, "keyway-outbound", "CLUSTER").into_iter().map(|p| &p["patch"]["value"]).collect();
    let tunnel = istio
        .iter()
        .find(|c| c["name"] == "keyway_gateway")
        .unwrap_or_else(|| panic!("no cluster keyway_gateway in keyway-outbound"));
    for name in ["keyway_gateway", "keyway_keyservice"] {
        let e2e = named(clusters, name);
        let ours =
            istio.iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no cluster {name} in keyway-outbound"));
        assert_eq!(ours["connect_timeout"], e2e["connect_timeout"], "cluster {name}: connect_timeout");
        assert_eq!(
            ours["typed_extension_protocol_options"], tunnel["typed_extension_protocol_options"],
            "cluster {name}: HTTP/2, as the tunnel port serves it"
        );
        assert_eq!(ours["transport_socket"], tunnel["transport_socket"], "cluster {name}: the same mutual TLS");
        let tls = &ours["transport_socket"]["typed_config"];
        assert_eq!(tls["@type"], "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext");
        let common = &tls["common_tls_context"];
        assert_eq!(
            common["tls_certificate_sds_secret_configs"][0]["name"], "default",
            "cluster {name}: own certificate"
        );
        assert_eq!(common["combined_validation_context"]["validation_context_sds_secret_config"]["name"], "ROOTCA");
        assert_eq!(
            common["combined_validation_context"]["default_validation_context"]["match_typed_subject_alt_names"],
            json!([{"san_type": "URI", "matcher": {"exact": GATEWAY_IDENTITY}}]),
            "cluster {name}: the gateway's mesh identity only"
        );
        assert_eq!(common["alpn_protocols"], json!(["h2"]));
        // Addresses differ by design (Service name vs. test addresses); the port does not.
        assert_eq!(ours["type"], "STRICT_DNS");
        let ep = &ours["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"];
        assert_eq!(ep["address"], "keyway-gateway.keyway-system.svc.cluster.local");
        assert_eq!(ours["dns_refresh_rate"], "5s", "cluster {name}: new replicas found within seconds");
        assert_eq!(ep["port_value"], u64::from(keyway_gateway::config::DEFAULT_TUNNEL_PORT), "cluster {name}");
    }
    // The same TLS as the e2e sidecar's apart from where certificates come from (istio-agent's
    // SDS here, files there) and Istio's explicit TLS 1.2 to 1.3: the socket, ALPN, the peer.
    for name in ["keyway_gateway", "keyway_keyservice"] {
        let ours = istio.iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no cluster {name}"));
        same_tls_as_the_e2e(
            &format!("cluster {name}"),
            &ours["transport_socket"],
            &named(clusters, name)["transport_socket"],
        );
    }
    let e2e_tunnel = named(clusters, "keyway_gateway");
    assert_eq!(tunnel["typed_extension_protocol_options"], e2e_tunnel["typed_extension_protocol_options"]);
    let e2e_port = &e2e_tunnel["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        ["port_value"];
    assert_eq!(u64::from(keyway_gateway::config::DEFAULT_TUNNEL_PORT), *e2e_port, "tunnel port as the e2e's");
    // The key service cluster is the one the plugin configurations name; the Service is headless.
    for ext in patches(&objects, "keyway-extensions", "EXTENSION_CONFIG") {
        if let Some(c) = extension_config(&ext["patch"]["value"])["key_service"]["cluster"].as_str() {
            assert_eq!(c, "keyway_keyservice", "{}", ext["patch"]["value"]["name"]);
        }
    }
    let svc = objects
        .iter()
        .find(|o| o.kind() == "Service" && o.name() == "keyway-gateway")
        .unwrap_or_else(|| panic!("no Service keyway-gateway"));
    assert_eq!(svc.value["spec"]["clusterIP"], "None", "headless: STRICT_DNS sees every replica");
}

/// Two TLS transport sockets agree on everything but the certificate source (Istio: SDS `default`
/// and `ROOTCA`; e2e: files) and Istio's explicit protocol versions: the socket and context type,
/// `require_client_certificate`, ALPN, and the peer's SAN matchers.
fn same_tls_as_the_e2e(what: &str, ours: &Value, e2e: &Value) {
    assert_eq!(ours["name"], e2e["name"], "{what}: transport socket");
    let (o, e) = (&ours["typed_config"], &e2e["typed_config"]);
    assert_eq!(o["@type"], e["@type"], "{what}: TLS context type");
    assert_eq!(o["require_client_certificate"], e["require_client_certificate"], "{what}: client certificate");
    let (oc, ec) = (&o["common_tls_context"], &e["common_tls_context"]);
    assert_eq!(oc["alpn_protocols"], ec["alpn_protocols"], "{what}: ALPN");
    assert_eq!(ec["alpn_protocols"], json!(["h2"]), "{what}: the e2e's ALPN");
    assert!(
        ec["validation_context"]["match_typed_subject_alt_names"].as_array().is_some_and(|a| a.len() == 1),
        "{what}: the e2e checks its peer: {e}"
    );
    assert_eq!(
        oc["combined_validation_context"]["default_validation_context"]["match_typed_subject_alt_names"],
        ec["validation_context"]["match_typed_subject_alt_names"],
        "{what}: the peer accepted"
    );
}

#[test]
fn keyway_inbound_listener_matches_the_e2e_sidecar() {
    let objects = base();
    let boot = e2e_bootstrap();
    let e2e = named(&boot["static_resources"]["listeners"], "keyway_inbound");
    let listeners = patches(&objects, "keyway-inbound", "LISTENER");
    assert_eq!(listeners.len(), 1);
    assert_eq!(listeners[0]["match"]["context"], "SIDECAR_INBOUND");
    let ours = &listeners[0]["patch"]["value"];
    assert_eq!(ours["address"], e2e["address"], "listener address and port");
    assert_eq!(ours["address"]["socket_address"]["port_value"], u64::from(KEYWAY_INBOUND_PORT));
    // Mutual TLS: only the gateways deliver (their mesh identity), the sidecar's own certificate.
    let tls = &ours["filter_chains"][0]["transport_socket"]["typed_config"];
    assert_eq!(tls["@type"], "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext");
    assert_eq!(tls["require_client_certificate"], true);
    let cluster_tls = &patches(&objects, "keyway-outbound", "CLUSTER")[0]["patch"]["value"]["transport_socket"]["typed_config"]
        ["common_tls_context"];
    assert_eq!(tls["common_tls_context"], *cluster_tls, "the same certificates and peer check as the clusters");
    same_tls_as_the_e2e(
        "listener keyway_inbound",
        &ours["filter_chains"][0]["transport_socket"],
        &e2e["filter_chains"][0]["transport_socket"],
    );
    let hcm_ours = &ours["filter_chains"][0]["filters"][0];
    let hcm_e2e = &e2e["filter_chains"][0]["filters"][0];
    assert_eq!(hcm_ours["name"], hcm_e2e["name"]);
    for field in ["@type", "stat_prefix", "codec_type", "http2_protocol_options", "upgrade_configs"] {
        assert_eq!(hcm_ours["typed_config"][field], hcm_e2e["typed_config"][field], "HCM {field}");
    }
    assert_eq!(hcm_ours["typed_config"]["stream_idle_timeout"], "0s", "tunnels are not reset when idle");
    // Every e2e virtual host (one per app port) is in the Istio listener, identical.
    let vh_ours = &hcm_ours["typed_config"]["route_config"]["virtual_hosts"];
    for vh in hcm_e2e["typed_config"]["route_config"]["virtual_hosts"].as_array().into_iter().flatten() {
        let name = vh["name"].as_str().unwrap_or_default();
        assert_eq!(named(vh_ours, name), vh, "virtual host {name}");
    }
    assert_eq!(hcm_ours["typed_config"]["route_config"]["name"], hcm_e2e["typed_config"]["route_config"]["name"]);
    // The app clusters those routes use: identical.
    let app_clusters: Vec<&Value> =
        patches(&objects, "keyway-inbound", "CLUSTER").into_iter().map(|p| &p["patch"]["value"]).collect();
    for vh in vh_ours.as_array().into_iter().flatten() {
        let cluster = vh["routes"][0]["route"]["cluster"].as_str().unwrap_or_default();
        let ours = app_clusters
            .iter()
            .find(|c| c["name"] == cluster)
            .unwrap_or_else(|| panic!("route to {cluster}: no such cluster"));
        if let Some(e2e_cluster) =
            boot["static_resources"]["clusters"].as_array().into_iter().flatten().find(|c| c["name"] == cluster)
        {
            assert_eq!(*ours, e2e_cluster, "cluster {cluster}");
        }
    }
    // HTTP filters: the keyway inbound-tunnel filter (same configuration), then the router.
    let f_ours = hcm_ours["typed_config"]["http_filters"].as_array().cloned().unwrap_or_default();
    let f_e2e = hcm_e2e["typed_config"]["http_filters"].as_array().cloned().unwrap_or_default();
    assert_eq!(f_ours.len(), f_e2e.len());
    let ext = ecds_extension(&objects, &f_ours[0], "http");
    assert_eq!(extension_config(ext), inline_config(&f_e2e[0]), "inbound_tunnel plugin configuration");
    assert_eq!(f_ours[1], f_e2e[1], "router");
}

#[test]
fn plain_inbound_matches_the_e2e_sidecar() {
    let objects = base();
    let boot = e2e_bootstrap();
    let e2e = named(&boot["static_resources"]["listeners"], "inbound_plain");
    let e2e_cfg = inline_config(&e2e["filter_chains"][0]["filters"][0]);
    // First in every chain of every inbound listener Istio builds (INSERT_FIRST).
    let first = patches(&objects, "keyway-inbound", "NETWORK_FILTER");
    assert_eq!(first.len(), 1);
    assert_eq!(first[0]["match"], json!({"context": "SIDECAR_INBOUND"}));
    assert_eq!(first[0]["patch"]["operation"], "INSERT_FIRST");
    let ext = ecds_extension(&objects, &first[0]["patch"]["value"], "network");
    let ours = extension_config(ext);
    assert!(ours.get("exempt_ports").is_none(), "Istio never captures its own ports: nothing to exempt");
    let mut e2e_rest = e2e_cfg.clone();
    if let Some(m) = e2e_rest.as_object_mut() {
        m.remove("exempt_ports");
    }
    assert_eq!(ours, e2e_rest, "inbound_plain plugin configuration apart from the e2e's exempt health port");
    // Every mode of the filter is deployed, each once, all from one module.
    let exts: Vec<&Value> =
        patches(&objects, "keyway-extensions", "EXTENSION_CONFIG").into_iter().map(|p| &p["patch"]["value"]).collect();
    let modes: Vec<String> =
        exts.iter().filter_map(|e| extension_config(e)["mode"].as_str().map(str::to_owned)).collect();
    assert_eq!(modes.len(), 3);
    for m in ["outbound", "inbound_tunnel", "inbound_plain"] {
        assert!(modes.iter().any(|x| x == m), "no extension configuration of mode {m}");
    }
    let urls: std::collections::BTreeSet<&str> = exts
        .iter()
        .filter_map(|e| e["typed_config"]["config"]["vm_config"]["code"]["remote"]["http_uri"]["uri"].as_str())
        .collect();
    assert_eq!(urls.len(), 1, "one module for the three filters: {urls:?}");
}
