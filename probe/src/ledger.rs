//! The probe's ledger: one record per id, and every figure the probe reports computed from it
//! over any time window. Pure: no I/O, no clock (times are offsets from the probe's start,
//! passed in by the caller), so every figure can be tested on synthetic timelines.
//!
//! - **stall**: time between two consecutive acknowledged writes, minus the write interval.
//!   The gap still open at "now" (no ack since the last one) counts as a stall too, so a
//!   writer that is stuck is never mistaken for a quiet one.
//! - **disruption**: the sum of stalls in the window.
//!
//! Memory is bounded: records older than the horizon are folded into running totals.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

/// A point in time: the offset from the probe's start.
pub type At = Duration;

/// Everything known about one id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdRecord {
    pub id: i64,
    pub first_sent: At,
    pub acked: Option<At>,
    pub attempts: u32,
    /// The SQLSTATE (or a short reason) of each failed attempt.
    pub errors: Vec<String>,
    /// Given up on (skip mode): the id will never be written.
    pub abandoned: bool,
    /// Acknowledged through a unique-key violation on a retry: an earlier attempt committed.
    pub committed_earlier: bool,
}

/// Totals of records that left the horizon.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    pub acked: u64,
    pub failed_attempts: u64,
    pub errors: BTreeMap<String, u64>,
    pub max_stall: Duration,
    pub disruption: Duration,
}

/// Figures over one window `[now - window, now]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WindowStats {
    pub window: Duration,
    /// Ids acknowledged in the window.
    pub acked: u64,
    /// Failed attempts begun in the window, by SQLSTATE.
    pub errors: BTreeMap<String, u64>,
    pub failed_attempts: u64,
    /// Write latency (first send to ack) of ids acknowledged in the window.
    pub latency_p50: Option<Duration>,
    pub latency_p99: Option<Duration>,
    pub latency_max: Option<Duration>,
    /// The longest stall ending in the window, or still open at its end.
    pub max_stall: Duration,
    /// Sum of the stalls ending in the window, plus the open one.
    pub disruption: Duration,
    /// The stall still open at the window's end (time since the last ack, minus the interval).
    pub open_stall: Duration,
    /// Ticks that passed while a write was still running, in the window.
    pub missed_ticks: u64,
    /// Ids given up on (skip mode) whose first send is in the window.
    pub abandoned: u64,
    pub last_ack: Option<At>,
    pub highest_acked: Option<i64>,
}

/// The ledger of one writer.
#[derive(Debug, Clone)]
pub struct Ledger {
    interval: Duration,
    horizon: Duration,
    records: VecDeque<IdRecord>,
    missed: VecDeque<At>,
    evicted: Totals,
    /// The last ack among evicted records (anchor for the first stall inside the horizon).
    evicted_last_ack: Option<At>,
}

