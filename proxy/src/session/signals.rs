//! What can stop a relay besides its two sockets: graywire's shutdown (soft and hard), a
//! topology change, the node's eviction, a pinned session's recheck, and another session
//! wanting the pool's connection.
//!
//! They are rare, and the relay must not pay for them on every round trip: polling them all
//! each time a socket woke the task would take a lock per token or watch channel, shared with
//! every other session. So they live in one future ([`watch`]) that runs only after one of
//! them woke the task ([`Gate`]); what fired is raised in a [`SignalSet`], which the relay reads
//! with plain loads.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};

use tokio::sync::watch as channel;

use super::tap::Tap;
use crate::pool::Pool;
use crate::shutdown::Shutdown;

/// Where the relay's signals come from, besides graywire's shutdown.
pub struct BoundaryWatch<'a> {
    /// Topology changes; a change not yet seen by this receiver stops the relay at a boundary.
    pub changes: &'a mut channel::Receiver<u64>,
    /// New transactions are held (paused): client bytes arriving at a boundary stop the relay.
    pub hold_requests: bool,
    /// Stop at the first boundary after this instant (a pinned session's recheck).
    pub recheck_at: Option<std::time::Instant>,
    /// Transaction mode: the connection's pool; stop at a boundary once another session
    /// wants a connection of it (the connection goes back).
    pub pool: Option<&'a Pool>,
    /// Changes when the session must leave its node at once.
    pub evictions: &'a mut channel::Receiver<u64>,
}

/// One signal, as a bit of a [`SignalSet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// graywire stops now: end the session wherever it is.
    HardStop = 1,
    /// graywire is stopping: end the session at its next boundary.
    SoftStop = 2,
    /// The topology changed: look at the node again at the next boundary.
    TopologyChanged = 4,
    /// A pinned session's recheck is due.
    RecheckDue = 8,
    /// Another session waits for a connection of this pool.
    Wanted = 16,
    /// The node's drain timed out: leave it at once.
    Evicted = 32,
}

/// The signals that fired during one relay run. Raised by [`watch`], read by the relay; both
/// run in the same task, the atomics only make the set shareable between them.
#[derive(Debug, Default)]
pub struct SignalSet(AtomicU8);

impl SignalSet {
    pub fn has(&self, s: Signal) -> bool {
        self.0.load(Ordering::Relaxed) & s as u8 != 0
    }

    fn raise(&self, s: Signal) {
        self.0.fetch_or(s as u8, Ordering::Relaxed);
    }
}

