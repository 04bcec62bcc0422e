//! One access-log event per flow, written when the flow ends by a drop guard that also keeps the
//! flow metrics, so no exit path can forget either.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::time::Instant;

use crate::metrics::Metrics;

/// The record of one flow; logs and counts itself when dropped.
#[derive(Debug)]
pub struct FlowLog {
    metrics: Arc<Metrics>,
    start: Instant,
    /// Flow id.
    pub flow_id: u64,
    /// Where the flow entered: `tunnel` (from a sidecar) or `overlay` (from a peer gateway).
    pub entry: &'static str,
    /// Source overlay address.
    pub src: String,
    /// Source identity, once verified.
    pub identity: String,
    /// The key epoch of the verified token (0 when none).
    pub epoch: u32,
    /// Destination address and port.
    pub dst: String,
    /// `allow`, `deny` or `error`.
    pub verdict: &'static str,
    /// Fixed reason label (`allowed`, `policy-denied`, `token-mac`, …).
    pub reason: &'static str,
    /// The deciding rule, in words.
    pub rule: String,
    /// Where the flow went: `local`, `external`, or the peer gateway (`zone/name`).
    pub next_hop: String,
    /// Bytes towards the destination.
    pub bytes_up: Arc<AtomicU64>,
    /// Bytes towards the source.
    pub bytes_down: Arc<AtomicU64>,
    active: bool,
}

impl FlowLog {
    /// Starts the record of a flow.
    pub fn new(metrics: Arc<Metrics>, flow_id: u64, entry: &'static str, src: String, dst: String) -> FlowLog {
        FlowLog {
            metrics,
            start: Instant::now(),
            flow_id,
            entry,
            src,
            identity: String::new(),
            epoch: 0,
            dst,
            verdict: "error",
            reason: "internal",
            rule: String::new(),
            next_hop: String::new(),
            bytes_up: Arc::new(AtomicU64::new(0)),
            bytes_down: Arc::new(AtomicU64::new(0)),
            active: false,
        }
    }

    /// Marks the flow as carrying bytes (counted in `active_flows` until dropped).
    pub fn set_active(&mut self) {
        if !self.active {
            self.active = true;
            self.metrics.active_flows.inc();
        }
    }

    /// Sets the outcome.
    pub fn outcome(&mut self, verdict: &'static str, reason: &'static str) {
        self.verdict = verdict;
        self.reason = reason;
    }
}

impl Drop for FlowLog {
    fn drop(&mut self) {
        if self.active {
            self.metrics.active_flows.dec();
        }
        let up = self.bytes_up.load(Ordering::Relaxed);
        let down = self.bytes_down.load(Ordering::Relaxed);
        self.metrics.flows.with_label_values(&[self.verdict, self.reason]).inc();
        self.metrics.bytes.with_label_values(&["upstream"]).inc_by(up);
        self.metrics.bytes.with_label_values(&["downstream"]).inc_by(down);
        tracing::info!(
            target: "keyway::access",
            flow_id = self.flow_id,
            entry = self.entry,
            src = %self.src,
            identity = %self.identity,
            epoch = self.epoch,
            dst = %self.dst,
            verdict = self.verdict,
            reason = self.reason,
            rule = %self.rule,
            next_hop = %self.next_hop,
            bytes_up = up,
            bytes_down = down,
            duration_ms = self.start.elapsed().as_secs_f64() * 1000.0,
            "flow"
        );
    }
}
