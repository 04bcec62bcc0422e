//! The closed-loop load of the filter benches: clients that each run one operation after another
//! for a measurement period, and the percentiles of what they saw.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// A `u64` from the environment, else `default`.
pub(crate) fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Runs `clients` loops of `op` for `seconds`: (samples in µs of the operations that succeeded,
/// failures). `op` returns the sample, or `None` for a failure.
pub(crate) async fn closed_loop<F, Fut>(clients: u64, seconds: u64, op: F) -> (Vec<u32>, u64)
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Option<u32>> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (stop, op) = (stop.clone(), op.clone());
        tasks.push(tokio::spawn(async move {
            let (mut samples, mut failures) = (Vec::new(), 0u64);
            while !stop.load(Ordering::Relaxed) {
                match op().await {
                    Some(us) => samples.push(us),
                    None => failures += 1,
                }
            }
            (samples, failures)
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await; // the measurement period, not a synchronisation
    stop.store(true, Ordering::Relaxed);
    let (mut all, mut failed) = (Vec::new(), 0);
    for t in tasks {
        let (s, f) = t.await.unwrap();
        all.extend(s);
        failed += f;
    }
    (all, failed)
}

/// The `p` percentile (0..=1) of sorted samples; 0 for none.
pub(crate) fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}
