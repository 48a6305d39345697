//! pgbench as the tests' application load: `pgbench -i` straight on a node, runs through
//! graywire in the background, and the figures of its report.

use std::time::Duration;

use graywire_localcluster::{LocalCluster, PgBinaries};
use tokio::task::JoinHandle;

/// `pgbench -i -s 1` on node `i` directly, as the superuser.
pub async fn init(cluster: &LocalCluster, i: usize) {
    init_at(cluster.port(i), cluster.password()).await;
}

/// `pgbench -i -s 1` on the node at `port` directly, as the superuser with `password`.
pub async fn init_at(port: u16, password: &str) {
    let bindir = PgBinaries::locate().expect("PostgreSQL binaries");
    let out = tokio::process::Command::new(bindir.program("pgbench"))
        .args(["-i", "-s", "1", "-q", "-h", "127.0.0.1", "-U", "postgres"])
        .args(["-p", &port.to_string(), "postgres"])
        .env("PGPASSWORD", password)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), out)
        .await
        .expect("pgbench -i finishes")
        .expect("pgbench runs");
    assert!(
        out.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Starts `pgbench -n -j 2 <args>` through graywire on `port` as user `app`; the handle gives
/// its output once it ends.
pub fn start(port: u16, args: &[&str]) -> JoinHandle<std::process::Output> {
    let bindir = PgBinaries::locate().expect("PostgreSQL binaries");
    let run = tokio::process::Command::new(bindir.program("pgbench"))
        .args(["-n", "-j", "2", "-h", "127.0.0.1", "-U", "app"])
        .args(["-p", &port.to_string()])
        .args(args)
        .arg("postgres")
        .env("PGPASSWORD", "app-pw")
        .kill_on_drop(true)
        .output();
    tokio::spawn(async move { run.await.expect("pgbench runs") })
}

/// Waits (at most `limit`) for a pgbench started by [`start`]; asserts it succeeded and
/// returns (transactions processed, transactions failed, its stdout).
pub async fn finish(
    handle: JoinHandle<std::process::Output>,
    limit: Duration,
) -> (u64, u64, String) {
    let out = tokio::time::timeout(limit, handle)
        .await
        .expect("pgbench ends in time")
        .expect("pgbench task");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "pgbench failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |prefix: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.split(['/', ' ']).next())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {prefix:?} in pgbench's report:\n{stdout}"))
    };
    let processed = field("number of transactions actually processed: ");
    let failed = field("number of failed transactions: ");
    (processed, failed, stdout)
}
