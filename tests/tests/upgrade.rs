//! A real minor-version change of one node under graywire: the other PostgreSQL 15 build is
//! fetched from Debian's archive (15.20 when 15.18 is installed, and the other way round), a
//! drained standby is restarted on it, and graywire reports and routes to it. The foundation
//! of the rolling upgrade (issue 6).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use graywire_localcluster::StopMode;
use graywire_tests::{
    cluster_op, config_for, connect, eventually_ok, fetch_other_build, start_cluster, ProxyOptions,
    RunningProxy,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_restarted_on_another_minor_version_rejoins_and_serves_reads() {
    let installed = graywire_localcluster::PgBinaries::locate()
        .unwrap()
        .version()
        .unwrap();
    let (bindir, want) = fetch_other_build().await;
    let cluster = std::sync::Arc::new(std::sync::Mutex::new(start_cluster(2).await));
    let config = config_for(&cluster.lock().unwrap(), &ProxyOptions::default());
    let proxy = RunningProxy::start(&config).await;
    assert!(proxy.node_info("pg1").await["version"]
        .as_str()
        .unwrap()
        .starts_with(&installed));

    let (status, body) = proxy.admin_post("/v1/nodes/pg1/drain?wait=10s").await;
    assert_eq!(status, 200, "{body}");
    cluster_op(&cluster, move |c| c.restart_on(1, &bindir, StopMode::Fast))
        .await
        .unwrap();
    // graywire sees the node come back, as a standby, on the new version.
    let what = format!("pg1 back on {want}");
    let n = eventually_ok(Duration::from_secs(20), &what, || async {
        let n = proxy.node_info("pg1").await;
        if n["state"] == "drained" && n["version"].as_str().is_some_and(|v| v.starts_with(want)) {
            Ok(n)
        } else {
            Err(n)
        }
    })
    .await;
    assert_eq!(n["role"], "standby", "{n}");
    let (status, _) = proxy.admin_post("/v1/nodes/pg1/undrain").await;
    assert_eq!(status, 200);

    // It replicates: a write through graywire reaches it, and a read-only session reads it there.
    let writer = proxy.connect("app").await;
    writer
        .batch_execute("CREATE TABLE upgraded (x int); INSERT INTO upgraded VALUES (42)")
        .await
        .unwrap();
    let reader = connect(&format!(
        "{} options='-c default_transaction_read_only=on'",
        proxy.dsn("app")
    ))
    .await;
    eventually_ok(Duration::from_secs(10), "the write replicated", || async {
        let row = reader
            .query_one(
                "SELECT current_setting('server_version'), \
                 (SELECT count(*) FROM pg_class WHERE relname = 'upgraded')",
                &[],
            )
            .await
            .unwrap();
        let version: String = row.get(0);
        // Every read, not only the last, is on pg1.
        assert!(
            version.starts_with(want),
            "the read-only session runs on pg1: {version}"
        );
        match row.get::<_, i64>(1) {
            1 => Ok(()),
            n => Err(format!("{n} table(s) named upgraded on pg1")),
        }
    })
    .await;
    println!("pg1 moved from {installed} to {want} and serves reads through graywire");
    proxy.shutdown().await;
}
