//! Prometheus metrics, all named `keyway_gateway_*`, with bounded label values only (enums,
//! fixed reason labels, zone names from the configuration; never addresses).

use prometheus::{Histogram, HistogramOpts, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// Every metric of a gateway.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    /// Flows by verdict (`allow`, `deny`, `error`) and reason label.
    pub flows: IntCounterVec,
    /// Flows open now.
    pub active_flows: IntGauge,
    /// Bytes carried, by direction (`upstream`: towards the destination; `downstream`).
    pub bytes: IntCounterVec,
    /// Tokens refused, by reason.
    pub token_failures: IntCounterVec,
    /// Nonces in the replay cache.
    pub replay_cache_entries: IntGauge,
    /// Time to decide one flow (token verification excluded).
    pub decision_seconds: Histogram,
    /// Peer gateways with a live overlay connection, by zone.
    pub peers_up: IntGaugeVec,
    /// Reloads of inventory, policies or secrets, by what and outcome.
    pub reloads: IntCounterVec,
    /// Work refused by a limit, by limit.
    pub limit_refusals: IntCounterVec,
    /// Overlay streams received from peer gateways, by outcome.
    pub overlay_streams: IntCounterVec,
    /// Key-service requests, by outcome.
    pub key_requests: IntCounterVec,
    /// Cluster objects the Kubernetes source left out of the last built inventory because they
    /// conflict with another (an overlay address another workload holds); the log names them.
    pub kubernetes_refused: IntGauge,
    /// Incoming QUIC connection attempts, by outcome (`retry`: asked to prove its address;
    /// `accepted`; `refused-limit`: too many handshakes in progress; `failed`).
    pub handshakes: IntCounterVec,
    /// UDP datagrams, by what became of them (`forwarded`, `delivered`, or the refusal's reason).
    pub udp_datagrams: IntCounterVec,
    /// UDP flows tracked now.
    pub udp_flows: IntGauge,
    /// Agents connected to the edge listener now.
    pub agents: IntGauge,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let flows = counter("keyway_gateway_flows_total", "Flows by verdict and reason.", &["verdict", "reason"])?;
        let bytes = counter("keyway_gateway_bytes_total", "Bytes carried by direction.", &["direction"])?;
        let token_failures = counter("keyway_gateway_token_failures_total", "Tokens refused by reason.", &["reason"])?;
        let reloads = counter("keyway_gateway_reloads_total", "Reloads by what and outcome.", &["what", "outcome"])?;
        let limit_refusals = counter("keyway_gateway_limit_refusals_total", "Work refused by a limit.", &["limit"])?;
        let overlay_streams =
            counter("keyway_gateway_overlay_streams_total", "Overlay streams received by outcome.", &["outcome"])?;
        let key_requests =
            counter("keyway_gateway_key_requests_total", "Key-service requests by outcome.", &["outcome"])?;
        let handshakes = counter(
            "keyway_gateway_overlay_handshakes_total",
            "Incoming QUIC connection attempts by outcome.",
            &["outcome"],
        )?;
        let udp_datagrams =
            counter("keyway_gateway_udp_datagrams_total", "UDP datagrams by what became of them.", &["outcome"])?;
        let udp_flows = IntGauge::new("keyway_gateway_udp_flows", "UDP flows tracked now.")?;
        registry.register(Box::new(udp_flows.clone()))?;
        let agents = IntGauge::new("keyway_gateway_agents", "Agents connected to the edge listener now.")?;
        registry.register(Box::new(agents.clone()))?;
        let kubernetes_refused = IntGauge::new(
            "keyway_gateway_kubernetes_refused_objects",
            "Cluster objects left out of the inventory as conflicting (the log names them).",
        )?;
        registry.register(Box::new(kubernetes_refused.clone()))?;
        let active_flows = IntGauge::new("keyway_gateway_active_flows", "Flows open now.")?;
        registry.register(Box::new(active_flows.clone()))?;
        let replay_cache_entries =
            IntGauge::new("keyway_gateway_replay_cache_entries", "Nonces remembered for replay detection.")?;
        registry.register(Box::new(replay_cache_entries.clone()))?;
        let peers_up = IntGaugeVec::new(
            Opts::new("keyway_gateway_peers_up", "Peer gateways with a live overlay connection, by zone."),
            &["zone"],
        )?;
        registry.register(Box::new(peers_up.clone()))?;
        let decision_seconds = Histogram::with_opts(
            HistogramOpts::new("keyway_gateway_decision_seconds", "Time to decide one flow.")
                .buckets(vec![1e-7, 2.5e-7, 5e-7, 1e-6, 2.5e-6, 5e-6, 1e-5, 1e-4, 1e-3]),
        )?;
        registry.register(Box::new(decision_seconds.clone()))?;
        Ok(Metrics {
            registry,
            flows,
            active_flows,
            bytes,
            token_failures,
            replay_cache_entries,
            decision_seconds,
            peers_up,
            reloads,
            limit_refusals,
            overlay_streams,
            key_requests,
            handshakes,
            kubernetes_refused,
            udp_datagrams,
            udp_flows,
            agents,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = String::new();
        let encoder = prometheus::TextEncoder::new();
        if encoder.encode_utf8(&self.registry.gather(), &mut buf).is_err() {
            buf.clear();
        }
        buf
    }
}
