//! graywire's write-continuity probe: it writes ids 1, 2, 3, … through an endpoint at a fixed
//! interval, reads them back, and reports gaps, lost writes, stalls and latency, plus a gate
//! that orchestration waits on. Usable inside `graywire run` (writing through graywire's own
//! listener) and standalone (`graywire probe`) against any endpoint.
//!
//! - [`ledger`]: pure per-id records and every figure over a window.
//! - [`writer`]: the tick loop. [`verify`]: the read-back.
//! - [`gate`]: pure verdict from figures and bounds. [`metrics`]: every metric name.
//! - [`status`]: the figures as `GET /v1/probe` serves them.

pub mod gate;
pub mod ledger;
pub mod metrics;
pub mod status;
pub mod verify;
pub mod writer;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use gate::{GateQuery, NodeFigure, ReadBack, Verdict};
use ledger::{At, Ledger, WindowStats};
use status::{ProbeStatus, ReadBackFigures, TotalFigures, WindowFigures};
use verify::ReadBackState;

/// What a failed write leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Retry the same id until it is written (a unique-key violation on a retry means an
    /// earlier attempt committed).
    Retry,
    /// Never retry: the next tick takes the next id, and the failed one stays a gap.
    Skip,
}

/// A probe mode that is neither `retry` nor `skip`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{given:?} is not a probe mode (\"retry\" or \"skip\")")]
pub struct BadMode {
    pub given: String,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Mode, BadMode> {
        match s {
            "retry" => Ok(Mode::Retry),
            "skip" => Ok(Mode::Skip),
            other => Err(BadMode {
                given: other.to_owned(),
            }),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Retry => "retry",
            Mode::Skip => "skip",
        }
    }
}

/// How a probe runs.
#[derive(Debug, Clone)]
pub struct ProbeConfig {
    /// Where the writer connects: the path under test.
    pub target: tokio_postgres::Config,
    /// Names this probe's rows, so several probes can share the table.
    pub writer: String,
    pub interval: Duration,
    pub mode: Mode,
    /// Bound on one write attempt (and on connecting).
    pub attempt_timeout: Duration,
    pub verify_interval: Duration,
    /// Per-id records are kept this long; older ones are folded into totals.
    pub horizon: Duration,
}

impl ProbeConfig {
    /// Defaults: 100 ms interval, retry mode, 2 s attempts, read-back every second, 1 h horizon.
    pub fn new(target: tokio_postgres::Config) -> Self {
        ProbeConfig {
            target,
            writer: default_writer(),
            interval: Duration::from_millis(100),
            mode: Mode::Retry,
            attempt_timeout: Duration::from_secs(2),
            verify_interval: Duration::from_secs(1),
            horizon: Duration::from_secs(3600),
        }
    }
}

/// `hostname-pid`, unique enough for writers sharing a table.
pub fn default_writer() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}-{}", std::process::id())
}

/// Where the verifier reads back from, asked before each read-back (inside graywire: the
/// current primary, directly).
pub type VerifyTarget = Arc<dyn Fn() -> Option<tokio_postgres::Config> + Send + Sync>;

/// State shared by the writer, the verifier and readers of figures.
pub struct ProbeShared {
    pub config: ProbeConfig,
    started: tokio::time::Instant,
    ledger: Mutex<Ledger>,
    read_back: Mutex<ReadBackState>,
    disruption: Mutex<Duration>,
    verify_target: VerifyTarget,
}

impl ProbeShared {
    pub fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn read_back(&self) -> MutexGuard<'_, ReadBackState> {
        self.read_back.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The probe-relative time of an instant.
    pub fn at(&self, t: tokio::time::Instant) -> At {
        t.saturating_duration_since(self.started)
    }

    pub fn now(&self) -> At {
        self.at(tokio::time::Instant::now())
    }

    /// Adds a stall to the running total; returns the total.
    pub fn add_disruption(&self, stall: Duration) -> Duration {
        let mut d = self.disruption.lock().unwrap_or_else(|p| p.into_inner());
        *d += stall;
        *d
    }
}

/// A running probe.
#[derive(Clone)]
pub struct Probe {
    shared: Arc<ProbeShared>,
}

impl Probe {
    /// Starts the writer and the verifier; both stop when `stop` is cancelled.
    pub fn start(
        config: ProbeConfig,
        verify_target: VerifyTarget,
        stop: CancellationToken,
    ) -> Probe {
        metrics::describe();
        let shared = Arc::new(ProbeShared {
            ledger: Mutex::new(Ledger::new(config.interval, config.horizon)),
            read_back: Mutex::new(ReadBackState::default()),
            disruption: Mutex::new(Duration::ZERO),
            started: tokio::time::Instant::now(),
            config,
            verify_target,
        });
        tokio::spawn(writer::run(shared.clone(), stop.clone()));
        tokio::spawn(verify::run(shared.clone(), stop));
        Probe { shared }
    }

