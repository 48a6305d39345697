//! `graywire demo --rolling-upgrade`: on the demo's cluster, with the probe and a little
//! application load running through graywire, a real `graywire rollout` — onto another
//! PostgreSQL build fetched from Debian's archive when one can be had, a restart-only rollout
//! (said plainly) when not. Fails when the rollout fails, the probe saw a lost write or a gap,
//! or the application saw an error, a closed connection or a missing row.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_postgres::NoTls;

use super::{DemoError, DEMO_PASSWORD, DEMO_USER};
use graywire_localcluster::{fetch_debian_server, LocalCluster, PgBinaries};
use graywire_rollout::cli;

/// The newest PostgreSQL 15 build Debian bookworm offers (bookworm-security).
const NEWER_BUILD: (&str, &str) = ("15.20-0+deb12u1", "15.20");

const UPGRADE_SCRIPT: &str = include_str!("../../../config/rollout/pg_ctl-upgrade.sh");
const SWITCHOVER_SCRIPT: &str = include_str!("../../../config/rollout/pg_ctl-switchover.sh");

/// Where the rollout takes the nodes.
struct Target {
    bindir: PathBuf,
    /// `Some` for a real upgrade.
    version: Option<String>,
}

/// Picks the build to move to: the newer Debian build when the installed one is older and it
/// can be fetched; otherwise the installed build (restart only), saying why.
async fn target() -> Result<Target, DemoError> {
    let installed = PgBinaries::locate()?;
    let version = installed.version()?;
    let restart_only = |why: String| {
        println!(
            "no second PostgreSQL 15 build to upgrade to ({why}): this is a RESTART-ONLY rollout, \
             every node is restarted on the build it runs ({version})"
        );
        Target {
            bindir: installed
                .program("postgres")
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
            version: None,
        }
    };
    if !version.starts_with("15.") || version.as_str() >= NEWER_BUILD.1 {
        return Ok(restart_only(format!(
            "the installed {version} is not older than {}",
            NEWER_BUILD.1
        )));
    }
    let cache = std::env::temp_dir().join("graywire-pg-cache");
    println!(
        "fetching postgresql-15={} from Debian's archive into {} ...",
        NEWER_BUILD.0,
        cache.display()
    );
    let fetched =
        tokio::task::spawn_blocking(move || fetch_debian_server(NEWER_BUILD.0, &cache)).await;
    match fetched {
        Ok(Ok(bindir)) => {
            println!("upgrading every node from {version} to {}", NEWER_BUILD.1);
            Ok(Target {
                bindir,
                version: Some(NEWER_BUILD.1.to_owned()),
            })
        }
        Ok(Err(e)) => Ok(restart_only(format!("fetching it failed: {e}"))),
        Err(e) => Err(DemoError::Task(e.to_string())),
    }
}

/// What one session of the application load saw.
#[derive(Debug, Default)]
struct Tally {
    /// Statements acknowledged (for a writer: the highest `n` it inserted).
    done: i64,
    errors: BTreeMap<String, u64>,
    closed: bool,
}

impl Tally {
    /// Counts one result; false once the connection is closed.
    fn record<T>(&mut self, result: Result<T, tokio_postgres::Error>, closed: bool) -> bool {
        match result {
            Ok(_) => self.done += 1,
            Err(_) if closed => {
                self.closed = true;
                return false;
            }
            Err(e) => {
                let key = e
                    .code()
                    .map_or_else(|| e.to_string(), |c| c.code().to_owned());
                *self.errors.entry(key).or_default() += 1;
            }
        }
        true
    }
}

/// Two writers (one row per transaction) and two read-only sessions, through graywire.
struct AppLoad {
    stop: Arc<AtomicBool>,
    writers: Vec<JoinHandle<Tally>>,
    readers: Vec<JoinHandle<Tally>>,
}

/// What the whole application load saw.
#[derive(Debug, Default)]
struct LoadReport {
    /// Acknowledged inserts per writer.
    acked: Vec<i64>,
    reads: i64,
    errors: BTreeMap<String, u64>,
    closed: u32,
}

