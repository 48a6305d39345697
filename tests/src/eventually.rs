//! Waiting for a condition instead of sleeping: the tests synchronise on what they wait for
//! (a node seen down, a session in `pg_stat_activity`, a held request), checked every
//! [`POLL`], and fail loudly, naming it, when it does not come within a limit.
//!
//! ```ignore
//! let n = eventually(Duration::from_secs(5), "pg1 has sessions", || async {
//!     let n = proxy.node_info("pg1").await;
//!     (n["sessions"].as_i64() > Some(0)).then_some(n)
//! })
//! .await;
//! ```
//!
//! Every wait is bounded in time and in the number of checks. A check still running when
//! the limit passes is abandoned (dropped) and counts as a failure.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// How long a wait sleeps between two checks.
pub const POLL: Duration = Duration::from_millis(25);

/// Checks `check` every [`POLL`] until it returns `Some`, and returns that value. Panics
/// with a message naming `what` and `limit` when `limit` passes first.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let outcome = poll(limit, || {
        let next = check();
        async move { next.await.ok_or(NotYet) }
    })
    .await;
    match outcome {
        Ok(value) => value,
        Err(failure) => panic!("{}", failure.message(what, limit)),
    }
}

/// [`eventually`] for a check that says why it is not there yet: it polls until `check`
/// returns `Ok`, and the panic message at the limit ends with the last `Err` (the last state
/// seen, e.g. the `/v1/nodes` entry).
pub async fn eventually_ok<T, E, F, Fut>(limit: Duration, what: &str, check: F) -> T
where
    E: Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    match poll(limit, check).await {
        Ok(value) => value,
        Err(failure) => panic!("{}", failure.message(what, limit)),
    }
}

/// [`eventually_ok`] for a caller that reports failures as errors (with context of its own)
/// rather than panicking: `Err` carries the message [`eventually_ok`] would panic with.
pub async fn try_eventually<T, E, F, Fut>(
    limit: Duration,
    what: &str,
    check: F,
) -> Result<T, String>
where
    E: Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    poll(limit, check)
        .await
        .map_err(|failure| failure.message(what, limit))
}

/// What [`eventually`] reports as the last state: nothing beyond "not yet".
struct NotYet;

impl Display for NotYet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("not yet")
    }
}

/// Why a wait failed.
struct Failure<E> {
    /// Checks that completed.
    checks: u64,
    /// The last completed check's answer.
    last: Option<E>,
    /// A check was still running at the limit.
    hung: bool,
}

impl<E: Display> Failure<E> {
    fn message(&self, what: &str, limit: Duration) -> String {
        let mut m = format!(
            "eventually: {what}: not so within {limit:?} ({} checks",
            self.checks
        );
        if self.hung {
            m.push_str(", and the last one was still running at the limit");
        }
        m.push(')');
        if let Some(last) = &self.last {
            m.push_str(&format!("; last check: {last}"));
        }
        m
    }
}

