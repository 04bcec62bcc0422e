//! Who this workload is: from the configuration, else the static key bundle, else Istio's node
//! metadata (`NAMESPACE`, `SERVICE_ACCOUNT`, the pod annotation `keyway.io/overlay-ips`, then
//! `INSTANCE_IPS`).

use std::net::IpAddr;

use crate::config::{KeySource, Settings};

/// The pod annotation that carries a workload's overlay addresses (comma-separated).
pub use keyway_policy::inventory::OVERLAY_IPS_ANNOTATION;

/// What the host tells about the node (Istio: `node.metadata.*`); each field as read, if present.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeMetadata {
    /// `node.metadata.NAMESPACE`.
    pub namespace: Option<String>,
    /// `node.metadata.SERVICE_ACCOUNT`.
    pub service_account: Option<String>,
    /// `node.metadata.ANNOTATIONS["keyway.io/overlay-ips"]`.
    pub overlay_ips_annotation: Option<String>,
    /// `node.metadata.INSTANCE_IPS` (comma-separated).
    pub instance_ips: Option<String>,
}

/// This workload's identity as the filter uses it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The SPIFFE id, when known (for logs and to check key bundles).
    pub spiffe: Option<String>,
    /// The overlay address: source of tokens, destination of tickets.
    pub overlay_ip: IpAddr,
}

/// Why no identity could be determined.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// Nothing gives the overlay address.
    #[error(
        "no overlay address: set `overlay_ip` in the plugin configuration or annotate the pod \
         with keyway.io/overlay-ips"
    )]
    NoOverlayIp,
    /// A metadata value that should be an address list is not.
    #[error("node metadata {field} = {value:?} does not start with an IP address")]
    BadAddress {
        /// Which metadata field.
        field: &'static str,
        /// Its value.
        value: String,
    },
}

/// Resolves the identity. Configuration first, then the static bundle, then node metadata.
pub fn resolve(settings: &Settings, meta: &NodeMetadata) -> Result<Identity, IdentityError> {
    let bundle = match &settings.keys {
        KeySource::Static(b) => Some(b.as_ref()),
        _ => None,
    };
    let spiffe = settings.identity.clone().or_else(|| bundle.map(|b| b.identity.clone())).or_else(|| {
        match (&meta.namespace, &meta.service_account) {
            (Some(ns), Some(sa)) if !ns.is_empty() && !sa.is_empty() => {
                Some(format!("spiffe://{}/ns/{ns}/sa/{sa}", settings.trust_domain))
            }
            _ => None,
        }
    });
    let overlay_ip = match settings.overlay_ip.or_else(|| bundle.map(|b| b.overlay_ip)) {
        Some(ip) => ip,
        None => match (&meta.overlay_ips_annotation, &meta.instance_ips) {
            (Some(list), _) => first_ip(list, "ANNOTATIONS[keyway.io/overlay-ips]")?,
            (None, Some(list)) => first_ip(list, "INSTANCE_IPS")?,
            (None, None) => return Err(IdentityError::NoOverlayIp),
        },
    };
    Ok(Identity { spiffe, overlay_ip: overlay_ip.to_canonical() })
}

fn first_ip(list: &str, field: &'static str) -> Result<IpAddr, IdentityError> {
    list.split(',')
        .next()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| IdentityError::BadAddress { field, value: list.to_owned() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;

    fn meta() -> NodeMetadata {
        NodeMetadata {
            namespace: Some("shop".into()),
            service_account: Some("cart".into()),
            overlay_ips_annotation: None,
            instance_ips: Some("10.244.0.5,fd00::5".into()),
        }
    }

    #[test]
    fn from_node_metadata() {
        let s = parse(br#"{"mode":"outbound","trust_domain":"td","key_service":{"cluster":"gw"}}"#).unwrap();
        let id = resolve(&s, &meta()).unwrap();
        assert_eq!(id.spiffe.as_deref(), Some("spiffe://td/ns/shop/sa/cart"));
        assert_eq!(id.overlay_ip, "10.244.0.5".parse::<IpAddr>().unwrap());
        let annotated = NodeMetadata { overlay_ips_annotation: Some("10.128.0.9, fd00::9".into()), ..meta() };
        assert_eq!(resolve(&s, &annotated).unwrap().overlay_ip, "10.128.0.9".parse::<IpAddr>().unwrap());
        assert_eq!(resolve(&s, &NodeMetadata::default()), Err(IdentityError::NoOverlayIp));
        let bad = NodeMetadata { instance_ips: Some("pod".into()), ..NodeMetadata::default() };
        assert!(matches!(resolve(&s, &bad), Err(IdentityError::BadAddress { field: "INSTANCE_IPS", .. })));
        let no_sa = NodeMetadata { service_account: None, ..meta() };
        assert_eq!(resolve(&s, &no_sa).unwrap().spiffe, None);
    }

    #[test]
    fn configuration_wins() {
        let s = parse(
            br#"{"mode":"outbound","identity":"spiffe://x/ns/a/sa/b","overlay_ip":"::ffff:10.1.1.1",
                 "key_service":{"cluster":"gw"}}"#,
        )
        .unwrap();
        let id = resolve(&s, &meta()).unwrap();
        assert_eq!(id.spiffe.as_deref(), Some("spiffe://x/ns/a/sa/b"));
        // v4-mapped addresses are canonicalised to IPv4.
        assert_eq!(id.overlay_ip, "10.1.1.1".parse::<IpAddr>().unwrap());
    }
}
