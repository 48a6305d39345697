//! Sleeps and timeouts for everything the proxy runs.
//!
//! With `runtime.worker_threads = 1`, the proxy runs on a single-threaded runtime built without
//! tokio's time driver (see [`crate::runtime`]). That driver costs every park of the event loop
//! two clock reads and a pass over its timer wheel, several times per transaction, although a
//! session in steady state has no timer at all. Instead, the thread installs a [`Service`]: its
//! deadlines in an ordered map behind one timerfd, registered with tokio's IO driver like any
//! socket. Nothing runs per park; the timerfd wakes the loop only when a deadline is due.
//!
//! On a thread without a service (a multi-threaded runtime, the probe's thread, the tests' own
//! runtimes), the same functions use `tokio::time`. The proxy calls these functions, never
//! `tokio::time`'s: clippy's `disallowed-methods` (in `proxy/clippy.toml`) enforces it outside
//! `demo/` and `rollout/`, which build runtimes with tokio's timer.
#![allow(clippy::disallowed_methods)]

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::future::Future;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use tokio::net::unix::pipe;

/// A deadline passed before the future completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

impl std::fmt::Display for Elapsed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("deadline has elapsed")
    }
}

impl std::error::Error for Elapsed {}

/// Completes at `at`.
pub fn sleep_until(at: Instant) -> Sleep {
    Sleep {
        at,
        own: None,
        tokio: None,
    }
}

/// Completes after `duration`.
pub fn sleep(duration: Duration) -> Sleep {
    sleep_until(Instant::now() + duration)
}

/// `future`'s output, or [`Elapsed`] if `at` comes first. The future is polled before the
/// deadline is looked at, so a future that is ready wins.
pub fn timeout_at<F: Future>(at: Instant, future: F) -> Timeout<F> {
    Timeout {
        future,
        sleep: sleep_until(at),
    }
}

/// `future`'s output, or [`Elapsed`] if it takes longer than `duration`.
pub fn timeout<F: Future>(duration: Duration, future: F) -> Timeout<F> {
    timeout_at(Instant::now() + duration, future)
}

pin_project_lite::pin_project! {
    /// A sleep; which timer serves it is decided at its first poll, on the thread that polls
    /// it. Hand-written rather than an `async fn`, so that wrapping a future in a [`Timeout`]
    /// does not copy it once more.
    pub struct Sleep {
        at: Instant,
        own: Option<OwnSleep>,
        #[pin]
        tokio: Option<tokio::time::Sleep>,
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        if let Some(own) = this.own {
            return Pin::new(own).poll(cx);
        }
        if this.tokio.is_none() {
            match current() {
                Some(service) => {
                    let own = this.own.insert(OwnSleep {
                        service,
                        at: *this.at,
                        id: None,
                    });
                    return Pin::new(own).poll(cx);
                }
                None => this
                    .tokio
                    .set(Some(tokio::time::sleep_until((*this.at).into()))),
            }
        }
        match this.tokio.as_pin_mut() {
            Some(sleep) => sleep.poll(cx),
            None => Poll::Pending,
        }
    }
}

pin_project_lite::pin_project! {
    /// See [`timeout_at`].
    pub struct Timeout<F> {
        #[pin]
        future: F,
        #[pin]
        sleep: Sleep,
    }
}

impl<F: Future> Future for Timeout<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.future.poll(cx) {
            return Poll::Ready(Ok(out));
        }
        this.sleep.poll(cx).map(|()| Err(Elapsed))
    }
}

thread_local! {
    static SERVICE: RefCell<Option<Arc<Service>>> = const { RefCell::new(None) };
}

fn current() -> Option<Arc<Service>> {
    SERVICE.with(|s| s.borrow().clone())
}