/// Raises each signal in `set` as it fires; never completes. On its first poll it registers
/// with every source and raises what has already happened (a change not yet seen, a pool that
/// is already wanted, a shutdown under way).
pub async fn watch(shutdown: &Shutdown, w: BoundaryWatch<'_>, set: &SignalSet) -> Infallible {
    let recheck_at = w.recheck_at;
    let pool = w.pool;
    let wanted = async {
        match pool {
            Some(p) => {
                let notified = p.wanted();
                tokio::pin!(notified);
                // Enabled before the first look at `is_wanted`, so no wake-up is missed.
                notified.as_mut().enable();
                if !p.is_wanted() {
                    notified.await;
                }
            }
            None => std::future::pending().await,
        }
    };
    let soft = shutdown.soft.cancelled();
    let hard = shutdown.hard.cancelled();
    let change = w.changes.changed();
    let evicted = w.evictions.changed();
    // No timer at all unless a recheck is due (most relays have none).
    let recheck = async {
        match recheck_at {
            Some(at) => crate::timer::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(soft, hard, change, evicted, recheck, wanted);
    let mut evictions_open = true;
    loop {
        tokio::select! {
            biased;
            _ = &mut hard, if !set.has(Signal::HardStop) => set.raise(Signal::HardStop),
            _ = &mut soft, if !set.has(Signal::SoftStop) => set.raise(Signal::SoftStop),
            r = &mut evicted, if evictions_open && !set.has(Signal::Evicted) => match r {
                Ok(()) => set.raise(Signal::Evicted),
                // The binding is gone: nobody can evict this session any more.
                Err(_) => evictions_open = false,
            },
            // A closed topology channel means graywire is going away: look again as well.
            _ = &mut change, if !set.has(Signal::TopologyChanged) => {
                set.raise(Signal::TopologyChanged)
            }
            _ = &mut wanted, if pool.is_some() && !set.has(Signal::Wanted) => {
                set.raise(Signal::Wanted)
            }
            _ = &mut recheck, if recheck_at.is_some() && !set.has(Signal::RecheckDue) => {
                set.raise(Signal::RecheckDue)
            }
            else => std::future::pending::<()>().await,
        }
    }
}

/// Runs a future only when it woke the task, not whenever the task is polled: the future is
/// polled through a [`Tap`].
pub struct Gate<'a, F> {
    fut: Pin<&'a mut F>,
    tap: Tap,
}

impl<'a, F: Future> Gate<'a, F> {
    pub fn new(fut: Pin<&'a mut F>) -> Self {
        Gate {
            fut,
            tap: Tap::default(),
        }
    }

    /// `Ready(Some(output))` if the inner future completed, `Ready(None)` if it ran and is
    /// still pending (look at what it changed), `Pending` if it had no reason to run.
    #[inline]
    pub fn poll_woken(&mut self, cx: &mut Context<'_>) -> Poll<Option<F::Output>> {
        let fut = &mut self.fut;
        match self.tap.run(cx, |inner| fut.as_mut().poll(inner)) {
            None => Poll::Pending,
            Some(Poll::Ready(out)) => Poll::Ready(Some(out)),
            Some(Poll::Pending) => Poll::Ready(None),
        }
    }

    /// Runs the inner future now, whether it was woken or not (e.g. to register it).
    pub async fn poll_now(&mut self) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            self.tap = Tap::default();
            self.poll_woken(cx)
        })
        .await
    }

    /// Completes once the inner future ran after waking the task.
    #[cfg(test)]
    pub async fn woken(&mut self) -> Option<F::Output> {
        std::future::poll_fn(|cx| self.poll_woken(cx)).await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use std::sync::{Arc, Mutex};
    use std::task::{Wake, Waker};

    /// A future's observer: counts its polls, keeps its last waker, decides when it is ready.
    #[derive(Default)]
    struct Probe {
        polls: AtomicUsize,
        open: AtomicBool,
        waker: Mutex<Option<Waker>>,
    }

    impl Probe {
        fn future(&self) -> Counted<'_> {
            Counted(self)
        }

        fn polls(&self) -> usize {
            self.polls.load(Ordering::SeqCst)
        }

        /// Wakes whoever polled the future last.
        fn wake(&self) {
            self.waker.lock().unwrap().take().unwrap().wake();
        }
    }

    /// Pending until its probe is opened.
    struct Counted<'a>(&'a Probe);

    impl Future for Counted<'_> {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.0.polls.fetch_add(1, Ordering::SeqCst);
            if self.0.open.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            *self.0.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    #[test]
    fn the_inner_future_runs_only_after_it_woke_the_task() {
        let probe = Probe::default();
        let mut fut = probe.future();
        let mut gate = Gate::new(Pin::new(&mut fut));
        let task_wakes = Arc::new(WakeCount::default());
        let task_waker = Waker::from(task_wakes.clone());
        let mut cx = Context::from_waker(&task_waker);

        // The first poll runs it (registration) and reports that it ran.
        assert_eq!(gate.poll_woken(&mut cx), Poll::Ready(None));
        assert_eq!(probe.polls(), 1);
        // Polled again without a wake-up: the inner future is not touched.
        for _ in 0..100 {
            assert_eq!(gate.poll_woken(&mut cx), Poll::Pending);
        }
        assert_eq!(probe.polls(), 1);

        // Its wake-up reaches the task, and the next poll runs it.
        probe.open.store(true, Ordering::SeqCst);
        probe.wake();
        assert_eq!(task_wakes.0.load(Ordering::SeqCst), 1);
        assert_eq!(gate.poll_woken(&mut cx), Poll::Ready(Some(())));
        assert_eq!(probe.polls(), 2);
    }

    #[test]
    fn a_new_task_waker_makes_it_run_again() {
        let probe = Probe::default();
        let mut fut = probe.future();
        let mut gate = Gate::new(Pin::new(&mut fut));
        let first = Waker::from(Arc::new(WakeCount::default()));
        let second_wakes = Arc::new(WakeCount::default());
        let second = Waker::from(second_wakes.clone());
        assert_eq!(
            gate.poll_woken(&mut Context::from_waker(&first)),
            Poll::Ready(None)
        );
        assert_eq!(
            gate.poll_woken(&mut Context::from_waker(&second)),
            Poll::Ready(None)
        );
        assert_eq!(probe.polls(), 2);
        // The inner wake-up now goes to the second waker.
        probe.wake();
        assert_eq!(second_wakes.0.load(Ordering::SeqCst), 1);
    }

    #[derive(Default)]
    struct WakeCount(AtomicUsize);

    impl Wake for WakeCount {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A watch of a session-mode session (no pool), not paused.
    fn watching<'a>(
        changes: &'a mut channel::Receiver<u64>,
        evictions: &'a mut channel::Receiver<u64>,
        recheck_at: Option<std::time::Instant>,
    ) -> BoundaryWatch<'a> {
        BoundaryWatch {
            changes,
            hold_requests: false,
            recheck_at,
            pool: None,
            evictions,
        }
    }

    #[tokio::test]
    async fn signals_that_already_fired_are_raised_on_the_first_poll() {
        let shutdown = Shutdown::default();
        shutdown.soft.cancel();
        let (tx, mut changes) = channel::channel(0u64);
        tx.send(1).unwrap();
        let (_etx, mut evictions) = channel::channel(0u64);
        let set = SignalSet::default();
        let w = watching(&mut changes, &mut evictions, None);
        let fut = watch(&shutdown, w, &set);
        tokio::pin!(fut);
        let mut gate = Gate::new(fut.as_mut());
        assert!(gate.poll_now().await.is_none());
        assert!(set.has(Signal::SoftStop));
        assert!(set.has(Signal::TopologyChanged));
        assert!(!set.has(Signal::HardStop));
        assert!(!set.has(Signal::Evicted));
        assert!(!set.has(Signal::RecheckDue));
    }

    #[tokio::test]
    async fn a_signal_wakes_the_relay_and_is_raised() {
        let shutdown = Shutdown::default();
        let (_tx, mut changes) = channel::channel(0u64);
        let (etx, mut evictions) = channel::channel(0u64);
        let set = SignalSet::default();
        let later = std::time::Instant::now() + std::time::Duration::from_secs(3600);
        let w = watching(&mut changes, &mut evictions, Some(later));
        let fut = watch(&shutdown, w, &set);
        tokio::pin!(fut);
        let mut gate = Gate::new(fut.as_mut());
        assert!(gate.poll_now().await.is_none());
        assert!(!set.has(Signal::Evicted));
        etx.send(1).unwrap();
        let woke = crate::timer::timeout(std::time::Duration::from_secs(5), gate.woken()).await;
        assert!(woke.is_ok(), "the eviction did not wake the gate");
        assert!(set.has(Signal::Evicted));
        assert!(!set.has(Signal::RecheckDue));
        shutdown.hard.cancel();
        let woke = crate::timer::timeout(std::time::Duration::from_secs(5), gate.woken()).await;
        assert!(woke.is_ok(), "the hard stop did not wake the gate");
        assert!(set.has(Signal::HardStop));
    }
}
