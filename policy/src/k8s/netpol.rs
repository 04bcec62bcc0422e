//! Kubernetes NetworkPolicy (`networking.k8s.io/v1`): decoding and validation into
//! [`NetworkPolicy`].

use serde::Deserialize;
use serde_json::Value;

use super::selector::{RawSelector, selector_at};
use super::{RawMeta, decode};
use crate::error::{LoadError, Origin, Warning};
use crate::ip::{IpSet, parse_cidr};
use crate::policy::netpol::{NetworkPolicy, Peer, Rule};
use crate::policy::{IpPeer, NamespaceMatch, PodPeer, PortSpec};
use crate::ports::Protocol;

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawNetworkPolicy {
    metadata: RawMeta,
    spec: RawSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct RawSpec {
    pod_selector: Option<RawSelector>,
    policy_types: Option<Vec<String>>,
    ingress: Option<Vec<RawIngress>>,
    egress: Option<Vec<RawEgress>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawIngress {
    from: Option<Vec<RawPeer>>,
    ports: Option<Vec<RawPort>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawEgress {
    to: Option<Vec<RawPeer>>,
    ports: Option<Vec<RawPort>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct RawPeer {
    pod_selector: Option<RawSelector>,
    namespace_selector: Option<RawSelector>,
    ip_block: Option<RawIpBlock>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawIpBlock {
    cidr: String,
    except: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum IntOrString {
    Int(i64),
    Str(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct RawPort {
    protocol: Option<String>,
    port: Option<IntOrString>,
    end_port: Option<i64>,
}

/// Decodes and validates one NetworkPolicy object in namespace `namespace`.
pub(crate) fn parse(
    value: Value,
    origin: &Origin,
    namespace: &str,
    _warnings: &mut Vec<Warning>,
) -> Result<NetworkPolicy, LoadError> {
    let raw: RawNetworkPolicy = decode(value, origin)?;
    let pod_selector = selector_at(raw.spec.pod_selector.as_ref(), origin, "spec.podSelector")?;
    let has_egress = raw.spec.egress.as_ref().is_some_and(|e| !e.is_empty());
    let (ingress_in_effect, egress_in_effect) = match &raw.spec.policy_types {
        None => (true, has_egress),
        Some(types) => {
            let mut io = (false, false);
            for (i, t) in types.iter().enumerate() {
                match t.as_str() {
                    "Ingress" => io.0 = true,
                    "Egress" => io.1 = true,
                    other => {
                        return Err(origin.invalid(
                            format!("spec.policyTypes[{i}]"),
                            format!("unknown policy type {other:?}; expected Ingress or Egress"),
                        ));
                    }
                }
            }
            if types.is_empty() { (true, has_egress) } else { io }
        }
    };
    let mut ingress_rules = Vec::new();
    for (i, r) in raw.spec.ingress.iter().flatten().enumerate() {
        let field = format!("spec.ingress[{i}]");
        ingress_rules.push(rule(origin, &field, "from", r.from.as_deref(), r.ports.as_deref(), namespace)?);
    }
    let mut egress_rules = Vec::new();
    for (i, r) in raw.spec.egress.iter().flatten().enumerate() {
        let field = format!("spec.egress[{i}]");
        egress_rules.push(rule(origin, &field, "to", r.to.as_deref(), r.ports.as_deref(), namespace)?);
    }
    Ok(NetworkPolicy {
        namespace: namespace.to_owned(),
        name: raw.metadata.name,
        file: origin.file.clone(),
        pod_selector,
        ingress_in_effect,
        egress_in_effect,
        ingress_rules,
        egress_rules,
    })
}

fn rule(
    origin: &Origin,
    field: &str,
    peers_field: &str,
    peers: Option<&[RawPeer]>,
    ports: Option<&[RawPort]>,
    namespace: &str,
) -> Result<Rule, LoadError> {
    let mut out_peers = Vec::new();
    for (j, p) in peers.unwrap_or_default().iter().enumerate() {
        let pf = format!("{field}.{peers_field}[{j}]");
        let peer = match (&p.ip_block, &p.pod_selector, &p.namespace_selector) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                return Err(origin.invalid(
                    pf,
                    "a peer with ipBlock must not also have podSelector or namespaceSelector; write them as two peers",
                ));
            }
            (None, None, None) => {
                return Err(origin.invalid(
                    pf,
                    "empty peer: expected podSelector, namespaceSelector or ipBlock (to match everything, leave out \
                     the whole list)",
                ));
            }
            (Some(b), None, None) => Peer::Ip(ip_block(origin, &format!("{pf}.ipBlock"), b)?),
            (None, pods, nss) => {
                let pods = selector_at(pods.as_ref(), origin, &format!("{pf}.podSelector"))?;
                let namespaces = match nss {
                    Some(s) => {
                        NamespaceMatch::Selected(selector_at(Some(s), origin, &format!("{pf}.namespaceSelector"))?)
                    }
                    None => NamespaceMatch::Named(namespace.to_owned()),
                };
                Peer::Pods(PodPeer { namespaces, pods })
            }
        };
        out_peers.push(peer);
    }
    let mut out_ports = Vec::new();
    for (j, p) in ports.unwrap_or_default().iter().enumerate() {
        out_ports.push(port(origin, &format!("{field}.ports[{j}]"), p)?);
    }
    Ok(Rule { peers: if out_peers.is_empty() { None } else { Some(out_peers) }, ports: out_ports })
}

fn ip_block(origin: &Origin, field: &str, b: &RawIpBlock) -> Result<IpPeer, LoadError> {
    let cidr = parse_cidr(&b.cidr).map_err(|e| origin.invalid(format!("{field}.cidr"), e))?;
    let mut set = IpSet::from_range(cidr.range);
    let mut text = b.cidr.clone();
    for (k, e) in b.except.iter().flatten().enumerate() {
        let ef = format!("{field}.except[{k}]");
        let ex = parse_cidr(e).map_err(|err| origin.invalid(&ef, err))?;
        if ex.v4 != cidr.v4 {
            return Err(origin.invalid(ef, format!("{e} is not of the same address family as cidr {}", b.cidr)));
        }
        if ex.range.first < cidr.range.first || ex.range.last > cidr.range.last || ex.range == cidr.range {
            return Err(origin.invalid(ef, format!("{e} must be strictly within cidr {}", b.cidr)));
        }
        set = set.subtract_range(ex.range);
        text.push_str(if k == 0 { " except " } else { ", " });
        text.push_str(e);
    }
    Ok(IpPeer { set, text })
}

fn port(origin: &Origin, field: &str, p: &RawPort) -> Result<PortSpec, LoadError> {
    let protocol = match p.protocol.as_deref() {
        None => Protocol::Tcp,
        Some(s) => Protocol::parse(s).ok_or_else(|| {
            origin.invalid(format!("{field}.protocol"), format!("unknown protocol {s:?}; expected TCP, UDP or SCTP"))
        })?,
    };
    let number = |n: i64, f: &str| -> Result<u16, LoadError> {
        u16::try_from(n)
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| origin.invalid(format!("{field}.{f}"), format!("{n} is not a port (1-65535)")))
    };
    match (&p.port, p.end_port) {
        (None, None) => Ok(PortSpec::Numbers { protocol, first: 1, last: 65535 }),
        (None, Some(_)) => Err(origin.invalid(format!("{field}.endPort"), "endPort requires port")),
        (Some(IntOrString::Int(n)), end) => {
            let first = number(*n, "port")?;
            let last = match end {
                None => first,
                Some(e) => {
                    let last = number(e, "endPort")?;
                    if last < first {
                        return Err(origin.invalid(
                            format!("{field}.endPort"),
                            format!("endPort {last} must not be less than port {first}"),
                        ));
                    }
                    last
                }
            };
            Ok(PortSpec::Numbers { protocol, first, last })
        }
        (Some(IntOrString::Str(name)), end) => {
            if end.is_some() {
                return Err(origin.invalid(
                    format!("{field}.endPort"),
                    format!("endPort cannot be used with the named port {name:?}; give port as a number"),
                ));
            }
            validate_port_name(name).map_err(|e| origin.invalid(format!("{field}.port"), e))?;
            Ok(PortSpec::Named { protocol: Some(protocol), name: name.clone() })
        }
    }
}

/// A port name as Kubernetes accepts it (IANA service name): 1-15 characters, lower-case
/// alphanumerics and `-`, at least one letter, no leading, trailing or double `-`.
pub(crate) fn validate_port_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && name.chars().any(|c| c.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a port number or a port name (1-15 lower-case letters, digits and '-', with at least one letter)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn np(spec: &str) -> Result<NetworkPolicy, LoadError> {
        let text = format!(
            "{{\"kind\":\"NetworkPolicy\",\"metadata\":{{\"name\":\"p\",\"namespace\":\"ns\"}},\"spec\":{spec}}}"
        );
        let v: Value = serde_json::from_str(&text).unwrap();
        let origin = Origin::object("np.yaml", "NetworkPolicy", Some("ns"), "p");
        parse(v, &origin, "ns", &mut Vec::new())
    }

    #[test]
    fn policy_types_defaults() {
        let p = np(r#"{"podSelector":{}}"#).unwrap();
        assert!(p.ingress_in_effect && !p.egress_in_effect);
        let p = np(r#"{"egress":[{}]}"#).unwrap();
        assert!(p.ingress_in_effect && p.egress_in_effect);
        let p = np(r#"{"egress":[]}"#).unwrap();
        assert!(p.ingress_in_effect && !p.egress_in_effect);
        let p = np(r#"{"policyTypes":["Egress"],"ingress":[{}]}"#).unwrap();
        assert!(!p.ingress_in_effect && p.egress_in_effect);
    }

    #[test]
    fn peers_and_ports() {
        let p = np(r#"{"ingress":[{"from":[{"podSelector":{"matchLabels":{"a":"b"}}},
            {"namespaceSelector":{}},{"namespaceSelector":{},"podSelector":{}},
            {"ipBlock":{"cidr":"10.0.0.0/8","except":["10.1.0.0/16"]}}],
            "ports":[{"port":80},{"protocol":"UDP"},{"port":"http"},{"port":1000,"endPort":2000,"protocol":"SCTP"}]}]}"#)
        .unwrap();
        let r = &p.ingress_rules[0];
        let peers = r.peers.as_ref().unwrap();
        assert!(matches!(&peers[0], Peer::Pods(PodPeer { namespaces: NamespaceMatch::Named(n), .. }) if n == "ns"));
        assert!(
            matches!(&peers[1], Peer::Pods(PodPeer { namespaces: NamespaceMatch::Selected(_), pods }) if pods.is_everything())
        );
        assert!(matches!(&peers[3], Peer::Ip(ip) if ip.text == "10.0.0.0/8 except 10.1.0.0/16"));
        assert_eq!(
            r.ports,
            [
                PortSpec::Numbers { protocol: Protocol::Tcp, first: 80, last: 80 },
                PortSpec::Numbers { protocol: Protocol::Udp, first: 1, last: 65535 },
                PortSpec::Named { protocol: Some(Protocol::Tcp), name: "http".into() },
                PortSpec::Numbers { protocol: Protocol::Sctp, first: 1000, last: 2000 },
            ]
        );
        let p = np(r#"{"ingress":[{"from":[]}]}"#).unwrap();
        assert!(p.ingress_rules[0].peers.is_none(), "an empty from matches every peer");
    }

    #[test]
    fn rejected_inputs_name_the_field() {
        let cases = [
            (
                r#"{"ingress":[{"from":[{"ipBlock":{"cidr":"10.0.0.0/8"},"podSelector":{}}]}]}"#,
                "spec.ingress[0].from[0]",
                "must not also have",
            ),
            (r#"{"ingress":[{"from":[{}]}]}"#, "spec.ingress[0].from[0]", "empty peer"),
            (
                r#"{"egress":[{"to":[{"ipBlock":{"cidr":"10.0.0.300/8"}}]}]}"#,
                "spec.egress[0].to[0].ipBlock.cidr",
                "not an IP address",
            ),
            (
                r#"{"egress":[{"to":[{"ipBlock":{"cidr":"10.0.0.0/8","except":["11.0.0.0/16"]}}]}]}"#,
                "spec.egress[0].to[0].ipBlock.except[0]",
                "strictly within",
            ),
            (
                r#"{"ingress":[{"ports":[{"port":"http","endPort":90}]}]}"#,
                "spec.ingress[0].ports[0].endPort",
                "named port",
            ),
            (r#"{"ingress":[{"ports":[{"port":90,"endPort":80}]}]}"#, "spec.ingress[0].ports[0].endPort", "less than"),
            (r#"{"ingress":[{"ports":[{"endPort":80}]}]}"#, "spec.ingress[0].ports[0].endPort", "requires port"),
            (r#"{"ingress":[{"ports":[{"port":0}]}]}"#, "spec.ingress[0].ports[0].port", "not a port"),
            (
                r#"{"ingress":[{"ports":[{"port":80,"protocol":"ICMP"}]}]}"#,
                "spec.ingress[0].ports[0].protocol",
                "unknown protocol",
            ),
            (r#"{"ingress":[{"ports":[{"port":"Not_A_Name"}]}]}"#, "spec.ingress[0].ports[0].port", "port name"),
            (r#"{"podSelector":{"matchLabels":{"app":"-x"}}}"#, "spec.podSelector.matchLabels.app", "label value"),
            (r#"{"policyTypes":["Sideways"]}"#, "spec.policyTypes[0]", "unknown policy type"),
            (r#"{"ingress":{"from":[]}}"#, "spec.ingress", "invalid type"),
        ];
        for (spec, field, what) in cases {
            let err = np(spec).unwrap_err().to_string();
            let want = format!("np.yaml: NetworkPolicy ns/p: {field}: ");
            assert!(err.starts_with(&want) && err.contains(what), "{spec}\n got: {err}\nwant: {want}…{what}");
        }
    }
}
