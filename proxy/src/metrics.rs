//! Every metric the proxy exports: its name, type and meaning, in one place. Code records
//! through these constants only; `describe()` registers the help texts and `install()` sets up
//! the Prometheus exporter once per process.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::protocol::SqlState;

/// Client connections accepted by the listener, by outcome of their startup
/// (`result`: session, cancel, refused_limit, auth_failed, protocol_error, backend_error, closed).
pub const CLIENT_CONNECTIONS_TOTAL: &str = "graywire_client_connections_total";
/// Sessions currently open (client connections past authentication).
pub const SESSIONS: &str = "graywire_sessions";
/// Sessions currently bound to a node (label `node`).
pub const NODE_SESSIONS: &str = "graywire_node_sessions";
/// Backend connections currently open to a node (label `node`).
pub const BACKEND_CONNECTIONS: &str = "graywire_backend_connections";
/// ErrorResponses clients received, relayed or graywire's own (labels `sqlstate`, `source`).
pub const CLIENT_ERRORS_TOTAL: &str = "graywire_client_errors_total";
/// Time from a client's request to the ReadyForQuery that answers it. Kept by graywire itself
/// ([`QUERY_DURATION`]), not by the exporter: it is recorded once per request.
pub const QUERY_DURATION_SECONDS: &str = "graywire_query_duration_seconds";
/// CancelRequests received (`result`: forwarded, unknown_key, idle, held_cancelled, failed).
pub const CANCEL_REQUESTS_TOTAL: &str = "graywire_cancel_requests_total";
/// 1 when the node's health is up, 0 otherwise (label `node`).
pub const NODE_UP: &str = "graywire_node_up";
/// 1 for the node's current role, 0 for the others (labels `node`, `role`).
pub const NODE_ROLE: &str = "graywire_node_role";
/// Health checks run (labels `node`, `result`: ok, failed).
pub const HEALTH_CHECKS_TOTAL: &str = "graywire_health_checks_total";
/// Changes of a node's health or role (labels `node`, `to`: up, down, primary, standby, unknown).
pub const NODE_TRANSITIONS_TOTAL: &str = "graywire_node_transitions_total";
/// 1 while more than one node claims to be primary.
pub const SPLIT_BRAIN: &str = "graywire_split_brain";
/// 1 while a primary takes writes (exactly one node up, in rotation, claiming primary, or the
/// split-brain policy picked one).
pub const PRIMARY_KNOWN: &str = "graywire_primary_known";
/// Client requests waiting for a suitable node right now.
pub const HELD_REQUESTS: &str = "graywire_held_requests";
/// How long requests were held before a node took them or the hold timed out.
pub const HOLD_DURATION_SECONDS: &str = "graywire_hold_duration_seconds";
/// Bytes relayed (label `direction`: client_to_node, node_to_client).
pub const RELAYED_BYTES_TOTAL: &str = "graywire_relayed_bytes_total";
/// Sessions bound to a node that hold state which cannot move (label `node`).
pub const PINNED_SESSIONS: &str = "graywire_pinned_sessions";
/// Sessions moved to another backend connection at a transaction boundary
/// (label `reason`: drain, role_change, node_down, failover).
pub const MIGRATIONS_TOTAL: &str = "graywire_migrations_total";
/// Migrations that could not happen because the session holds state that cannot move
/// (label `state`: temporary_tables, listen, advisory_locks, sql_prepare, hold_cursors).
pub const PINNED_TOTAL: &str = "graywire_pinned_total";
/// Requests in flight on a backend connection that died, answered by graywire
/// (label `sqlstate`: 40001 rolled back, 40003 outcome unknown).
pub const FAILOVERS_TOTAL: &str = "graywire_failovers_total";
/// Backend connections that ended under a session while their node stayed up, so the session
/// ended as on a direct connection (or, for `connection_lost`, was answered like a failover)
/// and the node was not counted as failing (label `cause`: one of [`TERMINATION_CAUSES`]).
pub const BACKEND_TERMINATIONS_TOTAL: &str = "graywire_backend_terminations_total";
/// The values of `cause` on [`BACKEND_TERMINATIONS_TOTAL`]: a closed set.
pub const TERMINATION_CAUSES: [&str; 8] = [
    "admin_command",
    "idle_session_timeout",
    "idle_in_transaction_timeout",
    "database_dropped",
    "recovery_conflict",
    "node_fatal",
    "connection_lost",
    "state_capture_failed",
];
/// Drains started through the admin API (label `node`).
pub const DRAINS_TOTAL: &str = "graywire_drains_total";
/// How long drain calls took until the node was empty or the wait ran out.
pub const DRAIN_DURATION_SECONDS: &str = "graywire_drain_duration_seconds";
/// Operator state of a node: 1 for its current state (labels `node`, `state`: active,
/// draining, drained).
pub const NODE_ADMIN_STATE: &str = "graywire_node_admin_state";
/// 1 while new transactions are paused by an operator.
pub const PAUSED: &str = "graywire_paused";
/// Replication lag of a standby in WAL bytes behind the primary (label `node`).
pub const REPLICATION_LAG_BYTES: &str = "graywire_replication_lag_bytes";
/// Replication lag of a standby in seconds (label `node`).
pub const REPLICATION_LAG_SECONDS: &str = "graywire_replication_lag_seconds";