impl Ledger {
    pub fn new(interval: Duration, horizon: Duration) -> Self {
        Ledger {
            interval,
            horizon,
            records: VecDeque::new(),
            missed: VecDeque::new(),
            evicted: Totals::default(),
            evicted_last_ack: None,
        }
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    fn record_mut(&mut self, id: i64) -> Option<&mut IdRecord> {
        self.records.iter_mut().rev().find(|r| r.id == id)
    }

    pub fn record(&self, id: i64) -> Option<&IdRecord> {
        self.records.iter().rev().find(|r| r.id == id)
    }

    /// An attempt to write `id` starts (the first one creates its record).
    pub fn attempt(&mut self, id: i64, at: At) {
        match self.record_mut(id) {
            Some(r) => r.attempts += 1,
            None => self.records.push_back(IdRecord {
                id,
                first_sent: at,
                acked: None,
                attempts: 1,
                errors: Vec::new(),
                abandoned: false,
                committed_earlier: false,
            }),
        }
    }

    /// The current attempt at `id` failed with `code`.
    pub fn fail(&mut self, id: i64, code: &str) {
        if let Some(r) = self.record_mut(id) {
            r.errors.push(code.to_owned());
        }
    }

    /// `id` will not be retried (skip mode).
    pub fn abandon(&mut self, id: i64) {
        if let Some(r) = self.record_mut(id) {
            r.abandoned = true;
        }
    }

    /// `id` is acknowledged at `at`; returns the stall this ack ends (if any).
    pub fn ack(&mut self, id: i64, at: At, committed_earlier: bool) -> Duration {
        let previous = self.last_ack();
        if let Some(r) = self.record_mut(id) {
            r.acked = Some(at);
            r.committed_earlier = committed_earlier;
        }
        previous
            .map(|p| at.saturating_sub(p).saturating_sub(self.interval))
            .unwrap_or_default()
    }

    /// A tick passed while a write was still running.
    pub fn missed_tick(&mut self, at: At) {
        self.missed.push_back(at);
    }

    pub fn last_ack(&self) -> Option<At> {
        self.records
            .iter()
            .rev()
            .find_map(|r| r.acked)
            .or(self.evicted_last_ack)
    }

    /// Ids that are settled (acknowledged or abandoned), lowest and highest still kept.
    pub fn settled_range(&self) -> Option<(i64, i64)> {
        let lo = self.records.front()?.id;
        let hi = self
            .records
            .iter()
            .rev()
            .find(|r| r.acked.is_some() || r.abandoned)?
            .id;
        Some((lo, hi))
    }

    /// Acknowledged ids in `lo..=hi`.
    pub fn acked_ids(&self, lo: i64, hi: i64) -> impl Iterator<Item = i64> + '_ {
        self.records
            .iter()
            .filter(move |r| r.id >= lo && r.id <= hi && r.acked.is_some())
            .map(|r| r.id)
    }

    /// Totals over everything, evicted records included.
    pub fn totals(&self) -> Totals {
        let mut t = self.evicted.clone();
        let mut prev = self.evicted_last_ack;
        for r in &self.records {
            t.failed_attempts += r.errors.len() as u64;
            for e in &r.errors {
                *t.errors.entry(e.clone()).or_default() += 1;
            }
            if let Some(a) = r.acked {
                t.acked += 1;
                if let Some(p) = prev {
                    let stall = a.saturating_sub(p).saturating_sub(self.interval);
                    t.max_stall = t.max_stall.max(stall);
                    t.disruption += stall;
                }
                prev = Some(a);
            }
        }
        t
    }

    /// Folds records sent before `now - horizon` into the totals (never one still in flight);
    /// the last folded ack stays the anchor of the next stall.
    pub fn evict(&mut self, now: At) {
        let Some(limit) = now.checked_sub(self.horizon) else {
            return;
        };
        while let Some(front) = self.records.front() {
            // Never evict an id still in flight.
            if front.first_sent >= limit || (front.acked.is_none() && !front.abandoned) {
                break;
            }
            let Some(r) = self.records.pop_front() else {
                break;
            };
            self.evicted.failed_attempts += r.errors.len() as u64;
            for e in &r.errors {
                *self.evicted.errors.entry(e.clone()).or_default() += 1;
            }
            if let Some(a) = r.acked {
                self.evicted.acked += 1;
                if let Some(p) = self.evicted_last_ack {
                    let stall = a.saturating_sub(p).saturating_sub(self.interval);
                    self.evicted.max_stall = self.evicted.max_stall.max(stall);
                    self.evicted.disruption += stall;
                }
                self.evicted_last_ack = Some(a);
            }
        }
        while self.missed.front().is_some_and(|m| *m < limit) {
            self.missed.pop_front();
        }
    }

