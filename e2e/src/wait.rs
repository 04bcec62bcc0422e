//! Waiting for a condition with a deadline: how every bed and test synchronises (never a bare
//! sleep standing in for "long enough").

use std::future::Future;
use std::time::Duration;

use anyhow::bail;

/// How often a condition is looked at again.
pub const POLL: Duration = Duration::from_millis(50);

/// Checks `condition` until it holds, every [`POLL`]; fails naming `what` once `deadline` has
/// passed. Returns how long it took (for the tests that report propagation times).
pub fn wait_until(deadline: Duration, what: &str, mut condition: impl FnMut() -> bool) -> anyhow::Result<Duration> {
    let start = std::time::Instant::now();
    while !condition() {
        if start.elapsed() > deadline {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(POLL);
    }
    Ok(start.elapsed())
}

/// As [`wait_until`], for a condition that is itself asynchronous (a metric read over HTTP, a
/// connection attempt); runs on tokio's clock.
pub async fn wait_until_async<F, C>(deadline: Duration, what: &str, mut condition: C) -> anyhow::Result<Duration>
where
    C: FnMut() -> F,
    F: Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    while !condition().await {
        if start.elapsed() > deadline {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(start.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_once_the_condition_holds_and_fails_past_the_deadline() {
        let mut n = 0;
        assert!(
            wait_until(Duration::from_secs(5), "three looks", || {
                n += 1;
                n == 3
            })
            .is_ok()
        );
        assert_eq!(n, 3);
        let e = wait_until(Duration::ZERO, "never", || false).unwrap_err();
        assert!(e.to_string().contains("waiting for never"), "{e}");
    }

    #[tokio::test]
    async fn the_async_form_too() {
        let e = wait_until_async(Duration::from_millis(120), "never", || async { false }).await.unwrap_err();
        assert!(e.to_string().contains("after 120ms waiting for never"), "{e}");
        let mut n = 0;
        let took = wait_until_async(Duration::from_secs(1), "two looks", || {
            n += 1;
            let done = n == 2;
            async move { done }
        })
        .await
        .unwrap();
        assert!(took >= POLL, "{took:?}");
    }
}
