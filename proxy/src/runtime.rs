//! The threads `graywire run` works on.
//!
//! `runtime.worker_threads = 1` (single-threaded like PgBouncer, the benchmarked setting) runs
//! everything of the proxy on one current-thread runtime with IO but without tokio's time
//! driver: that driver costs every park of the event loop two clock reads and a pass over its
//! timer wheel, several times per transaction, while a session in steady state has no timer at
//! all. Sleeps and timeouts come from [`crate::timer`] instead.
//!
//! The probe (`[probe]`) is a client library built on tokio's timer; when configured it gets a
//! runtime of its own on a second thread. The process is then multi-threaded, which makes
//! glibc's `recv` and `send` wrappers dearer (cancellation points), so only a configured probe
//! starts that thread.
//!
//! Any other thread count gives one multi-threaded runtime with everything enabled.

use std::future::Future;

use tokio::runtime::{Builder, Handle, Runtime};

/// The runtimes of one process.
pub struct Runtimes {
    main: Runtime,
    /// Built only on request, when `main` lacks tokio's timer.
    probe: Option<Runtime>,
    /// Whether `main` runs without tokio's timer (and [`crate::timer`] serves it).
    own_timers: bool,
}

impl Runtimes {
    /// One runtime with everything enabled (`threads`: 0 one worker per core, 1
    /// single-threaded, n workers): for commands other than `run`.
    pub fn single(threads: usize) -> std::io::Result<Self> {
        let main = match threads {
            0 => Runtime::new()?,
            1 => Builder::new_current_thread().enable_all().build()?,
            n => Builder::new_multi_thread()
                .worker_threads(n)
                .enable_all()
                .build()?,
        };
        Ok(Runtimes {
            main,
            probe: None,
            own_timers: false,
        })
    }

    /// The runtimes of the proxy for `runtime.worker_threads = threads`: with 1, one thread
    /// without tokio's timer, plus a thread for the probe if `with_probe`; otherwise as
    /// [`Runtimes::single`].
    pub fn for_proxy(threads: usize, with_probe: bool) -> std::io::Result<Self> {
        if threads != 1 {
            return Self::single(threads);
        }
        let main = Builder::new_current_thread().enable_io().build()?;
        let probe = if with_probe {
            Some(
                Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("graywire-probe")
                    .enable_all()
                    .build()?,
            )
        } else {
            None
        };
        Ok(Runtimes {
            main,
            probe,
            own_timers: true,
        })
    }

    /// Where the probe runs: its own runtime if there is one, else the main one.
    pub fn probe(&self) -> Handle {
        match &self.probe {
            Some(p) => p.handle().clone(),
            None => self.main.handle().clone(),
        }
    }

    /// Runs `f` on the main runtime (on this thread), with this thread's timer service
    /// installed when the runtime lacks tokio's timer.
    pub fn block_on<F: Future>(&self, f: F) -> std::io::Result<F::Output> {
        if !self.own_timers {
            return Ok(self.main.block_on(f));
        }
        self.main.block_on(async move {
            let _timers = crate::timer::install()?;
            Ok(f.await)
        })
    }
}