    /// Figures over `[now - window, now]`.
    pub fn window(&self, now: At, window: Duration) -> WindowStats {
        let start = now.saturating_sub(window);
        let mut s = WindowStats {
            window,
            ..WindowStats::default()
        };
        let mut latencies = Vec::new();
        // The anchor: the last ack before the window (else the first send ever seen).
        let mut prev: Option<At> = self.evicted_last_ack;
        for r in &self.records {
            if r.first_sent >= start && r.first_sent <= now {
                s.failed_attempts += r.errors.len() as u64;
                for e in &r.errors {
                    *s.errors.entry(e.clone()).or_default() += 1;
                }
                if r.abandoned {
                    s.abandoned += 1;
                }
            }
            let Some(a) = r.acked else { continue };
            if a > now {
                continue;
            }
            if a >= start {
                s.acked += 1;
                latencies.push(a.saturating_sub(r.first_sent));
                let from = prev.unwrap_or(r.first_sent);
                let stall = a.saturating_sub(from).saturating_sub(self.interval);
                s.max_stall = s.max_stall.max(stall);
                s.disruption += stall;
                s.highest_acked = Some(s.highest_acked.map_or(r.id, |h: i64| h.max(r.id)));
            }
            prev = Some(a);
        }
        s.last_ack = prev;
        let anchor = prev.or_else(|| self.records.front().map(|r| r.first_sent));
        if let Some(p) = anchor {
            s.open_stall = now.saturating_sub(p).saturating_sub(self.interval);
            s.max_stall = s.max_stall.max(s.open_stall);
            s.disruption += s.open_stall.min(window);
        }
        s.missed_ticks = self
            .missed
            .iter()
            .filter(|m| **m >= start && **m <= now)
            .count() as u64;
        latencies.sort_unstable();
        s.latency_p50 = quantile(&latencies, 0.50);
        s.latency_p99 = quantile(&latencies, 0.99);
        s.latency_max = latencies.last().copied();
        s
    }
}

