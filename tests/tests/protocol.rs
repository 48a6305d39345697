//! Through graywire to a real PostgreSQL: the simple and extended protocols, prepared
//! statements, COPY both ways, large values, errors, transaction status, startup parameters,
//! ParameterStatus, notices, notifications and cancel behave as on a direct connection.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt, TryStreamExt};
use graywire_tests::raw::RawClient;
use graywire_tests::{eventually, sqlstate, start_cluster, RunningProxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_and_extended_queries_and_reused_prepared_statements() {
    let cluster = start_cluster(1).await;
    let proxy = RunningProxy::in_front_of(&cluster).await;
    let c = proxy.connect("app").await;

    let rows = c
        .simple_query("SELECT 1 AS one, 'two' AS two")
        .await
        .unwrap();
    let row = rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .unwrap();
    assert_eq!(row.get("one"), Some("1"));
    assert_eq!(row.get("two"), Some("two"));

    let row = c
        .query_one(
            "SELECT $1::int8 * 2, $2::text || '!', $3::text IS NULL",
            &[&21i64, &"hi", &None::<String>],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 42);
    assert_eq!(row.get::<_, String>(1), "hi!");
    assert!(row.get::<_, bool>(2));

    c.batch_execute("CREATE TABLE kv (k int PRIMARY KEY, v text)")
        .await
        .unwrap();
    let insert = c.prepare("INSERT INTO kv VALUES ($1, $2)").await.unwrap();
    let select = c.prepare("SELECT v FROM kv WHERE k = $1").await.unwrap();
    for k in 0..300i32 {
        c.execute(&insert, &[&k, &format!("v{k}")]).await.unwrap();
    }
    for k in (0..300i32).step_by(7) {
        let v: String = c.query_one(&select, &[&k]).await.unwrap().get(0);
        assert_eq!(v, format!("v{k}"));
    }
    let n: i64 = c
        .query_one("SELECT count(*) FROM kv", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 300);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_pass_through_with_their_sqlstate_and_the_session_goes_on() {
    let cluster = start_cluster(1).await;
    let proxy = RunningProxy::in_front_of(&cluster).await;
    let c = proxy.connect("app").await;
    c.batch_execute("CREATE TABLE u (id int PRIMARY KEY)")
        .await
        .unwrap();
    c.batch_execute("INSERT INTO u VALUES (1)").await.unwrap();

    let cases = [
        ("SELECT 1/0", "22012"),
        ("SELECT * FROM no_such_table", "42P01"),
        ("INSERT INTO u VALUES (1)", "23505"),
        ("SELEC 1", "42601"),
        ("SELECT 'x'::int", "22P02"),
    ];
    for (sql, code) in cases {
        let e = c.simple_query(sql).await.expect_err(sql);
        assert_eq!(sqlstate(&e).as_deref(), Some(code), "{sql}: {e:?}");
        // The extended protocol reports the same.
        let e = c.query(sql, &[]).await.expect_err(sql);
        assert_eq!(sqlstate(&e).as_deref(), Some(code), "{sql} (extended)");
    }
    let db = c
        .query_one("SELECT 1::int4", &[])
        .await
        .unwrap()
        .get::<_, i32>(0);
    assert_eq!(db, 1, "the session works after errors");

    // A detail field survives too.
    let e = c
        .execute("INSERT INTO u VALUES (1)", &[])
        .await
        .unwrap_err();
    let detail = e
        .as_db_error()
        .and_then(|d| d.detail())
        .unwrap_or_default()
        .to_owned();
    assert!(detail.contains("(id)=(1) already exists"), "{detail}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_status_follows_every_ready_for_query() {
    let cluster = start_cluster(1).await;
    let proxy = RunningProxy::in_front_of(&cluster).await;
    let mut c = RawClient::connect_trust(proxy.addr, "trusted", &[])
        .await
        .unwrap();
    let steps = [
        ("SELECT 1", b'I'),
        ("BEGIN", b'T'),
        ("SELECT 1", b'T'),
        ("SELECT 1/0", b'E'),
        ("SELECT 1", b'E'),
        ("ROLLBACK", b'I'),
        ("BEGIN", b'T'),
        ("CREATE TEMP TABLE t (x int)", b'T'),
        ("COMMIT", b'I'),
        ("BEGIN; SELECT 1/0", b'E'),
        ("COMMIT", b'I'),
    ];
    for (sql, want) in steps {
        let r = c.query(sql).await;
        assert_eq!(r.status as char, want as char, "after {sql:?}");
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out_of_100k_rows_keeps_every_byte() {
    let cluster = start_cluster(1).await;
    let proxy = RunningProxy::in_front_of(&cluster).await;
    let c = proxy.connect("app").await;
    c.batch_execute("CREATE TABLE items (id int, label text, note text)")
        .await
        .unwrap();

    let mut expected = String::new();
    for i in 0..100_000 {
        expected.push_str(&format!(
            "{i}\tlabel-{i}\tnote with tab\\tand backslash\\\\ {}\n",
            i * 7
        ));
    }
    let sink = c.copy_in("COPY items FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    for chunk in expected.as_bytes().chunks(50_000) {
        sink.send(Bytes::copy_from_slice(chunk)).await.unwrap();
    }
    let n = sink.finish().await.unwrap();
    assert_eq!(n, 100_000);

    let row = c
        .query_one(
            "SELECT count(*), sum(id)::int8, count(DISTINCT label) FROM items",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 100_000);
    assert_eq!(row.get::<_, i64>(1), (0..100_000i64).sum::<i64>());
    assert_eq!(row.get::<_, i64>(2), 100_000);

    let stream = c
        .copy_out("COPY (SELECT * FROM items ORDER BY id) TO STDOUT")
        .await
        .unwrap();
    let chunks: Vec<Bytes> = stream.try_collect().await.unwrap();
    let out: Vec<u8> = chunks.concat();
    assert_eq!(out.len(), expected.len());
    assert!(
        out == expected.as_bytes(),
        "COPY OUT returns exactly what COPY IN stored"
    );

    // A COPY that fails midway reports the node's error and the session goes on.
    let sink = c.copy_in("COPY items (id) FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    sink.send(Bytes::from_static(b"1\nnot-a-number\n"))
        .await
        .unwrap();
    let e = sink.finish().await.unwrap_err();
    assert_eq!(sqlstate(&e).as_deref(), Some("22P02"));
    let one: i32 = c.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_32_mib_bytea_round_trips() {
    let cluster = start_cluster(1).await;
    let proxy = RunningProxy::in_front_of(&cluster).await;
    let c = proxy.connect("app").await;
    c.batch_execute("CREATE TABLE blobs (id int, data bytea)")
        .await
        .unwrap();
    let data: Vec<u8> = (0..32u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    c.execute("INSERT INTO blobs VALUES (1, $1)", &[&data])
        .await
        .unwrap();
    let back: Vec<u8> = c
        .query_one("SELECT data FROM blobs WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(back.len(), data.len());
    assert!(back == data, "bytes differ");
    // And as text in the simple protocol (64 MiB of hex in one DataRow).
    let rows = c.simple_query("SELECT md5(data) FROM blobs").await.unwrap();
    assert!(rows
        .iter()
        .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_))));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_backend_and_stops_the_query() {
    let cluster = start_cluster(1).await;
    let proxy = RunningProxy::in_front_of(&cluster).await;
    let c = proxy.connect("app").await;
    let direct = graywire_tests::connect(&cluster.dsn(0)).await;
    let token = c.cancel_token();
    let started = Instant::now();
    let running = tokio::spawn(async move {
        let r = c.simple_query("SELECT pg_sleep(30)").await;
        (r, c)
    });
    // The cancel is for a query the node is running.
    eventually(
        Duration::from_secs(2),
        "pg_sleep(30) running on the node",
        || async {
            let n: i64 = direct
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity \
                 WHERE state = 'active' AND query = 'SELECT pg_sleep(30)'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            (n == 1).then_some(())
        },
    )
    .await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let (r, c) = tokio::time::timeout(Duration::from_secs(5), running)
        .await
        .unwrap()
        .unwrap();
    let e = r.expect_err("the query is cancelled");
    assert_eq!(sqlstate(&e).as_deref(), Some("57014"), "{e:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    // The session is usable afterwards.
    let one: i32 = c.query_one("SELECT 1", &[]).await.unwrap().get(0);
    assert_eq!(one, 1);

    // A cancel with a wrong key does nothing to anyone.
    let mut raw = RawClient::connect_trust(proxy.addr, "trusted", &[])
        .await
        .unwrap();
    let (pid, secret) = raw.key.unwrap();
    let mut bogus = RawClient::open(proxy.addr).await;
    let mut pkt = 16u32.to_be_bytes().to_vec();
    pkt.extend_from_slice(&80_877_102u32.to_be_bytes());
    pkt.extend_from_slice(&pid.to_be_bytes());
    pkt.extend_from_slice(&secret.wrapping_add(1).to_be_bytes());
    bogus.send(&pkt).await;
    assert!(
        bogus.read().await.is_none(),
        "cancel connections get no reply"
    );
    let r = raw.query("SELECT pg_sleep(0.5), 1").await;
    assert!(
        r.errors.is_empty(),
        "a wrong secret cancels nothing: {:?}",
        r.errors
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_parameters_options_and_parameter_status_are_relayed() {
    let cluster = start_cluster(1).await;
    let proxy = RunningProxy::in_front_of(&cluster).await;
    let mut c = RawClient::connect_trust(
        proxy.addr,
        "trusted",
        &[
            ("application_name", "graywire-test"),
            (
                "options",
                "-c work_mem=7MB -c search_path=pg_catalog,public",
            ),
            ("DateStyle", "German, DMY"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(
        c.parameters.get("application_name").map(String::as_str),
        Some("graywire-test")
    );
    assert_eq!(
        c.parameters.get("DateStyle").map(String::as_str),
        Some("German, DMY")
    );
    for p in [
        "server_version",
        "server_encoding",
        "client_encoding",
        "TimeZone",
        "integer_datetimes",
    ] {
        assert!(
            c.parameters.contains_key(p),
            "ParameterStatus {p} relayed: {:?}",
            c.parameters
        );
    }
    let r = c.query("SHOW work_mem").await;
    assert_eq!(r.rows[0][0].as_deref(), Some("7MB"));
    let r = c.query("SHOW search_path").await;
    assert_eq!(r.rows[0][0].as_deref(), Some("pg_catalog,public"));

    // A SET of a reported parameter sends ParameterStatus, as PostgreSQL does.
    let r = c.query("SET application_name = 'renamed'").await;
    assert!(
        r.all.iter().any(|m| m.tag == b'S'),
        "ParameterStatus after SET"
    );
    assert_eq!(
        c.parameters.get("application_name").map(String::as_str),
        Some("renamed")
    );

    // The node's own refusal of a bad startup parameter reaches the client unchanged.
    let refused = RawClient::connect_trust(
        proxy.addr,
        "trusted",
        &[("options", "-c no_such_setting=1")],
    )
    .await
    .err()
    .expect("refused");
    assert_eq!(refused.sqlstate(), "42704");
    // connect_trust sends database=postgres first; as in PostgreSQL the later one wins.
    let refused = RawClient::connect_trust(proxy.addr, "trusted", &[("database", "no_such_db")])
        .await
        .err()
        .expect("refused");
    assert_eq!(refused.sqlstate(), "3D000");
    let c2 = graywire_tests::connect_refused(&format!(
        "host={} port={} user=app password=app-pw dbname=no_such_db",
        proxy.addr.ip(),
        proxy.addr.port()
    ))
    .await;
    assert_eq!(sqlstate(&c2).as_deref(), Some("3D000"));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notices_and_notifications_are_relayed() {
    let cluster = start_cluster(1).await;
    let proxy = RunningProxy::in_front_of(&cluster).await;
    let mut listener = RawClient::connect_trust(proxy.addr, "trusted", &[])
        .await
        .unwrap();
    let r = listener
        .query("DO $$ BEGIN RAISE NOTICE 'hello %', 42; RAISE WARNING 'careful'; END $$")
        .await;
    let texts: Vec<String> = r.notices.iter().map(|n| n.fields()[&'M'].clone()).collect();
    assert_eq!(texts, vec!["hello 42".to_string(), "careful".to_string()]);

    listener.query("LISTEN news").await;
    let sender = proxy.connect("app").await;
    sender
        .batch_execute("NOTIFY news, 'first'; SELECT pg_notify('news', 'second')")
        .await
        .unwrap();
    let mut payloads = Vec::new();
    while payloads.len() < 2 {
        let m = listener.read().await.expect("notification");
        if m.tag == b'A' {
            let parts: Vec<&[u8]> = m.body[4..].split(|&b| b == 0).collect();
            assert_eq!(parts[0], b"news");
            payloads.push(String::from_utf8_lossy(parts[1]).into_owned());
        }
    }
    assert_eq!(payloads, vec!["first", "second"]);

    // tokio-postgres sees them as async messages too.
    let (client, mut conn) = tokio_postgres::connect(&proxy.dsn("app"), tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stream = futures_util::stream::poll_fn(move |cx| conn.poll_message(cx));
    tokio::spawn(stream.for_each(move |m| {
        if let Ok(tokio_postgres::AsyncMessage::Notification(n)) = m {
            let _ = tx.send(n.payload().to_owned());
        }
        futures_util::future::ready(())
    }));
    client.batch_execute("LISTEN news").await.unwrap();
    sender.batch_execute("NOTIFY news, 'third'").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap();
    assert_eq!(got.as_deref(), Some("third"));
    proxy.shutdown().await;
}
