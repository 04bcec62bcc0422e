//! AdminNetworkPolicy and BaselineAdminNetworkPolicy (`policy.networking.k8s.io/v1alpha1`):
//! decoding and validation into [`AdminPolicy`] and [`BaselinePolicy`].

use serde::Deserialize;
use serde_json::Value;

use super::selector::{RawSelector, selector_at};
use super::{RawMeta, decode};
use crate::error::{LoadError, Origin, Warning};
use crate::ip::{IpSet, parse_cidr};
use crate::policy::admin::{AdminAction, AdminPeer, AdminPolicy, AdminRule, BaselinePolicy, MAX_PRIORITY, Subject};
use crate::policy::{Direction, IpPeer, PortSpec};
use crate::ports::Protocol;

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawAdmin {
    metadata: RawMeta,
    spec: RawSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawSpec {
    priority: Option<i64>,
    subject: Option<RawSubject>,
    ingress: Option<Vec<RawRule>>,
    egress: Option<Vec<RawRule>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawSubject {
    namespaces: Option<RawSelector>,
    pods: Option<RawNamespacedPod>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct RawNamespacedPod {
    namespace_selector: Option<RawSelector>,
    pod_selector: Option<RawSelector>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawRule {
    name: String,
    action: String,
    from: Option<Vec<RawPeer>>,
    to: Option<Vec<RawPeer>>,
    ports: Option<Vec<RawPort>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawPeer {
    namespaces: Option<RawSelector>,
    pods: Option<RawNamespacedPod>,
    networks: Option<Vec<String>>,
    nodes: Option<RawSelector>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct RawPort {
    port_number: Option<RawPortNumber>,
    port_range: Option<RawPortRange>,
    named_port: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawPortNumber {
    protocol: Option<String>,
    port: i64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawPortRange {
    protocol: Option<String>,
    start: i64,
    end: i64,
}

/// Decodes and validates an AdminNetworkPolicy.
pub(crate) fn parse_admin(
    value: Value,
    origin: &Origin,
    warnings: &mut Vec<Warning>,
) -> Result<AdminPolicy, LoadError> {
    let raw: RawAdmin = decode(value, origin)?;
    let priority = match raw.spec.priority {
        Some(p) if (0..=MAX_PRIORITY).contains(&p) => p as u32,
        Some(p) => {
            return Err(origin.invalid("spec.priority", format!("{p} is out of range: expected 0 to {MAX_PRIORITY}")));
        }
        None => {
            return Err(origin.invalid("spec.priority", format!("missing: expected a number from 0 to {MAX_PRIORITY}")));
        }
    };
    let (subject, ingress, egress) = common(&raw.spec, origin, true, warnings)?;
    Ok(AdminPolicy { name: raw.metadata.name, file: origin.file.clone(), priority, subject, ingress, egress })
}

/// Decodes and validates a BaselineAdminNetworkPolicy.
pub(crate) fn parse_baseline(
    value: Value,
    origin: &Origin,
    warnings: &mut Vec<Warning>,
) -> Result<BaselinePolicy, LoadError> {
    let raw: RawAdmin = decode(value, origin)?;
    if raw.metadata.name != "default" {
        return Err(origin.invalid(
            "metadata.name",
            format!(
                "{:?}: the BaselineAdminNetworkPolicy is a singleton and must be named \"default\"",
                raw.metadata.name
            ),
        ));
    }
    let (subject, ingress, egress) = common(&raw.spec, origin, false, warnings)?;
    Ok(BaselinePolicy { file: origin.file.clone(), subject, ingress, egress })
}

type Parts = (Subject, Vec<AdminRule>, Vec<AdminRule>);

fn common(spec: &RawSpec, origin: &Origin, admin: bool, warnings: &mut Vec<Warning>) -> Result<Parts, LoadError> {
    let subject = match &spec.subject {
        None => return Err(origin.invalid("spec.subject", "missing: expected namespaces or pods")),
        Some(RawSubject { namespaces: Some(n), pods: None }) => {
            Subject::Namespaces(selector_at(Some(n), origin, "spec.subject.namespaces")?)
        }
        Some(RawSubject { namespaces: None, pods: Some(p) }) => Subject::Pods {
            namespaces: selector_at(p.namespace_selector.as_ref(), origin, "spec.subject.pods.namespaceSelector")?,
            pods: selector_at(p.pod_selector.as_ref(), origin, "spec.subject.pods.podSelector")?,
        },
        Some(_) => return Err(origin.invalid("spec.subject", "expected exactly one of namespaces or pods")),
    };
    let mut ingress = Vec::new();
    for (i, r) in spec.ingress.iter().flatten().enumerate() {
        ingress.push(rule(r, origin, &format!("spec.ingress[{i}]"), Direction::Ingress, admin, warnings)?);
    }
    let mut egress = Vec::new();
    for (i, r) in spec.egress.iter().flatten().enumerate() {
        egress.push(rule(r, origin, &format!("spec.egress[{i}]"), Direction::Egress, admin, warnings)?);
    }
    Ok((subject, ingress, egress))
}

fn rule(
    r: &RawRule,
    origin: &Origin,
    field: &str,
    direction: Direction,
    admin: bool,
    warnings: &mut Vec<Warning>,
) -> Result<AdminRule, LoadError> {
    let action = match (r.action.as_str(), admin) {
        ("Allow", _) => AdminAction::Allow,
        ("Deny", _) => AdminAction::Deny,
        ("Pass", true) => AdminAction::Pass,
        (other, true) => {
            return Err(origin.invalid(format!("{field}.action"), format!("{other:?}: expected Allow, Deny or Pass")));
        }
        (other, false) => {
            return Err(origin
                .invalid(format!("{field}.action"), format!("{other:?}: a baseline rule's action is Allow or Deny")));
        }
    };
    let (peers_field, raw_peers, other) = match direction {
        Direction::Ingress => ("from", &r.from, &r.to),
        Direction::Egress => ("to", &r.to, &r.from),
    };
    if other.is_some() {
        let wrong = if direction == Direction::Ingress { "to" } else { "from" };
        return Err(origin.invalid(format!("{field}.{wrong}"), format!("not allowed in an {} rule", direction.field())));
    }
    let raw_peers = raw_peers.as_deref().unwrap_or_default();
    if raw_peers.is_empty() {
        return Err(origin.invalid(format!("{field}.{peers_field}"), "missing: a rule needs at least one peer"));
    }
    let mut peers = Vec::new();
    for (j, p) in raw_peers.iter().enumerate() {
        let pf = format!("{field}.{peers_field}[{j}]");
        let set = [p.namespaces.is_some(), p.pods.is_some(), p.networks.is_some(), p.nodes.is_some()];
        if set.iter().filter(|b| **b).count() != 1 {
            return Err(origin.invalid(pf, "expected exactly one of namespaces, pods, networks or nodes"));
        }
        if direction == Direction::Ingress && (p.networks.is_some() || p.nodes.is_some()) {
            return Err(origin.invalid(pf, "networks and nodes peers are for egress rules only"));
        }
        let peer = if let Some(n) = &p.namespaces {
            AdminPeer::Namespaces(selector_at(Some(n), origin, &format!("{pf}.namespaces"))?)
        } else if let Some(pods) = &p.pods {
            AdminPeer::Pods {
                namespaces: selector_at(
                    pods.namespace_selector.as_ref(),
                    origin,
                    &format!("{pf}.pods.namespaceSelector"),
                )?,
                pods: selector_at(pods.pod_selector.as_ref(), origin, &format!("{pf}.pods.podSelector"))?,
            }
        } else if let Some(networks) = &p.networks {
            let mut set = IpSet::empty();
            let mut text = Vec::new();
            for (k, c) in networks.iter().enumerate() {
                let cidr = parse_cidr(c).map_err(|e| origin.invalid(format!("{pf}.networks[{k}]"), e))?;
                if !cidr.v4 {
                    warnings.push(origin.warning(
                        format!("{pf}.networks[{k}]"),
                        format!("IPv6 network {c} is ignored: keyway's connectivity model covers IPv4 networks only"),
                    ));
                    continue;
                }
                set = union(&set, cidr.range);
                text.push(c.clone());
            }
            AdminPeer::Networks(IpPeer { set, text: text.join(", ") })
        } else {
            warnings.push(
                origin
                    .warning(format!("{pf}.nodes"), "nodes peers match nothing: keyway does not track node addresses"),
            );
            AdminPeer::Nodes
        };
        peers.push(peer);
    }
    let ports = match &r.ports {
        None => None,
        Some(list) => {
            let mut out = Vec::new();
            for (j, p) in list.iter().enumerate() {
                out.push(port(p, origin, &format!("{field}.ports[{j}]"))?);
            }
            Some(out)
        }
    };
    Ok(AdminRule { name: r.name.clone(), action, peers, ports })
}

fn union(set: &IpSet, r: crate::ip::Range) -> IpSet {
    // set ∪ r = (set − r) + r, kept sorted.
    let mut ranges: Vec<crate::ip::Range> = set.subtract_range(r).ranges().to_vec();
    ranges.push(r);
    ranges.sort();
    ranges.into_iter().fold(IpSet::empty(), |acc, x| {
        let mut v = acc.ranges().to_vec();
        match v.last_mut() {
            Some(last) if last.last.checked_add(1).is_some_and(|n| n >= x.first) => last.last = last.last.max(x.last),
            _ => v.push(x),
        }
        IpSet::from_sorted(v)
    })
}

fn port(p: &RawPort, origin: &Origin, field: &str) -> Result<PortSpec, LoadError> {
    let proto = |s: &Option<String>, f: &str| -> Result<Protocol, LoadError> {
        match s.as_deref() {
            None => Ok(Protocol::Tcp),
            Some(s) => Protocol::parse(s).ok_or_else(|| {
                origin.invalid(
                    format!("{field}.{f}.protocol"),
                    format!("unknown protocol {s:?}; expected TCP, UDP or SCTP"),
                )
            }),
        }
    };
    let number = |n: i64, f: &str| -> Result<u16, LoadError> {
        u16::try_from(n)
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| origin.invalid(format!("{field}.{f}"), format!("{n} is not a port (1-65535)")))
    };
    match (&p.port_number, &p.port_range, &p.named_port) {
        (Some(n), None, None) => {
            let port = number(n.port, "portNumber.port")?;
            Ok(PortSpec::Numbers { protocol: proto(&n.protocol, "portNumber")?, first: port, last: port })
        }
        (None, Some(r), None) => {
            let first = number(r.start, "portRange.start")?;
            let last = number(r.end, "portRange.end")?;
            if last < first {
                return Err(origin.invalid(
                    format!("{field}.portRange"),
                    format!("empty range: end {last} is less than start {first}"),
                ));
            }
            Ok(PortSpec::Numbers { protocol: proto(&r.protocol, "portRange")?, first, last })
        }
        (None, None, Some(name)) => {
            super::netpol::validate_port_name(name).map_err(|e| origin.invalid(format!("{field}.namedPort"), e))?;
            Ok(PortSpec::Named { protocol: None, name: name.clone() })
        }
        _ => Err(origin.invalid(field, "expected exactly one of portNumber, portRange or namedPort")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anp(spec: &str) -> Result<AdminPolicy, LoadError> {
        let text = format!("{{\"kind\":\"AdminNetworkPolicy\",\"metadata\":{{\"name\":\"a\"}},\"spec\":{spec}}}");
        let origin = Origin::object("anp.yaml", "AdminNetworkPolicy", None, "a");
        parse_admin(serde_json::from_str(&text).unwrap(), &origin, &mut Vec::new())
    }

    #[test]
    fn parses_rules_and_ports() {
        let a = anp(r#"{"priority":5,"subject":{"pods":{"podSelector":{"matchLabels":{"app":"x"}}}},
            "ingress":[{"name":"r","action":"Pass","from":[{"namespaces":{}}],
              "ports":[{"portNumber":{"port":80}},{"portRange":{"protocol":"UDP","start":5000,"end":6000}},{"namedPort":"web"}]}],
            "egress":[{"name":"e","action":"Deny","to":[{"networks":["10.0.0.0/8","2001:db8::/32"]},{"nodes":{}}]}]}"#)
        .unwrap();
        assert_eq!(a.priority, 5);
        assert!(matches!(&a.subject, Subject::Pods { namespaces, .. } if namespaces.is_everything()));
        assert_eq!(a.ingress[0].action, AdminAction::Pass);
        assert_eq!(a.ingress[0].ports.as_ref().map(Vec::len), Some(3));
        assert!(matches!(&a.egress[0].peers[0], AdminPeer::Networks(ip) if ip.text == "10.0.0.0/8"));
        assert!(matches!(a.egress[0].peers[1], AdminPeer::Nodes));
    }

    #[test]
    fn rejected_inputs() {
        let cases = [
            (r#"{"priority":1001,"subject":{"namespaces":{}}}"#, "spec.priority", "out of range"),
            (r#"{"subject":{"namespaces":{}}}"#, "spec.priority", "missing"),
            (r#"{"priority":1}"#, "spec.subject", "missing"),
            (r#"{"priority":1,"subject":{"namespaces":{},"pods":{}}}"#, "spec.subject", "exactly one"),
            (
                r#"{"priority":1,"subject":{"namespaces":{}},"ingress":[{"action":"Drop","from":[{"namespaces":{}}]}]}"#,
                "spec.ingress[0].action",
                "expected Allow",
            ),
            (
                r#"{"priority":1,"subject":{"namespaces":{}},"ingress":[{"action":"Allow"}]}"#,
                "spec.ingress[0].from",
                "at least one peer",
            ),
            (
                r#"{"priority":1,"subject":{"namespaces":{}},"ingress":[{"action":"Allow","from":[{"networks":["1.0.0.0/8"]}]}]}"#,
                "spec.ingress[0].from[0]",
                "egress rules only",
            ),
            (
                r#"{"priority":1,"subject":{"namespaces":{}},"egress":[{"action":"Allow","to":[{"networks":["1.0.0.0/88"]}]}]}"#,
                "spec.egress[0].to[0].networks[0]",
                "prefix length",
            ),
            (
                r#"{"priority":1,"subject":{"namespaces":{}},"egress":[{"action":"Allow","to":[{"namespaces":{}}],"ports":[{"portRange":{"start":9,"end":8}}]}]}"#,
                "spec.egress[0].ports[0].portRange",
                "empty range",
            ),
            (
                r#"{"priority":1,"subject":{"namespaces":{}},"egress":[{"action":"Allow","to":[{"namespaces":{}}],"ports":[{}]}]}"#,
                "spec.egress[0].ports[0]",
                "exactly one",
            ),
        ];
        for (spec, field, what) in cases {
            let err = anp(spec).unwrap_err().to_string();
            let want = format!("anp.yaml: AdminNetworkPolicy a: {field}: ");
            assert!(err.starts_with(&want) && err.contains(what), "{spec}\n got: {err}\nwant: {want}…{what}");
        }
    }

    #[test]
    fn baseline_must_be_default_and_cannot_pass() {
        let origin = Origin::object("b.yaml", "BaselineAdminNetworkPolicy", None, "x");
        let v = serde_json::json!({"kind":"BaselineAdminNetworkPolicy","metadata":{"name":"x"},"spec":{"subject":{"namespaces":{}}}});
        let err = parse_baseline(v, &origin, &mut Vec::new()).unwrap_err().to_string();
        assert!(err.contains("metadata.name") && err.contains("must be named \"default\""), "{err}");
        let v = serde_json::json!({"metadata":{"name":"default"},"spec":{"subject":{"namespaces":{}},
            "ingress":[{"action":"Pass","from":[{"namespaces":{}}]}]}});
        let err = parse_baseline(v, &origin, &mut Vec::new()).unwrap_err().to_string();
        assert!(err.contains("spec.ingress[0].action"), "{err}");
    }
}