/// Latency buckets from 100 µs to 60 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

pub fn describe() {
    describe_counter!(
        CLIENT_CONNECTIONS_TOTAL,
        "Client connections accepted, by outcome of their startup"
    );
    describe_gauge!(SESSIONS, "Sessions currently open");
    describe_gauge!(NODE_SESSIONS, "Sessions currently bound to the node");
    describe_gauge!(
        BACKEND_CONNECTIONS,
        "Backend connections currently open to the node"
    );
    describe_counter!(
        CLIENT_ERRORS_TOTAL,
        "ErrorResponses sent to clients, by SQLSTATE and source"
    );
    describe_counter!(CANCEL_REQUESTS_TOTAL, "CancelRequests received, by result");
    describe_gauge!(NODE_UP, "1 when the node passes health checks");
    describe_gauge!(NODE_ROLE, "1 for the node's discovered role");
    describe_counter!(HEALTH_CHECKS_TOTAL, "Health checks run, by result");
    describe_counter!(NODE_TRANSITIONS_TOTAL, "Changes of node health or role");
    describe_gauge!(PRIMARY_KNOWN, "1 while a primary takes writes");
    describe_gauge!(
        SPLIT_BRAIN,
        "1 while more than one node claims to be primary"
    );
    describe_gauge!(
        HELD_REQUESTS,
        "Client requests held waiting for a suitable node"
    );
    describe_histogram!(
        HOLD_DURATION_SECONDS,
        Unit::Seconds,
        "How long requests were held"
    );
    describe_gauge!(
        PINNED_SESSIONS,
        "Sessions on the node holding state that cannot move"
    );
    describe_counter!(
        MIGRATIONS_TOTAL,
        "Sessions moved to another backend at a transaction boundary"
    );
    describe_counter!(PINNED_TOTAL, "Migrations refused because of session state");
    describe_counter!(
        FAILOVERS_TOTAL,
        "In-flight requests on a dead backend answered by graywire"
    );
    describe_counter!(
        BACKEND_TERMINATIONS_TOTAL,
        "Backend connections ended under a session while their node stayed up, by cause"
    );
    describe_counter!(DRAINS_TOTAL, "Drains started");
    describe_histogram!(
        DRAIN_DURATION_SECONDS,
        Unit::Seconds,
        "Duration of drain calls"
    );
    describe_gauge!(NODE_ADMIN_STATE, "1 for the node's operator state");
    describe_gauge!(PAUSED, "1 while new transactions are paused");
    describe_gauge!(
        REPLICATION_LAG_BYTES,
        Unit::Bytes,
        "WAL bytes a standby is behind the primary"
    );
    describe_gauge!(
        REPLICATION_LAG_SECONDS,
        Unit::Seconds,
        "Seconds a standby's replay is behind"
    );
    describe_counter!(
        RELAYED_BYTES_TOTAL,
        Unit::Bytes,
        "Bytes relayed between clients and nodes"
    );
}

