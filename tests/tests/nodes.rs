//! Finding the primary among real nodes, the admin endpoints, and graceful shutdown.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use graywire_tests::raw::RawClient;
use graywire_tests::{config_for, eventually, start_cluster, ProxyOptions, RunningProxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_is_found_when_it_is_not_first_in_the_config() {
    let cluster = start_cluster(3).await;
    let opts = ProxyOptions {
        node_order: Some(vec![2, 1, 0]),
        ..ProxyOptions::default()
    };
    let proxy = RunningProxy::start(&config_for(&cluster, &opts)).await;
    let c = proxy.connect("app").await;
    // Writes work, so the session reached the primary (node 0, listed last).
    c.batch_execute("CREATE TABLE w (x int); INSERT INTO w VALUES (1)")
        .await
        .unwrap();
    let in_recovery: bool = c
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!in_recovery);
    let port: i32 = c
        .query_one("SELECT current_setting('port')::int", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(port, i32::from(cluster.port(0)));

    let (status, body) = proxy.admin_get("/v1/nodes").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let nodes = v["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    for n in nodes {
        let want = if n["name"] == "pg0" {
            "primary"
        } else {
            "standby"
        };
        assert_eq!(n["role"], want, "{n}");
        assert_eq!(n["state"], "up", "{n}");
        assert!(n["version"].as_str().unwrap().starts_with("15"), "{n}");
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_answer_and_metrics_are_exported() {
    let cluster = start_cluster(1).await;
    let proxy = RunningProxy::in_front_of(&cluster).await;
    let c = proxy.connect("app").await;
    // A request graywire must time at 0.3 s or more (it sees the query before the node does,
    // and the reply after).
    c.simple_query("SELECT pg_sleep(0.3)").await.unwrap();
    // A session publishes its request durations at least once a second while it runs. Not a
    // synchronisation: the next request comes more than a second later, and it is what makes
    // the open session publish (there is nothing to poll before it is sent).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    c.simple_query("SELECT 2").await.unwrap();

    assert_eq!(proxy.admin_get("/healthz").await.0, 200);
    let (status, body) = proxy.admin_get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"primary\":\"pg0\""), "{body}");

    let (status, body) = proxy.admin_get("/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "graywire_sessions",
        "graywire_node_up",
        "graywire_node_role",
        "graywire_node_sessions",
        "graywire_backend_connections",
        "graywire_health_checks_total",
        "graywire_query_duration_seconds_bucket",
        "graywire_client_connections_total",
        "graywire_relayed_bytes_total",
    ] {
        assert!(body.contains(name), "{name} missing from /metrics:\n{body}");
    }
    assert!(
        body.contains("graywire_node_role{node=\"pg0\",role=\"primary\"} 1"),
        "{body}"
    );
    let sample = |prefix: &str| -> f64 {
        body.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in:\n{body}"))
    };
    let count = sample("graywire_query_duration_seconds_count ");
    assert!(
        count >= 2.0,
        "the open session's requests are not counted:\n{body}"
    );
    let sum = sample("graywire_query_duration_seconds_sum ");
    assert!(
        (0.3..30.0).contains(&sum),
        "the durations add up to {sum} s, with a 0.3 s sleep among them:\n{body}"
    );
    let quick = sample("graywire_query_duration_seconds_bucket{le=\"0.25\"} ");
    assert!(
        quick < count,
        "the 0.3 s request was counted at or under 0.25 s:\n{body}"
    );

    let (status, body) = proxy.admin_get("/v1/nope").await;
    assert_eq!(status, 404);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(v["error"].as_str().unwrap().contains("/v1/nope"));
    let (status, _) = graywire_tests::http_request(proxy.admin, "POST", "/metrics").await;
    assert_eq!(status, 405);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_primary_means_57p03_after_the_hold_timeout() {
    let cluster = start_cluster(2).await;
    // List only the standby: no node is primary.
    let opts = ProxyOptions {
        node_order: Some(vec![1]),
        extra: "[pool]\nhold_timeout = \"1s\"\n".into(),
        ..ProxyOptions::default()
    };
    let proxy = RunningProxy::start(&config_for(&cluster, &opts)).await;
    let started = std::time::Instant::now();
    let e = graywire_tests::connect_refused(&proxy.dsn("app")).await;
    assert_eq!(
        graywire_tests::sqlstate(&e).as_deref(),
        Some("57P03"),
        "{e:?}"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    assert_eq!(proxy.admin_get("/readyz").await.0, 503);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_open_transactions_finish_then_ends_sessions_with_57p01() {
    let cluster = start_cluster(1).await;
    let proxy = RunningProxy::in_front_of(&cluster).await;
    let addr = proxy.addr;
    let mut idle = RawClient::connect_trust(addr, "trusted", &[])
        .await
        .unwrap();
    let mut busy = RawClient::connect_trust(addr, "trusted", &[])
        .await
        .unwrap();
    busy.query("CREATE TABLE s (x int)").await;
    assert_eq!(
        busy.query("BEGIN; INSERT INTO s VALUES (1)").await.status,
        b'T'
    );

    let stopping = tokio::spawn(proxy.shutdown());
    // The idle session is told at once.
    let m = idle.read().await.expect("a FATAL for the idle session");
    assert_eq!(m.tag, b'E');
    assert_eq!(m.sqlstate(), "57P01");
    // New connections are refused: the listener is closed (well within the 3 s grace the busy
    // session needs below).
    eventually(Duration::from_secs(2), "listener closed", || async {
        tokio::net::TcpStream::connect(addr)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    // The session inside a transaction may finish it, then it is closed.
    let r = busy.query("INSERT INTO s VALUES (2); COMMIT").await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.status, b'I');
    let m = busy.read().await.expect("a FATAL after the commit");
    assert_eq!(m.sqlstate(), "57P01");
    assert!(busy.read().await.is_none(), "then the connection closes");
    stopping.await.unwrap();

    let direct = graywire_tests::connect(&cluster.dsn(0)).await;
    let n: i64 = direct
        .query_one("SELECT count(*) FROM s", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2, "the finished transaction committed");
}
