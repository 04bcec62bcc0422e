//! The Envoy configuration the end-to-end tests give their sidecars (`e2e/src/envoy.rs`,
//! `Sidecar::bootstrap`) is the one the EnvoyFilters and WasmPlugins of `istio/base` make Istio
//! produce, field for field: the outbound `tcp_proxy` with its tunnelling, the filter order, the
//! keyway inbound CONNECT listener, the clusters, and each mode's plugin configuration. A change
//! to one side without the other fails here.
//!
//! What legitimately differs, and is checked to differ only so: Istio delivers the wasm module
//! over ECDS (a `config_discovery` reference to the WasmPlugin) where the e2e bootstrap inlines it;
//! Istio reaches the gateways through their Service name (STRICT_DNS) where the e2e lists addresses
//! (STATIC); Istio's plain-inbound filter also exempts Istio's own ports 15020 and 15090.

use std::path::{Path, PathBuf};

use keyway_e2e::envoy::{KEYWAY_INBOUND_PORT, Sidecar};
use keyway_istio_check::Object;
use keyway_istio_check::render::{kubectl, render};
use serde_json::{Value, json};

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
        admin_port: keyway_gateway::config::DEFAULT_ADMIN_PORT,
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

fn wasm_plugin<'a>(objects: &'a [Object], ecds_name: &str) -> &'a Object {
    let (ns, name) =
        ecds_name.split_once('.').unwrap_or_else(|| panic!("ECDS name {ecds_name} is not <namespace>.<name>"));
    objects
        .iter()
        .find(|o| o.kind() == "WasmPlugin" && o.name() == name && o.namespace() == Some(ns))
        .unwrap_or_else(|| panic!("the ECDS reference {ecds_name} names no WasmPlugin"))
}

/// The e2e wasm filter's plugin configuration, as JSON.
fn inline_config(filter: &Value) -> Value {
    let config = &filter["typed_config"]["config"];
    assert_eq!(config["root_id"], "keyway");
    let text = config["configuration"]["value"].as_str().unwrap_or_else(|| panic!("no configuration in {filter}"));
    serde_json::from_str(text).unwrap_or_else(|e| panic!("e2e plugin configuration: {e}"))
}

/// An ECDS reference of the Istio side: the WasmPlugin it names, checked for type and module.
fn ecds_plugin<'a>(objects: &'a [Object], filter: &Value, wasm_type: &str, type_url: &str) -> &'a Object {
    let name = filter["name"].as_str().unwrap_or_default();
    assert_eq!(filter["config_discovery"]["type_urls"], json!([type_url]), "{name}");
    assert_eq!(filter["config_discovery"]["config_source"]["ads"], json!({}), "{name}: from Istio (ADS)");
    let wp = wasm_plugin(objects, name);
    assert_eq!(wp.value["spec"]["type"], wasm_type, "{}", wp.describe());
    assert_eq!(wp.value["spec"]["pluginName"], "keyway", "{}: root id as the e2e's", wp.describe());
    wp
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
    let wp = ecds_plugin(
        &objects,
        &istio_filters[0],
        "NETWORK",
        "type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm",
    );
    assert_eq!(wp.value["spec"]["match"], json!([{"mode": "CLIENT"}]));
    assert_eq!(wp.value["spec"]["pluginConfig"], inline_config(&e2e_filters[0]), "outbound pluginConfig");
    // 2. tcp_proxy, identical: cluster, retries, tunneling_config (hostname, x-keyway-token)
    assert_eq!(istio_filters[1], e2e_filters[1], "tcp_proxy of the overlay chain");
    let tunneling = &istio_filters[1]["typed_config"]["tunneling_config"];
    assert_eq!(tunneling["hostname"], "%DOWNSTREAM_LOCAL_ADDRESS%");
    assert_eq!(
        tunneling["headers_to_add"][0]["header"],
        json!({"key": "x-keyway-token", "value": "%FILTER_STATE(wasm.keyway_token:PLAIN)%"})
    );
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

