//! The decision and the route of one flow, as plain functions over the compiled engine and the
//! peers' health: a service's overlay address resolves to an endpoint by locality (this zone,
//! then the configured failover zones, round-robin within a zone), the engine decides, and the
//! route follows from the destination's zone.

use std::net::{IpAddr, SocketAddr};

use keyway_policy::engine::Peer;
use keyway_policy::{Engine, Protocol, Verdict};

use super::refusal::{Refusal, Unroutable};
use crate::routing::Routing;

/// Where an allowed flow goes next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// A workload of this zone: its sidecar's keyway inbound address.
    Local {
        /// The sidecar's address and keyway inbound port.
        sidecar: SocketAddr,
        /// Who the ticket is for.
        recipient: Recipient,
    },
    /// A workload of this zone reached through its `keyway agent` (a device, a pod's UDP): over
    /// the agent's connection to this gateway.
    Agent(IpAddr),
    /// A workload of another zone: through one of its gateways.
    Zone(String),
    /// An address outside the overlay: straight out.
    External(SocketAddr),
}

/// The destination workload of a local delivery, as its ticket key is derived: its identity and
/// its first overlay address (the key service hands the workload the same key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    /// Its SPIFFE identity.
    pub identity: String,
    /// Its first overlay address.
    pub key_ip: IpAddr,
}

/// An allowed flow: the rule that allowed it and where it goes.
#[derive(Debug, Clone)]
pub struct Decision {
    /// The deciding rule, in words (`ANP … → NetworkPolicy …: Allow`).
    pub rule: String,
    /// Where to send it.
    pub route: Route,
    /// The destination: the address asked for or, for a service's overlay address, the chosen
    /// endpoint's.
    pub dst: SocketAddr,
    /// Whether the address asked for is a service's (another endpoint may be tried).
    pub service: bool,
}

/// For a service's overlay address, the endpoint to use: the nearest reachable zone in locality
/// order, outside `avoid`, the `turn`-th endpoint there (round-robin). `None` when `dst` is not a
/// service's address.
pub fn pick_endpoint(
    engine: &Engine,
    routing: &Routing,
    dst: IpAddr,
    avoid: &[String],
    turn: usize,
) -> Option<Result<usize, Unroutable>> {
    let inv = engine.inventory();
    let svc = inv.service_for(dst)?;
    let endpoints = inv.endpoints(svc);
    if endpoints.is_empty() {
        return Some(Err(Unroutable::ServiceNoEndpoints));
    }
    for zone in routing.failover_order(routing.my_zone()) {
        if !routing.zone_up(&zone) || avoid.contains(&zone) {
            continue;
        }
        let here: Vec<usize> = endpoints
            .iter()
            .copied()
            .filter(|&w| {
                inv.workloads
                    .get(w)
                    .is_some_and(|w| w.zone.as_deref() == Some(zone.as_str()) && !w.overlay_ips.is_empty())
            })
            .collect();
        if !here.is_empty() {
            return here.get(turn % here.len()).copied().map(Ok);
        }
    }
    Some(Err(Unroutable::ServiceNoReachableEndpoint))
}

/// The inventory kind of a device: a workload outside any cluster, joined by a `keyway agent`.
pub const DEVICE_KIND: &str = "WorkloadEntry";