/// Registers one node's series at zero (or their initial value) when its checker starts, so
/// every per-node panel has a series from the start.
pub fn register_node(node: &str) {
    let n = || node.to_owned();
    metrics::gauge!(NODE_UP, "node" => n()).increment(0.0);
    metrics::gauge!(NODE_SESSIONS, "node" => n()).increment(0.0);
    metrics::gauge!(BACKEND_CONNECTIONS, "node" => n()).increment(0.0);
    metrics::gauge!(PINNED_SESSIONS, "node" => n()).increment(0.0);
    metrics::counter!(DRAINS_TOTAL, "node" => n()).absolute(0);
    for result in ["ok", "failed"] {
        metrics::counter!(HEALTH_CHECKS_TOTAL, "node" => n(), "result" => result).absolute(0);
    }
    for to in ["up", "down", "primary", "standby", "unknown"] {
        metrics::counter!(NODE_TRANSITIONS_TOTAL, "node" => n(), "to" => to).absolute(0);
    }
}

/// Registers the label sets that exist from the start at zero, so dashboards and alerts see
/// a series before the first event rather than "no data".
pub fn register_zeroes() {
    for result in [
        "session",
        "cancel",
        "closed",
        "refused_limit",
        "auth_failed",
        "protocol_error",
        "backend_error",
        "shutdown",
    ] {
        metrics::counter!(CLIENT_CONNECTIONS_TOTAL, "result" => result).absolute(0);
    }
    for result in [
        "forwarded",
        "unknown_key",
        "idle",
        "held_cancelled",
        "failed",
    ] {
        metrics::counter!(CANCEL_REQUESTS_TOTAL, "result" => result).absolute(0);
    }
    metrics::gauge!(SESSIONS).increment(0.0);
    metrics::gauge!(HELD_REQUESTS).increment(0.0);
    metrics::gauge!(SPLIT_BRAIN).increment(0.0);
    metrics::gauge!(PAUSED).increment(0.0);
    metrics::gauge!(PRIMARY_KNOWN).increment(0.0);
    for state in [
        "temporary_tables",
        "listen",
        "advisory_locks",
        "sql_prepare",
        "hold_cursors",
    ] {
        metrics::counter!(PINNED_TOTAL, "state" => state).absolute(0);
    }
    for code in SqlState::SENT_BY_GRAYWIRE {
        metrics::counter!(CLIENT_ERRORS_TOTAL, "sqlstate" => code.label(), "source" => "graywire")
            .absolute(0);
    }
    // Histograms with no sample yet: their buckets are exported at zero.
    for h in [HOLD_DURATION_SECONDS, DRAIN_DURATION_SECONDS] {
        let _registered = metrics::histogram!(h);
    }
    for cause in TERMINATION_CAUSES {
        metrics::counter!(BACKEND_TERMINATIONS_TOTAL, "cause" => cause).absolute(0);
    }
    for reason in ["drain", "role_change", "node_down", "failover", "removed"] {
        metrics::counter!(MIGRATIONS_TOTAL, "reason" => reason).absolute(0);
    }
    for code in [
        SqlState::SERIALIZATION_FAILURE,
        SqlState::STATEMENT_COMPLETION_UNKNOWN,
    ] {
        metrics::counter!(FAILOVERS_TOTAL, "sqlstate" => code.label()).absolute(0);
    }
}

/// Outcomes of a client connection, the values of `result` on [`CLIENT_CONNECTIONS_TOTAL`].
pub const CONNECTION_RESULTS: [&str; 8] = [
    "session",
    "cancel",
    "refused_limit",
    "auth_failed",
    "protocol_error",
    "backend_error",
    "closed",
    "shutdown",
];

/// Handles of the metrics every session records, looked up once: resolving a metric by name
/// and labels hashes them and takes the registry's lock, which a short session (connection
/// churn) would otherwise do several times.
#[derive(Clone)]
pub struct SessionMetrics {
    pub sessions: metrics::Gauge,
    pub bytes_up: metrics::Counter,
    pub bytes_down: metrics::Counter,
    connections: [metrics::Counter; CONNECTION_RESULTS.len()],
}

