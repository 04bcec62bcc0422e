//! Why a flow was not carried: one type for every refusal of every face (tunnel, overlay,
//! delivery, limits). It alone knows each refusal's metric label, HTTP status, verdict and
//! overlay status; the sites that refuse only choose the variant.

use std::net::SocketAddr;

use http::StatusCode;
use keyway_policy::flow::StatusCode as FlowStatus;

use crate::metrics::Metrics;

/// Where a flow entered this gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// From a sidecar, through the tunnel.
    Tunnel,
    /// From a peer gateway, over the overlay.
    Overlay,
    /// From a `keyway agent`, over the edge listener.
    Edge,
}

impl Entry {
    /// The access log's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Entry::Tunnel => "tunnel",
            Entry::Overlay => "overlay",
            Entry::Edge => "edge",
        }
    }
}

/// A limit that refused a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `limits.max_flows` flows are open.
    MaxFlows,
    /// The source holds its `limits.max_flows_per_source` flows.
    MaxFlowsPerSource,
    /// Every connection to the destination zone's gateways holds `limits.max_flows_per_peer` flows.
    MaxFlowsPerPeer,
}

impl Limit {
    fn label(self) -> &'static str {
        match self {
            Limit::MaxFlows => "max-flows",
            Limit::MaxFlowsPerSource => "max-flows-per-source",
            Limit::MaxFlowsPerPeer => "max-flows-per-peer",
        }
    }

    fn metric(self) -> &'static str {
        match self {
            Limit::MaxFlows => "max_flows",
            Limit::MaxFlowsPerSource => "max_flows_per_source",
            Limit::MaxFlowsPerPeer => "max_flows_per_peer",
        }
    }
}

/// Why an allowed flow has no route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unroutable {
    /// The service has no endpoints.
    ServiceNoEndpoints,
    /// Every zone with endpoints of the service is unreachable (or was just tried).
    ServiceNoReachableEndpoint,
    /// The destination workload has no zone.
    DestinationZoneUnknown,
    /// A flow from a peer gateway for a destination that is not in this zone.
    NotInZone,
    /// The destination is reached through its `keyway agent`, and none is connected here.
    NoAgent,
    /// UDP to a Service's overlay address or outside the overlay: keyway carries UDP between
    /// workloads and devices only.
    UdpNotCarried,
}

/// Why delivering to a destination failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DeliverError {
    /// No usable epoch secret to mint a ticket with.
    #[error("no usable epoch secret to mint a ticket")]
    NoKey,
    /// Minting failed (identity too long).
    #[error("cannot mint a ticket: {0}")]
    Mint(String),
    /// TCP connect failed or timed out.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The HTTP/2 exchange failed.
    #[error("HTTP/2 CONNECT to {addr} failed: {reason}")]
    Http {
        /// The address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The sidecar's mesh certificate is not the destination workload's: it gets no ticket.
    #[error("the sidecar at {addr} presented {found:?}, not the destination workload's {want:?}")]
    WrongIdentity {
        /// The address.
        addr: SocketAddr,
        /// The SPIFFE id of its certificate (empty: none).
        found: String,
        /// The destination workload's.
        want: String,
    },
    /// The sidecar refused the ticket.
    #[error("sidecar {addr} refused the tunnel with {status} ({reason})")]
    Refused {
        /// The address.
        addr: SocketAddr,
        /// The HTTP status.
        status: u16,
        /// Its deny-reason header.
        reason: String,
    },
}

impl DeliverError {
    /// The fixed label.
    pub fn label(&self) -> &'static str {
        match self {
            DeliverError::NoKey => "no-epoch-secret",
            DeliverError::Mint(_) => "ticket-mint",
            DeliverError::Connect { .. } => "destination-unreachable",
            DeliverError::Http { .. } => "destination-protocol",
            DeliverError::WrongIdentity { .. } => "destination-identity",
            DeliverError::Refused { .. } => "destination-refused",
        }
    }
}

