//! Namespaces, pods, workload resources and Services: decoding into the inventory's
//! [`Namespace`]s, [`Workload`]s and [`Service`]s.

use std::net::IpAddr;

use serde::Deserialize;
use serde_json::Value;

use super::{RawMeta, decode};
use crate::error::{LoadError, Origin};
use crate::inventory::{
    ContainerPort, NAMESPACE_NAME_LABEL, Namespace, OVERLAY_IPS_ANNOTATION, SIDECAR_IPS_ANNOTATION, Service, Workload,
    ZONE_ANNOTATION, ZONE_LABEL,
};
use crate::ports::Protocol;
use crate::selector::Labels;

/// The workload kinds whose pod template becomes a workload.
pub(crate) const WORKLOAD_KINDS: [&str; 7] =
    ["Deployment", "ReplicaSet", "ReplicationController", "StatefulSet", "DaemonSet", "Job", "CronJob"];

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct RawPodSpec {
    containers: Option<Vec<RawContainer>>,
    service_account_name: Option<String>,
    service_account: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawContainer {
    ports: Option<Vec<RawContainerPort>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct RawContainerPort {
    name: Option<String>,
    container_port: Option<i64>,
    protocol: Option<String>,
}

/// A pod template, and a Pod (which has the same fields as far as keyway reads it).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawTemplate {
    metadata: RawMeta,
    spec: RawPodSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct RawWorkloadSpec {
    template: Option<RawTemplate>,
    job_template: Option<RawJobTemplate>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawJobTemplate {
    spec: RawJobSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawJobSpec {
    template: Option<RawTemplate>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawWorkloadObject {
    metadata: RawMeta,
    spec: RawWorkloadSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawService {
    metadata: RawMeta,
    spec: RawServiceSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawServiceSpec {
    selector: Option<Labels>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawNamespace {
    metadata: RawMeta,
}

/// A Namespace, with its `kubernetes.io/metadata.name` label and its zone label (from the
/// `keyway.io/zone` annotation).
pub(crate) fn namespace(value: Value, origin: &Origin) -> Result<Namespace, LoadError> {
    let raw: RawNamespace = decode(value, origin)?;
    let mut labels = raw.metadata.labels.unwrap_or_default();
    labels.entry(NAMESPACE_NAME_LABEL.to_owned()).or_insert_with(|| raw.metadata.name.clone());
    if let Some(zone) = raw.metadata.annotations.as_ref().and_then(|a| a.get(ZONE_ANNOTATION)) {
        labels.insert(ZONE_LABEL.to_owned(), zone.clone());
    }
    Ok(Namespace { name: raw.metadata.name, labels })
}

/// A Pod in `namespace` as the workload it belongs to (its controller owner, or itself), with the
/// pod's name; `None` for pods keyway leaves out (KubeVirt's `virt-launcher-*`).
pub(crate) fn pod(value: Value, origin: &Origin, namespace: &str) -> Result<Option<(Workload, String)>, LoadError> {
    let raw: RawTemplate = decode(value, origin)?;
    if raw.metadata.name.starts_with("virt-launcher-") {
        return Ok(None);
    }
    let owner = raw.metadata.owner_references.iter().flatten().find(|o| o.controller == Some(true));
    let (wname, wkind) = match owner {
        Some(o) if o.kind.as_deref() != Some("Node") => {
            (o.name.clone(), o.kind.clone().unwrap_or_else(|| "Pod".to_owned()))
        }
        _ => (raw.metadata.name.clone(), "Pod".to_owned()),
    };
    let w = workload_from(origin, namespace, (wname, wkind), &raw, &raw.metadata)?;
    Ok(Some((w, raw.metadata.name)))
}

/// A workload resource of `kind` (one of [`WORKLOAD_KINDS`]) in `namespace`, from its pod
/// template, with a name for its template in messages.
pub(crate) fn workload(
    kind: &str,
    value: Value,
    origin: &Origin,
    namespace: &str,
) -> Result<(Workload, String), LoadError> {
    let raw: RawWorkloadObject = decode(value, origin)?;
    let template =
        if kind == "CronJob" { raw.spec.job_template.and_then(|j| j.spec.template) } else { raw.spec.template };
    let template = template.unwrap_or_default();
    let w = workload_from(origin, namespace, (raw.metadata.name.clone(), kind.to_owned()), &template, &raw.metadata)?;
    Ok((w, format!("{}/{} (template)", kind, raw.metadata.name)))
}

/// A Service in `namespace` with overlay addresses (`keyway.io/overlay-ips`); `None` for the
/// Services without them, which keyway does not read (and so does not decode).
pub(crate) fn service(value: Value, origin: &Origin, namespace: &str) -> Result<Option<Service>, LoadError> {
    let annotated =
        value.get("metadata").and_then(|m| m.get("annotations")).and_then(|a| a.get(OVERLAY_IPS_ANNOTATION));
    if annotated.is_none() {
        return Ok(None);
    }
    let raw: RawService = decode(value, origin)?;
    let Some(list) = raw.metadata.annotations.as_ref().and_then(|a| a.get(OVERLAY_IPS_ANNOTATION)) else {
        return Ok(None);
    };
    let overlay_ips = ip_list(origin, OVERLAY_IPS_ANNOTATION, list)?;
    Ok(Some(Service {
        namespace: namespace.to_owned(),
        name: raw.metadata.name,
        overlay_ips,
        selector: raw.spec.selector.unwrap_or_default(),
        file: origin.file.clone(),
    }))
}

/// The workload `(name, kind)` in `namespace` whose pods are `pod`; keyway's annotations are read
/// from the pod, then from `object_meta` (the workload resource's own metadata).
fn workload_from(
    origin: &Origin,
    namespace: &str,
    (name, kind): (String, String),
    pod: &RawTemplate,
    object_meta: &RawMeta,
) -> Result<Workload, LoadError> {
    let (pod_meta, spec) = (&pod.metadata, &pod.spec);
    let mut ports = Vec::new();
    for (ci, c) in spec.containers.iter().flatten().enumerate() {
        for (pi, p) in c.ports.iter().flatten().enumerate() {
            let field = format!("spec.containers[{ci}].ports[{pi}]");
            // A port without a number (a misspelt `containerPort`) does not exist, as upstream.
            let Some(number) = p.container_port else { continue };
            let port = u16::try_from(number).ok().filter(|n| *n >= 1).ok_or_else(|| {
                origin.invalid(format!("{field}.containerPort"), format!("{number} is not a port (1-65535)"))
            })?;
            let protocol = match p.protocol.as_deref() {
                None | Some("") => Protocol::Tcp,
                Some(s) => Protocol::parse(s).ok_or_else(|| {
                    origin.invalid(
                        format!("{field}.protocol"),
                        format!("unknown protocol {s:?}; expected TCP, UDP or SCTP"),
                    )
                })?,
            };
            ports.push(ContainerPort { name: p.name.clone().filter(|n| !n.is_empty()), port, protocol });
        }
    }
    let annotation = |key: &str| {
        pod_meta
            .annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .or_else(|| object_meta.annotations.as_ref().and_then(|a| a.get(key)))
            .cloned()
    };
    let annotated_ips = |key: &str| annotation(key).map_or(Ok(Vec::new()), |list| ip_list(origin, key, &list));
    let overlay_ips = annotated_ips(OVERLAY_IPS_ANNOTATION)?;
    let sidecar_ips = annotated_ips(SIDECAR_IPS_ANNOTATION)?;
    let service_account = spec
        .service_account_name
        .clone()
        .or_else(|| spec.service_account.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_owned());
    Ok(Workload {
        namespace: namespace.to_owned(),
        name,
        kind,
        labels: pod_meta.labels.clone().unwrap_or_default(),
        ports,
        service_account,
        zone: annotation(ZONE_ANNOTATION),
        overlay_ips,
        sidecar_ips,
        file: origin.file.clone(),
        label_variants: Vec::new(),
    })
}

/// The addresses of annotation `key` of an object: a comma-separated list (`10.10.1.5,fd00::5`).
pub(crate) fn ip_list(origin: &Origin, key: &str, list: &str) -> Result<Vec<IpAddr>, LoadError> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|part| {
            part.parse::<IpAddr>().map_err(|_| {
                origin.invalid(
                    format!("metadata.annotations.{key}"),
                    format!("{part:?} is not an IP address; expected a comma-separated list such as 10.10.1.5,fd00::5"),
                )
            })
        })
        .collect()
}