impl SessionMetrics {
    /// Registers the handles with the recorder installed now (make them after [`install`]).
    pub fn new() -> Self {
        SessionMetrics {
            sessions: metrics::gauge!(SESSIONS),
            bytes_up: metrics::counter!(RELAYED_BYTES_TOTAL, "direction" => "client_to_node"),
            bytes_down: metrics::counter!(RELAYED_BYTES_TOTAL, "direction" => "node_to_client"),
            connections: CONNECTION_RESULTS
                .map(|result| metrics::counter!(CLIENT_CONNECTIONS_TOTAL, "result" => result)),
        }
    }

    /// Counts a client connection that ended with `result` (one of [`CONNECTION_RESULTS`]).
    pub fn connection_ended(&self, result: &'static str) {
        match CONNECTION_RESULTS.iter().position(|r| *r == result) {
            Some(i) => self.connections[i].increment(1),
            None => metrics::counter!(CLIENT_CONNECTIONS_TOTAL, "result" => result).increment(1),
        }
    }
}

impl Default for SessionMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A histogram graywire keeps itself, for a measurement taken once per request: the
/// exporter's histograms store every sample with a timestamp until upkeep folds them in,
/// which costs more per request than the rest of the relay's bookkeeping. Sessions count
/// into a [`LocalHistogram`] and add it here in batches; `/metrics` renders it after the
/// exporter's output ([`render_kept`]).
pub struct KeptHistogram {
    name: &'static str,
    help: &'static str,
    /// Samples per bucket of [`LATENCY_BUCKETS`] (not cumulative); the last one counts the
    /// samples above every bound.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

/// See [`QUERY_DURATION_SECONDS`].
pub static QUERY_DURATION: KeptHistogram = KeptHistogram {
    name: QUERY_DURATION_SECONDS,
    help: "Time from a client request to its ReadyForQuery",
    buckets: [const { AtomicU64::new(0) }; LATENCY_BUCKETS.len() + 1],
    sum_nanos: AtomicU64::new(0),
};

impl KeptHistogram {
    /// Appends the histogram in the Prometheus text format.
    fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} histogram", self.name);
        let mut cumulative = 0u64;
        for (i, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            match LATENCY_BUCKETS.get(i) {
                Some(le) => {
                    let _ = writeln!(out, "{}_bucket{{le=\"{le}\"}} {cumulative}", self.name);
                }
                None => {
                    let _ = writeln!(out, "{}_bucket{{le=\"+Inf\"}} {cumulative}", self.name);
                }
            }
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{}_sum {sum}", self.name);
        let _ = writeln!(out, "{}_count {cumulative}", self.name);
    }
}

/// A session publishes what it counted locally (bytes, request durations) at least this
/// often while requests complete, so a quiet session's figures are never far behind.
pub const PUBLISH_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

/// Samples one session recorded and has not yet added to the shared histogram.
#[derive(Default)]
pub struct LocalHistogram {
    buckets: [u32; LATENCY_BUCKETS.len() + 1],
    sum_nanos: u64,
    samples: u32,
}

impl LocalHistogram {
    /// A busy session adds its samples to the shared histogram per this many, so it touches
    /// the shared counters rarely (its owner also publishes on a clock, see
    /// [`PUBLISH_PERIOD`]).
    pub const BATCH: u32 = 64;

    /// Counts one sample; adds the batch to `shared` when it is full.
    pub fn record(&mut self, took: std::time::Duration, shared: &KeptHistogram) {
        let secs = took.as_secs_f64();
        // The first bound at or above the value: its bucket is `le` that bound.
        let i = LATENCY_BUCKETS.partition_point(|&le| le < secs);
        self.buckets[i] += 1;
        self.sum_nanos = self
            .sum_nanos
            .saturating_add(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX));
        self.samples += 1;
        if self.samples >= Self::BATCH {
            self.publish(shared);
        }
    }

    /// Adds what was counted to `shared` and starts over.
    pub fn publish(&mut self, shared: &KeptHistogram) {
        if self.samples == 0 {
            return;
        }
        for (mine, theirs) in self.buckets.iter_mut().zip(&shared.buckets) {
            if *mine > 0 {
                theirs.fetch_add(u64::from(std::mem::take(mine)), Ordering::Relaxed);
            }
        }
        shared
            .sum_nanos
            .fetch_add(std::mem::take(&mut self.sum_nanos), Ordering::Relaxed);
        self.samples = 0;
    }
}

