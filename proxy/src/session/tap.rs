//! Polling a source only when it has something to say.
//!
//! A task that waits on several sources is woken by any one of them, and without help it polls
//! them all to find out which: for a socket with nothing to read, each such poll takes the
//! socket's registration lock and registers the same waker again. The relay waits on two
//! sockets in two directions and on its signals, and a round trip wakes it twice, so most of
//! those polls would find nothing.
//!
//! A [`Tap`] gives one source a waker of its own. Waking it marks the tap and passes the
//! wake-up on to the task's waker. The task then polls a source only if its tap is marked: the
//! source woke it, has not been polled yet, or answered its last poll (a source that answered
//! holds no waker, so it must be polled again to register one).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

/// One source's waker, and whether the source is due a poll.
#[derive(Default)]
pub struct Tap {
    /// Made at the first poll, and made anew if the task's waker changes (a new mark starts
    /// due, so every source registers the new one).
    mark: Option<(Arc<Mark>, Waker)>,
}

/// What a tap's waker does: mark the source due and wake the task.
struct Mark {
    due: AtomicBool,
    task: Waker,
}

impl Wake for Mark {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.due.store(true, Ordering::Release);
        self.task.wake_by_ref();
    }
}

impl Tap {
    /// Runs `f` with the tap's waker if the source is due a poll (or the task's waker changed
    /// since the last time), and clears the mark first, so a wake-up during `f` marks it again.
    /// `None` if the source had no reason to be polled.
    #[inline]
    pub fn run<T>(&mut self, cx: &Context<'_>, f: impl FnOnce(&mut Context<'_>) -> T) -> Option<T> {
        let waker = match &self.mark {
            Some((mark, waker)) if mark.task.will_wake(cx.waker()) => {
                // A load and a store, not a swap: a wake-up between the two is not lost,
                // because the source is polled after the store.
                if !mark.due.load(Ordering::Acquire) {
                    return None;
                }
                mark.due.store(false, Ordering::Release);
                waker
            }
            _ => {
                let mark = Arc::new(Mark {
                    due: AtomicBool::new(false),
                    task: cx.waker().clone(),
                });
                let waker = Waker::from(mark.clone());
                &self.mark.insert((mark, waker)).1
            }
        };
        Some(f(&mut Context::from_waker(waker)))
    }

    /// Polls a source through the tap: `Pending` without touching it unless it is due. A
    /// source that answers is due again (it holds no waker until polled once more).
    #[inline]
    pub fn poll<T>(
        &mut self,
        cx: &Context<'_>,
        f: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        match self.run(cx, f) {
            Some(Poll::Ready(out)) => {
                if let Some((mark, _)) = &self.mark {
                    mark.due.store(true, Ordering::Release);
                }
                Poll::Ready(out)
            }
            Some(Poll::Pending) | None => Poll::Pending,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    /// A source that counts its polls, keeps the waker it was polled with, and answers when
    /// told to.
    #[derive(Default)]
    struct Source {
        polls: AtomicUsize,
        answer: AtomicBool,
        waker: Mutex<Option<Waker>>,
    }

    impl Source {
        fn poll(&self, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if self.answer.swap(false, Ordering::SeqCst) {
                return Poll::Ready(());
            }
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }

        fn polls(&self) -> usize {
            self.polls.load(Ordering::SeqCst)
        }

        /// Has something, and wakes whoever polled it last.
        fn fire(&self) {
            self.answer.store(true, Ordering::SeqCst);
            if let Some(w) = self.waker.lock().unwrap().take() {
                w.wake();
            }
        }
    }

    #[derive(Default)]
    struct WakeCount(AtomicUsize);

    impl Wake for WakeCount {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_source_is_polled_only_when_it_woke_the_task_or_answered_last() {
        let source = Source::default();
        let mut tap = Tap::default();
        let task = Arc::new(WakeCount::default());
        let waker = Waker::from(task.clone());
        let cx = Context::from_waker(&waker);

        // The first poll registers.
        assert!(tap.poll(&cx, |cx| source.poll(cx)).is_pending());
        assert_eq!(source.polls(), 1);
        // Not woken: not touched.
        for _ in 0..100 {
            assert!(tap.poll(&cx, |cx| source.poll(cx)).is_pending());
        }
        assert_eq!(source.polls(), 1);

        // Its wake-up reaches the task, and the next poll gets the answer.
        source.fire();
        assert_eq!(task.0.load(Ordering::SeqCst), 1);
        assert!(tap.poll(&cx, |cx| source.poll(cx)).is_ready());
        assert_eq!(source.polls(), 2);
        // It answered, so it holds no waker: the next poll goes through and registers.
        assert!(tap.poll(&cx, |cx| source.poll(cx)).is_pending());
        assert_eq!(source.polls(), 3);
        assert!(tap.poll(&cx, |cx| source.poll(cx)).is_pending());
        assert_eq!(source.polls(), 3);
    }

    #[test]
    fn a_new_task_waker_makes_the_source_due_and_receives_its_wake_ups() {
        let source = Source::default();
        let mut tap = Tap::default();
        let first = Waker::from(Arc::new(WakeCount::default()));
        let second_wakes = Arc::new(WakeCount::default());
        let second = Waker::from(second_wakes.clone());
        assert!(tap
            .poll(&Context::from_waker(&first), |cx| source.poll(cx))
            .is_pending());
        assert!(tap
            .poll(&Context::from_waker(&second), |cx| source.poll(cx))
            .is_pending());
        assert_eq!(source.polls(), 2);
        source.fire();
        assert_eq!(second_wakes.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn run_reports_whether_the_source_was_due_and_does_not_mark_it_again() {
        let source = Source::default();
        let mut tap = Tap::default();
        let waker = Waker::from(Arc::new(WakeCount::default()));
        let cx = Context::from_waker(&waker);
        assert_eq!(tap.run(&cx, |cx| source.poll(cx)), Some(Poll::Pending));
        assert_eq!(tap.run(&cx, |cx| source.poll(cx)), None);
        source.fire();
        assert_eq!(tap.run(&cx, |cx| source.poll(cx)), Some(Poll::Ready(())));
        // Unlike `poll`, an answer does not make it due again.
        assert_eq!(tap.run(&cx, |cx| source.poll(cx)), None);
    }
}