/// Why a flow was refused or could not be carried.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refusal {
    /// The tunnel request is not a CONNECT.
    #[error("not a CONNECT request")]
    NotConnect,
    /// The CONNECT authority is not `address:port`.
    #[error("the CONNECT authority is not an IP address and port")]
    BadAuthority,
    /// The gateway is draining.
    #[error("the gateway is draining")]
    Draining,
    /// A limit.
    #[error("limit reached: {}", .0.label())]
    Limit(Limit),
    /// The token did not verify (label from the codec or the tunnel's checks).
    #[error("token refused: {0}")]
    Token(&'static str),
    /// A peer's flow header did not verify (label from the codec or the overlay's checks).
    #[error("flow header refused: {0}")]
    Header(&'static str),
    /// The policy denies the flow.
    #[error("denied: {rule}")]
    Policy {
        /// The deciding rule, in words.
        rule: String,
    },
    /// The destination zone's gateway denied the flow.
    #[error("denied by the destination zone: {rule}")]
    RemotePolicy {
        /// The rules of both zones, in words.
        rule: String,
    },
    /// An address outside the overlay that flows may never go to (loopback, link-local,
    /// unspecified, multicast, the gateway's own).
    #[error("{0} is not a destination a flow may leave the overlay for")]
    ExternalForbidden(std::net::IpAddr),
    /// Allowed, but there is nowhere to send it.
    #[error("no route: {}", self.label())]
    Unroutable(Unroutable),
    /// Delivery to the destination failed.
    #[error("{0}")]
    Delivery(DeliverError),
    /// No gateway of the chosen zone took the flow.
    #[error("no gateway of the destination zone took the flow")]
    ZoneUnreachable,
    /// The destination zone's gateway could not reach the destination.
    #[error("the destination zone could not reach the destination: {0}")]
    RemoteUnreachable(String),
    /// The destination zone's gateway refused the flow header.
    #[error("the destination zone refused the flow header: {0}")]
    RemoteRefused(String),
    /// The client went away before its tunnel opened.
    #[error("the client went away before the tunnel opened")]
    ClientGone,
    /// The flow's task ended before any outcome (gateway stopped).
    #[error("the flow ended before an outcome (gateway stopped)")]
    Aborted,
}

/// The verdict word of the access log and the `flows_total` metric.
pub const ALLOW: &str = "allow";

impl Refusal {
    /// The fixed reason label: metrics, the access log, the deny-reason header.
    pub fn label(&self) -> &'static str {
        match self {
            Refusal::NotConnect => "not-connect",
            Refusal::BadAuthority => "bad-authority",
            Refusal::Draining => "draining",
            Refusal::Limit(l) => l.label(),
            Refusal::Token(r) | Refusal::Header(r) => r,
            Refusal::Policy { .. } => "policy-denied",
            Refusal::ExternalForbidden(_) => "external-forbidden",
            Refusal::RemotePolicy { .. } => "policy-denied-remote",
            Refusal::Unroutable(Unroutable::ServiceNoEndpoints) => "service-no-endpoints",
            Refusal::Unroutable(Unroutable::ServiceNoReachableEndpoint) => "service-no-reachable-endpoint",
            Refusal::Unroutable(Unroutable::DestinationZoneUnknown) => "destination-zone-unknown",
            Refusal::Unroutable(Unroutable::NotInZone) => "not-in-zone",
            Refusal::Unroutable(Unroutable::NoAgent) => "no-agent",
            Refusal::Unroutable(Unroutable::UdpNotCarried) => "udp-not-carried",
            Refusal::Delivery(e) => e.label(),
            Refusal::ZoneUnreachable => "zone-unreachable",
            Refusal::RemoteUnreachable(_) => "destination-unreachable",
            Refusal::RemoteRefused(_) => "overlay-refused",
            Refusal::ClientGone => "client-gone",
            Refusal::Aborted => "aborted",
        }
    }

    /// `deny` for a refusal by policy or credential, `error` for everything else.
    pub fn verdict(&self) -> &'static str {
        match self {
            Refusal::Token(_)
            | Refusal::Policy { .. }
            | Refusal::RemotePolicy { .. }
            | Refusal::ExternalForbidden(_) => "deny",
            Refusal::Header("flow-identity-mismatch" | "flow-source-zone" | "edge-source-address") => "deny",
            _ => "error",
        }
    }

    /// The status a sidecar's CONNECT is answered with.
    pub fn http_status(&self) -> StatusCode {
        match self {
            Refusal::NotConnect => StatusCode::METHOD_NOT_ALLOWED,
            Refusal::BadAuthority => StatusCode::BAD_REQUEST,
            Refusal::Token(_)
            | Refusal::Policy { .. }
            | Refusal::RemotePolicy { .. }
            | Refusal::ExternalForbidden(_) => StatusCode::FORBIDDEN,
            Refusal::Draining
            | Refusal::Limit(_)
            | Refusal::ZoneUnreachable
            | Refusal::Unroutable(Unroutable::ServiceNoReachableEndpoint) => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::Header(_)
            | Refusal::Unroutable(_)
            | Refusal::Delivery(_)
            | Refusal::RemoteUnreachable(_)
            | Refusal::RemoteRefused(_)
            | Refusal::ClientGone
            | Refusal::Aborted => StatusCode::BAD_GATEWAY,
        }
    }

    /// The status a peer gateway's flow header is answered with, and its reason text.
    pub fn flow_status(&self) -> (FlowStatus, &str) {
        match self {
            Refusal::Policy { rule } | Refusal::RemotePolicy { rule } => (FlowStatus::Denied, rule),
            Refusal::Draining | Refusal::Limit(_) => (FlowStatus::Overloaded, self.label()),
            Refusal::Header(_) => (FlowStatus::Refused, self.label()),
            _ => (FlowStatus::Unreachable, self.label()),
        }
    }

    /// The deciding rule, for refusals by policy.
    pub fn rule(&self) -> Option<&str> {
        match self {
            Refusal::Policy { rule } | Refusal::RemotePolicy { rule } => Some(rule),
            _ => None,
        }
    }

    /// Counts the refusal in the metrics specific to it (`flows_total` is counted by the access log).
    pub fn count(&self, metrics: &Metrics, entry: Entry) {
        match self {
            Refusal::Token(r) => metrics.token_failures.with_label_values(&[r]).inc(),
            Refusal::Limit(l) => metrics.limit_refusals.with_label_values(&[l.metric()]).inc(),
            _ => {}
        }
        if entry == Entry::Overlay {
            metrics.overlay_streams.with_label_values(&[self.label()]).inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_has_one_label_status_and_verdict() {
        let addr: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let all = [
            (Refusal::NotConnect, "not-connect", 405, "error"),
            (Refusal::BadAuthority, "bad-authority", 400, "error"),
            (Refusal::Draining, "draining", 503, "error"),
            (Refusal::Limit(Limit::MaxFlows), "max-flows", 503, "error"),
            (Refusal::Limit(Limit::MaxFlowsPerSource), "max-flows-per-source", 503, "error"),
            (Refusal::Limit(Limit::MaxFlowsPerPeer), "max-flows-per-peer", 503, "error"),
            (Refusal::ExternalForbidden(addr.ip()), "external-forbidden", 403, "deny"),
            (Refusal::Header("flow-source-zone"), "flow-source-zone", 502, "deny"),
            (Refusal::Header("edge-source-address"), "edge-source-address", 502, "deny"),
            (Refusal::Token("token-mac"), "token-mac", 403, "deny"),
            (Refusal::Header("flow-identity-mismatch"), "flow-identity-mismatch", 502, "deny"),
            (Refusal::Header("flow-sender-mismatch"), "flow-sender-mismatch", 502, "error"),
            (Refusal::Policy { rule: "r".into() }, "policy-denied", 403, "deny"),
            (Refusal::RemotePolicy { rule: "r".into() }, "policy-denied-remote", 403, "deny"),
            (
                Refusal::Unroutable(Unroutable::ServiceNoReachableEndpoint),
                "service-no-reachable-endpoint",
                503,
                "error",
            ),
            (Refusal::Unroutable(Unroutable::DestinationZoneUnknown), "destination-zone-unknown", 502, "error"),
            (
                Refusal::Delivery(DeliverError::Connect { addr, reason: "x".into() }),
                "destination-unreachable",
                502,
                "error",
            ),
            (
                Refusal::Delivery(DeliverError::WrongIdentity { addr, found: "a".into(), want: "b".into() }),
                "destination-identity",
                502,
                "error",
            ),
            (Refusal::ZoneUnreachable, "zone-unreachable", 503, "error"),
            (Refusal::RemoteRefused("x".into()), "overlay-refused", 502, "error"),
        ];
        for (r, label, status, verdict) in all {
            assert_eq!((r.label(), r.http_status().as_u16(), r.verdict()), (label, status, verdict), "{r:?}");
        }
        assert_eq!(Refusal::Policy { rule: "NP a/b".into() }.flow_status(), (FlowStatus::Denied, "NP a/b"));
        assert_eq!(Refusal::Limit(Limit::MaxFlows).flow_status(), (FlowStatus::Overloaded, "max-flows"));
        assert_eq!(Refusal::Header("flow-version").flow_status(), (FlowStatus::Refused, "flow-version"));
        assert_eq!(Refusal::Unroutable(Unroutable::NotInZone).flow_status(), (FlowStatus::Unreachable, "not-in-zone"));
    }
}