/// The histograms graywire keeps itself, in the Prometheus text format (appended to the
/// exporter's output on `/metrics`).
pub fn render_kept() -> String {
    let mut out = String::new();
    QUERY_DURATION.render(&mut out);
    out
}

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Histogram samples wait in the recorder until upkeep folds them in; without a scrape they
/// would pile up, so upkeep runs on this period regardless.
pub const UPKEEP_PERIOD: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs the recorder's upkeep every [`UPKEEP_PERIOD`] until `stop` is cancelled.
pub async fn upkeep(handle: PrometheusHandle, stop: tokio_util::sync::CancellationToken) {
    let mut next = std::time::Instant::now();
    loop {
        tokio::select! {
            () = crate::timer::sleep_until(next) => {
                handle.run_upkeep();
                next = std::time::Instant::now() + UPKEEP_PERIOD;
            }
            _ = stop.cancelled() => return,
        }
    }
}

/// Installs the process-wide Prometheus recorder (once) and returns the handle that renders
/// `/metrics`. `None` if another recorder was installed first.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
                .ok()?;
            let handle = builder.install_recorder().ok()?;
            describe();
            register_zeroes();
            Some(handle)
        })
        .clone()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Duration;

    use super::*;

    fn histogram() -> KeptHistogram {
        KeptHistogram {
            name: "test_seconds",
            help: "A test histogram",
            buckets: [const { AtomicU64::new(0) }; LATENCY_BUCKETS.len() + 1],
            sum_nanos: AtomicU64::new(0),
        }
    }

    fn rendered(h: &KeptHistogram) -> String {
        let mut out = String::new();
        h.render(&mut out);
        out
    }

    #[test]
    fn samples_land_in_cumulative_buckets_with_inclusive_bounds() {
        let shared = histogram();
        let mut local = LocalHistogram::default();
        local.record(Duration::from_micros(100), &shared); // exactly the first bound
        local.record(Duration::from_micros(101), &shared);
        local.record(Duration::from_millis(3), &shared);
        local.record(Duration::from_secs(100), &shared); // above every bound
                                                         // Nothing is shared before the batch is published.
        assert!(rendered(&shared).contains("test_seconds_count 0\n"));
        local.publish(&shared);
        let text = rendered(&shared);
        for line in [
            "# HELP test_seconds A test histogram\n",
            "# TYPE test_seconds histogram\n",
            "test_seconds_bucket{le=\"0.0001\"} 1\n",
            "test_seconds_bucket{le=\"0.00025\"} 2\n",
            "test_seconds_bucket{le=\"0.0025\"} 2\n",
            "test_seconds_bucket{le=\"0.005\"} 3\n",
            "test_seconds_bucket{le=\"60\"} 3\n",
            "test_seconds_bucket{le=\"+Inf\"} 4\n",
            "test_seconds_sum 100.003201\n",
            "test_seconds_count 4\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from:\n{text}");
        }
        // Publishing again adds nothing.
        local.publish(&shared);
        assert!(rendered(&shared).contains("test_seconds_count 4\n"));
    }

    #[test]
    fn a_full_batch_is_published_without_being_asked() {
        let shared = histogram();
        let mut local = LocalHistogram::default();
        for _ in 0..LocalHistogram::BATCH {
            local.record(Duration::from_millis(1), &shared);
        }
        let text = rendered(&shared);
        assert!(
            text.contains(&format!("test_seconds_count {}\n", LocalHistogram::BATCH)),
            "{text}"
        );
        assert!(
            text.contains("test_seconds_bucket{le=\"0.001\"} 64\n"),
            "{text}"
        );
    }
}
