//! The verifier: every `verify_interval` it reads this writer's ids back — from the primary
//! directly when the probe knows it, not through the path under test — and reports gaps (ids
//! missing from the table), **lost writes** (acknowledged ids missing) and duplicates.
//!
//! Only settled ids are judged: acknowledged ones, and in skip mode abandoned ones; an id still
//! being written is neither a gap nor lost yet.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

use crate::ledger::{At, Ledger};
use crate::metrics as m;
use crate::ProbeShared;

/// What the read-backs found, kept between runs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReadBackState {
    pub runs_ok: u64,
    pub runs_failed: u64,
    pub last_ok: Option<At>,
    pub last_error: Option<String>,
    /// Missing ids (settled, not in the table) with when they were first seen missing.
    pub gaps: BTreeMap<i64, At>,
    /// Acknowledged ids missing from the table, with when they were first seen missing.
    pub lost: BTreeMap<i64, At>,
    pub duplicates: u64,
}

/// Compares what the table holds with the ledger, for ids `lo..=hi`.
pub fn compare(
    ledger: &Ledger,
    lo: i64,
    hi: i64,
    present: &[i64],
    now: At,
    state: &mut ReadBackState,
) {
    let mut seen = BTreeSet::new();
    let mut duplicates = 0;
    for id in present {
        if !seen.insert(*id) {
            duplicates += 1;
        }
    }
    state.duplicates = duplicates;
    let acked: BTreeSet<i64> = ledger.acked_ids(lo, hi).collect();
    // Re-judge the ids in range (a stale read can be corrected); keep verdicts on older ids
    // and the time each missing id was first seen missing.
    let old_gaps = std::mem::take(&mut state.gaps);
    let old_lost = std::mem::take(&mut state.lost);
    let mut gaps: BTreeMap<i64, At> = old_gaps.range(..lo).map(|(k, v)| (*k, *v)).collect();
    let mut lost: BTreeMap<i64, At> = old_lost.range(..lo).map(|(k, v)| (*k, *v)).collect();
    for id in lo..=hi {
        if seen.contains(&id) {
            continue;
        }
        let record = ledger.record(id);
        // An id still in flight is not judged yet; one never attempted (kept out of the
        // ledger by a writer restart) is a gap.
        let judged = record.is_none_or(|r| r.acked.is_some() || r.abandoned);
        if !judged {
            continue;
        }
        gaps.insert(id, old_gaps.get(&id).copied().unwrap_or(now));
        if acked.contains(&id) {
            lost.insert(id, old_lost.get(&id).copied().unwrap_or(now));
        }
    }
    state.gaps = gaps;
    state.lost = lost;
}

/// Runs read-backs until `stop`.
pub async fn run(shared: Arc<ProbeShared>, stop: CancellationToken) {
    let cfg = &shared.config;
    let mut ticks = tokio::time::interval(cfg.verify_interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.cancelled() => return,
        }
        let result = tokio::time::timeout(
            cfg.verify_interval.max(Duration::from_secs(2)),
            once(&shared),
        )
        .await;
        let outcome = match result {
            Ok(r) => r,
            Err(_) => Err(ReadBackError::TimedOut),
        };
        let mut state = shared.read_back();
        match outcome {
            Ok(()) => {
                state.runs_ok += 1;
                state.last_error = None;
                metrics::counter!(m::VERIFY_RUNS_TOTAL, "result" => "ok").increment(1);
            }
            Err(e) => {
                state.runs_failed += 1;
                debug!(error = %e, "probe read-back failed");
                state.last_error = Some(e.to_string());
                metrics::counter!(m::VERIFY_RUNS_TOTAL, "result" => "error").increment(1);
            }
        }
    }
}

/// Why a read-back did not happen.
#[derive(Debug, thiserror::Error)]
enum ReadBackError {
    #[error("no node to read back from right now")]
    NoTarget,
    #[error("read-back timed out")]
    TimedOut,
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
}

async fn once(shared: &ProbeShared) -> Result<(), ReadBackError> {
    let target = (shared.verify_target)().ok_or(ReadBackError::NoTarget)?;
    let (client, conn) = target.connect(NoTls).await?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let range = shared.ledger().settled_range();
    let Some((lo, hi)) = range else {
        driver.abort();
        return Ok(());
    };
    let rows = client
        .query(
            "SELECT id FROM graywire_probe WHERE writer = $1 AND id BETWEEN $2 AND $3",
            &[&shared.config.writer, &lo, &hi],
        )
        .await;
    driver.abort();
    let rows = rows?;
    let present: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    let now = shared.now();
    let ledger = shared.ledger().clone();
    let mut state = shared.read_back();
    let lost_before = state.lost.len();
    compare(&ledger, lo, hi, &present, now, &mut state);
    state.last_ok = Some(now);
    if state.lost.len() > lost_before {
        let new: Vec<i64> = state.lost.keys().copied().rev().take(20).collect();
        error!(
            lost = state.lost.len(),
            newest = ?new,
            "LOST WRITES: acknowledged probe ids are missing from the table"
        );
    } else if !state.gaps.is_empty() {
        warn!(gaps = state.gaps.len(), "probe ids missing from the table");
    }
    metrics::gauge!(m::GAPS).set(state.gaps.len() as f64);
    metrics::gauge!(m::LOST_WRITES).set(state.lost.len() as f64);
    metrics::gauge!(m::DUPLICATES).set(state.duplicates as f64);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn missing_acknowledged_ids_are_lost_and_abandoned_ones_are_gaps() {
        let mut l = Ledger::new(100 * MS, Duration::from_secs(3600));
        for id in 1..=10 {
            l.attempt(id, MS * id as u32 * 100);
            if id == 4 {
                l.fail(id, "08006");
                l.abandon(id);
            } else {
                l.ack(id, MS * (id as u32 * 100 + 1), false);
            }
        }
        l.attempt(11, MS * 1100); // in flight: neither gap nor lost
        let present: Vec<i64> = (1..=10).filter(|i| *i != 4 && *i != 7 && *i != 8).collect();
        let mut state = ReadBackState::default();
        let (lo, hi) = l.settled_range().expect("range");
        assert_eq!((lo, hi), (1, 10));
        compare(&l, lo, hi, &present, MS * 2000, &mut state);
        assert_eq!(state.lost.keys().copied().collect::<Vec<_>>(), vec![7, 8]);
        assert_eq!(
            state.gaps.keys().copied().collect::<Vec<_>>(),
            vec![4, 7, 8]
        );
        assert_eq!(state.duplicates, 0);
        // A later read that finds 8 after all corrects the verdict; 7 keeps its first time.
        let present: Vec<i64> = (1..=10).filter(|i| *i != 4 && *i != 7).collect();
        compare(&l, lo, hi, &present, MS * 3000, &mut state);
        assert_eq!(state.lost.keys().copied().collect::<Vec<_>>(), vec![7]);
        assert_eq!(state.lost.get(&7), Some(&(MS * 2000)));
    }

    #[test]
    fn duplicates_are_counted() {
        let mut l = Ledger::new(100 * MS, Duration::from_secs(3600));
        l.attempt(1, MS);
        l.ack(1, 2 * MS, false);
        let mut state = ReadBackState::default();
        compare(&l, 1, 1, &[1, 1], 3 * MS, &mut state);
        assert_eq!(state.duplicates, 1);
        assert!(state.lost.is_empty());
    }
}
