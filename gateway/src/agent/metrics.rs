//! The agent's counters: atomics, rendered in the Prometheus text format by the admin listener.
//! Label values are fixed lists (never addresses).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a UDP datagram (or another packet) was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// From the host with a source other than the overlay address.
    SpoofedSource,
    /// Too large for one QUIC datagram.
    TooLarge,
    /// No gateway connected (fail closed).
    NoGateway,
    /// A packet of another protocol than UDP, or a fragment.
    NotUdp,
    /// A packet or datagram that does not decode.
    Malformed,
    /// From a gateway for another address than this agent's.
    NotThisDevice,
    /// The host side's queue was full.
    QueueFull,
}

impl DropReason {
    const ALL: [DropReason; 7] = [
        DropReason::SpoofedSource,
        DropReason::TooLarge,
        DropReason::NoGateway,
        DropReason::NotUdp,
        DropReason::Malformed,
        DropReason::NotThisDevice,
        DropReason::QueueFull,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            DropReason::SpoofedSource => "spoofed-source",
            DropReason::TooLarge => "too-large",
            DropReason::NoGateway => "no-gateway",
            DropReason::NotUdp => "not-udp",
            DropReason::Malformed => "malformed",
            DropReason::NotThisDevice => "not-this-device",
            DropReason::QueueFull => "queue-full",
        }
    }
}

/// The counters of one agent.
#[derive(Debug, Default)]
pub struct AgentMetrics {
    /// Gateways connected now.
    pub gateways_connected: AtomicU64,
    /// Connections to gateways established (including reconnections).
    pub gateway_connects: AtomicU64,
    /// Outbound TCP flows the gateway accepted.
    pub tcp_outbound_opened: AtomicU64,
    /// Outbound TCP flows refused (by a gateway, or with no gateway).
    pub tcp_outbound_refused: AtomicU64,
    /// Inbound TCP flows delivered to a local socket.
    pub tcp_inbound_opened: AtomicU64,
    /// Inbound TCP flows refused (not this device, unreachable, pod mode).
    pub tcp_inbound_refused: AtomicU64,
    /// UDP datagrams sent to a gateway.
    pub udp_sent: AtomicU64,
    /// UDP datagrams received from a gateway and written to the host.
    pub udp_received: AtomicU64,
    dropped: [AtomicU64; 7],
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl AgentMetrics {
    /// Counts one dropped datagram or packet.
    pub fn count_drop(&self, why: DropReason) {
        if let Some(i) = DropReason::ALL.iter().position(|d| *d == why) {
            inc(&self.dropped[i]);
        }
    }

    /// How many were dropped for `why`.
    pub fn dropped(&self, why: DropReason) -> u64 {
        DropReason::ALL.iter().position(|d| *d == why).map_or(0, |i| self.dropped[i].load(Ordering::Relaxed))
    }

    /// Adds one to a counter.
    pub fn inc(&self, c: &AtomicU64) {
        inc(c);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut o = String::new();
        let _ = writeln!(o, "# HELP keyway_agent_gateways_connected Edge gateways connected now.");
        let _ = writeln!(o, "# TYPE keyway_agent_gateways_connected gauge");
        let _ = writeln!(o, "keyway_agent_gateways_connected {}", g(&self.gateways_connected));
        let _ = writeln!(o, "# HELP keyway_agent_gateway_connects_total Connections to edge gateways established.");
        let _ = writeln!(o, "# TYPE keyway_agent_gateway_connects_total counter");
        let _ = writeln!(o, "keyway_agent_gateway_connects_total {}", g(&self.gateway_connects));
        let _ = writeln!(o, "# HELP keyway_agent_tcp_flows_total TCP flows by direction and result.");
        let _ = writeln!(o, "# TYPE keyway_agent_tcp_flows_total counter");
        for (dir, res, c) in [
            ("outbound", "opened", &self.tcp_outbound_opened),
            ("outbound", "refused", &self.tcp_outbound_refused),
            ("inbound", "opened", &self.tcp_inbound_opened),
            ("inbound", "refused", &self.tcp_inbound_refused),
        ] {
            let _ = writeln!(o, "keyway_agent_tcp_flows_total{{direction=\"{dir}\",result=\"{res}\"}} {}", g(c));
        }
        let _ = writeln!(o, "# HELP keyway_agent_udp_datagrams_total UDP datagrams carried, by direction.");
        let _ = writeln!(o, "# TYPE keyway_agent_udp_datagrams_total counter");
        let _ = writeln!(o, "keyway_agent_udp_datagrams_total{{direction=\"sent\"}} {}", g(&self.udp_sent));
        let _ = writeln!(o, "keyway_agent_udp_datagrams_total{{direction=\"received\"}} {}", g(&self.udp_received));
        let _ = writeln!(o, "# HELP keyway_agent_dropped_total Packets and datagrams dropped, by reason.");
        let _ = writeln!(o, "# TYPE keyway_agent_dropped_total counter");
        for d in DropReason::ALL {
            let _ = writeln!(o, "keyway_agent_dropped_total{{reason=\"{}\"}} {}", d.label(), self.dropped(d));
        }
        o
    }
}
