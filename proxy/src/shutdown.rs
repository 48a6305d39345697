//! Stopping graywire with two deadlines: first stop accepting and let every session reach its
//! transaction boundary (soft), then end whatever is left with 57P01 (hard).

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Default)]
pub struct Shutdown {
    /// Stop accepting; sessions close at their next transaction boundary.
    pub soft: CancellationToken,
    /// Sessions close now, inside a transaction or not.
    pub hard: CancellationToken,
    /// Every session task, so shutdown can wait for them.
    pub sessions: TaskTracker,
}

impl Shutdown {
    /// Runs the two phases once `soft` has been cancelled: waits up to `grace` for sessions to
    /// end at their boundaries, then cancels `hard` and waits up to `hard_grace` more.
    /// Returns how many session tasks were still running at each deadline.
    pub async fn drain(&self, grace: Duration, hard_grace: Duration) -> (usize, usize) {
        self.soft.cancel();
        self.sessions.close();
        let at_soft = match crate::timer::timeout(grace, self.sessions.wait()).await {
            Ok(()) => return (0, 0),
            Err(_) => self.sessions.len(),
        };
        self.hard.cancel();
        let _ = crate::timer::timeout(hard_grace, self.sessions.wait()).await;
        (at_soft, self.sessions.len())
    }
}