/// The wait itself: the first check at once, then one every [`POLL`] (the last at the limit),
/// each abandoned if it is still running at the limit; at most `limit / POLL + 2` checks.
async fn poll<T, E, F, Fut>(limit: Duration, mut check: F) -> Result<T, Failure<E>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + limit;
    let max_checks = u64::try_from(limit.as_nanos() / POLL.as_nanos())
        .unwrap_or(u64::MAX - 2)
        .saturating_add(2);
    let mut failure = Failure {
        checks: 0,
        last: None,
        hung: false,
    };
    while failure.checks < max_checks {
        // A check that is ready returns its answer even at or after the deadline.
        match tokio::time::timeout_at(deadline, check()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => {
                failure.checks += 1;
                failure.last = Some(e);
            }
            Err(_) => {
                failure.hung = true;
                return Err(failure);
            }
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        tokio::time::sleep(POLL.min(deadline - now)).await;
    }
    Err(failure)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// The panic message of a future that must panic.
    async fn panic_message(f: impl Future<Output = ()> + Send + 'static) -> String {
        let e = tokio::spawn(f).await.expect_err("the wait panics");
        let p = e.into_panic();
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap()
    }

    #[tokio::test]
    async fn returns_the_value_of_the_first_check_that_has_one() {
        let calls = AtomicU32::new(0);
        let started = Instant::now();
        let v = eventually(Duration::from_secs(5), "the third call", || async {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            (n == 3).then_some(n * 10)
        })
        .await;
        assert_eq!(v, 30);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            3,
            "no check after the success"
        );
        let took = started.elapsed();
        assert!(
            took >= 2 * POLL && took < Duration::from_secs(2),
            "two pauses between three checks: {took:?}"
        );
    }

    #[tokio::test]
    async fn a_condition_that_holds_at_once_costs_no_pause() {
        let started = Instant::now();
        eventually(Duration::ZERO, "already true", || async { Some(()) }).await;
        eventually_ok(Duration::ZERO, "already ok", || async {
            Ok::<_, String>(())
        })
        .await;
        assert!(started.elapsed() < POLL, "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn panics_after_the_limit_naming_what_it_waited_for() {
        let started = Instant::now();
        let message = panic_message(async {
            eventually(Duration::from_millis(300), "the sky to fall", || async {
                None::<()>
            })
            .await;
        })
        .await;
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(3),
            "{took:?}"
        );
        assert!(message.contains("the sky to fall"), "{message}");
        assert!(message.contains("300ms"), "{message}");
    }

    #[tokio::test]
    async fn checks_are_bounded_in_number() {
        let calls = std::sync::Arc::new(AtomicU32::new(0));
        let counted = calls.clone();
        let limit = Duration::from_millis(200);
        panic_message(async move {
            eventually(limit, "never", || {
                counted.fetch_add(1, Ordering::SeqCst);
                async { None::<()> }
            })
            .await;
        })
        .await;
        let n = calls.load(Ordering::SeqCst);
        let most = u32::try_from(limit.as_nanos() / POLL.as_nanos()).unwrap() + 2;
        assert!((2..=most).contains(&n), "{n} checks in {limit:?}");
    }

    #[tokio::test]
    async fn eventually_ok_reports_the_last_error() {
        let calls = std::sync::Arc::new(AtomicU32::new(0));
        let counted = calls.clone();
        let message = panic_message(async move {
            eventually_ok(Duration::from_millis(150), "a green light", || {
                let n = counted.fetch_add(1, Ordering::SeqCst) + 1;
                async move { Err::<(), _>(format!("red #{n}")) }
            })
            .await;
        })
        .await;
        let n = calls.load(Ordering::SeqCst);
        assert!(message.contains("a green light"), "{message}");
        assert!(message.contains("150ms"), "{message}");
        assert!(
            message.ends_with(&format!("last check: red #{n}")),
            "{message}"
        );
    }

    #[tokio::test]
    async fn eventually_ok_returns_the_first_ok() {
        let calls = AtomicU32::new(0);
        let v = eventually_ok(Duration::from_secs(5), "ok on the second call", || async {
            match calls.fetch_add(1, Ordering::SeqCst) {
                0 => Err("first"),
                n => Ok(n),
            }
        })
        .await;
        assert_eq!(v, 1);
    }

    #[tokio::test]
    async fn try_eventually_returns_the_failure_instead_of_panicking() {
        let v = try_eventually(Duration::from_secs(5), "at once", || async {
            Ok::<_, String>(7)
        })
        .await;
        assert_eq!(v, Ok(7));
        let started = Instant::now();
        let e = try_eventually(Duration::from_millis(100), "the impossible", || async {
            Err::<(), _>("still impossible")
        })
        .await
        .unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(100));
        assert!(e.contains("the impossible"), "{e}");
        assert!(e.contains("100ms"), "{e}");
        assert!(e.ends_with("last check: still impossible"), "{e}");
    }

    #[tokio::test]
    async fn a_check_still_running_at_the_limit_fails_the_wait_at_the_limit() {
        let started = Instant::now();
        let message = panic_message(async {
            eventually(Duration::from_millis(200), "a hanging check", || async {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Some(())
            })
            .await;
        })
        .await;
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(message.contains("a hanging check"), "{message}");
        assert!(message.contains("still running at the limit"), "{message}");
    }
}
