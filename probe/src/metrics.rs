//! Every metric the probe exports: name, type and meaning, in one place. The probe records
//! through these constants only; [`describe`] registers the help texts with whatever recorder
//! the process installed (graywire's Prometheus exporter).

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};

/// Probe writes by result (`result`: ok, retry_committed, error).
pub const WRITES_TOTAL: &str = "graywire_probe_writes_total";
/// Time from an id's first send to its acknowledgement.
pub const WRITE_LATENCY_SECONDS: &str = "graywire_probe_write_latency_seconds";
/// Stalls: time between consecutive acknowledgements minus the interval (only stalls > 0).
pub const STALL_SECONDS: &str = "graywire_probe_stall_seconds";
/// Unix time of the last acknowledged write.
pub const LAST_ACK_TIMESTAMP_SECONDS: &str = "graywire_probe_last_ack_timestamp_seconds";
/// The highest acknowledged id.
pub const ACKED_ID: &str = "graywire_probe_acked_id";
/// Gaps found by the last read-back (ids missing from the table).
pub const GAPS: &str = "graywire_probe_gaps";
/// Lost writes: acknowledged ids missing on read-back (the most serious signal).
pub const LOST_WRITES: &str = "graywire_probe_lost_writes";
/// Ids present more than once on read-back.
pub const DUPLICATES: &str = "graywire_probe_duplicates";
/// Total stall time since the probe started (a gauge: the metrics crate's counters are whole
/// numbers).
pub const DISRUPTION_SECONDS: &str = "graywire_probe_disruption_seconds";
/// Ticks that passed while a write was still running.
pub const MISSED_TICKS_TOTAL: &str = "graywire_probe_missed_ticks_total";
/// Read-backs by result (`result`: ok, error).
pub const VERIFY_RUNS_TOTAL: &str = "graywire_probe_verify_runs_total";
/// The gate's verdict against the probe's configured bounds, evaluated every second from the
/// probe's start: 1 pass, 0 fail. `/v1/gate` queries with other bounds do not change it.
pub const GATE_PASS: &str = "graywire_probe_gate_pass";

/// Every probe metric with its Prometheus type, for tests and docs.
pub const CATALOG: &[(&str, &str)] = &[
    (WRITES_TOTAL, "counter"),
    (WRITE_LATENCY_SECONDS, "histogram"),
    (STALL_SECONDS, "histogram"),
    (LAST_ACK_TIMESTAMP_SECONDS, "gauge"),
    (ACKED_ID, "gauge"),
    (GAPS, "gauge"),
    (LOST_WRITES, "gauge"),
    (DUPLICATES, "gauge"),
    (DISRUPTION_SECONDS, "gauge"),
    (MISSED_TICKS_TOTAL, "counter"),
    (VERIFY_RUNS_TOTAL, "counter"),
    (GATE_PASS, "gauge"),
];

/// Registers help texts and the series that exist from the start.
pub fn describe() {
    describe_counter!(WRITES_TOTAL, "Probe writes by result");
    describe_histogram!(
        WRITE_LATENCY_SECONDS,
        Unit::Seconds,
        "Time from an id's first send to its acknowledgement"
    );
    describe_histogram!(
        STALL_SECONDS,
        Unit::Seconds,
        "Time between consecutive acknowledged writes minus the interval"
    );
    describe_gauge!(
        LAST_ACK_TIMESTAMP_SECONDS,
        Unit::Seconds,
        "Unix time of the last acknowledged probe write"
    );
    describe_gauge!(ACKED_ID, "Highest acknowledged probe id");
    describe_gauge!(
        GAPS,
        "Probe ids missing from the table at the last read-back"
    );
    describe_gauge!(
        LOST_WRITES,
        "Acknowledged probe ids missing from the table at read-back"
    );
    describe_gauge!(DUPLICATES, "Probe ids present more than once at read-back");
    describe_gauge!(
        DISRUPTION_SECONDS,
        Unit::Seconds,
        "Total stall time of the probe since it started"
    );
    describe_counter!(
        MISSED_TICKS_TOTAL,
        "Probe ticks that passed while a write was still running"
    );
    describe_counter!(VERIFY_RUNS_TOTAL, "Probe read-backs by result");
    describe_gauge!(
        GATE_PASS,
        "1 while the gate passes against the configured bounds (evaluated every second)"
    );
    for result in ["ok", "retry_committed", "error"] {
        metrics::counter!(WRITES_TOTAL, "result" => result).absolute(0);
    }
    for result in ["ok", "error"] {
        metrics::counter!(VERIFY_RUNS_TOTAL, "result" => result).absolute(0);
    }
    metrics::counter!(MISSED_TICKS_TOTAL).absolute(0);
    for g in [
        LAST_ACK_TIMESTAMP_SECONDS,
        ACKED_ID,
        GAPS,
        LOST_WRITES,
        DUPLICATES,
        DISRUPTION_SECONDS,
    ] {
        metrics::gauge!(g).increment(0.0);
    }
    // Histograms with no sample yet: their buckets are exported at zero.
    for h in [WRITE_LATENCY_SECONDS, STALL_SECONDS] {
        let _registered = metrics::histogram!(h);
    }
}
