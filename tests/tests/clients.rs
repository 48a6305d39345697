//! Real clients through graywire: every auth method with tokio-postgres and psql, many
//! concurrent sessions, the connection cap, and psql's everyday use.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use graywire_tests::{
    config_for, connect_refused, eventually_ok, psql, sqlstate, start_cluster, try_connect,
    ProxyOptions, RunningProxy,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_auth_method_accepts_the_right_password_and_refuses_others() {
    let cluster = start_cluster(1).await;
    let proxy = RunningProxy::in_front_of(&cluster).await;
    let dsn = |user: &str, pw: &str| {
        format!(
            "host={} port={} user={user} password='{pw}' dbname=postgres",
            proxy.addr.ip(),
            proxy.addr.port()
        )
    };
    for (user, method, pw) in graywire_tests::USERS {
        let c = try_connect(&dsn(user, pw))
            .await
            .unwrap_or_else(|e| panic!("{user} ({method}) with the right password: {e}"));
        let who: String = c
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            who,
            cluster.superuser(),
            "sessions log in to nodes as graywire's backend user"
        );
        if *method != "trust" {
            let e = connect_refused(&dsn(user, "wrong")).await;
            assert_eq!(
                sqlstate(&e).as_deref(),
                Some("28P01"),
                "{user} ({method}): {e:?}"
            );
            let message = e
                .as_db_error()
                .map(|d| d.message().to_owned())
                .unwrap_or_default();
            assert_eq!(
                message,
                format!("password authentication failed for user \"{user}\"")
            );
        }
    }
    // An unknown user is refused exactly like a wrong password: a SCRAM exchange, then 28P01
    // with the same message, so a client cannot enumerate graywire's users.
    for (user, password) in [("nobody", "x"), ("app", "wrong")] {
        let e = connect_refused(&dsn(user, password)).await;
        assert_eq!(sqlstate(&e).as_deref(), Some("28P01"), "{user}: {e:?}");
        let message = e.as_db_error().map(|d| d.message().to_owned());
        assert_eq!(
            message.as_deref(),
            Some(format!("password authentication failed for user \"{user}\"").as_str())
        );
    }
    // An empty password is never accepted.
    let e = connect_refused(&dsn("plainuser", "")).await;
    assert_eq!(sqlstate(&e).as_deref(), Some("28P01"), "{e:?}");

    // psql (libpq) with each password method, and a refusal it reports.
    for (user, _, _) in graywire_tests::USERS {
        let (ok, out, err) = psql(
            &proxy.url(user),
            &["-c", "SELECT 'hello from ' || current_database()"],
        )
        .await;
        assert!(ok, "psql as {user}: {err}");
        assert_eq!(out.trim(), "hello from postgres");
    }
    let wrong = format!("postgres://app:nope@{}/postgres", proxy.addr);
    let (ok, _, err) = psql(&wrong, &["-c", "SELECT 1"]).await;
    assert!(!ok);
    assert!(err.contains("password authentication failed"), "{err}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_creates_inserts_and_selects_through_graywire() {
    let cluster = start_cluster(1).await;
    let proxy = RunningProxy::in_front_of(&cluster).await;
    let url = proxy.url("app");
    let (ok, out, err) = psql(&url, &["-c", "SELECT 1"]).await;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "1");
    let script = "CREATE TABLE notes (id serial PRIMARY KEY, body text);\n\
                  INSERT INTO notes (body) VALUES ('a'), ('b'), ('c');\n\
                  SELECT string_agg(body, ',' ORDER BY id) FROM notes;\n";
    let (ok, out, err) = psql(&url, &["-q", "-c", script]).await;
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "a,b,c");
    // psql's \copy uses COPY FROM STDIN through graywire.
    let file = cluster.dir().join("notes.csv");
    std::fs::write(&file, "d\ne\n").unwrap();
    let copy = format!("\\copy notes (body) FROM '{}'", file.display());
    let (ok, _, err) = psql(&url, &["-c", &copy]).await;
    assert!(ok, "{err}");
    let (_, out, _) = psql(&url, &["-c", "SELECT count(*) FROM notes"]).await;
    assert_eq!(out.trim(), "5");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_clients_each_running_fifty_transactions() {
    let cluster = start_cluster(1).await;
    let proxy = Arc::new(RunningProxy::in_front_of(&cluster).await);
    let setup = proxy.connect("app").await;
    setup
        .batch_execute(
            "CREATE TABLE ledger (client int, seq int, PRIMARY KEY (client, seq));
             CREATE TABLE totals (client int PRIMARY KEY, n int NOT NULL);",
        )
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for client_id in 0..200i32 {
        let proxy = proxy.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = proxy.connect("app").await;
            c.execute("INSERT INTO totals VALUES ($1, 0)", &[&client_id])
                .await
                .unwrap();
            for seq in 0..50i32 {
                let tx = c.transaction().await.unwrap();
                tx.execute("INSERT INTO ledger VALUES ($1, $2)", &[&client_id, &seq])
                    .await
                    .unwrap();
                tx.execute(
                    "UPDATE totals SET n = n + 1 WHERE client = $1",
                    &[&client_id],
                )
                .await
                .unwrap();
                let n: i32 = tx
                    .query_one("SELECT n FROM totals WHERE client = $1", &[&client_id])
                    .await
                    .unwrap()
                    .get(0);
                assert_eq!(n, seq + 1, "client {client_id} sees its own writes");
                tx.commit().await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let row = setup
        .query_one("SELECT count(*), count(DISTINCT ledger.client), min(n), max(n) FROM ledger JOIN totals USING (client)", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 10_000);
    assert_eq!(row.get::<_, i64>(1), 200);
    assert_eq!(row.get::<_, i32>(2), 50);
    assert_eq!(row.get::<_, i32>(3), 50);
    drop(setup);
    Arc::try_unwrap(proxy)
        .ok()
        .expect("sole owner")
        .shutdown()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_over_the_cap_get_53300_and_a_freed_slot_is_reused() {
    let cluster = start_cluster(1).await;
    let opts = ProxyOptions {
        listener_extra: "max_client_connections = 3".into(),
        ..ProxyOptions::default()
    };
    let proxy = RunningProxy::start(&config_for(&cluster, &opts)).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(proxy.connect("app").await);
    }
    let e = connect_refused(&proxy.dsn("app")).await;
    assert_eq!(sqlstate(&e).as_deref(), Some("53300"), "{e:?}");
    assert!(format!("{e:?}").contains("too many clients"), "{e:?}");
    // The sessions that are in keep working.
    for c in &held {
        c.simple_query("SELECT 1").await.unwrap();
    }
    drop(held.pop());
    eventually_ok(
        std::time::Duration::from_secs(5),
        "a freed slot is usable again",
        || async { try_connect(&proxy.dsn("app")).await.map(drop) },
    )
    .await;
    proxy.shutdown().await;
}