/// Installs a timer service on this thread, which must be the only thread of a
/// current-thread runtime, from inside it (the timerfd is registered with the runtime's IO
/// driver and a task reads it). Timers of this thread use it until the guard is dropped.
pub fn install() -> std::io::Result<Installed> {
    let fd = TimerFd::new(
        ClockId::CLOCK_MONOTONIC,
        TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
    )?;
    // tokio registers an arbitrary descriptor safely only as a pipe's reading end (its
    // AsyncFd constructors are unsafe, and this workspace forbids unsafe code). A timerfd
    // reads like one: 8 bytes when it has gone off, EAGAIN before. The duplicate shares the
    // timer; `fd` keeps the handle to set it.
    let expiries = pipe::Receiver::from_owned_fd_unchecked(fd.as_fd().try_clone_to_owned()?)?;
    let service = Arc::new(Service {
        expiries,
        fd,
        state: Mutex::new(State {
            waiting: BTreeMap::new(),
            next_id: 0,
            armed: None,
        }),
    });
    let driver = tokio::spawn(drive(service.clone()));
    SERVICE.with(|s| *s.borrow_mut() = Some(service));
    Ok(Installed { driver })
}

/// Keeps the service installed; dropping it uninstalls the service and stops its task.
pub struct Installed {
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Installed {
    fn drop(&mut self) {
        self.driver.abort();
        SERVICE.with(|s| s.borrow_mut().take());
    }
}

/// The deadlines of one thread.
struct Service {
    /// A duplicate of `fd`, registered with the runtime's IO driver, to read expiries from.
    expiries: pipe::Receiver,
    fd: TimerFd,
    state: Mutex<State>,
}

struct State {
    /// Wakers by deadline; the id tells apart sleeps with the same deadline. A sleep whose
    /// entry is gone has fired.
    waiting: BTreeMap<(Instant, u64), Waker>,
    next_id: u64,
    /// When the timerfd goes off, if armed. It may go off for a sleep that has since been
    /// dropped; the driver then finds nothing due and arms it for the next deadline.
    armed: Option<Instant>,
}

impl Service {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets the timerfd to go off at `at` (relative to now: `Instant` does not expose its
    /// clock value; it is the same monotonic clock).
    fn arm(&self, state: &mut State, at: Instant) {
        // Zero would disarm the timer.
        let after = at
            .saturating_duration_since(Instant::now())
            .max(Duration::from_nanos(1));
        match self.fd.set(
            Expiration::OneShot(TimeSpec::from_duration(after)),
            TimerSetTimeFlags::empty(),
        ) {
            Ok(()) => state.armed = Some(at),
            // Cannot fail for a valid timerfd and a valid time; if it ever does, the next
            // sleep to register tries again.
            Err(e) => tracing::error!(error = %e, "cannot arm the session thread's timerfd"),
        }
    }
}

/// Reads the timerfd whenever it goes off and wakes every sleep that is due.
async fn drive(service: Arc<Service>) {
    let mut due: Vec<Waker> = Vec::new();
    loop {
        if let Err(e) = service.expiries.readable().await {
            tracing::error!(error = %e, "the session thread's timerfd failed; timers stop");
            return;
        }
        match service.expiries.try_read(&mut [0u8; 8]) {
            Ok(_) => {}
            // Not gone off after all (readiness is cleared): wait again.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the session thread's timerfd; timers stop");
                return;
            }
        }
        {
            let mut state = service.state();
            let now = Instant::now();
            while let Some(entry) = state.waiting.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                due.push(entry.remove());
            }
            state.armed = None;
            if let Some((&(next, _), _)) = state.waiting.first_key_value() {
                service.arm(&mut state, next);
            }
        }
        for waker in due.drain(..) {
            waker.wake();
        }
    }
}

/// A sleep on this thread's service.
struct OwnSleep {
    service: Arc<Service>,
    at: Instant,
    /// Set once registered.
    id: Option<u64>,
}

impl Future for OwnSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let mut state = this.service.state();
        match this.id {
            None => {
                if Instant::now() >= this.at {
                    return Poll::Ready(());
                }
                let id = state.next_id;
                state.next_id += 1;
                state.waiting.insert((this.at, id), cx.waker().clone());
                if state.armed.is_none_or(|armed| this.at < armed) {
                    this.service.arm(&mut state, this.at);
                }
                this.id = Some(id);
                Poll::Pending
            }
            Some(id) => match state.waiting.get_mut(&(this.at, id)) {
                Some(waker) => {
                    if !waker.will_wake(cx.waker()) {
                        waker.clone_from(cx.waker());
                    }
                    Poll::Pending
                }
                None => {
                    // Fired; `at` has passed, so a later poll is ready too.
                    this.id = None;
                    Poll::Ready(())
                }
            },
        }
    }
}

