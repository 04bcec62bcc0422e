use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use keyway_gateway::config::MeshFiles;
use serde_json::{Value, json};

use super::{Addresses, BedSidecar, PodDump, convert};

const SDS: &str = r#"{"apiConfigSource":{"apiType":"GRPC","grpcServices":[{"envoyGrpc":{"clusterName":"sds-grpc"}}]},"initialFetchTimeout":"0s"}"#;

fn tls(kind: &str) -> Value {
    let sds: Value = serde_json::from_str(SDS).unwrap_or_default();
    json!({ "name": "envoy.transport_sockets.tls", "typedConfig": {
        "@type": format!("type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.{kind}"),
        "commonTlsContext": {
            "tlsCertificateSdsSecretConfigs": [{ "name": "default", "sdsConfig": sds }],
            "combinedValidationContext": { "validationContextSdsSecretConfig": { "name": "ROOTCA", "sdsConfig": sds } } } } })
}

fn ecds_ref(name: &str) -> Value {
    json!({ "name": name, "configDiscovery": { "configSource": { "ads": {} }, "typeUrls": ["type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm"] } })
}

fn metadata_exchange() -> Value {
    json!({ "name": "istio.metadata_exchange", "typedConfig": {
        "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
        "typeUrl": "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange", "value": {} } })
}