impl AppLoad {
    async fn start(dsn: &str) -> Result<AppLoad, tokio_postgres::Error> {
        let setup = connect(dsn).await?;
        setup
            .batch_execute(
                "CREATE TABLE IF NOT EXISTS demo_load (writer int, n bigint, PRIMARY KEY (writer, n))",
            )
            .await?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut writers = Vec::new();
        for w in 0..2i32 {
            let client = connect(dsn).await?;
            let stop = stop.clone();
            writers.push(tokio::spawn(async move {
                let mut t = Tally::default();
                while !stop.load(Ordering::Relaxed) {
                    let n = t.done + 1;
                    let r = client
                        .execute("INSERT INTO demo_load VALUES ($1, $2)", &[&w, &n])
                        .await;
                    if !t.record(r, client.is_closed()) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                t
            }));
        }
        let mut readers = Vec::new();
        let ro = format!("{dsn} options='-c default_transaction_read_only=on'");
        for _ in 0..2 {
            let client = connect(&ro).await?;
            // The table was just created on the primary: wait until this session's standby
            // has replayed it (bounded), so replication catching up is not counted as an error.
            for _ in 0..100 {
                if client
                    .query_one("SELECT count(*) FROM demo_load", &[])
                    .await
                    .is_ok()
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let stop = stop.clone();
            readers.push(tokio::spawn(async move {
                let mut t = Tally::default();
                while !stop.load(Ordering::Relaxed) {
                    let r = client
                        .query_one("SELECT count(*) FROM demo_load", &[])
                        .await;
                    if !t.record(r, client.is_closed()) {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                t
            }));
        }
        Ok(AppLoad {
            stop,
            writers,
            readers,
        })
    }

    async fn finish(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let mut r = LoadReport::default();
        for (is_writer, task) in self
            .writers
            .into_iter()
            .map(|t| (true, t))
            .chain(self.readers.into_iter().map(|t| (false, t)))
        {
            let t = task.await.unwrap_or_else(|e| Tally {
                errors: BTreeMap::from([(format!("session task: {e}"), 1)]),
                closed: true,
                ..Tally::default()
            });
            if is_writer {
                r.acked.push(t.done);
            } else {
                r.reads += t.done;
            }
            for (k, v) in t.errors {
                *r.errors.entry(k).or_default() += v;
            }
            r.closed += u32::from(t.closed);
        }
        r
    }
}

async fn connect(dsn: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(dsn, NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Runs the rolling upgrade; `Err` names every way it fell short.
pub async fn run(
    cluster: &LocalCluster,
    listen: SocketAddr,
    admin: SocketAddr,
) -> Result<(), DemoError> {
    let target = target().await?;
    // The scripts graywire ships for pg_ctl-run clusters, written next to the cluster.
    let scripts = cluster.dir().join("rollout");
    let write = |name: &str, text: &str| {
        std::fs::create_dir_all(&scripts)
            .and_then(|()| std::fs::write(scripts.join(name), text))
            .map_err(|e| DemoError::Task(format!("writing {}: {e}", scripts.join(name).display())))
    };
    write("pg_ctl-upgrade.sh", UPGRADE_SCRIPT)?;
    write("pg_ctl-switchover.sh", SWITCHOVER_SCRIPT)?;

    let dsn = format!(
        "host={} port={} user={DEMO_USER} password={DEMO_PASSWORD} dbname=postgres connect_timeout=10",
        listen.ip(),
        listen.port()
    );
    let load = AppLoad::start(&dsn)
        .await
        .map_err(|e| DemoError::Task(format!("starting the application load: {e}")))?;
    println!("application load running through graywire: 2 writers, 2 read-only sessions\n");

    let mut flags = vec![
        "--admin".to_owned(),
        format!("http://{admin}"),
        "--upgrade-cmd".to_owned(),
        format!(
            "sh {} {{data_dir}} {}",
            scripts.join("pg_ctl-upgrade.sh").display(),
            target.bindir.display()
        ),
        "--switchover-cmd".to_owned(),
        format!(
            "sh {} {{data_dir}} {{candidate_data_dir}} {{candidate_host}} {{candidate_port}} \
             {{standby_data_dirs}}",
            scripts.join("pg_ctl-switchover.sh").display()
        ),
        "--settle".to_owned(),
        "5s".to_owned(),
        "--max-stall".to_owned(),
        "5s".to_owned(),
        "--max-gaps".to_owned(),
        "0".to_owned(),
    ];
    for i in 0..cluster.len() {
        flags.push("--data-dir".to_owned());
        flags.push(format!("pg{}={}", i + 1, cluster.data_dir(i).display()));
    }
    if let Some(v) = &target.version {
        flags.push("--expect-version".to_owned());
        flags.push(v.clone());
    }
    let args = cli::parse(&flags).map_err(|e| DemoError::Task(format!("rollout flags: {e}")))?;
    let (code, report) = cli::run(args).await;
    let app = load.finish().await;

    let mut problems = Vec::new();
    if code != 0 {
        problems.push(format!("the rollout did not succeed (exit {code})"));
    }
    match report.as_ref().and_then(|r| r.availability.as_ref()) {
        Some(a) if a.lost_writes > 0 || a.gaps > 0 => problems.push(format!(
            "the probe saw {} lost writes and {} gaps",
            a.lost_writes, a.gaps
        )),
        Some(_) => {}
        None => problems.push("the probe's figures are missing".into()),
    }
    if !app.errors.is_empty() || app.closed > 0 {
        problems.push(format!(
            "the application saw errors {:?} and {} closed connections",
            app.errors, app.closed
        ));
    }
    let missing = missing_rows(&dsn, &app.acked).await;
    if let Err(e) = &missing {
        problems.push(e.clone());
    }
    println!(
        "\napplication load: {} inserts acknowledged ({}), {} reads, {} errors, {} closed \
         connections",
        app.acked.iter().sum::<i64>(),
        if missing.is_ok() {
            "every one of them is in the table"
        } else {
            "SOME ARE MISSING"
        },
        app.reads,
        app.errors.values().sum::<u64>(),
        app.closed
    );
    if target.version.is_none() {
        println!("(restart-only rollout: no second PostgreSQL build could be obtained)");
    }
    if problems.is_empty() {
        println!("rolling upgrade demo: OK");
        Ok(())
    } else {
        Err(DemoError::RollingUpgrade(problems.join("; ")))
    }
}

/// Checks every acknowledged insert is in the table (read through graywire, on the primary).
async fn missing_rows(dsn: &str, acked: &[i64]) -> Result<(), String> {
    let client = connect(dsn)
        .await
        .map_err(|e| format!("checking the rows: {e}"))?;
    for (w, n) in acked.iter().enumerate() {
        let w = i32::try_from(w).unwrap_or(i32::MAX);
        let have: i64 = client
            .query_one(
                "SELECT count(*) FROM demo_load WHERE writer = $1 AND n <= $2",
                &[&w, n],
            )
            .await
            .map_err(|e| format!("checking the rows: {e}"))?
            .get(0);
        if have != *n {
            return Err(format!(
                "writer {w}: {n} inserts acknowledged but {have} rows present"
            ));
        }
    }
    Ok(())
}