/// The `q` quantile of sorted values (nearest rank).
pub fn quantile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    /// A writer that acks every id `latency` after sending it, one per `interval`, except
    /// that nothing is acknowledged during `[outage_from, outage_to)`; the id sent during an
    /// outage is retried each tick and acked at the first tick after it.
    fn timeline(
        interval: Duration,
        latency: Duration,
        ticks: u32,
        outage: Option<(Duration, Duration)>,
    ) -> Ledger {
        let mut l = Ledger::new(interval, Duration::from_secs(3600));
        let mut id = 1;
        let mut retrying = false;
        for k in 0..ticks {
            let t = interval * k;
            l.attempt(id, t);
            let down = outage.is_some_and(|(a, b)| t >= a && t < b);
            if down {
                l.fail(id, "08006");
                retrying = true;
                continue;
            }
            l.ack(id, t + latency, retrying);
            retrying = false;
            id += 1;
        }
        l
    }

    #[test]
    fn a_steady_writer_has_no_stall() {
        let l = timeline(100 * MS, 2 * MS, 100, None);
        let s = l.window(Duration::from_millis(9_950), Duration::from_secs(5));
        assert_eq!(s.max_stall, Duration::ZERO);
        assert_eq!(s.acked, 50);
        assert_eq!(s.latency_p99, Some(2 * MS));
        assert!(s.errors.is_empty());
    }

    #[test]
    fn an_outage_is_one_stall_of_its_length() {
        // Down from 2.0 s to 5.0 s: the last ack before is at 1.902, the first after at 5.002.
        let l = timeline(
            100 * MS,
            2 * MS,
            100,
            Some((Duration::from_secs(2), Duration::from_secs(5))),
        );
        let s = l.window(Duration::from_millis(9_950), Duration::from_secs(10));
        assert_eq!(s.max_stall, Duration::from_millis(3_000));
        assert_eq!(s.errors.get("08006"), Some(&30));
        // The retried id's latency counts from its first attempt (at 2.0 s).
        assert_eq!(s.latency_max, Some(Duration::from_millis(3_002)));
        // A window that ends before the outage sees none of it.
        let early = l.window(Duration::from_millis(1_950), Duration::from_secs(1));
        assert_eq!(early.max_stall, Duration::ZERO);
        // A window after the outage has moved past it.
        let late = l.window(Duration::from_millis(9_950), Duration::from_secs(2));
        assert_eq!(late.max_stall, Duration::ZERO);
    }

    #[test]
    fn a_stuck_writer_shows_an_open_stall() {
        let l = timeline(100 * MS, 2 * MS, 10, None);
        // Last ack at 0.902 s; at 5 s nothing since.
        let s = l.window(Duration::from_secs(5), Duration::from_secs(2));
        assert_eq!(s.acked, 0);
        assert_eq!(s.open_stall, Duration::from_millis(3_998));
        assert_eq!(s.max_stall, s.open_stall);
    }

    #[test]
    fn retry_committed_acks_count_once() {
        let mut l = Ledger::new(100 * MS, Duration::from_secs(60));
        l.attempt(1, Duration::ZERO);
        l.fail(1, "40003");
        l.attempt(1, 100 * MS);
        l.ack(1, 120 * MS, true);
        let r = l.record(1).expect("record");
        assert_eq!(r.attempts, 2);
        assert!(r.committed_earlier);
        let s = l.window(200 * MS, Duration::from_secs(1));
        assert_eq!(s.acked, 1);
        assert_eq!(s.latency_max, Some(120 * MS));
        assert_eq!(l.totals().acked, 1);
    }

    #[test]
    fn eviction_keeps_totals_and_the_stall_anchor() {
        let mut l = timeline(
            100 * MS,
            MS,
            200,
            Some((Duration::from_secs(3), Duration::from_secs(4))),
        );
        let before = l.totals();
        l.evict(Duration::from_secs(25)); // horizon 1 h: nothing goes
        assert_eq!(l.totals(), before);
        let mut short = Ledger::new(100 * MS, Duration::from_secs(10));
        std::mem::swap(&mut short.records, &mut l.records);
        let before = short.totals();
        short.evict(Duration::from_secs(19));
        assert!(short.records.len() < 200);
        assert_eq!(short.totals(), before, "totals survive eviction");
        assert!(short.last_ack().is_some());
    }

    #[test]
    fn quantiles_use_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(|i| i * MS).collect();
        assert_eq!(quantile(&v, 0.99), Some(99 * MS));
        assert_eq!(quantile(&v, 0.5), Some(50 * MS));
        assert_eq!(quantile(&[], 0.5), None);
    }

    proptest! {
        #[test]
        fn the_max_stall_is_the_outage_whatever_its_place(
            start_tick in 5u32..50,
            len_ticks in 1u32..40,
            latency_ms in 0u64..50,
        ) {
            let interval = 100 * MS;
            let from = interval * start_tick;
            let to = interval * (start_tick + len_ticks);
            let l = timeline(interval, Duration::from_millis(latency_ms), 120, Some((from, to)));
            let now = interval * 120;
            let s = l.window(now, now);
            // The last ack before is at from - interval + latency, the first after at to + latency.
            prop_assert_eq!(s.max_stall, to - from);
            prop_assert_eq!(s.errors.get("08006").copied().unwrap_or(0), u64::from(len_ticks));
            prop_assert_eq!(s.acked, u64::from(120 - len_ticks));
            let totals = l.totals();
            prop_assert_eq!(totals.max_stall, to - from);
            prop_assert_eq!(totals.disruption, to - from);
        }

        #[test]
        fn windows_split_acks_exactly(split_ms in 100u64..9_900) {
            let l = timeline(100 * MS, MS, 100, None);
            let now = Duration::from_secs(10);
            let split = Duration::from_millis(split_ms);
            let whole = l.window(now, now).acked;
            let recent = l.window(now, now - split).acked;
            let early = l.window(split, split).acked;
            // Acks at exactly the split instant count in both halves.
            let on_edge = u64::from((split_ms >= 1) && (split_ms - 1) % 100 == 0);
            prop_assert_eq!(recent + early, whole + on_edge);
        }
    }
}