    pub fn config(&self) -> &ProbeConfig {
        &self.shared.config
    }

    /// Figures over the last `window`.
    pub fn window(&self, window: Duration) -> WindowStats {
        let now = self.shared.now();
        self.shared.ledger().window(now, window)
    }

    /// A copy of the ledger (for reports and tests).
    pub fn ledger(&self) -> Ledger {
        self.shared.ledger().clone()
    }

    /// What the read-backs found so far.
    pub fn read_back(&self) -> ReadBackState {
        self.shared.read_back().clone()
    }

    /// The read-back figures of the window `[now - window, now]`: gaps and lost writes among
    /// ids sent, or first seen missing, in it.
    fn read_back_in(&self, now: At, window: Duration) -> ReadBack {
        let start = now.saturating_sub(window);
        let ledger = self.shared.ledger();
        let rb = self.shared.read_back();
        let in_window = |id: &i64, seen: &At| {
            *seen >= start || ledger.record(*id).is_some_and(|r| r.first_sent >= start)
        };
        let cfg = &self.shared.config;
        ReadBack {
            gaps_in_window: rb.gaps.iter().filter(|(i, s)| in_window(i, s)).count() as u64,
            lost_in_window: rb.lost.iter().filter(|(i, s)| in_window(i, s)).count() as u64,
            verified_ago: rb.last_ok.map(|t| now.saturating_sub(t)),
            verify_deadline: cfg.verify_interval * 3 + cfg.attempt_timeout,
        }
    }

    /// The gate's verdict over `query.window`, with node figures when the probe runs inside
    /// graywire.
    pub fn gate(&self, query: &GateQuery, nodes: Option<&[NodeFigure]>) -> Verdict {
        let now = self.shared.now();
        let stats = self.shared.ledger().window(now, query.window);
        let read_back = self.read_back_in(now, query.window);
        gate::evaluate(query, &stats, &read_back, nodes)
    }

    /// Evaluates the gate against `bounds` every second (the first time at once) until
    /// `stop`, and publishes the verdict as [`metrics::GATE_PASS`], so the gauge and the alert
    /// on it hold a verdict from the first scrape whether or not anybody asks `/v1/gate`.
    /// `nodes` gives the node figures when the probe runs inside graywire. Runs on the
    /// current tokio runtime (it uses tokio's timer).
    pub fn watch_gate(
        &self,
        bounds: GateQuery,
        nodes: impl Fn() -> Option<Vec<NodeFigure>> + Send + 'static,
        stop: CancellationToken,
    ) {
        let probe = self.clone();
        let publish = move || {
            let verdict = probe.gate(&bounds, nodes().as_deref());
            ::metrics::gauge!(metrics::GATE_PASS).set(if verdict.pass { 1.0 } else { 0.0 });
        };
        publish();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_secs(1));
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticks.tick() => publish(),
                    _ = stop.cancelled() => return,
                }
            }
        });
    }

    /// A summary: configuration, figures over `window`, totals, read-back (the body of
    /// `GET /v1/probe`).
    pub fn status(&self, window: Duration) -> ProbeStatus {
        let now = self.shared.now();
        let s = self.shared.ledger().window(now, window);
        let totals = self.shared.ledger().totals();
        let rb = self.read_back();
        let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1000.0);
        let cfg = &self.shared.config;
        ProbeStatus {
            writer: cfg.writer.clone(),
            mode: cfg.mode.as_str().to_owned(),
            interval_ms: cfg.interval.as_millis() as u64,
            window_seconds: window.as_secs_f64(),
            window: WindowFigures {
                acked: s.acked,
                failed_attempts: s.failed_attempts,
                errors: s.errors,
                latency_p50_ms: ms(s.latency_p50),
                latency_p99_ms: ms(s.latency_p99),
                latency_max_ms: ms(s.latency_max),
                max_stall_seconds: s.max_stall.as_secs_f64(),
                open_stall_seconds: s.open_stall.as_secs_f64(),
                disruption_seconds: s.disruption.as_secs_f64(),
                missed_ticks: s.missed_ticks,
                abandoned: s.abandoned,
                highest_acked: s.highest_acked,
            },
            totals: TotalFigures {
                acked: totals.acked,
                failed_attempts: totals.failed_attempts,
                errors: totals.errors,
                max_stall_seconds: totals.max_stall.as_secs_f64(),
                disruption_seconds: totals.disruption.as_secs_f64(),
            },
            read_back: ReadBackFigures {
                runs_ok: rb.runs_ok,
                runs_failed: rb.runs_failed,
                last_error: rb.last_error,
                seconds_since_last: rb.last_ok.map(|t| now.saturating_sub(t).as_secs_f64()),
                gaps: rb.gaps.len() as u64,
                lost_writes: rb.lost.len() as u64,
                lost_ids: rb.lost.keys().rev().take(100).copied().collect(),
                duplicates: rb.duplicates,
            },
        }
    }
}
