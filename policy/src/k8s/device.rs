//! Devices outside the clusters (a laptop, a VM running `keyway agent`), declared as Istio
//! `WorkloadEntry` objects (`networking.istio.io/v1`, `v1beta1` or `v1alpha3`): the resource Istio
//! itself uses for a workload outside Kubernetes. Each becomes a [`Workload`] of kind
//! `WorkloadEntry`, which policies select as they select pods.
//!
//! Read: `metadata.name`/`namespace`; `spec.labels` (what Istio selects a WorkloadEntry by;
//! `metadata.labels` only when `spec.labels` is absent); `spec.serviceAccount` (the identity
//! `spiffe://<td>/ns/<namespace>/sa/<service account>` its certificate names, `default` when
//! unset); `spec.ports` (name → number, TCP named ports); the annotations `keyway.io/zone` (the
//! zone whose edge gateways the device connects to) and `keyway.io/overlay-ips` (its overlay
//! addresses), both required. `spec.address` is ignored: a roaming device has no fixed address,
//! and the gateway learns where it is from its QUIC connection.

use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;

use super::{RawMeta, decode};
use crate::error::{LoadError, Origin};
use crate::inventory::{ContainerPort, OVERLAY_IPS_ANNOTATION, Workload, ZONE_ANNOTATION};
use crate::ports::Protocol;
use crate::selector::Labels;

/// The kind of a device's workload.
pub(crate) const KIND: &str = "WorkloadEntry";
/// The API versions of `WorkloadEntry` keyway reads.
pub(crate) const API_VERSIONS: [&str; 3] =
    ["networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"];

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawWorkloadEntry {
    metadata: RawMeta,
    spec: RawSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct RawSpec {
    labels: Option<Labels>,
    service_account: Option<String>,
    ports: Option<BTreeMap<String, i64>>,
}

/// A `WorkloadEntry` in `namespace` as a device's workload; an unknown API version or a missing
/// keyway annotation is an error naming the field.
pub(crate) fn workload_entry(value: Value, origin: &Origin, namespace: &str) -> Result<Workload, LoadError> {
    let api_version = value.get("apiVersion").and_then(Value::as_str).unwrap_or_default().to_owned();
    if !API_VERSIONS.contains(&api_version.as_str()) {
        return Err(origin.invalid(
            "apiVersion",
            format!("{api_version:?}: a device is an Istio WorkloadEntry of {}", API_VERSIONS.join(", ")),
        ));
    }
    let raw: RawWorkloadEntry = decode(value, origin)?;
    let annotations = raw.metadata.annotations.unwrap_or_default();
    let required = |key: &str, what: &str| {
        annotations.get(key).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty()).ok_or_else(|| {
            origin.invalid(
                format!("metadata.annotations.{key}"),
                format!("missing: a device's WorkloadEntry needs {what}"),
            )
        })
    };
    let zone = required(ZONE_ANNOTATION, "the zone whose edge gateways it connects to")?;
    let ips = required(OVERLAY_IPS_ANNOTATION, "its overlay addresses (comma-separated, such as 10.30.0.7)")?;
    let overlay_ips = super::workload::ip_list(origin, OVERLAY_IPS_ANNOTATION, &ips)?;
    let mut ports = Vec::new();
    for (name, number) in raw.spec.ports.unwrap_or_default() {
        let port = u16::try_from(number)
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| origin.invalid(format!("spec.ports.{name}"), format!("{number} is not a port (1-65535)")))?;
        ports.push(ContainerPort { name: Some(name), port, protocol: Protocol::Tcp });
    }
    Ok(Workload {
        namespace: namespace.to_owned(),
        name: raw.metadata.name,
        kind: KIND.to_owned(),
        labels: raw.spec.labels.or(raw.metadata.labels).unwrap_or_default(),
        ports,
        service_account: raw.spec.service_account.filter(|s| !s.is_empty()).unwrap_or_else(|| "default".to_owned()),
        zone: Some(zone),
        overlay_ips,
        sidecar_ips: Vec::new(),
        file: origin.file.clone(),
        label_variants: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{SourceFile, load};
    use std::net::IpAddr;

    fn load_text(text: &str) -> Result<crate::manifest::Manifests, LoadError> {
        load(&[SourceFile { path: "devices.yaml".to_owned(), text: text.to_owned() }])
    }

    const LAPTOP: &str = r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: laptop-7
  namespace: field
  labels: {ignored: "yes"}
  annotations: {keyway.io/zone: zone-a, keyway.io/overlay-ips: "10.30.0.7, fd00::30:7"}
spec:
  address: 192.0.2.9
  labels: {app: field-laptop, team: ops}
  serviceAccount: laptop-7
  ports: {ssh: 22, http: 8080}
"#;

    #[test]
    fn a_workload_entry_is_a_device_workload() {
        let m = load_text(LAPTOP).unwrap();
        let w = &m.inventory.workloads[0];
        assert_eq!(w.display_name(), "field/laptop-7[WorkloadEntry]");
        assert_eq!(w.labels, Labels::from([("app".into(), "field-laptop".into()), ("team".into(), "ops".into())]));
        assert_eq!(w.identity("cluster.local"), "spiffe://cluster.local/ns/field/sa/laptop-7");
        assert_eq!(w.zone.as_deref(), Some("zone-a"));
        assert_eq!(w.overlay_ips, ["10.30.0.7".parse::<IpAddr>().unwrap(), "fd00::30:7".parse().unwrap()]);
        assert!(w.sidecar_ips.is_empty(), "spec.address is not an address keyway uses");
        assert_eq!(w.named_port("http").map(|p| (p.port, p.protocol)), Some((8080, Protocol::Tcp)));
        assert_eq!(w.named_port("ssh").map(|p| p.port), Some(22));
        assert!(m.inventory.namespaces.contains_key("field"), "its namespace exists");

        // Without spec.labels, metadata.labels; without spec.serviceAccount, `default`.
        let bare = LAPTOP
            .replace("  labels: {app: field-laptop, team: ops}\n", "")
            .replace("  serviceAccount: laptop-7\n", "");
        let m = load_text(&bare).unwrap();
        let w = &m.inventory.workloads[0];
        assert_eq!(w.labels, Labels::from([("ignored".into(), "yes".into())]));
        assert_eq!(w.service_account, "default");
        for version in ["v1beta1", "v1alpha3"] {
            let m = load_text(&LAPTOP.replace("networking.istio.io/v1", &format!("networking.istio.io/{version}")));
            assert_eq!(m.unwrap().inventory.workloads[0].kind, "WorkloadEntry", "{version}");
        }
    }

    #[test]
    fn network_policies_select_a_device_as_they_select_pods() {
        let text = format!(
            "{LAPTOP}---\n{}",
            r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: api, namespace: shop}
spec: {template: {metadata: {labels: {app: api}}, spec: {containers: [{ports: [{name: http, containerPort: 8080}]}]}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: batch, namespace: shop}
spec: {template: {metadata: {labels: {app: batch}}}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api-from-field, namespace: shop}
spec:
  podSelector: {matchLabels: {app: api}}
  policyTypes: [Ingress]
  ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: field}}, podSelector: {matchLabels: {team: ops}}}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: laptop, namespace: field}
