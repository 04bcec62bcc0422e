//! Every task the gateway starts is owned: spawned through [`Tasks`], which tracks it and ends it
//! when the gateway stops. Connection handlers, relays, HTTP/2 drivers (hyper spawns its own
//! through the [`hyper::rt::Executor`] below), peer connectors and the inventory source all run
//! here, so `kill` really ends every local flow and `shutdown` really closes what is left after
//! the drain deadline.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The set of a gateway's tasks.
#[derive(Debug, Clone, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl Tasks {
    /// An empty set.
    pub fn new() -> Tasks {
        Tasks::default()
    }

    /// Runs `fut` until it finishes or the set is stopped, whichever comes first (a stopped task is
    /// dropped where it waits: its sockets close).
    pub fn spawn<F>(&self, fut: F)
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let stop = self.stop.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = fut => {}
            }
        });
    }

    /// Resolves when the set is stopped.
    pub fn stopped(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.stop.cancelled()
    }

    /// How many tasks are running.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    /// Whether no task is running.
    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }

    /// Stops every task and waits (at most `deadline`) until all have ended. Returns how many were
    /// still running at the deadline.
    pub async fn stop(&self, deadline: Duration) -> usize {
        self.stop.cancel();
        self.tracker.close();
        let _ = tokio::time::timeout(deadline, self.tracker.wait()).await;
        self.tracker.len()
    }
}

impl<F> hyper::rt::Executor<F> for Tasks
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.spawn(fut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stop_ends_every_task_where_it_waits() {
        let tasks = Tasks::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tasks.spawn(async move {
            // Holds the sender until dropped: the receiver sees the drop.
            let _tx = tx;
            std::future::pending::<()>().await;
        });
        tasks.spawn(std::future::pending::<()>());
        assert_eq!(tasks.len(), 2);
        assert_eq!(tasks.stop(Duration::from_secs(5)).await, 0);
        assert!(rx.await.is_err(), "the task's state was dropped");
        assert!(tasks.is_empty());
    }
}