/// A pod as pilot would dump it, small: the 15006 chain with Istio's metadata exchange, the
/// keyway inbound listener with TLS, an EDS cluster and the DNS gateway cluster.
fn pod() -> PodDump {
    let plain = ecds_ref("keyway-inbound-plain");
    PodDump {
        dir: PathBuf::from("/dump/shop-cart-0"),
        lds: vec![
            json!({ "name": "virtualInbound", "filterChains": [
                { "name": "inbound|8080||", "filters": [plain, metadata_exchange(),
                    { "name": "envoy.filters.network.tcp_proxy", "typedConfig": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", "cluster": "x" } }] }] }),
            json!({ "name": "keyway_inbound", "filterChains": [{ "transportSocket": tls("DownstreamTlsContext"), "filters": [] }] }),
        ],
        cds: vec![
            json!({ "name": "outbound|8080||cart.shop.svc.cluster.local", "type": "EDS",
                "edsClusterConfig": { "edsConfig": { "ads": {} }, "serviceName": "outbound|8080||cart.shop.svc.cluster.local" },
                "filters": [metadata_exchange()] }),
            json!({ "name": "keyway_gateway", "type": "STRICT_DNS", "dnsRefreshRate": "5s", "transportSocket": tls("UpstreamTlsContext"),
                "loadAssignment": { "clusterName": "keyway_gateway", "endpoints": [{ "lbEndpoints": [{ "endpoint": { "address": {
                    "socketAddress": { "address": "keyway-gateway.keyway-system.svc.cluster.local", "portValue": 15180 } } } }] }] } }),
        ],
        rds: Vec::new(),
        eds: vec![
            json!({ "clusterName": "outbound|8080||cart.shop.svc.cluster.local", "endpoints": [{ "lbEndpoints": [
            { "endpoint": { "address": { "socketAddress": { "address": "10.244.0.11", "portValue": 8080 } } } }] }] }),
        ],
        ecds: vec![json!({ "name": "keyway-inbound-plain", "typedConfig": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm",
            "config": { "rootId": "keyway", "vmConfig": { "vmId": "keyway", "code": { "remote": { "httpUri": { "uri": "oci://x" } } } },
                "configuration": { "@type": "type.googleapis.com/google.protobuf.StringValue", "value": "{\"mode\":\"inbound_plain\"}" } } } })],
        node: json!({ "id": "sidecar~10.244.0.11~cart-0.shop~shop.svc.cluster.local", "cluster": "cart.shop",
            "metadata": { "NAMESPACE": "shop", "WORKLOAD_NAME": "cart", "INSTANCE_IPS": "10.244.0.11" } }),
    }
}

fn mesh() -> MeshFiles {
    MeshFiles { ca: "/m/ca.pem".into(), cert: "/m/cert.pem".into(), key: "/m/key.pem".into() }
}

fn addresses() -> Addresses {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap_or(IpAddr::from([0, 0, 0, 0]));
    let harness = BTreeMap::from([("shop/cart".to_owned(), ip("10.244.0.11"))]);
    let bed = BTreeMap::from([("shop/cart".to_owned(), ip("10.61.1.11"))]);
    Addresses::new(&harness, &bed).unwrap_or_default()
}

fn run(p: &PodDump) -> anyhow::Result<(Value, super::Report)> {
    let mesh = mesh();
    let gateways = ["10.61.1.2".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))];
    let addresses = addresses();
    let bed = BedSidecar {
        mesh: &mesh,
        wasm: Path::new("/bed/keyway_filter.wasm"),
        gateways: &gateways,
        tunnel_port: 15180,
        addresses: &addresses,
    };
    convert(p, &bed)
}

#[test]
fn converts_a_pod_into_a_static_bootstrap() {
    let (b, report) = run(&pod()).unwrap_or_else(|e| panic!("{e:#}"));
    let text = b.to_string();
    // ECDS inlined with the local module, the plugin configuration as served.
    let chain = &b["staticResources"]["listeners"][0]["filterChains"][0]["filters"];
    assert_eq!(chain[0]["name"], "keyway-inbound-plain");
    assert_eq!(chain[0]["typedConfig"]["config"]["vmConfig"]["code"]["local"]["filename"], "/bed/keyway_filter.wasm");
    assert_eq!(chain[0]["typedConfig"]["config"]["configuration"]["value"], "{\"mode\":\"inbound_plain\"}");
    // Istio's metadata exchange removed from the chain and the cluster, Istio's tcp_proxy kept.
    assert_eq!(chain.as_array().map(Vec::len), Some(2));
    assert_eq!(chain[1]["name"], "envoy.filters.network.tcp_proxy");
    assert_eq!(report.removed.get("type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange"), Some(&2));
    assert_eq!(report.keyway_filters.get("keyway-inbound-plain"), Some(&1));
    assert_eq!(report.tls_contexts, 2);
    // SDS: static secrets of the same names, from the bed's files.
    assert!(!text.contains("sdsConfig") && !text.contains("sds-grpc"), "{text}");
    let secrets = &b["staticResources"]["secrets"];
    assert_eq!(secrets[0]["name"], "default");
    assert_eq!(secrets[0]["tlsCertificate"]["privateKey"]["filename"], "/m/key.pem");
    assert_eq!(secrets[1]["validationContext"]["trustedCa"]["filename"], "/m/ca.pem");
    // Clusters static: EDS with the bed's pod address, the gateway cluster with the gateways.
    let clusters = &b["staticResources"]["clusters"];
    assert_eq!(clusters[0]["type"], "STATIC");
    assert_eq!(
        clusters[0]["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]["endpoint"]["address"]["socketAddress"]["address"],
        "10.61.1.11"
    );
    assert_eq!(clusters[0]["filters"], json!([]));
    assert_eq!(clusters[1]["type"], "STATIC");
    assert_eq!(
        clusters[1]["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]["endpoint"]["address"]["socketAddress"]["address"],
        "10.61.1.2"
    );
    assert!(clusters[1].get("dnsRefreshRate").is_none());
    // The node: the bed's address.
    assert_eq!(b["node"]["metadata"]["INSTANCE_IPS"], "10.61.1.11");
    assert_eq!(b["node"]["id"], "sidecar~10.61.1.11~cart-0.shop~shop.svc.cluster.local");
}

#[test]
fn refuses_what_it_cannot_carry_over() {
    // An ECDS name pilot does not serve.
    let mut p = pod();
    p.ecds.clear();
    assert!(format!("{:#}", run(&p).unwrap_err()).contains("not served over ECDS"));
    // An Istio-only extension not in the table.
    let mut p = pod();
    p.lds[0]["filterChains"][0]["filters"][1]["typedConfig"]["typeUrl"] =
        "type.googleapis.com/io.istio.new.Thing".into();
    assert!(format!("{:#}", run(&p).unwrap_err()).contains("not in ISTIO_ONLY"));
    // A secret istio-agent does not serve.
    let mut p = pod();
    p.lds[1]["filterChains"][0]["transportSocket"]["typedConfig"]["commonTlsContext"]["tlsCertificateSdsSecretConfigs"]
        [0]["name"] = "file-cert:/etc/certs/cert-chain.pem".into();
    assert!(format!("{:#}", run(&p).unwrap_err()).contains("SDS secret"));
    // The keyway inbound listener missing.
    let mut p = pod();
    p.lds.truncate(1);
    assert!(format!("{:#}", run(&p).unwrap_err()).contains("keyway_inbound"));
    // A DNS cluster of something else.
    let mut p = pod();
    p.cds[1]["name"] = "outbound|443||example.com".into();
    assert!(format!("{:#}", run(&p).unwrap_err()).contains("DNS cluster"));
}