spec:
  podSelector: {matchLabels: {app: field-laptop}}
  policyTypes: [Ingress, Egress]
  ingress: [{from: [{namespaceSelector: {}, podSelector: {matchLabels: {app: batch}}}], ports: [{port: ssh}]}]
  egress: [{to: [{namespaceSelector: {}, podSelector: {matchLabels: {app: api}}}], ports: [{port: 8080}]}]
"#
        );
        let m = load_text(&text).unwrap();
        let engine = crate::Engine::compile(m.inventory, m.policies).unwrap();
        let lines = crate::connlist::render(&crate::connlist::connections(&engine), crate::connlist::Format::Txt);
        let device: Vec<&str> = lines.lines().filter(|l| l.contains("WorkloadEntry")).collect();
        assert_eq!(
            device,
            [
                "field/laptop-7[WorkloadEntry] => shop/api[Deployment] : TCP 8080",
                "shop/batch[Deployment] => field/laptop-7[WorkloadEntry] : TCP 22",
            ],
            "{lines}"
        );
    }

    #[test]
    fn a_device_without_zone_or_addresses_is_refused_naming_the_field() {
        let cases = [
            (
                LAPTOP.replace("keyway.io/zone: zone-a, ", ""),
                "devices.yaml: WorkloadEntry field/laptop-7: metadata.annotations.keyway.io/zone: missing: a device's WorkloadEntry needs the zone",
            ),
            (
                LAPTOP.replace(", keyway.io/overlay-ips: \"10.30.0.7, fd00::30:7\"", ""),
                "devices.yaml: WorkloadEntry field/laptop-7: metadata.annotations.keyway.io/overlay-ips: missing",
            ),
            (LAPTOP.replace("10.30.0.7,", "laptop,"), "keyway.io/overlay-ips: \"laptop\" is not an IP address"),
            (
                LAPTOP.replace("ssh: 22", "ssh: 70000"),
                "WorkloadEntry field/laptop-7: spec.ports.ssh: 70000 is not a port",
            ),
            (
                LAPTOP.replace("networking.istio.io/v1", "example.com/v1"),
                "apiVersion: \"example.com/v1\": a device is an Istio WorkloadEntry",
            ),
            (LAPTOP.replace("ssh: 22", "ssh: [22]"), "spec.ports.ssh: invalid type"),
        ];
        for (text, want) in cases {
            let err = load_text(&text).unwrap_err().to_string();
            assert!(err.contains(want), "got: {err}\nwant: {want}");
        }
        let twice = format!("{LAPTOP}---{LAPTOP}");
        let err = load_text(&twice).unwrap_err().to_string();
        assert!(err.contains("WorkloadEntry field/laptop-7: defined twice"), "{err}");
    }
}
