//! The write-continuity probe against real PostgreSQL: an outage measured to within 300 ms,
//! lost writes seen after failing over to a lagging standby (the probe is not blind), gaps
//! in skip mode, the integrated probe through a planned switchover, and its metrics.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use graywire_probe::gate::GateQuery;
use graywire_probe::{Mode, Probe, ProbeConfig};
use graywire_tests::{
    cluster_op, config_for, connect, eventually, eventually_ok, planned_switchover, start_cluster,
    ProxyOptions, RunningProxy, StopMode,
};
use tokio_util::sync::CancellationToken;

/// A probe writing straight to node `i` (reading back from it too).
fn direct_probe(dsn: &str, mode: Mode, stop: &CancellationToken) -> Probe {
    let target: tokio_postgres::Config = dsn.parse().unwrap();
    let mut config = ProbeConfig::new(target.clone());
    config.mode = mode;
    config.writer = format!("test-{}", mode.as_str());
    config.attempt_timeout = Duration::from_millis(500);
    config.verify_interval = Duration::from_millis(300);
    Probe::start(config, Arc::new(move || Some(target.clone())), stop.clone())
}

/// Waits (bounded) until `f` holds.
async fn until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    eventually(limit, what, || {
        let holds = f();
        async move { holds.then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_second_outage_is_measured_within_300ms_and_gates_only_its_window() {
    let cluster = Arc::new(Mutex::new(start_cluster(1).await));
    let dsn = cluster.lock().unwrap().dsn(0);
    let stop = CancellationToken::new();
    let probe = direct_probe(&dsn, Mode::Retry, &stop);
    until("first acks", Duration::from_secs(10), || {
        probe.window(Duration::from_secs(60)).acked >= 10
    })
    .await;

    let down_from = Instant::now();
    cluster_op(&cluster, |c| c.stop(0, StopMode::Fast))
        .await
        .unwrap();
    // Not a synchronisation: the outage the test measures lasts 3 s.
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster_op(&cluster, |c| c.start_node(0)).await.unwrap();
    let outage = down_from.elapsed();
    let back = Instant::now();
    until("acks after the outage", Duration::from_secs(10), || {
        probe.window(Duration::from_millis(500)).acked >= 3
    })
    .await;
    let runs = probe.read_back().runs_ok;
    until(
        "read-backs after the outage",
        Duration::from_secs(10),
        || probe.read_back().runs_ok >= runs + 2,
    )
    .await;

    let whole = probe.window(Duration::from_secs(30));
    let measured = whole.max_stall;
    println!(
        "3 s outage: node down for {outage:?} (stop + 3 s + start), probe max stall {measured:?}, \
         errors {:?}",
        whole.errors
    );
    let diff = measured.as_secs_f64() - outage.as_secs_f64();
    assert!(diff.abs() <= 0.3, "stall {measured:?} vs outage {outage:?}");
    assert!(probe.read_back().lost.is_empty(), "no lost writes");
    assert!(probe.read_back().runs_ok > 0);

    let q = GateQuery::parse("window=10s&max_stall=1s").unwrap();
    let v = probe.gate(&q, None);
    assert!(!v.pass, "the window covers the outage");
    assert!(
        v.reasons().join(" ").contains("max_stall"),
        "{:?}",
        v.reasons()
    );
    // Once the window has moved past the outage, the gate passes again.
    let q = GateQuery::parse("window=1s&max_stall=1s&max_gaps=0").unwrap();
    let limit = (back + Duration::from_secs(10)).saturating_duration_since(Instant::now());
    eventually_ok(limit, "the gate passing again", || async {
        let v = probe.gate(&q, None);
        if v.pass {
            Ok(())
        } else {
            Err(format!("{:?}", v.reasons()))
        }
    })
    .await;
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_mode_leaves_one_gap_per_failed_tick() {
    let cluster = Arc::new(Mutex::new(start_cluster(1).await));
    let dsn = cluster.lock().unwrap().dsn(0);
    let stop = CancellationToken::new();
    let probe = direct_probe(&dsn, Mode::Skip, &stop);
    until("first acks", Duration::from_secs(10), || {
        probe.window(Duration::from_secs(60)).acked >= 10
    })
    .await;
    cluster_op(&cluster, |c| c.stop(0, StopMode::Fast))
        .await
        .unwrap();
    // Not a synchronisation: the outage lasts 2 s (about 20 ticks fail).
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster_op(&cluster, |c| c.start_node(0)).await.unwrap();
    until("acks after the outage", Duration::from_secs(10), || {
        probe.window(Duration::from_millis(500)).acked >= 3
    })
    .await;
    let runs = probe.read_back().runs_ok;
    until(
        "a read-back after the outage",
        Duration::from_secs(10),
        || probe.read_back().runs_ok >= runs + 2,
    )
    .await;

    let abandoned = probe.window(Duration::from_secs(60)).abandoned;
    let rb = probe.read_back();
    println!(
        "skip mode, 2 s outage: {abandoned} failed ticks, {} gaps",
        rb.gaps.len()
    );
    assert!(abandoned >= 15, "about 20 ticks failed: {abandoned}");
    assert_eq!(rb.gaps.len() as u64, abandoned, "one gap per failed tick");
    assert!(
        rb.lost.is_empty(),
        "failed writes were never acknowledged: not lost"
    );
    let v = probe.gate(&GateQuery::parse("window=60s&max_gaps=0").unwrap(), None);
    assert!(
        v.reasons()
            .join(" ")
            .contains(&format!("gaps: measured {abandoned}")),
        "{:?}",
        v.reasons()
    );
    stop.cancel();
}

/// The integrated probe on graywire's single-threaded runtime (the probe then gets a thread of
/// its own, with tokio's timer; the proxy keeps graywire's). `observability.rs` covers the
/// probe on the multi-threaded runtime.
fn with_probe(extra: &str) -> ProxyOptions {
    ProxyOptions {
        extra: format!(
            "[shutdown]\ntimeout = \"3s\"\n\n[runtime]\nworker_threads = 1\n\n\
             [pool]\nhold_timeout = \"30s\"\n\n\
             [probe]\nuser = \"app\"\npassword = \"app-pw\"\nwriter = \"integrated\"\n\
             attempt_timeout = \"1s\"\nverify_interval = \"300ms\"\n{extra}"
        ),
        ..ProxyOptions::default()
    }
}

async fn probe_status(proxy: &RunningProxy) -> serde_json::Value {
    let (status, body) = proxy.admin_get("/v1/probe?window=120s").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

async fn until_status(
    proxy: &RunningProxy,
    what: &str,
    limit: Duration,
    f: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    eventually_ok(limit, what, || async {
        let s = probe_status(proxy).await;
        if f(&s) {
            Ok(s)
        } else {
            Err(s)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_is_not_blind_to_writes_lost_in_a_failover_to_a_lagging_standby() {
    let cluster = Arc::new(Mutex::new(start_cluster(2).await));
    let config = config_for(&cluster.lock().unwrap(), &with_probe(""));
    let proxy = RunningProxy::start(&config).await;
    until_status(
        &proxy,
        "acks and a read-back",
        Duration::from_secs(15),
        |s| {
            s["window"]["acked"].as_u64() >= Some(10)
                && s["read_back"]["runs_ok"].as_u64() >= Some(1)
        },
    )
    .await;

    // The standby stops receiving WAL; the primary keeps acknowledging probe writes.
    cluster_op(&cluster, |c| c.detach(1)).await.unwrap();
    let before = probe_status(&proxy).await["window"]["highest_acked"]
        .as_i64()
        .unwrap();
    until_status(
        &proxy,
        "acks the standby misses",
        Duration::from_secs(10),
        |s| s["window"]["highest_acked"].as_i64() >= Some(before + 10),
    )
    .await;
    cluster_op(&cluster, |c| c.kill9(0)).await.unwrap();
    cluster_op(&cluster, |c| c.promote(1)).await.unwrap();
    // The probe resumes on the new primary and reads back from it.
    until_status(
        &proxy,
        "lost writes reported",
        Duration::from_secs(20),
        |s| {
            s["read_back"]["lost_writes"].as_u64() > Some(0)
                && s["window"]["open_stall_seconds"].as_f64() < Some(1.0)
        },
    )
    .await;
    // Read-backs that started after the probe resumed: every lost id is settled in them.
    let runs = probe_status(&proxy).await["read_back"]["runs_ok"]
        .as_u64()
        .unwrap();
    let s = until_status(
        &proxy,
        "read-backs after the failover",
        Duration::from_secs(10),
        |s| s["read_back"]["runs_ok"].as_u64() >= Some(runs + 2),
    )
    .await;
    let reported = s["read_back"]["lost_writes"].as_u64().unwrap();

    // Independently: in retry mode every id up to the highest acknowledged one was
    // acknowledged, so the lost ones are exactly those the new primary does not have.
    let dsn1 = cluster.lock().unwrap().dsn(1);
    let direct = connect(&dsn1).await;
    let present: std::collections::HashSet<i64> = direct
        .query(
            "SELECT id FROM graywire_probe WHERE writer = 'integrated'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let highest = s["window"]["highest_acked"].as_i64().unwrap();
    let expected: Vec<i64> = (1..=highest).filter(|i| !present.contains(i)).collect();
    let lost_ids: Vec<i64> = s["read_back"]["lost_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    println!(
        "not-blind test: {reported} lost writes reported, {} acknowledged ids missing on the \
         promoted standby (highest acknowledged id {highest})",
        expected.len()
    );
    assert_eq!(
        reported as usize,
        expected.len(),
        "reported {lost_ids:?}, missing {expected:?}"
    );
    assert!(lost_ids.iter().all(|id| expected.contains(id)));
    assert!(
        reported >= 10,
        "at least the ids acknowledged after the detach"
    );
    let (_, metrics) = proxy.admin_get("/metrics").await;
    assert!(
        metrics.contains(&format!("graywire_probe_lost_writes {reported}")),
        "{metrics}"
    );
    let (status, body) = proxy.admin_get("/v1/gate?window=60s").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("lost_writes"), "{body}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_integrated_probe_sees_no_loss_and_no_gap_through_a_planned_switchover() {
    let cluster = Arc::new(Mutex::new(start_cluster(3).await));
    let config = config_for(&cluster.lock().unwrap(), &with_probe(""));
    let proxy = RunningProxy::start(&config).await;
    until_status(&proxy, "acks", Duration::from_secs(15), |s| {
        s["window"]["acked"].as_u64() >= Some(10)
    })
    .await;

    planned_switchover(&cluster, &proxy).await;
    let runs = probe_status(&proxy).await["read_back"]["runs_ok"]
        .as_u64()
        .unwrap();
    let s = until_status(
        &proxy,
        "read-backs on the new primary",
        Duration::from_secs(15),
        |s| {
            s["read_back"]["runs_ok"].as_u64() >= Some(runs + 3)
                && s["window"]["open_stall_seconds"].as_f64() < Some(0.5)
        },
    )
    .await;
    println!(
        "integrated probe through a planned switchover: max stall {:.3}s, lost {}, gaps {}, errors {}",
        s["totals"]["max_stall_seconds"].as_f64().unwrap(),
        s["read_back"]["lost_writes"],
        s["read_back"]["gaps"],
        s["totals"]["errors"]
    );
    assert_eq!(s["read_back"]["lost_writes"], 0, "{s}");
    assert_eq!(s["read_back"]["gaps"], 0, "{s}");
    assert_eq!(
        s["totals"]["failed_attempts"], 0,
        "clients (the probe among them) saw no error: {s}"
    );

    // pg0 is stopped, so the gate fails on it until it is back; the verdict says so.
    let (status, body) = proxy.admin_get("/v1/gate?window=5s&max_stall=1s").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("not up: pg0"), "{body}");
    // Every probe metric of the catalog is exported with its documented type (the gate's
    // once a verdict was served).
    let (_, metrics) = proxy.admin_get("/metrics").await;
    for (name, kind) in graywire_probe::metrics::CATALOG {
        assert!(
            metrics.contains(&format!("# TYPE {name} {kind}")),
            "{name} ({kind}) missing from /metrics"
        );
    }
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_queries_are_validated_and_absent_probes_reported() {
    let cluster = start_cluster(1).await;
    let proxy = RunningProxy::start(&config_for(&cluster, &ProxyOptions::default())).await;
    let (status, body) = proxy.admin_get("/v1/gate").await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("no probe is running"), "{body}");
    proxy.shutdown().await;

    let proxy = RunningProxy::start(&config_for(&cluster, &with_probe(""))).await;
    for bad in ["window=soon", "max_gaps=x", "max_stall=-1s", "bogus=1"] {
        let (status, body) = proxy.admin_get(&format!("/v1/gate?{bad}")).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body.contains("\"error\""), "{body}");
    }
    let (status, _) = graywire_tests::http_request(proxy.admin, "POST", "/v1/gate").await;
    assert_eq!(status, 405);
    proxy.shutdown().await;
}