/// Decides the flow of `protocol` from `src` to `dst` and finds its route (see [`pick_endpoint`]
/// for services). TCP to a device and every UDP flow to this zone go to the destination's agent;
/// UDP goes nowhere else than to workloads and devices.
pub fn decide(
    engine: &Engine,
    routing: &Routing,
    src: Peer,
    (dst, protocol): (SocketAddr, Protocol),
    avoid: &[String],
    turn: usize,
) -> Result<Decision, Refusal> {
    let udp = protocol == Protocol::Udp;
    if udp && engine.inventory().service_for(dst.ip()).is_some() {
        return Err(Refusal::Unroutable(Unroutable::UdpNotCarried));
    }
    let service = engine.inventory().service_for(dst.ip()).is_some();
    let (ip, dst_peer) = match pick_endpoint(engine, routing, dst.ip(), avoid, turn) {
        None => (dst.ip(), engine.peer_for(dst.ip())),
        Some(Ok(w)) => {
            let ip =
                engine.inventory().workloads.get(w).and_then(|w| w.overlay_ips.first().copied()).unwrap_or(dst.ip());
            (ip, Peer::Workload(w))
        }
        Some(Err(u)) => return Err(Refusal::Unroutable(u)),
    };
    let d = engine.decide(src, dst_peer, protocol, dst.port());
    let rule = engine.describe_decision(&d);
    if d.verdict == Verdict::Deny {
        return Err(Refusal::Policy { rule });
    }
    let route = match dst_peer {
        Peer::Ip(ip) if external_forbidden(ip, routing.external_loopback()) => {
            return Err(Refusal::ExternalForbidden(ip));
        }
        Peer::Ip(_) if udp => return Err(Refusal::Unroutable(Unroutable::UdpNotCarried)),
        Peer::Ip(ip) => Route::External(SocketAddr::new(ip, dst.port())),
        Peer::Workload(w) => {
            let w = engine.inventory().workloads.get(w);
            match w.and_then(|w| w.zone.as_deref().map(|z| (w, z))) {
                None => return Err(Refusal::Unroutable(Unroutable::DestinationZoneUnknown)),
                Some((w, zone)) if zone == routing.my_zone() && (udp || w.kind == DEVICE_KIND) => Route::Agent(ip),
                Some((w, zone)) if zone == routing.my_zone() => {
                    let sidecar = w.sidecar_ips.first().copied().unwrap_or(ip);
                    let recipient = Recipient {
                        identity: w.identity(routing.trust_domain()),
                        key_ip: w.overlay_ips.first().copied().unwrap_or(ip),
                    };
                    Route::Local { sidecar: SocketAddr::new(sidecar, routing.sidecar_port()), recipient }
                }
                Some((_, zone)) => Route::Zone(zone.to_owned()),
            }
        }
    };
    Ok(Decision { rule, route, dst: SocketAddr::new(ip, dst.port()), service })
}

/// Whether flows may never leave the overlay for `ip`, whatever the policy says: unspecified,
/// "this network", link-local (cloud metadata services live there), multicast and broadcast
/// addresses, and loopback unless `allow_loopback` (single-host test beds). The gateway's own
/// other addresses are caught once connected ([`super::deliver::to_external`]).
pub fn external_forbidden(ip: IpAddr, allow_loopback: bool) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            v4.is_unspecified()
                || v4.octets()[0] == 0
                || v4.is_link_local()
                || v4.is_multicast()
                || v4.is_broadcast()
                || (v4.is_loopback() && !allow_loopback)
        }
        IpAddr::V6(v6) => {
            v6.is_unspecified()
                || v6.is_unicast_link_local()
                || v6.is_multicast()
                || (v6.is_loopback() && !allow_loopback)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn external_destinations_that_are_never_allowed() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        for bad in ["0.0.0.0", "0.1.2.3", "169.254.169.254", "224.0.0.1", "255.255.255.255", "::", "fe80::1", "ff02::1"]
        {
            assert!(external_forbidden(ip(bad), true), "{bad}");
        }
        for lo in ["127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1"] {
            assert!(external_forbidden(ip(lo), false), "{lo}");
            assert!(!external_forbidden(ip(lo), true), "{lo} with loopback allowed");
        }
        assert!(external_forbidden(ip("::ffff:169.254.169.254"), true), "v4-mapped forms too");
        for ok in ["192.0.2.10", "10.1.2.3", "2001:db8::1", "100.64.0.1"] {
            assert!(!external_forbidden(ip(ok), false), "{ok}");
        }
    }
}
