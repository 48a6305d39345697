//! The writer: every `interval`, on a fixed clock, the next id goes into
//! `graywire_probe(writer, id, sent_at)` in its own transaction, through the endpoint under
//! test. A tick that comes while a write still runs is counted as missed (the clock does not
//! shift). In `retry` mode a failed id is retried at each tick until it is written (a
//! unique-key violation on a retry means an earlier attempt committed); in `skip` mode the next
//! tick takes the next id, leaving a gap.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics as m;
use crate::{Mode, ProbeShared};

/// The table every probe writes into (several writers may share it).
pub const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS graywire_probe (\
     writer text NOT NULL, id bigint NOT NULL, sent_at timestamptz NOT NULL DEFAULT now(), \
     PRIMARY KEY (writer, id))";
const INSERT: &str = "INSERT INTO graywire_probe (writer, id, sent_at) VALUES ($1, $2, now())";

/// SQLSTATE-like label of a failed attempt.
fn failure_code(e: &tokio_postgres::Error) -> String {
    match e.code() {
        Some(c) => c.code().to_owned(),
        // No server error: the connection broke or could not be made.
        None if e.is_closed() => SqlState::CONNECTION_FAILURE.code().to_owned(),
        None => SqlState::CONNECTION_EXCEPTION.code().to_owned(),
    }
}

struct Connection {
    client: Client,
    insert: tokio_postgres::Statement,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Why the writer could not connect (and prepare its statement).
#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
    #[error("no connection within {0:?}")]
    Timeout(Duration),
}

async fn connect(shared: &ProbeShared) -> Result<(Connection, i64), ConnectError> {
    let cfg = &shared.config;
    let attempt = async {
        let (client, conn) = cfg.target.connect(NoTls).await?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        client.batch_execute(CREATE_TABLE).await?;
        let last: i64 = client
            .query_one(
                "SELECT coalesce(max(id), 0) FROM graywire_probe WHERE writer = $1",
                &[&cfg.writer],
            )
            .await?
            .get(0);
        let insert = client.prepare(INSERT).await?;
        Ok((
            Connection {
                client,
                insert,
                driver,
            },
            last,
        ))
    };
    match tokio::time::timeout(cfg.attempt_timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout(cfg.attempt_timeout)),
    }
}

/// Runs the writer until `stop`.
pub async fn run(shared: Arc<ProbeShared>, stop: CancellationToken) {
    let cfg = &shared.config;
    let interval = cfg.interval;
    let start = tokio::time::Instant::now();
    let mut conn: Option<Connection> = None;
    // The id to write next, known once the first connection read the table.
    let mut next_id: Option<i64> = None;
    let mut retrying = false;
    let mut tick: u64 = 0;
    loop {
        let due = start + interval * (tick as u32);
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = stop.cancelled() => return,
        }
        // Ticks that passed while the last write ran are counted, not replayed.
        let now = tokio::time::Instant::now();
        let behind =
            (now.saturating_duration_since(due).as_nanos() / interval.as_nanos().max(1)) as u64;
        if behind > 0 {
            let mut ledger = shared.ledger();
            for k in 1..=behind {
                ledger.missed_tick(shared.at(due + interval * (k as u32)));
            }
            metrics::counter!(m::MISSED_TICKS_TOTAL).increment(behind);
        }
        tick += behind + 1;

        if conn.is_none() {
            match connect(&shared).await {
                Ok((c, last)) => {
                    if next_id.is_none() {
                        next_id = Some(last + 1);
                        info!(writer = %cfg.writer, first_id = last + 1, "probe connected");
                    }
                    conn = Some(c);
                }
                Err(e) => {
                    debug!(error = %e, "probe cannot connect");
                    if let Some(id) = next_id {
                        let mut ledger = shared.ledger();
                        ledger.attempt(id, shared.at(now));
                        ledger.fail(
                            id,
                            SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION.code(),
                        );
                        drop(ledger);
                        metrics::counter!(m::WRITES_TOTAL, "result" => "error").increment(1);
                        if cfg.mode == Mode::Skip {
                            shared.ledger().abandon(id);
                            next_id = Some(id + 1);
                        } else {
                            retrying = true;
                        }
                    }
                    continue;
                }
            }
        }
        let (Some(c), Some(id)) = (conn.as_ref(), next_id) else {
            continue;
        };
        let sent = tokio::time::Instant::now();
        shared.ledger().attempt(id, shared.at(sent));
        let result = tokio::time::timeout(
            cfg.attempt_timeout,
            c.client.execute(&c.insert, &[&cfg.writer, &id]),
        )
        .await;
        let acked_at = tokio::time::Instant::now();
        let outcome = match result {
            Ok(Ok(_)) => Ok(false),
            Ok(Err(e)) if retrying && e.code() == Some(&SqlState::UNIQUE_VIOLATION) => Ok(true),
            Ok(Err(e)) => Err((failure_code(&e), c.client.is_closed())),
            Err(_) => Err(("timeout".to_owned(), true)),
        };
        match outcome {
            Ok(committed_earlier) => {
                let (stall, latency) = {
                    let mut ledger = shared.ledger();
                    let stall = ledger.ack(id, shared.at(acked_at), committed_earlier);
                    let first = ledger.record(id).map(|r| r.first_sent);
                    (stall, first.map(|f| shared.at(acked_at).saturating_sub(f)))
                };
                let label = if committed_earlier {
                    "retry_committed"
                } else {
                    "ok"
                };
                metrics::counter!(m::WRITES_TOTAL, "result" => label).increment(1);
                if let Some(l) = latency {
                    metrics::histogram!(m::WRITE_LATENCY_SECONDS).record(l.as_secs_f64());
                }
                metrics::histogram!(m::STALL_SECONDS).record(stall.as_secs_f64());
                if !stall.is_zero() {
                    let total = shared.add_disruption(stall);
                    metrics::gauge!(m::DISRUPTION_SECONDS).set(total.as_secs_f64());
                }
                metrics::gauge!(m::ACKED_ID).set(id as f64);
                let unix = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64();
                metrics::gauge!(m::LAST_ACK_TIMESTAMP_SECONDS).set(unix);
                next_id = Some(id + 1);
                retrying = false;
            }
            Err((code, broken)) => {
                shared.ledger().fail(id, &code);
                metrics::counter!(m::WRITES_TOTAL, "result" => "error").increment(1);
                if broken {
                    warn!(id, %code, "probe write failed; reconnecting");
                    conn = None;
                } else {
                    debug!(id, %code, "probe write failed");
                }
                if cfg.mode == Mode::Skip {
                    shared.ledger().abandon(id);
                    next_id = Some(id + 1);
                } else {
                    retrying = true;
                }
            }
        }
        let now = shared.at(tokio::time::Instant::now());
        shared.ledger().evict(now);
    }
}
