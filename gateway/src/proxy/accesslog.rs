//! One access-log event per flow, written when the flow ends by a drop guard that also keeps the
//! flow metrics, so no exit path can forget either. The outcome is a `Result<(), Refusal>`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::time::Instant;

use super::Decision;
use super::refusal::{ALLOW, Entry, Refusal};
use super::relay::Ended;
use crate::metrics::Metrics;

/// The record of one flow; logs and counts itself when dropped.
#[derive(Debug)]
pub struct FlowLog {
    metrics: Arc<Metrics>,
    start: Instant,
    /// Flow id.
    pub flow_id: u64,
    /// Where the flow entered.
    pub entry: Entry,
    /// Source overlay address.
    pub src: String,
    /// Source identity, once verified.
    pub identity: String,
    /// The key epoch of the verified token (0 when none).
    pub epoch: u32,
    /// Destination address and port.
    pub dst: String,
    /// The outcome; `None` until decided (a flow dropped then was aborted).
    pub result: Option<Result<(), Refusal>>,
    ended: Option<Ended>,
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
    pub fn new(metrics: Arc<Metrics>, flow_id: u64, entry: Entry, src: String, dst: String) -> FlowLog {
        FlowLog {
            metrics,
            start: Instant::now(),
            flow_id,
            entry,
            src,
            identity: String::new(),
            epoch: 0,
            dst,
            result: None,
            ended: None,
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

    /// Records the outcome, counting a refusal in the metrics specific to it.
    pub fn finish(&mut self, result: Result<(), Refusal>) {
        match &result {
            Err(r) => r.count(&self.metrics, self.entry),
            Ok(()) if self.entry == Entry::Overlay => {
                self.metrics.overlay_streams.with_label_values(&["connected"]).inc();
            }
            Ok(()) => {}
        }
        self.result = Some(result);
    }

    /// Records how the relay of an allowed flow ended (never called: it was still open when the
    /// gateway stopped).
    pub fn relayed(&mut self, ended: Ended) {
        self.ended = Some(ended);
    }

    /// Records the deciding rule of a decision, allowed or denied.
    pub fn note_rule(&mut self, decided: &Result<Decision, Refusal>) {
        match decided {
            Ok(d) => self.rule.clone_from(&d.rule),
            Err(r) => {
                if let Some(rule) = r.rule() {
                    self.rule = rule.to_owned();
                }
            }
        }
    }
}

impl Drop for FlowLog {
    fn drop(&mut self) {
        if self.active {
            self.metrics.active_flows.dec();
        }
        let up = self.bytes_up.load(Ordering::Relaxed);
        let down = self.bytes_down.load(Ordering::Relaxed);
        let result = self.result.take().unwrap_or(Err(Refusal::Aborted));
        let (verdict, reason) = match &result {
            Ok(()) => (ALLOW, "allowed"),
            Err(r) => (r.verdict(), r.label()),
        };
        let ended = match (&result, self.ended) {
            (Err(_), _) => "",
            (Ok(()), Some(Ended::Closed)) => "closed",
            (Ok(()), Some(Ended::Error)) => "error",
            (Ok(()), Some(Ended::Idle)) => "idle",
            (Ok(()), None) => "stopped",
        };
        self.metrics.flows.with_label_values(&[verdict, reason]).inc();
        self.metrics.bytes.with_label_values(&["upstream"]).inc_by(up);
        self.metrics.bytes.with_label_values(&["downstream"]).inc_by(down);
        tracing::info!(
            target: "keyway::access",
            flow_id = self.flow_id,
            entry = self.entry.as_str(),
            src = %self.src,
            identity = %self.identity,
            epoch = self.epoch,
            dst = %self.dst,
            verdict,
            reason,
            ended,
            rule = %self.rule,
            next_hop = %self.next_hop,
            bytes_up = up,
            bytes_down = down,
            duration_ms = self.start.elapsed().as_secs_f64() * 1000.0,
            "flow"
        );
    }
}
