//! Client load for HA tests: tokio-postgres sessions writing or reading through graywire in a
//! loop, each recording what was acknowledged, which errors it saw, and when.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

/// The longest any load loop runs, whatever the test does.
pub const LOAD_LIMIT: Duration = Duration::from_secs(120);

/// What one looping session saw.
#[derive(Debug, Default, Clone)]
pub struct SessionReport {
    pub id: i32,
    /// Values acknowledged to the client (the `n` of each committed row, or each read's port).
    pub acked: Vec<(Instant, i64)>,
    /// SQLSTATE (or message, for errors without one) of every failed transaction.
    pub errors: Vec<String>,
    /// The connection was closed under the session.
    pub closed: bool,
}

impl SessionReport {
    /// Records one transaction's outcome; false when the connection is closed (the loop ends).
    fn record(&mut self, result: Result<i64, tokio_postgres::Error>, closed: bool) -> bool {
        match result {
            Ok(v) => self.acked.push((Instant::now(), v)),
            Err(e) if closed => {
                self.closed = true;
                self.errors.push(format!("closed: {e}"));
                return false;
            }
            Err(e) => self
                .errors
                .push(crate::sqlstate(&e).unwrap_or_else(|| format!("{e:?}"))),
        }
        true
    }

    /// The longest time between consecutive acknowledgements, counted from `since`.
    pub fn longest_gap(&self, since: Instant) -> Duration {
        let mut last = since;
        let mut longest = Duration::ZERO;
        for (t, _) in &self.acked {
            longest = longest.max(t.saturating_duration_since(last));
            last = *t;
        }
        longest
    }

    /// The first acknowledgement after `t`.
    pub fn first_ack_after(&self, t: Instant) -> Option<Instant> {
        self.acked.iter().map(|(at, _)| *at).find(|at| *at > t)
    }
}

/// Sessions looping until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<SessionReport>>,
    pub started: Instant,
}

impl Load {
    /// `sessions` writers inserting `(writer, n)` into `table` through `dsn`, one row per
    /// transaction, with a prepared statement; odd writers use explicit transactions
    /// (BEGIN … COMMIT), even ones autocommit.
    pub async fn writers(dsn: &str, table: &str, sessions: i32) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for id in 0..sessions {
            let mut client = crate::connect(dsn).await;
            let stmt = client
                .prepare(&format!("INSERT INTO {table} (writer, n) VALUES ($1, $2)"))
                .await
                .expect("prepare");
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut r = SessionReport {
                    id,
                    ..SessionReport::default()
                };
                let limit = Instant::now() + LOAD_LIMIT;
                let mut n: i64 = 0;
                while !stop.load(Ordering::Relaxed) && Instant::now() < limit {
                    n += 1;
                    let result = if id % 2 == 1 {
                        match client.transaction().await {
                            Ok(tx) => match tx.execute(&stmt, &[&id, &n]).await {
                                Ok(_) => tx.commit().await,
                                Err(e) => Err(e),
                            },
                            Err(e) => Err(e),
                        }
                    } else {
                        client.execute(&stmt, &[&id, &n]).await.map(|_| ())
                    };
                    let failed = result.is_err();
                    if !r.record(result.map(|()| n), client.is_closed()) {
                        break;
                    }
                    if failed {
                        // Pacing, not a synchronisation: a writer whose write failed pauses
                        // 5 ms rather than spin on a node that refuses.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                r
            }));
        }
        Load {
            stop,
            tasks,
            started: Instant::now(),
        }
    }

    /// `sessions` readers asking which node serves them (`current_setting('port')`), one
    /// read-only transaction after another.
    pub async fn readers(dsn: &str, sessions: i32) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for id in 0..sessions {
            let client = crate::connect(dsn).await;
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                let mut r = SessionReport {
                    id,
                    ..SessionReport::default()
                };
                let limit = Instant::now() + LOAD_LIMIT;
                while !stop.load(Ordering::Relaxed) && Instant::now() < limit {
                    let result = client
                        .query_one("SELECT current_setting('port')::int8", &[])
                        .await
                        .map(|row| row.get(0));
                    if !r.record(result, client.is_closed()) {
                        break;
                    }
                    // Pacing, not a synchronisation: one read every ~2 ms per session.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                r
            }));
        }
        Load {
            stop,
            tasks,
            started: Instant::now(),
        }
    }

    /// Stops every session and collects the reports.
    pub async fn finish(self) -> Vec<SessionReport> {
        self.stop.store(true, Ordering::Relaxed);
        let mut out = Vec::new();
        for t in self.tasks {
            out.push(
                tokio::time::timeout(Duration::from_secs(60), t)
                    .await
                    .expect("load session stops")
                    .expect("load session task"),
            );
        }
        out
    }
}

/// Errors of all sessions, counted by SQLSTATE.
pub fn error_counts(reports: &[SessionReport]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in reports {
        for e in &r.errors {
            *m.entry(e.clone()).or_default() += 1;
        }
    }
    m
}
