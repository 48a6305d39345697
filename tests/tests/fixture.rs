//! Tests of the local-cluster fixture itself: replication, failover, restarts (also ones done
//! outside the fixture with `pg_ctl`), and that nothing — no process, no directory — outlives a
//! cluster, even one dropped by a panic.
#![allow(clippy::unwrap_used)]

use std::ffi::OsStr;
use std::io::{Read, Seek};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use graywire_localcluster::{
    process_alive, ClusterSpec, LocalCluster, LocalClusterError, PgBinaries, StopMode,
};
use tokio::task::block_in_place;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

/// Bound on every wait for replicated data.
const REPLICATION_WAIT: Duration = Duration::from_secs(30);

async fn start(nodes: usize) -> anyhow::Result<LocalCluster> {
    let spec = ClusterSpec::new(nodes)?;
    let started = Instant::now();
    let cluster = tokio::task::spawn_blocking(move || LocalCluster::start(spec)).await??;
    eprintln!("{nodes}-node cluster started in {:?}", started.elapsed());
    Ok(cluster)
}

async fn connect(dsn: &str) -> anyhow::Result<Client> {
    let (client, connection) = tokio_postgres::connect(dsn, NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// The first column of the first row of `sql` on `dsn`, as text.
async fn scalar(dsn: &str, sql: &str) -> anyhow::Result<Option<String>> {
    let client = connect(dsn).await?;
    for message in client.simple_query(sql).await? {
        if let SimpleQueryMessage::Row(row) = message {
            return Ok(row.get(0).map(str::to_owned));
        }
    }
    Ok(None)
}

/// Polls `sql` on `dsn` until it returns `want`, for at most [`REPLICATION_WAIT`].
async fn wait_for(dsn: &str, sql: &str, want: &str) -> anyhow::Result<()> {
    let what = format!("{sql:?} on {dsn} returns {want:?}");
    graywire_tests::try_eventually(REPLICATION_WAIT, &what, || async {
        match scalar(dsn, sql).await {
            Ok(Some(got)) if got == want => Ok(()),
            last => Err(format!("{last:?}")),
        }
    })
    .await
    .map_err(anyhow::Error::msg)
}

async fn in_recovery(cluster: &LocalCluster, i: usize) -> anyhow::Result<bool> {
    let answer = scalar(&cluster.dsn(i), "SELECT pg_is_in_recovery()").await?;
    Ok(answer.as_deref() == Some("t"))
}

/// Drops the cluster and returns what must have disappeared with it.
fn teardown(cluster: LocalCluster) -> (PathBuf, Vec<u32>) {
    let dir = cluster.dir().to_path_buf();
    let pids: Vec<u32> = (0..cluster.len()).filter_map(|i| cluster.pid(i)).collect();
    drop(cluster);
    (dir, pids)
}

fn assert_nothing_left(dir: &std::path::Path, pids: &[u32]) {
    assert!(!dir.exists(), "{} still exists", dir.display());
    for pid in pids {
        // process_alive is kill(pid, 0) != ESRCH, not counting zombies.
        assert!(!process_alive(*pid), "postmaster {pid} is still alive");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_and_leave_nothing_behind() -> anyhow::Result<()> {
    let cluster = start(3).await?;
    assert_eq!(cluster.len(), 3);
    assert!(
        !in_recovery(&cluster, 0).await?,
        "node 0 should be the primary"
    );
    for i in 1..3 {
        assert!(
            in_recovery(&cluster, i).await?,
            "node {i} should be a standby"
        );
        assert!(cluster.is_running(i));
        assert_ne!(cluster.port(i), cluster.port(0));
    }

    let primary = connect(&cluster.dsn(0)).await?;
    primary
        .batch_execute(
            "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'one')",
        )
        .await?;
    for i in 1..3 {
        wait_for(&cluster.dsn(i), "SELECT v FROM t WHERE id = 1", "one")
            .await
            .with_context(|| cluster.log_tail(i))?;
    }
    drop(primary);

    assert_eq!(cluster.pid(0).map(process_alive), Some(true));
    let (dir, pids) = block_in_place(|| teardown(cluster));
    assert_eq!(pids.len(), 3);
    assert_nothing_left(&dir, &pids);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_promote_and_repoint_keep_replication_going() -> anyhow::Result<()> {
    let mut cluster = start(3).await?;
    let old_primary = cluster.pid(0).context("node 0 runs")?;

    block_in_place(|| cluster.kill9(0))?;
    assert!(!cluster.is_running(0));
    assert_eq!(cluster.pid(0), None);
    assert!(!process_alive(old_primary));

    block_in_place(|| cluster.promote(1))?;
    assert!(
        !in_recovery(&cluster, 1).await?,
        "node 1 should be promoted"
    );
    block_in_place(|| cluster.repoint(2, 1))?;
    assert!(in_recovery(&cluster, 2).await?);

    connect(&cluster.dsn(1))
        .await?
        .batch_execute(
            "CREATE TABLE after_failover (v text); INSERT INTO after_failover VALUES ('two')",
        )
        .await?;
    wait_for(&cluster.dsn(2), "SELECT v FROM after_failover", "two")
        .await
        .with_context(|| cluster.log_tail(2))?;
    let sender = scalar(
        &cluster.dsn(2),
        "SELECT sender_port FROM pg_stat_wal_receiver",
    )
    .await?;
    assert_eq!(sender, Some(cluster.port(1).to_string()));

    let (dir, pids) = block_in_place(|| teardown(cluster));
    assert_nothing_left(&dir, &pids);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_restart_in_every_mode_on_the_same_port() -> anyhow::Result<()> {
    let mut cluster = start(2).await?;
    let ports = (cluster.port(0), cluster.port(1));
    connect(&cluster.dsn(0))
        .await?
        .batch_execute("CREATE TABLE r (n int)")
        .await?;

    for (n, mode) in [StopMode::Smart, StopMode::Fast, StopMode::Immediate]
        .into_iter()
        .enumerate()
    {
        for i in [1, 0] {
            let before = cluster.pid(i);
            block_in_place(|| cluster.restart(i, mode))?;
            assert!(cluster.is_running(i));
            assert_ne!(cluster.pid(i), before, "{mode:?} restart of node {i}");
        }
        assert_eq!((cluster.port(0), cluster.port(1)), ports);
        connect(&cluster.dsn(0))
            .await?
            .execute("INSERT INTO r VALUES ($1)", &[&i32::try_from(n)?])
            .await?;
        wait_for(
            &cluster.dsn(1),
            "SELECT count(*) FROM r",
            &(n + 1).to_string(),
        )
        .await?;
    }

    // A crashed primary comes back on its port after crash recovery.
    block_in_place(|| cluster.kill9(0))?;
    assert!(matches!(
        block_in_place(|| cluster.stop(0, StopMode::Fast)),
        Err(LocalClusterError::NotRunning(0))
    ));
    block_in_place(|| cluster.start_node(0))?;
    assert_eq!(cluster.port(0), ports.0);
    assert!(!in_recovery(&cluster, 0).await?);
    connect(&cluster.dsn(0))
        .await?
        .execute("INSERT INTO r VALUES (99)", &[])
        .await?;
    wait_for(&cluster.dsn(1), "SELECT max(n) FROM r", "99").await?;

    // TCP connections need the password.
    let wrong = format!(
        "host={} port={} user={} password=wrong dbname=postgres",
        cluster.host(),
        cluster.port(0),
        cluster.superuser()
    );
    let err = connect(&wrong)
        .await
        .expect_err("a wrong password is refused");
    assert!(
        format!("{err:?}").contains("password authentication failed"),
        "{err:?}"
    );

    let (dir, pids) = block_in_place(|| teardown(cluster));
    assert_nothing_left(&dir, &pids);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_owner_still_cleans_up() -> anyhow::Result<()> {
    let spec = ClusterSpec::new(1)?;
    let (tx, rx) = std::sync::mpsc::channel();
    let owner = std::thread::spawn(move || {
        let cluster = LocalCluster::start(spec).unwrap();
        tx.send((cluster.dir().to_path_buf(), cluster.pid(0).unwrap()))
            .unwrap();
        panic!("test owner panics while holding the cluster");
    });
    let joined = block_in_place(|| owner.join());
    assert!(joined.is_err(), "the owner thread panicked");
    let (dir, pid) = rx.recv()?;
    assert_nothing_left(&dir, &[pid]);
    Ok(())
}

#[test]
fn missing_binaries_name_the_package_to_install() {
    let err = PgBinaries::at("/nonexistent/postgresql/bin").expect_err("nothing there");
    let text = err.to_string();
    assert!(text.contains("apt-get install -y postgresql-15"), "{text}");
    assert!(text.contains("/nonexistent/postgresql/bin"), "{text}");
}

#[test]
fn located_binaries_report_their_version() {
    let binaries = PgBinaries::locate().unwrap();
    let version = binaries.version().unwrap();
    assert!(
        version.starts_with(|c: char| c.is_ascii_digit()),
        "{version}"
    );
}

#[test]
fn invalid_specs_are_refused_before_anything_starts() {
    let mut spec = ClusterSpec::new(0).unwrap();
    assert!(matches!(
        LocalCluster::start(spec.clone()),
        Err(LocalClusterError::InvalidSpec(_))
    ));
    spec.nodes = 1;
    spec.superuser_password = "two\nlines".to_owned();
    assert!(matches!(
        LocalCluster::start(spec),
        Err(LocalClusterError::InvalidSpec(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_port_fails_the_start_with_the_log_tail() -> anyhow::Result<()> {
    let mut cluster = start(1).await?;
    block_in_place(|| cluster.stop(0, StopMode::Fast))?;
    let squatter = std::net::TcpListener::bind((cluster.host(), cluster.port(0)))?;
    let err = block_in_place(|| cluster.start_node(0)).expect_err("port is taken");
    let text = err.to_string();
    assert!(
        matches!(err, LocalClusterError::NodeExited { node: 0, .. }),
        "{text}"
    );
    assert!(text.contains("could not bind"), "{text}");
    assert!(!cluster.is_running(0));

    drop(squatter);
    block_in_place(|| cluster.start_node(0))?;
    assert_eq!(
        scalar(&cluster.dsn(0), "SELECT 1").await?,
        Some("1".to_owned())
    );
    Ok(())
}

#[test]
fn a_base_dir_postgres_cannot_enter_is_refused_when_root() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let root = std::fs::metadata("/proc/self").unwrap().uid() == 0;
    let private = std::env::temp_dir().join(format!("graywire-private-{}", std::process::id()));
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut spec = ClusterSpec::new(1).unwrap();
    spec.base_dir = Some(private.clone());
    let result = LocalCluster::start(spec);
    if root {
        // PostgreSQL runs as the `postgres` OS user, which cannot enter a root-only directory.
        let err = result.expect_err("postgres cannot enter a 0700 root directory");
        assert!(err.to_string().contains("cannot enter"), "{err}");
    } else {
        // Non-root, PostgreSQL runs as us, and we own the directory.
        let cluster = result.unwrap();
        assert!(cluster.dir().starts_with(&private));
    }
    std::fs::remove_dir_all(&private).unwrap();
}

/// Bound on each `pg_ctl` run of [`restart_outside`] (pg_ctl itself waits at most 60 s).
const PG_CTL_LIMIT: Duration = Duration::from_secs(90);

/// Runs `pg_ctl args` the way a rolling-upgrade script would: as the OS user PostgreSQL runs as
/// (`postgres` through `runuser` when we are root, as the fixture does), in the cluster
/// directory, for at most [`PG_CTL_LIMIT`].
fn pg_ctl<I, A>(cluster: &LocalCluster, args: I) -> anyhow::Result<()>
where
    I: IntoIterator<Item = A>,
    A: AsRef<OsStr>,
{
    let program = PgBinaries::locate()?.program("pg_ctl");
    let root = std::fs::metadata("/proc/self")?.uid() == 0;
    let mut cmd = if root {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(&program);
        cmd
    } else {
        Command::new(&program)
    };
    cmd.args(args);
    for (key, _) in std::env::vars_os() {
        if key.as_encoded_bytes().starts_with(b"PG") {
            cmd.env_remove(&key);
        }
    }
    // Output goes to a file: the postmaster pg_ctl forks must not keep a pipe of ours open.
    let mut output = tempfile::tempfile()?;
    cmd.env("LC_ALL", "C")
        .current_dir(cluster.dir())
        .stdin(Stdio::null())
        .stdout(output.try_clone()?)
        .stderr(output.try_clone()?);
    let what = format!("{cmd:?}");
    let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    let deadline = Instant::now() + PG_CTL_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            child.kill()?;
            child.wait()?;
            bail!("{what} did not finish within {PG_CTL_LIMIT:?}");
        }
        // Not a synchronisation by sleeping: this polls for pg_ctl's exit, bounded, in blocking
        // code, and kills pg_ctl at the limit (`eventually` is async and would only panic).
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut text = String::new();
    output.rewind()?;
    output.read_to_string(&mut text)?;
    if !status.success() {
        bail!("{what} failed ({status}):\n{text}");
    }
    Ok(())
}

/// Restarts node `i` behind the fixture's back, as a rolling-upgrade script does: `pg_ctl stop
/// -m fast`, then `pg_ctl start` with the options the postmaster was started with. Like
/// `pg_ctl restart`, it takes them from `postmaster.opts` (`<program> "-D" "…" "-p" "…" …`):
/// everything from the first double quote. Returns once the new postmaster accepts connections.
fn restart_outside(cluster: &LocalCluster, i: usize) -> anyhow::Result<()> {
    let data_dir = cluster.data_dir(i);
    let opts = std::fs::read_to_string(data_dir.join("postmaster.opts"))?;
    let options = opts
        .find('"')
        .map(|at| opts[at..].trim_end().to_owned())
        .with_context(|| format!("no options in postmaster.opts: {opts:?}"))?;
    let (log, dir, os) = (cluster.log_file(i), data_dir.as_os_str(), OsStr::new);
    let stop_args = [
        os("stop"),
        os("-m"),
        os("fast"),
        os("-w"),
        os("-t"),
        os("60"),
        os("-D"),
        dir,
    ];
    let start_args = [
        os("start"),
        os("-w"),
        os("-t"),
        os("60"),
        os("-D"),
        dir,
        os("-l"),
        log.as_os_str(),
        os("-o"),
        os(&options),
    ];
    pg_ctl(cluster, stop_args)
        .and_then(|()| pg_ctl(cluster, start_args))
        .with_context(|| {
            format!(
                "restarting node {i} outside the fixture; its log:\n{}",
                cluster.log_tail(i)
            )
        })
}

/// The PID `postmaster.pid` of node `i` names, read directly (not through the fixture).
fn lock_file_pid(cluster: &LocalCluster, i: usize) -> anyhow::Result<u32> {
    let text = std::fs::read_to_string(cluster.data_dir(i).join("postmaster.pid"))?;
    let first = text.lines().next().context("empty postmaster.pid")?;
    Ok(first.trim().parse()?)
}

/// Every live process whose working directory is inside `dir` (every PostgreSQL server process
/// works in its data directory), whoever its parent is.
fn processes_in(dir: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(dir))
                && process_alive(*pid)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_restarted_outside_the_fixture_is_adopted() -> anyhow::Result<()> {
    let mut cluster = start(2).await?;
    let old = cluster.pid(1).context("node 1 runs")?;

    block_in_place(|| restart_outside(&cluster, 1))?;
    let adopted = cluster.pid(1).context("node 1 runs again")?;
    assert_ne!(adopted, old, "a new postmaster");
    assert!(!process_alive(old));
    assert!(cluster.is_running(1));
    assert!(in_recovery(&cluster, 1).await?, "node 1 is still a standby");
    connect(&cluster.dsn(0))
        .await?
        .batch_execute("CREATE TABLE adopted (v text); INSERT INTO adopted VALUES ('streams')")
        .await?;
    wait_for(&cluster.dsn(1), "SELECT v FROM adopted", "streams")
        .await
        .with_context(|| cluster.log_tail(1))?;
    assert!(matches!(
        block_in_place(|| cluster.start_node(1)),
        Err(LocalClusterError::AlreadyRunning(1))
    ));
    assert_eq!(cluster.pid(1), Some(adopted));

    // Stopped by the fixture, by PID, although it is not our child.
    block_in_place(|| cluster.stop(1, StopMode::Fast))?;
    assert!(!process_alive(adopted));
    assert_eq!(cluster.pid(1), None);
    assert!(!cluster.is_running(1));
    block_in_place(|| cluster.start_node(1))?;
    assert!(in_recovery(&cluster, 1).await?);

    // And a crash of an adopted postmaster, then a start by the fixture.
    block_in_place(|| restart_outside(&cluster, 1))?;
    let adopted = cluster.pid(1).context("node 1 runs again")?;
    block_in_place(|| cluster.kill9(1))?;
    assert!(!process_alive(adopted));
    assert_eq!(cluster.pid(1), None);
    block_in_place(|| cluster.start_node(1))?;
    wait_for(&cluster.dsn(1), "SELECT v FROM adopted", "streams").await?;

    let (dir, pids) = block_in_place(|| teardown(cluster));
    assert_nothing_left(&dir, &pids);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_stops_a_postmaster_restarted_outside_the_fixture() -> anyhow::Result<()> {
    let cluster = start(1).await?;
    let old = cluster.pid(0).context("node 0 runs")?;
    block_in_place(|| restart_outside(&cluster, 0))?;
    // Read behind the fixture's back, so that only Drop itself can adopt it.
    let adopted = lock_file_pid(&cluster, 0)?;
    assert_ne!(adopted, old);
    assert!(process_alive(adopted));
    let dir = cluster.dir().to_path_buf();
    let servers = processes_in(&dir);
    assert!(servers.contains(&adopted), "{servers:?} lacks {adopted}");

    drop(cluster);
    assert_nothing_left(&dir, &[old, adopted]);
    let left: Vec<u32> = servers.into_iter().filter(|p| process_alive(*p)).collect();
    assert!(
        left.is_empty(),
        "server processes outlived the cluster: {left:?}"
    );
    Ok(())
}
