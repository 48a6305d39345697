//! Malformed, oversized and out-of-order input from a client ends only that session, with a
//! FATAL ErrorResponse; other sessions never notice. A client that vanishes mid-transaction
//! leaves nothing running or locked on the node.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use graywire_tests::raw::{message, startup_packet, RawClient};
use graywire_tests::{
    config_for, connect, eventually_ok, start_cluster, ProxyOptions, RunningProxy,
};

/// Reads until EOF and returns the FATAL ErrorResponse the session ended with.
async fn fatal_then_eof(c: &mut RawClient) -> graywire_tests::raw::Msg {
    let mut fatal = None;
    while let Some(m) = c.read().await {
        if m.tag == b'E' {
            fatal = Some(m);
        }
    }
    let m = fatal.expect("a FATAL ErrorResponse before the close");
    assert_eq!(m.fields().get(&'S').map(String::as_str), Some("FATAL"));
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_startup_packets_get_a_fatal_error() {
    let cluster = start_cluster(1).await;
    let proxy = RunningProxy::in_front_of(&cluster).await;
    let bystander = proxy.connect("app").await;

    let mut cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "no terminator",
            {
                let mut p = startup_packet(&[("user", "trusted")]);
                p.pop();
                let len = p.len() as u32;
                p[..4].copy_from_slice(&len.to_be_bytes());
                p
            },
            "08P01",
        ),
        ("length too small", vec![0, 0, 0, 4, 0, 3, 0, 0], "08P01"),
        ("length too large", vec![0, 1, 0, 0, 0, 3, 0, 0], "08P01"),
        (
            "no user",
            startup_packet(&[("database", "postgres")]),
            "28000",
        ),
        (
            "protocol 2.0",
            {
                let mut p = startup_packet(&[("user", "trusted")]);
                p[4..8].copy_from_slice(&0x0002_0000u32.to_be_bytes());
                p
            },
            "0A000",
        ),
        (
            "unknown request code",
            {
                let mut p = startup_packet(&[("user", "trusted")]);
                p[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
                p
            },
            "0A000",
        ),
    ];
    for (what, bytes, code) in cases.drain(..) {
        let mut c = RawClient::open(proxy.addr).await;
        c.send_lenient(&bytes).await;
        let m = fatal_then_eof(&mut c).await;
        assert_eq!(m.sqlstate(), code, "{what}: {:?}", m.fields());
    }
    // SSLRequest and GSSENCRequest are answered 'N', then a plain startup works.
    for code in [80_877_103u32, 80_877_104] {
        let mut c = RawClient::open(proxy.addr).await;
        let mut req = 8u32.to_be_bytes().to_vec();
        req.extend_from_slice(&code.to_be_bytes());
        c.send(&req).await;
        let mut answer = [0u8; 1];
        tokio::io::AsyncReadExt::read_exact(&mut c.stream, &mut answer)
            .await
            .unwrap();
        assert_eq!(&answer, b"N");
        c.send(&startup_packet(&[
            ("user", "trusted"),
            ("database", "postgres"),
        ]))
        .await;
        let r = c.until_ready().await;
        assert_eq!(
            r.status, b'I',
            "session works after the refused encryption request"
        );
    }
    // A client that says nothing at all is dropped after auth_timeout; meanwhile others work.
    bystander.simple_query("SELECT 1").await.unwrap();
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_after_startup_ends_only_that_session() {
    let cluster = start_cluster(1).await;
    let opts = ProxyOptions {
        listener_extra: "max_message_size = \"64kB\"".into(),
        ..ProxyOptions::default()
    };
    let proxy = RunningProxy::start(&config_for(&cluster, &opts)).await;
    let bystander = proxy.connect("app").await;
    bystander
        .batch_execute("CREATE TABLE t (x int)")
        .await
        .unwrap();
    let tx_holder = proxy.connect("app").await;
    tx_holder
        .batch_execute("BEGIN; INSERT INTO t VALUES (1)")
        .await
        .unwrap();

    let oversized = {
        let mut q = vec![b'x'; 100_000];
        q.push(0);
        message(b'Q', &q)
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("unknown message type", message(b'!', b"junk")),
        ("a backend message type", message(b'Z', b"I")),
        ("length below 4", vec![b'Q', 0, 0, 0, 2]),
        ("oversized query", oversized),
        (
            "oversized control message",
            message(b'E', &vec![0u8; 20_000]),
        ),
        ("Sync with a body", message(b'S', b"x")),
        ("password message after startup", message(b'p', b"pw\0")),
    ];
    for (what, bytes) in cases {
        let mut c = RawClient::connect_trust(proxy.addr, "trusted", &[])
            .await
            .unwrap();
        let ok = c.query("SELECT 1").await;
        assert_eq!(ok.status, b'I');
        c.send_lenient(&bytes).await;
        let m = fatal_then_eof(&mut c).await;
        assert_eq!(m.sqlstate(), "08P01", "{what}: {:?}", m.fields());
        // Everyone else is untouched, including a transaction in progress.
        bystander.simple_query("SELECT 1").await.unwrap();
    }
    tx_holder
        .batch_execute("INSERT INTO t VALUES (2); COMMIT")
        .await
        .unwrap();
    let n: i64 = bystander
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);

    // A truncated message followed by a hang-up: no crash, the next client is served.
    let mut c = RawClient::connect_trust(proxy.addr, "trusted", &[])
        .await
        .unwrap();
    c.send(&message(b'Q', b"SELECT 1\0")[..6]).await;
    drop(c);
    let fresh = proxy.connect("app").await;
    fresh.simple_query("SELECT 1").await.unwrap();

    // /metrics counts the protocol violations graywire answered.
    let (status, body) = proxy.admin_get("/metrics").await;
    assert_eq!(status, 200);
    assert!(
        body.lines()
            .any(|l| l.starts_with("graywire_client_errors_total")
                && l.contains("sqlstate=\"08P01\"")),
        "{body}"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_vanishes_mid_transaction_leaves_nothing_behind() {
    let cluster = start_cluster(1).await;
    let proxy = RunningProxy::in_front_of(&cluster).await;
    let direct = connect(&cluster.dsn(0)).await;
    direct
        .batch_execute("CREATE TABLE locked (x int)")
        .await
        .unwrap();

    // Inside a transaction holding a lock, with a long query running: then the socket drops.
    let mut c =
        RawClient::connect_trust(proxy.addr, "trusted", &[("application_name", "vanisher")])
            .await
            .unwrap();
    assert_eq!(
        c.query("BEGIN; LOCK TABLE locked IN ACCESS EXCLUSIVE MODE")
            .await
            .status,
        b'T'
    );
    c.send(&message(b'Q', b"SELECT pg_sleep(60)\0")).await;
    sessions_of(
        &direct,
        "vanisher",
        "state = 'active' AND query = 'SELECT pg_sleep(60)'",
        1,
    )
    .await;
    drop(c);

    let started = Instant::now();
    direct
        .batch_execute("SET lock_timeout = '5s'; LOCK TABLE locked")
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "lock freed after {:?}",
        started.elapsed()
    );
    // The backend connection of the vanished client is closed.
    sessions_of(&direct, "vanisher", "true", 0).await;

    // Same with an idle transaction (no query running): rolled back, nothing left.
    let mut c =
        RawClient::connect_trust(proxy.addr, "trusted", &[("application_name", "vanisher2")])
            .await
            .unwrap();
    c.query("BEGIN; INSERT INTO locked VALUES (1)").await;
    drop(c);
    sessions_of(&direct, "vanisher2", "true", 0).await;
    let rows: i64 = direct
        .query_one("SELECT count(*) FROM locked", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0, "the open transaction was rolled back");
    proxy.shutdown().await;
}

/// Waits (bounded) until `pg_stat_activity` shows `n` backends of `application_name` for
/// which `filter` (SQL) holds.
async fn sessions_of(
    direct: &tokio_postgres::Client,
    application_name: &str,
    filter: &str,
    n: i64,
) {
    let sql =
        format!("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND ({filter})");
    let what = format!("{n} backend(s) of {application_name} where {filter}");
    eventually_ok(Duration::from_secs(5), &what, || async {
        let count: i64 = direct
            .query_one(&sql, &[&application_name])
            .await
            .unwrap()
            .get(0);
        if count == n {
            Ok(())
        } else {
            Err(format!("{count} backend(s)"))
        }
    })
    .await;
}
