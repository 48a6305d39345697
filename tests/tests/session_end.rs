//! A backend that dies is not a node that dies: a DBA's `pg_terminate_backend`, the node's
//! idle timeouts and a state graywire cannot carry end the one session the way PostgreSQL ends
//! it (its FATAL, the connection closed) and never mark the node down.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use graywire_tests::{psql, sqlstate, start_cluster, RunningProxy};
use tokio::sync::oneshot;
use tokio_postgres::NoTls;

/// Connects and hands back how the connection ended (the error the node's FATAL became).
async fn connect_watched(
    dsn: &str,
) -> (
    tokio_postgres::Client,
    oneshot::Receiver<Result<(), tokio_postgres::Error>>,
) {
    let (client, connection) = tokio_postgres::connect(dsn, NoTls).await.unwrap();
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let _ = tx.send(connection.await);
    });
    (client, rx)
}

/// The connection's end, which must come within `limit`.
async fn ended(
    rx: oneshot::Receiver<Result<(), tokio_postgres::Error>>,
    limit: Duration,
) -> Result<(), tokio_postgres::Error> {
    tokio::time::timeout(limit, rx)
        .await
        .expect("the connection ends in time")
        .expect("the connection task reports its end")
}

async fn assert_node_up(proxy: &RunningProxy) {
    let n = proxy.node_info("pg0").await;
    assert_eq!(n["state"], "up", "{n}");
    let (_, body) = proxy.admin_get("/v1/nodes").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["primary"], "pg0", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_terminates_its_own_backend_gets_57p01_and_is_closed() {
    let cluster = start_cluster(1).await;
    let proxy = RunningProxy::in_front_of(&cluster).await;

    // tokio-postgres: the statement fails with the node's FATAL, the connection closes.
    for _ in 0..3 {
        let (client, end) = connect_watched(&proxy.dsn("app")).await;
        let e = client
            .query_one("SELECT pg_terminate_backend(pg_backend_pid())", &[])
            .await
            .unwrap_err();
        let db = e.as_db_error().unwrap_or_else(|| panic!("{e:?}"));
        assert_eq!(db.code().code(), "57P01", "{e:?}");
        assert_eq!(
            db.message(),
            "terminating connection due to administrator command"
        );
        assert_eq!(db.severity(), "FATAL");
        let _ = ended(end, Duration::from_secs(5)).await;
        assert!(client.is_closed(), "graywire closes the client connection");
    }
    // Three terminations in a row (the fall count) leave the node up.
    assert_node_up(&proxy).await;
    assert!(
        proxy
            .metric("graywire_backend_terminations_total{cause=\"admin_command\"}")
            .await
            >= Some(3.0)
    );

    // psql (libpq) sees the same FATAL and a closed connection.
    let (ok, _, err) = psql(
        &proxy.url("app"),
        &["-c", "SELECT pg_terminate_backend(pg_backend_pid())"],
    )
    .await;
    assert!(!ok);
    assert!(
        err.contains("FATAL:  terminating connection due to administrator command"),
        "{err}"
    );

    // A DBA connected directly ends a session by its backend: that session ends, others go on.
    let (victim, victim_end) =
        connect_watched(&format!("{} application_name=victim", proxy.dsn("app"))).await;
    victim.simple_query("SELECT 1").await.unwrap();
    let bystander = proxy.connect("app").await;
    let dba = graywire_tests::connect(&cluster.dsn(0)).await;
    let pid: i32 = dba
        .query_one(
            "SELECT pid FROM pg_stat_activity WHERE application_name = 'victim'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let killed: bool = dba
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap()
        .get(0);
    assert!(killed);
    let e = ended(victim_end, Duration::from_secs(5)).await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("57P01"), "{e:?}");
    bystander.simple_query("SELECT 1").await.unwrap();
    assert_node_up(&proxy).await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nodes_idle_timeouts_end_the_session_with_their_own_sqlstate() {
    let cluster = start_cluster(1).await;
    let proxy = RunningProxy::in_front_of(&cluster).await;

    let (client, end) = connect_watched(&proxy.dsn("app")).await;
    client
        .simple_query("SET idle_session_timeout = '1s'")
        .await
        .unwrap();
    let e = ended(end, Duration::from_secs(10)).await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("57P05"), "{e:?}");
    assert!(client.is_closed());

    let (client, end) = connect_watched(&proxy.dsn("app")).await;
    client
        .simple_query("SET idle_in_transaction_session_timeout = '1s'; BEGIN")
        .await
        .unwrap();
    let e = ended(end, Duration::from_secs(10)).await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("25P03"), "{e:?}");
    assert!(client.is_closed());

    assert_node_up(&proxy).await;
    assert_eq!(
        proxy
            .metric("graywire_backend_terminations_total{cause=\"idle_session_timeout\"}")
            .await,
        Some(1.0)
    );
    assert_eq!(
        proxy
            .metric("graywire_backend_terminations_total{cause=\"idle_in_transaction_timeout\"}")
            .await,
        Some(1.0)
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_too_large_to_carry_ends_the_session_not_the_node() {
    let cluster = start_cluster(1).await;
    let proxy = RunningProxy::in_front_of(&cluster).await;
    for _ in 0..3 {
        let (client, end) = connect_watched(&proxy.dsn("app")).await;
        // A setting over the 1 MiB graywire reads back when it captures the state (which a
        // SET makes it do at the next boundary).
        let big = vec!["schema_that_is_not_there"; 50_000].join(", ");
        let _ = client
            .simple_query(&format!("SET search_path = {big}"))
            .await;
        let e = ended(end, Duration::from_secs(10)).await.unwrap_err();
        assert_eq!(sqlstate(&e).as_deref(), Some("08006"), "{e:?}");
        let message = e.as_db_error().map(|d| d.message()).unwrap_or_default();
        assert!(
            message.contains("could not read this session's state"),
            "{e:?}"
        );
    }
    assert_node_up(&proxy).await;
    let c = proxy.connect("app").await;
    c.simple_query("SELECT 1").await.unwrap();
    proxy.shutdown().await;
}

/// Latencies of `SELECT 1` and one-row INSERTs by 8 sessions for `period`.
async fn workload(proxy: &RunningProxy, period: Duration) -> Vec<Duration> {
    let mut tasks = Vec::new();
    for w in 0..8 {
        let client = proxy.connect("app").await;
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let deadline = Instant::now() + period;
            let mut i = 0u32;
            while Instant::now() < deadline && i < 100_000 {
                let start = Instant::now();
                if i.is_multiple_of(2) {
                    client.simple_query("SELECT 1").await.unwrap();
                } else {
                    client
                        .execute("INSERT INTO workload VALUES ($1, $2)", &[&w, &(i as i32)])
                        .await
                        .unwrap();
                }
                latencies.push(start.elapsed());
                i += 1;
                // Paced: a steady stream, not a saturating one.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    all
}

fn p99(sorted: &[Duration]) -> Duration {
    sorted[(sorted.len() * 99 / 100).min(sorted.len() - 1)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_killing_their_own_backends_never_mark_the_node_down() {
    let cluster = start_cluster(1).await;
    let proxy = RunningProxy::in_front_of(&cluster).await;
    let setup = proxy.connect("app").await;
    setup
        .simple_query("CREATE TABLE workload (w int, i int)")
        .await
        .unwrap();

    let quiet = workload(&proxy, Duration::from_secs(5)).await;

    let stop = tokio_util::sync::CancellationToken::new();
    let mut killers = Vec::new();
    for _ in 0..8 {
        let dsn = proxy.dsn("trusted");
        let stop = stop.clone();
        killers.push(tokio::spawn(async move {
            let mut killed = 0u32;
            while !stop.is_cancelled() && killed < 10_000 {
                let (client, end) = connect_watched(&dsn).await;
                let e = client
                    .simple_query("SELECT pg_terminate_backend(pg_backend_pid())")
                    .await
                    .unwrap_err();
                assert_eq!(sqlstate(&e).as_deref(), Some("57P01"), "{e:?}");
                let _ = ended(end, Duration::from_secs(5)).await;
                killed += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            killed
        }));
    }
    let watch_stop = stop.clone();
    let admin = proxy.admin;
    let watcher = tokio::spawn(async move {
        let mut looks = 0u32;
        while !watch_stop.is_cancelled() && looks < 1_000 {
            let (_, body) = graywire_tests::http_request(admin, "GET", "/v1/nodes").await;
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["primary"], "pg0", "the node was marked down: {body}");
            looks += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        looks
    });
    let loaded = workload(&proxy, Duration::from_secs(10)).await;
    stop.cancel();
    let mut killed = 0;
    for k in killers {
        killed += k.await.unwrap();
    }
    let looks = watcher.await.unwrap();
    let (p_quiet, p_loaded) = (p99(&quiet), p99(&loaded));
    println!(
        "{killed} backends terminated; p99 without terminations {p_quiet:?} ({} requests), \
         with them {p_loaded:?} ({} requests); the node was up at all {looks} looks",
        quiet.len(),
        loaded.len()
    );
    assert!(killed >= 50, "the killers ran: {killed}");
    // Within 2x, with 25 ms of slack for a sub-millisecond baseline on a 2-core machine.
    let bound = (p_quiet * 2).max(p_quiet + Duration::from_millis(25));
    assert!(
        p_loaded <= bound,
        "p99 {p_loaded:?} with terminations against {p_quiet:?} without (bound {bound:?})"
    );
    assert_node_up(&proxy).await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_startup_packet_the_node_would_refuse_is_refused_at_the_client() {
    let cluster = start_cluster(1).await;
    let proxy = RunningProxy::in_front_of(&cluster).await;
    // A client packet of 9,990 bytes (under the limit itself) without a database, which
    // graywire's own parameters (its backend user, the database made explicit) would push
    // over PostgreSQL's 10,000: 8 + user (13) + options (8 + 20 + 9,918 + 1) +
    // client_encoding (21) + 1.
    let options = format!("-c application_name={}", "x".repeat(9_918));
    let mut config = tokio_postgres::Config::new();
    config
        .host(proxy.addr.ip().to_string())
        .port(proxy.addr.port())
        .user("trusted")
        .options(&options);
    let Err(e) = config.connect(NoTls).await else {
        panic!("a startup packet over the node's limit was accepted");
    };
    let db = e.as_db_error().unwrap_or_else(|| panic!("{e:?}"));
    assert_eq!(db.code().code(), "08P01", "{e:?}");
    assert!(
        db.message().contains("over PostgreSQL's limit of 10000"),
        "{}",
        db.message()
    );
    assert_node_up(&proxy).await;
    // The node was never asked: no failed check, and the next client is served.
    let n = proxy.node_info("pg0").await;
    assert!(n["last_error"].is_null(), "{n}");
    proxy
        .connect("trusted")
        .await
        .simple_query("SELECT 1")
        .await
        .unwrap();
    proxy.shutdown().await;
}

/// LISTEN and NOTIFY on one session, through a raw client that sees BackendKeyData.
async fn notify_self(proxy: &RunningProxy) -> (u32, u32, u32) {
    use graywire_tests::raw::RawClient;
    let mut c = RawClient::connect_trust(proxy.addr, "trusted", &[])
        .await
        .unwrap_or_else(|m| panic!("refused: {:?}", m.fields()));
    let (advertised, _) = c.key.expect("BackendKeyData");
    let r = c.query("LISTEN here; NOTIFY here, 'hello'").await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let notification = r
        .all
        .iter()
        .find(|m| m.tag == b'A')
        .unwrap_or_else(|| panic!("no NotificationResponse in {:?}", r.all));
    let sender = u32::from_be_bytes(notification.body[..4].try_into().unwrap());
    let r = c.query("SELECT pg_backend_pid()").await;
    let backend: u32 = r.rows[0][0].as_deref().unwrap().parse().unwrap();
    (advertised, sender, backend)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_knows_its_own_pid_as_on_a_direct_connection() {
    let cluster = start_cluster(1).await;

    let proxy = RunningProxy::in_front_of(&cluster).await;
    let (advertised, sender, backend) = notify_self(&proxy).await;
    assert_eq!(sender, advertised, "session mode: the notification's pid");
    assert_eq!(backend, advertised, "session mode: pg_backend_pid()");
    proxy.shutdown().await;

    // Transaction mode: an earlier session leaves a connection in the pool, so this one's
    // first backend may be any; a notification it sends itself still carries its own pid.
    let mut opts = graywire_tests::ProxyOptions::default();
    opts.extra
        .push_str("\n[pool]\nmode = \"transaction\"\nsize = 2\n");
    let proxy = RunningProxy::start(&graywire_tests::config_for(&cluster, &opts)).await;
    for _ in 0..3 {
        let (advertised, sender, _) = notify_self(&proxy).await;
        assert_eq!(
            sender, advertised,
            "transaction mode: the notification's pid"
        );
    }
    proxy.shutdown().await;
}

/// Transaction mode with a pool of `size`.
fn transaction_mode(size: usize) -> graywire_tests::ProxyOptions {
    let mut opts = graywire_tests::ProxyOptions::default();
    opts.extra.push_str(&format!(
        "\n[pool]\nmode = \"transaction\"\nsize = {size}\n"
    ));
    opts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_transaction_mode_a_connection_ended_between_transactions_is_not_the_clients() {
    let cluster = start_cluster(1).await;
    let proxy =
        RunningProxy::start(&graywire_tests::config_for(&cluster, &transaction_mode(2))).await;
    let dba = graywire_tests::connect(&cluster.dsn(0)).await;
    let backend_pid = |c: tokio_postgres::Client| async move {
        let pid: i32 = c
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        (c, pid)
    };

    // The session's own connection, ended by a DBA while the session sits between
    // transactions: its next transaction runs on another connection, without an error.
    let (client, end) = connect_watched(&proxy.dsn("app")).await;
    let (client, pid) = backend_pid(client).await;
    let killed: bool = dba
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap()
        .get(0);
    assert!(killed);
    // graywire has seen the node end that connection (not the session's request: there was
    // none in flight).
    proxy
        .wait_metric(
            "graywire_backend_terminations_total{cause=\"admin_command\"}",
            1.0,
            Duration::from_secs(5),
        )
        .await;
    let new_pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .expect("the next transaction runs on another connection")
        .get(0);
    assert_ne!(new_pid, pid, "a new backend serves the session");
    assert!(!client.is_closed());

    // A pooled connection ended while idle in the pool: the next session is served from
    // another one, and the node is not counted as failing.
    drop(client);
    let _ = ended(end, Duration::from_secs(5)).await;
    let (second, second_pid) = backend_pid(proxy.connect("app").await).await;
    drop(second);
    let killed: bool = dba
        .query_one("SELECT pg_terminate_backend($1)", &[&second_pid])
        .await
        .unwrap()
        .get(0);
    assert!(killed);
    // Idle in the pool past the age at which graywire checks a connection before use (part
    // of the scenario, not a synchronisation).
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    for _ in 0..3 {
        let c = proxy.connect("app").await;
        c.simple_query("SELECT 1").await.unwrap();
    }
    assert_node_up(&proxy).await;
    let n = proxy.node_info("pg0").await;
    assert!(n["last_error"].is_null(), "{n}");
    proxy.shutdown().await;
}