impl Drop for OwnSleep {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            self.service.state().waiting.remove(&(self.at, id));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A runtime like the session thread's: IO, no time driver.
    fn session_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .expect("runtime")
    }

    fn waiting(service: &Service) -> usize {
        service.state().waiting.len()
    }

    #[test]
    fn sleeps_end_in_deadline_order_without_tokio_timers() {
        session_runtime().block_on(async {
            let _installed = install().expect("install");
            let started = Instant::now();
            let order = Arc::new(Mutex::new(Vec::new()));
            let mut tasks = Vec::new();
            for ms in [120u64, 40, 80, 1, 40] {
                let order = order.clone();
                tasks.push(tokio::spawn(async move {
                    sleep(Duration::from_millis(ms)).await;
                    let at = started.elapsed();
                    assert!(
                        at >= Duration::from_millis(ms),
                        "{ms} ms sleep ended at {at:?}"
                    );
                    order.lock().expect("order").push(ms);
                }));
            }
            for t in tasks {
                t.await.expect("sleep task");
            }
            assert_eq!(*order.lock().expect("order"), vec![1, 40, 40, 80, 120]);
            let service = current().expect("installed");
            assert_eq!(waiting(&service), 0, "fired sleeps leave no entry");
        });
    }

    #[test]
    fn a_dropped_sleep_is_forgotten_and_later_ones_still_fire() {
        session_runtime().block_on(async {
            let _installed = install().expect("install");
            let service = current().expect("installed");
            // The earliest deadline arms the timerfd, then goes away: the timerfd goes off for
            // nothing and must be armed again for the next one.
            let early = timeout(Duration::from_millis(20), std::future::pending::<()>());
            let mut early = Box::pin(early);
            assert!(futures_poll_once(early.as_mut()).await.is_pending());
            assert_eq!(waiting(&service), 1);
            drop(early);
            assert_eq!(waiting(&service), 0, "a dropped sleep leaves no entry");
            let started = Instant::now();
            sleep(Duration::from_millis(60)).await;
            let took = started.elapsed();
            assert!(took >= Duration::from_millis(60), "{took:?}");
            assert!(took < Duration::from_secs(2), "{took:?}");
        });
    }

    #[test]
    fn timeouts_give_the_output_or_elapsed() {
        session_runtime().block_on(async {
            let _installed = install().expect("install");
            let quick = timeout(Duration::from_secs(5), async { 7 }).await;
            assert_eq!(quick, Ok(7));
            let started = Instant::now();
            let slow = timeout(Duration::from_millis(50), std::future::pending::<()>()).await;
            assert_eq!(slow, Err(Elapsed));
            assert!(started.elapsed() >= Duration::from_millis(50));
            let past = timeout_at(started, async { "ready wins" }).await;
            assert_eq!(
                past,
                Ok("ready wins"),
                "a ready future beats a past deadline"
            );
            let past = timeout_at(started, std::future::pending::<()>()).await;
            assert_eq!(past, Err(Elapsed));
        });
    }

    #[test]
    fn many_sleeps_with_the_same_deadline_all_fire() {
        session_runtime().block_on(async {
            let _installed = install().expect("install");
            let at = Instant::now() + Duration::from_millis(30);
            let tasks: Vec<_> = (0..200).map(|_| tokio::spawn(sleep_until(at))).collect();
            for t in tasks {
                t.await.expect("sleep task");
            }
            assert!(Instant::now() >= at);
            assert_eq!(waiting(&current().expect("installed")), 0);
        });
    }

    #[test]
    fn without_a_service_tokio_times_it() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime");
        rt.block_on(async {
            assert!(current().is_none());
            let started = tokio::time::Instant::now();
            // With the clock paused, only tokio's timer can make this return at once.
            sleep(Duration::from_secs(3600)).await;
            assert!(started.elapsed() >= Duration::from_secs(3600));
        });
    }

    #[test]
    fn dropping_the_guard_uninstalls() {
        session_runtime().block_on(async {
            let installed = install().expect("install");
            assert!(current().is_some());
            drop(installed);
            assert!(current().is_none());
        });
    }

    /// Polls `f` once.
    async fn futures_poll_once<F: Future + Unpin>(mut f: F) -> Poll<F::Output> {
        std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut f).poll(cx))).await
    }
}
