//! Transaction mode against real PostgreSQL: backend connections shared between sessions
//! without leaking one session's state into another, pinning, connections in unknown state
//! closed, and pgbench through a switchover.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use graywire_tests::{
    config_for, eventually_ok, pgbench, planned_switchover, start_cluster, ProxyOptions,
    RunningProxy,
};

/// The PID of the backend that serves `c`'s next statement.
async fn backend_pid(c: &tokio_postgres::Client) -> i32 {
    c.query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

fn transaction_mode(size: usize) -> ProxyOptions {
    ProxyOptions {
        extra: format!(
            "[shutdown]\ntimeout = \"3s\"\n\n[pool]\nmode = \"transaction\"\nsize = {size}\nhold_timeout = \"30s\"\n"
        ),
        ..ProxyOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_share_few_connections_and_never_see_each_others_settings() {
    let cluster = start_cluster(1).await;
    let proxy = RunningProxy::start(&config_for(&cluster, &transaction_mode(2))).await;
    let mut tasks = Vec::new();
    for i in 0..10 {
        let c = proxy.connect("app").await;
        tasks.push(tokio::spawn(async move {
            let mem = format!("{}kB", 1024 + i * 64);
            c.batch_execute(&format!("SET work_mem = '{mem}'; SET application_name = 'app{i}'"))
                .await
                .unwrap();
            let stmt = c
                .prepare("SELECT pg_backend_pid(), current_setting('work_mem'), current_setting('application_name'), $1::int4 + 1")
                .await
                .unwrap();
            let mut pids = HashSet::new();
            for n in 0..20i32 {
                let row = c.query_one(&stmt, &[&n]).await.unwrap();
                pids.insert(row.get::<_, i32>(0));
                let want_mem = if mem.ends_with("kB") && (1024 + i * 64) % 1024 == 0 {
                    format!("{}MB", (1024 + i * 64) / 1024)
                } else {
                    mem.clone()
                };
                assert_eq!(row.get::<_, String>(1), want_mem, "session {i} sees its own work_mem");
                assert_eq!(row.get::<_, String>(2), format!("app{i}"));
                assert_eq!(row.get::<_, i32>(3), n + 1);
                tokio::task::yield_now().await;
            }
            pids
        }));
    }
    let mut all = HashSet::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    assert!(
        all.len() <= 2,
        "at most pool.size backend processes served them: {all:?}"
    );
    let n = proxy.node_info("pg0").await;
    assert!(n["backend_connections"].as_i64().unwrap() <= 2, "{n}");
    // A fresh session starts from the defaults, whatever the others set.
    let c = proxy.connect("app").await;
    let row = c
        .query_one(
            "SELECT current_setting('work_mem'), current_setting('application_name')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "4MB");
    assert_eq!(row.get::<_, String>(1), "");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_with_a_temporary_table_keeps_its_connection() {
    let cluster = start_cluster(1).await;
    let proxy = RunningProxy::start(&config_for(&cluster, &transaction_mode(2))).await;
    let pinned = proxy.connect("app").await;
    pinned
        .batch_execute("CREATE TEMP TABLE mine (x int); INSERT INTO mine VALUES (42)")
        .await
        .unwrap();
    // Other sessions keep the other connection busy and cycle through the pool.
    for _ in 0..3 {
        let c = proxy.connect("app").await;
        for _ in 0..10 {
            c.simple_query("SELECT 1").await.unwrap();
        }
    }
    let x: i32 = pinned
        .query_one("SELECT x FROM mine", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(x, 42);
    assert_eq!(proxy.node_info("pg0").await["pinned_sessions"], 1);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_leaves_mid_transaction_never_returns_its_connection() {
    let cluster = start_cluster(1).await;
    let proxy = RunningProxy::start(&config_for(&cluster, &transaction_mode(1))).await;
    {
        let c = proxy.connect("app").await;
        c.batch_execute("CREATE TABLE held (x int)").await.unwrap();
        c.batch_execute("BEGIN; INSERT INTO held VALUES (1)")
            .await
            .unwrap();
        // Dropped inside the transaction.
    }
    let c = proxy.connect("app").await;
    // The dropped session's transaction is gone with its connection, not parked in the pool.
    eventually_ok(
        Duration::from_secs(5),
        "the dropped transaction rolled back, no connection idle in transaction",
        || async {
            let idle_in_tx: i64 = c
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            let n: i64 = c
                .query_one("SELECT count(*) FROM held", &[])
                .await
                .unwrap()
                .get(0);
            if n == 0 && idle_in_tx == 0 {
                Ok(())
            } else {
                Err(format!(
                    "{n} row(s) in held, {idle_in_tx} idle in transaction"
                ))
            }
        },
    )
    .await;
    proxy.shutdown().await;
}

/// Runs pgbench through graywire (`args` after the connection options) while `during` runs.
async fn pgbench_through_a_switchover(extra_args: &[&str]) {
    let cluster = Arc::new(Mutex::new(start_cluster(3).await));
    let (config, port, password) = {
        let c = cluster.lock().unwrap();
        (
            config_for(&c, &transaction_mode(20)),
            c.port(0),
            c.password().to_owned(),
        )
    };
    pgbench::init_at(port, &password).await;
    let proxy = RunningProxy::start(&config).await;
    let mut args = vec!["-T", "8", "-c", "8"];
    args.extend_from_slice(extra_args);
    let bench = pgbench::start(proxy.addr.port(), &args);
    // Not a synchronisation: pgbench runs for 2 s before the switchover (and 6 s in all).
    tokio::time::sleep(Duration::from_secs(2)).await;
    planned_switchover(&cluster, &proxy).await;
    let (processed, failed, stdout) = pgbench::finish(bench, Duration::from_secs(60)).await;
    assert_eq!(failed, 0, "{stdout}");
    assert!(processed > 0, "{stdout}");
    println!("pgbench {extra_args:?} through a switchover: {processed} transactions, none failed");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_prepared_runs_through_a_switchover_without_failures() {
    pgbench_through_a_switchover(&["-M", "prepared"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_reconnecting_runs_through_a_switchover_without_failures() {
    pgbench_through_a_switchover(&["-C", "-S"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_gives_its_connection_to_one_that_needs_it() {
    let cluster = start_cluster(1).await;
    let proxy = RunningProxy::start(&config_for(&cluster, &transaction_mode(1))).await;
    let a = proxy.connect("app").await;
    let pid_a = backend_pid(&a).await;
    // The only connection is held by idle session a; b's startup and queries get it at once.
    let started = std::time::Instant::now();
    let b = proxy.connect("app").await;
    let pid_b = backend_pid(&b).await;
    assert_eq!(pid_a, pid_b, "one connection, handed over");
    // And back.
    let again = backend_pid(&a).await;
    assert_eq!(again, pid_a);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "handed over at the boundary, not after a timeout: {:?}",
        started.elapsed()
    );
    // Many rounds of alternation stay quick and correct.
    for i in 0..20 {
        let c = if i % 2 == 0 { &a } else { &b };
        let v: i32 = c.query_one("SELECT $1::int4", &[&i]).await.unwrap().get(0);
        assert_eq!(v, i);
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_reuses_a_left_connection_with_nothing_of_its_last_session() {
    let cluster = start_cluster(1).await;
    let proxy = RunningProxy::start(&config_for(&cluster, &ProxyOptions::default())).await;
    let first_pid: i32 = {
        let a = proxy.connect("app").await;
        a.batch_execute(
            "SET work_mem = '9MB'; SET application_name = 'left'; \
             CREATE TEMP TABLE gone (x int); PREPARE q AS SELECT 1; LISTEN ch",
        )
        .await
        .unwrap();
        backend_pid(&a).await
    };
    // The client left cleanly at a boundary: its backend connection waits for the next session.
    // Until its reset is done a new session gets another connection. Those stay open: one given
    // back would be the newest idle connection, the one every later attempt is handed.
    let others = Mutex::new(Vec::new());
    let b = eventually_ok(Duration::from_secs(5), "the connection reused", || async {
        let b = proxy.connect("app").await;
        let pid = backend_pid(&b).await;
        if pid == first_pid {
            return Ok(b);
        }
        others.lock().unwrap().push(b);
        Err(format!("backend {pid}, not {first_pid}"))
    })
    .await;
    drop(others);
    let row = b
        .query_one(
            "SELECT current_setting('work_mem'), current_setting('application_name'), \
             (SELECT count(*) FROM pg_prepared_statements WHERE from_sql), \
             (SELECT count(*) FROM pg_listening_channels()), \
             to_regclass('pg_temp.gone') IS NULL",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "4MB");
    assert_eq!(row.get::<_, String>(1), "");
    assert_eq!(row.get::<_, i64>(2), 0);
    assert_eq!(row.get::<_, i64>(3), 0);
    assert!(row.get::<_, bool>(4), "the temporary table is gone");
    proxy.shutdown().await;
}

/// The next session on a left connection is greeted with the parameters a fresh connection
/// would report, not those the last session set (its reset went out when it left).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_session_on_a_left_connection_is_greeted_with_fresh_parameters() {
    use graywire_tests::raw::{message, RawClient};
    let cluster = start_cluster(1).await;
    let proxy = RunningProxy::in_front_of(&cluster).await;
    let mut a = RawClient::connect_trust(proxy.addr, "trusted", &[])
        .await
        .unwrap();
    let fresh_datestyle = a.parameters.get("DateStyle").cloned().unwrap();
    let r = a
        .query(
            "SET application_name = 'left'; SET DateStyle = 'German, DMY'; SELECT pg_backend_pid()",
        )
        .await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let first_pid = r.rows[0][0].clone().unwrap();
    assert_eq!(a.parameters.get("application_name").unwrap(), "left");
    a.send(&message(b'X', &[])).await;
    drop(a);

    // A's connection is back once its reset is done; until then a new session gets another
    // one. Those stay open, so that a later attempt cannot be handed one of them again.
    let others = Mutex::new(Vec::new());
    let mut b = eventually_ok(Duration::from_secs(5), "the connection reused", || async {
        let mut b = RawClient::connect_trust(proxy.addr, "trusted", &[])
            .await
            .unwrap();
        let pid = b.query("SELECT pg_backend_pid()").await.rows[0][0].clone();
        if pid.as_deref() == Some(first_pid.as_str()) {
            return Ok(b);
        }
        others.lock().unwrap().push(b);
        Err(format!("backend {pid:?}, not {first_pid}"))
    })
    .await;
    drop(others);
    assert_eq!(b.parameters.get("application_name").unwrap(), "");
    assert_eq!(b.parameters.get("DateStyle").unwrap(), &fresh_datestyle);
    let r = b
        .query("SELECT current_setting('application_name'), current_setting('DateStyle')")
        .await;
    assert_eq!(
        r.rows[0],
        vec![Some(String::new()), Some(fresh_datestyle.clone())]
    );
    proxy.shutdown().await;
}

/// Session mode with more clients coming and going at once than `pool.size`: a connection a
/// leaving client gives back is the one the next client takes, not closed and reopened; the
/// surplus is closed once the burst is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_keeps_a_bursts_connections_and_trims_the_surplus_after() {
    const CLIENTS: usize = 4;
    const CONNECTIONS_EACH: usize = 15;
    let cluster = start_cluster(1).await;
    let opts = ProxyOptions {
        extra: "[pool]\nmode = \"session\"\nsize = 1\n".to_owned(),
        ..ProxyOptions::default()
    };
    let proxy = Arc::new(RunningProxy::start(&config_for(&cluster, &opts)).await);
    let pids = Arc::new(Mutex::new(HashSet::new()));
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (proxy, pids) = (proxy.clone(), pids.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..CONNECTIONS_EACH {
                let c = proxy.connect("app").await;
                let pid = backend_pid(&c).await;
                pids.lock().unwrap().insert(pid);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let opened = pids.lock().unwrap().len();
    // At most one connection per client at a time, plus one per client for a connection that
    // left but was not given back yet when the same client came again.
    assert!(
        opened <= 2 * CLIENTS,
        "{} client connections opened {opened} backend connections",
        CLIENTS * CONNECTIONS_EACH
    );
    eventually_ok(
        Duration::from_secs(10),
        "the surplus beyond pool.size closed",
        || async {
            let n = proxy.node_info("pg0").await;
            if n["backend_connections"].as_i64().unwrap() <= 1 {
                Ok(())
            } else {
                Err(n)
            }
        },
    )
    .await;
    match Arc::try_unwrap(proxy) {
        Ok(proxy) => proxy.shutdown().await,
        Err(_) => panic!("the proxy is still shared"),
    }
}
