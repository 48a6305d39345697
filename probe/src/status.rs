//! The probe's figures as `GET /v1/probe` serves them ([`crate::Probe::status`]), and as
//! clients (`graywire rollout`) read them back.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Configuration, figures over a window, totals and read-back.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProbeStatus {
    pub writer: String,
    /// `retry` or `skip`.
    pub mode: String,
    pub interval_ms: u64,
    pub window_seconds: f64,
    pub window: WindowFigures,
    pub totals: TotalFigures,
    pub read_back: ReadBackFigures,
}

/// Figures over the window (see [`crate::ledger::WindowStats`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WindowFigures {
    pub acked: u64,
    pub failed_attempts: u64,
    /// Failed attempts by SQLSTATE.
    pub errors: BTreeMap<String, u64>,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub latency_max_ms: Option<f64>,
    pub max_stall_seconds: f64,
    pub open_stall_seconds: f64,
    pub disruption_seconds: f64,
    pub missed_ticks: u64,
    pub abandoned: u64,
    pub highest_acked: Option<i64>,
}

/// Totals of the records that left the horizon (see [`crate::ledger::Totals`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TotalFigures {
    pub acked: u64,
    pub failed_attempts: u64,
    pub errors: BTreeMap<String, u64>,
    pub max_stall_seconds: f64,
    pub disruption_seconds: f64,
}

/// What the read-backs found (see [`crate::verify::ReadBackState`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReadBackFigures {
    pub runs_ok: u64,
    pub runs_failed: u64,
    pub last_error: Option<String>,
    pub seconds_since_last: Option<f64>,
    pub gaps: u64,
    pub lost_writes: u64,
    /// The highest 100 lost ids, highest first.
    pub lost_ids: Vec<i64>,
    pub duplicates: u64,
}