#[test]
fn gateway_clusters_match_the_e2e_sidecar() {
    let objects = base();
    let boot = e2e_bootstrap();
    let clusters = &boot["static_resources"]["clusters"];
    let istio: Vec<&Value> =
        patches(&objects, "keyway-outbound", "CLUSTER").into_iter().map(|p| &p["patch"]["value"]).collect();
    for (name, port) in [
        ("keyway_gateway", keyway_gateway::config::DEFAULT_TUNNEL_PORT),
        ("keyway_keyservice", keyway_gateway::config::DEFAULT_ADMIN_PORT),
    ] {
        let e2e = named(clusters, name);
        let ours =
            istio.iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no cluster {name} in keyway-outbound"));
        for field in ["connect_timeout", "typed_extension_protocol_options"] {
            assert_eq!(ours[field], e2e[field], "cluster {name}: {field}");
        }
        // Addresses differ by design (Service name vs. test addresses); the port does not.
        assert_eq!(ours["type"], "STRICT_DNS");
        let ep = &ours["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"];
        assert_eq!(ep["address"], "keyway-gateway.keyway-system.svc.cluster.local");
        assert_eq!(ep["port_value"], u64::from(port), "cluster {name}");
        let e2e_port = &e2e["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
            ["port_value"];
        assert_eq!(ep["port_value"], *e2e_port, "cluster {name}: port as the e2e's");
    }
    // The key service cluster is the one the plugin configurations name.
    for wp in objects.iter().filter(|o| o.kind() == "WasmPlugin") {
        if let Some(c) = wp.value["spec"]["pluginConfig"]["key_service"]["cluster"].as_str() {
            assert_eq!(c, "keyway_keyservice", "{}", wp.describe());
        }
    }
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
    let hcm_ours = &ours["filter_chains"][0]["filters"][0];
    let hcm_e2e = &e2e["filter_chains"][0]["filters"][0];
    assert_eq!(hcm_ours["name"], hcm_e2e["name"]);
    for field in ["@type", "stat_prefix", "codec_type", "http2_protocol_options", "upgrade_configs"] {
        assert_eq!(hcm_ours["typed_config"][field], hcm_e2e["typed_config"][field], "HCM {field}");
    }
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
    let wp =
        ecds_plugin(&objects, &f_ours[0], "HTTP", "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm");
    assert_eq!(wp.value["spec"]["pluginConfig"], inline_config(&f_e2e[0]), "inbound_tunnel pluginConfig");
    assert_eq!(wp.value["spec"]["match"], json!([{"mode": "SERVER", "ports": [{"number": KEYWAY_INBOUND_PORT}]}]));
    assert_eq!(f_ours[1], f_e2e[1], "router");
}

#[test]
fn plain_inbound_matches_the_e2e_sidecar() {
    let objects = base();
    let boot = e2e_bootstrap();
    let e2e = named(&boot["static_resources"]["listeners"], "inbound_plain");
    let e2e_cfg = inline_config(&e2e["filter_chains"][0]["filters"][0]);
    let wp = objects
        .iter()
        .find(|o| o.kind() == "WasmPlugin" && o.value["spec"]["pluginConfig"]["mode"] == "inbound_plain")
        .unwrap_or_else(|| panic!("no inbound_plain WasmPlugin"));
    assert_eq!(wp.value["spec"]["type"], "NETWORK");
    assert_eq!(wp.value["spec"]["match"], json!([{"mode": "SERVER"}]));
    let ours = &wp.value["spec"]["pluginConfig"];
    let mut extra: Vec<u64> = ours["exempt_ports"].as_array().into_iter().flatten().filter_map(Value::as_u64).collect();
    for p in e2e_cfg["exempt_ports"].as_array().into_iter().flatten().filter_map(Value::as_u64) {
        assert!(extra.contains(&p), "the e2e exempts port {p}, Istio does not");
        extra.retain(|x| *x != p);
    }
    assert_eq!(extra, vec![15020, 15090], "Istio exempts exactly its own ports beyond the e2e's");
    let mut rest = ours.clone();
    let mut e2e_rest = e2e_cfg.clone();
    for v in [&mut rest, &mut e2e_rest] {
        if let Some(m) = v.as_object_mut() {
            m.remove("exempt_ports");
        }
    }
    assert_eq!(rest, e2e_rest, "inbound_plain pluginConfig apart from exempt_ports");
    // Every mode of the filter is deployed, each once, all from one module.
    let modes: Vec<&str> = objects
        .iter()
        .filter(|o| o.kind() == "WasmPlugin")
        .filter_map(|o| o.value["spec"]["pluginConfig"]["mode"].as_str())
        .collect();
    assert_eq!(modes.len(), 3);
    for m in ["outbound", "inbound_tunnel", "inbound_plain"] {
        assert!(modes.contains(&m), "no WasmPlugin of mode {m}");
    }
    let urls: std::collections::BTreeSet<&str> =
        objects.iter().filter(|o| o.kind() == "WasmPlugin").filter_map(|o| o.value["spec"]["url"].as_str()).collect();
    assert_eq!(urls.len(), 1, "one module for the three filters: {urls:?}");
}
