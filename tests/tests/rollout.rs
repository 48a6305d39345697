//! `graywire rollout` against real PostgreSQL: a 3-node cluster moved from one PostgreSQL 15
//! build to another (15.18 → 15.20 where 15.18 is installed; the other build is fetched from
//! Debian's archive), switchover included, under pgbench, read-only sessions and the probe;
//! the rollout stopping with the node drained when the upgrade command fails, when the node
//! does not come back, and when the gate fails; and two graywire instances driven together.
//!
//! The rollout runs in-process through `graywire_rollout::cli` (exactly what the `graywire
//! rollout` command runs) with the shell scripts of `config/rollout/` as its commands.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use graywire_localcluster::{LocalCluster, PgBinaries};
use graywire_rollout::{cli, Report, Step};
use graywire_tests::load::{error_counts, Load};
use graywire_tests::{
    config_for, eventually_ok, fetch_other_build, pgbench, start_cluster, ProxyOptions,
    RunningProxy,
};

fn script(name: &str) -> String {
    format!("{}/../config/rollout/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// The upgrade command: restart the node on `bindir` with the options it had.
fn upgrade_cmd(bindir: &std::path::Path) -> String {
    format!(
        "sh {} {{data_dir}} {}",
        script("pg_ctl-upgrade.sh"),
        bindir.display()
    )
}

fn switchover_cmd() -> String {
    format!(
        "sh {} {{data_dir}} {{candidate_data_dir}} {{candidate_host}} {{candidate_port}} \
         {{standby_data_dirs}}",
        script("pg_ctl-switchover.sh")
    )
}

/// graywire options: the integrated probe on, writes held long enough for a switchover.
fn with_probe() -> ProxyOptions {
    ProxyOptions {
        extra: "[shutdown]\ntimeout = \"3s\"\n\n[pool]\nhold_timeout = \"30s\"\n\n\
                [probe]\nuser = \"app\"\npassword = \"app-pw\"\nwriter = \"integrated\"\n\
                attempt_timeout = \"1s\"\nverify_interval = \"300ms\"\n"
            .into(),
        ..ProxyOptions::default()
    }
}

/// `--admin` and `--data-dir` flags for a cluster behind `proxies`.
fn cluster_flags(cluster: &LocalCluster, proxies: &[&RunningProxy]) -> Vec<String> {
    let mut flags = Vec::new();
    for p in proxies {
        flags.push("--admin".into());
        flags.push(format!("http://{}", p.admin));
    }
    for i in 0..cluster.len() {
        flags.push("--data-dir".into());
        flags.push(format!("pg{i}={}", cluster.data_dir(i).display()));
    }
    flags
}

/// The flags of a real upgrade onto `bindir` (reporting `want`) with the `config/rollout`
/// scripts, a 2 s settle window and a minute for each node to come back.
fn upgrade_flags(
    cluster: &LocalCluster,
    proxies: &[&RunningProxy],
    bindir: &std::path::Path,
    want: &str,
) -> Vec<String> {
    let mut flags = cluster_flags(cluster, proxies);
    flags.extend(
        [
            "--upgrade-cmd",
            &upgrade_cmd(bindir),
            "--switchover-cmd",
            &switchover_cmd(),
            "--expect-version",
            want,
            "--settle",
            "2s",
            "--ready-timeout",
            "60s",
        ]
        .map(String::from),
    );
    flags
}

/// Runs the rollout with `flags`; returns the exit code and the report.
async fn rollout(flags: Vec<String>) -> (u8, Option<Report>) {
    let args = cli::parse(flags).unwrap();
    tokio::time::timeout(Duration::from_secs(240), cli::run(args))
        .await
        .expect("the rollout ends within 4 minutes")
}

/// Waits until the probe has acknowledged writes and read them back, so the preflight gate
/// can pass.
async fn probe_warm(proxy: &RunningProxy) {
    eventually_ok(
        Duration::from_secs(30),
        "the probe passes its gate",
        || async {
            match proxy.admin_get("/v1/gate?window=2s").await {
                (200, _) => Ok(()),
                (status, body) => Err(format!("{status} {body}")),
            }
        },
    )
    .await;
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The version each node reports, asked directly (not through graywire).
async fn direct_versions(cluster: &LocalCluster) -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..cluster.len() {
        let c = graywire_tests::connect(&cluster.dsn(i)).await;
        out.push(
            c.query_one("SHOW server_version", &[])
                .await
                .unwrap()
                .get(0),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_upgrades_every_node_under_load_without_losing_a_write() {
    let (bindir, want) = fetch_other_build().await;
    let cluster = start_cluster(3).await;
    pgbench::init(&cluster, 0).await;
    let proxy = RunningProxy::start(&config_for(&cluster, &with_probe())).await;
    probe_warm(&proxy).await;

    let bench = pgbench::start(proxy.addr.port(), &["-T", "40", "-c", "8"]);
    let readers = Load::readers(
        &format!(
            "{} options='-c default_transaction_read_only=on'",
            proxy.dsn("app")
        ),
        4,
    )
    .await;
    // Not a synchronisation: the load runs for 2 s before the rollout starts.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut flags = upgrade_flags(&cluster, &[&proxy], &bindir, want);
    flags.extend(
        [
            "--max-stall",
            "5s",
            "--max-gaps",
            "0",
            "--gate-timeout",
            "30s",
        ]
        .map(String::from),
    );
    let started = Instant::now();
    let (code, report) = rollout(flags).await;
    let rollout_took = started.elapsed();
    let report = report.expect("the rollout started");
    assert_eq!(code, 0, "{}", report.human());

    // Every node runs the new build and was stepped through in order, the primary last.
    let order: Vec<&str> = report.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(order, ["pg1", "pg2", "pg0"]);
    assert!(
        report.nodes.iter().all(|n| n.outcome == "upgraded"),
        "{}",
        report.human()
    );
    assert!(report.nodes[2]
        .steps
        .iter()
        .any(|s| s.step == Step::Switchover && s.ok));
    for v in direct_versions(&cluster).await {
        assert!(v.starts_with(want), "a node reports {v}");
    }
    for i in 0..3 {
        let n = proxy.node_info(&format!("pg{i}")).await;
        assert_eq!(n["state"], "up", "{n}");
        assert!(n["version"].as_str().unwrap().starts_with(want), "{n}");
    }

    // The application saw nothing but availability.
    let (processed, failed, stdout) = pgbench::finish(bench, Duration::from_secs(90)).await;
    assert_eq!(failed, 0, "{stdout}");
    assert!(
        rollout_took < Duration::from_secs(37),
        "the rollout ({rollout_took:?}) outlasted the pgbench run it is measured under"
    );
    let reports = readers.finish().await;
    assert!(
        reports.iter().all(|r| !r.closed),
        "a read-only session was closed"
    );
    assert!(
        error_counts(&reports).is_empty(),
        "{:?}",
        error_counts(&reports)
    );
    assert!(reports.iter().all(|r| r.acked.len() > 100));

    // Every acknowledged write is there: pgbench's history rows, and the probe's ids.
    let primary = graywire_tests::connect(&proxy.dsn("app")).await;
    let history: i64 = primary
        .query_one("SELECT count(*) FROM pgbench_history", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        history as u64, processed,
        "pgbench_history rows vs acknowledged transactions"
    );
    let a = report.availability.clone().expect("probe figures");
    assert_eq!((a.lost_writes, a.gaps), (0, 0), "{a:?}");
    assert!(a.writes_acked > 50, "{a:?}");
    println!(
        "rollout {:.1}s: max stall {:.3}s, disruption {:.3}s; pgbench {processed} transactions, \
         0 failed; 4 read-only sessions, {} reads, 0 errors",
        report.seconds,
        a.max_stall_seconds,
        a.disruption_seconds,
        reports.iter().map(|r| r.acked.len()).sum::<usize>()
    );
    proxy.shutdown().await;
}

/// A 2-node cluster behind a graywire with the probe, ready for a rollout.
async fn two_nodes() -> (LocalCluster, RunningProxy) {
    let cluster = start_cluster(2).await;
    let proxy = RunningProxy::start(&config_for(&cluster, &with_probe())).await;
    probe_warm(&proxy).await;
    (cluster, proxy)
}

fn quick(flags: &mut Vec<String>, upgrade: &str) {
    flags.extend(
        [
            "--upgrade-cmd",
            upgrade,
            "--switchover-cmd",
            "exit 99",
            "--settle",
            "1s",
            "--ready-timeout",
            "5s",
            "--gate-timeout",
            "3s",
        ]
        .map(String::from),
    );
}

/// The rollout stopped at pg1 (the standby) in `step` and left it drained, the primary
/// untouched and in rotation.
async fn stopped_with_standby_drained(proxy: &RunningProxy, code: u8, report: &Report, step: Step) {
    assert_eq!(code, 1, "{}", report.human());
    let f = report.failure.as_ref().expect("a failure");
    assert_eq!(
        (f.node.as_deref(), f.step),
        (Some("pg1"), step),
        "{}",
        report.human()
    );
    assert!(f.advice.contains("pg1 stays drained"), "{}", f.advice);
    assert_eq!(proxy.node_info("pg1").await["admin_state"], "drained");
    assert_eq!(proxy.node_info("pg0").await["state"], "up");
    assert_eq!(report.nodes[1].outcome, "not reached");
    assert!(report.finalize.contains("not run"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_upgrade_command_stops_the_rollout_with_the_node_drained() {
    let (cluster, proxy) = two_nodes().await;
    let mut flags = cluster_flags(&cluster, &[&proxy]);
    quick(&mut flags, "echo 'apt-get: package not found' >&2; exit 3");
    let (code, report) = rollout(flags).await;
    let report = report.unwrap();
    stopped_with_standby_drained(&proxy, code, &report, Step::Upgrade).await;
    let text = report.human();
    assert!(text.contains("exited with code 3"), "{text}");
    assert!(text.contains("| apt-get: package not found"), "{text}");
    // Writes went on throughout.
    let c = proxy.connect("app").await;
    c.batch_execute("CREATE TABLE still_writable (x int)")
        .await
        .unwrap();
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_does_not_come_back_stops_the_rollout_with_the_node_drained() {
    let (cluster, proxy) = two_nodes().await;
    let mut flags = cluster_flags(&cluster, &[&proxy]);
    // "Upgrades" by stopping the node and never starting it again.
    quick(
        &mut flags,
        "kill -INT $(head -n 1 {data_dir}/postmaster.pid)",
    );
    let (code, report) = rollout(flags).await;
    let report = report.unwrap();
    stopped_with_standby_drained(&proxy, code, &report, Step::WaitReady).await;
    let f = report.failure.unwrap();
    assert!(f.what.contains("pg1 is not back within 5s"), "{}", f.what);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_gate_stops_the_rollout_with_the_node_drained() {
    let (cluster, proxy) = two_nodes().await;
    let bindir = PgBinaries::locate().unwrap().program("postgres");
    let bindir = bindir.parent().unwrap();
    let mut flags = cluster_flags(&cluster, &[&proxy]);
    // The node comes back, restarted, but with no upstream: it never catches up.
    let detach_then_restart = format!(
        "f={{data_dir}}/postgresql.auto.conf; grep -v '^primary_conninfo' \"$f\" > \"$f.new\"; \
         cat \"$f.new\" > \"$f\"; rm \"$f.new\"; {}",
        upgrade_cmd(bindir)
    );
    quick(&mut flags, &detach_then_restart);
    flags.extend(["--max-lag", "1s"].map(String::from));
    let started = unix_now();
    let (code, report) = rollout(flags).await;
    let report = report.unwrap();
    stopped_with_standby_drained(&proxy, code, &report, Step::Gate).await;
    let f = report.failure.unwrap();
    assert!(f.what.contains("replication_lag"), "{}", f.what);
    assert!(report.started_at >= started - 1.0);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_are_drained_and_undrained_together_and_never_route_to_a_drained_node() {
    let (bindir, want) = fetch_other_build().await;
    let cluster = start_cluster(2).await;
    let ports = [cluster.port(0) as i64, cluster.port(1) as i64];
    let a = RunningProxy::start(&config_for(&cluster, &with_probe())).await;
    let b = RunningProxy::start(&config_for(
        &cluster,
        &ProxyOptions {
            extra: "[shutdown]\ntimeout = \"3s\"\n\n[pool]\nhold_timeout = \"30s\"\n".into(),
            ..ProxyOptions::default()
        },
    ))
    .await;
    probe_warm(&a).await;
    // Read-only sessions through both instances record which node served each read.
    let ro = "options='-c default_transaction_read_only=on'";
    let clock = (Instant::now(), unix_now());
    let readers_a = Load::readers(&format!("{} {ro}", a.dsn("app")), 2).await;
    let readers_b = Load::readers(&format!("{} {ro}", b.dsn("app")), 2).await;

    let flags = upgrade_flags(&cluster, &[&a, &b], &bindir, want);
    let (code, report) = rollout(flags).await;
    let report = report.unwrap();
    assert_eq!(code, 0, "{}", report.human());
    let reports_a = readers_a.finish().await;
    let reports_b = readers_b.finish().await;
    for r in reports_a.iter().chain(&reports_b) {
        assert!(!r.closed && r.errors.is_empty(), "{:?}", r.errors);
    }
    // While a node was drained (drain done → undrain begun), no read went to it.
    let at_unix = |t: Instant| clock.1 + t.duration_since(clock.0).as_secs_f64();
    for (i, node) in report.nodes.iter().enumerate() {
        let drained_from = node.steps.iter().find(|s| s.step == Step::Drain).unwrap();
        let drained_from = report.started_at + drained_from.started_seconds + drained_from.seconds;
        let undrained_at = node.steps.iter().find(|s| s.step == Step::Undrain).unwrap();
        let undrained_at = report.started_at + undrained_at.started_seconds;
        let port = ports[node.name[2..].parse::<usize>().unwrap()];
        for r in reports_a.iter().chain(&reports_b) {
            let bad: Vec<f64> = r
                .acked
                .iter()
                .filter(|(t, p)| {
                    *p == port && at_unix(*t) > drained_from + 0.05 && at_unix(*t) < undrained_at
                })
                .map(|(t, _)| at_unix(*t) - report.started_at)
                .collect();
            assert!(
                bad.is_empty(),
                "node #{i} {}: reads while drained at {bad:?}",
                node.name
            );
        }
    }
    for p in [&a, &b] {
        for n in ["pg0", "pg1"] {
            let info = p.node_info(n).await;
            assert_eq!(info["state"], "up", "{info}");
            assert!(
                info["version"].as_str().unwrap().starts_with(want),
                "{info}"
            );
        }
    }

    // Run again: every node is on the target version, so nothing is touched, and the finalize
    // command runs only without --preserve-downgrade, on the primary of that time.
    let marker = tempfile::tempdir().unwrap();
    let file = marker.path().join("finalized");
    let again = |extra: &[&str]| {
        let mut f = cluster_flags(&cluster, &[&a, &b]);
        f.extend(
            [
                "--upgrade-cmd",
                "exit 1",
                "--expect-version",
                want,
                "--settle",
                "1s",
                "--finalize-cmd",
                &format!("echo {{node}} >> {}", file.display()),
            ]
            .map(String::from),
        );
        f.extend(extra.iter().map(|s| s.to_string()));
        f
    };
    let (code, report) = rollout(again(&["--preserve-downgrade"])).await;
    let report = report.unwrap();
    assert_eq!(code, 0, "{}", report.human());
    assert!(report
        .nodes
        .iter()
        .all(|n| n.outcome.starts_with("skipped: already on")));
    assert!(
        report.finalize.contains("--preserve-downgrade"),
        "{}",
        report.finalize
    );
    assert!(!file.exists());
    let (code, report) = rollout(again(&[])).await;
    let report = report.unwrap();
    assert_eq!(code, 0, "{}", report.human());
    let primary = a.admin_get("/v1/nodes").await.1;
    let primary: serde_json::Value = serde_json::from_str(&primary).unwrap();
    assert_eq!(
        std::fs::read_to_string(&file).unwrap().trim(),
        primary["primary"].as_str().unwrap()
    );
    assert!(report.finalize.starts_with("ran on"), "{}", report.finalize);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_is_refused_before_any_change_without_the_token_or_with_a_bad_plan() {
    let cluster = start_cluster(2).await;
    let token = "rollout-token-0123456789";
    let mut opts = with_probe();
    opts.extra = format!("[admin]\ntoken = \"{token}\"\n\n{}", opts.extra);
    let proxy = RunningProxy::start(&config_for(&cluster, &opts)).await;
    let base = |extra: &[&str]| {
        let mut f = cluster_flags(&cluster, &[&proxy]);
        f.extend(["--upgrade-cmd", "exit 0", "--switchover-cmd", "exit 0"].map(String::from));
        f.extend(extra.iter().map(|s| s.to_string()));
        f
    };
    // No token, a wrong token: refused (exit 2), nothing drained.
    for extra in [&[][..], &["--token", "wrong"][..]] {
        let (code, report) = rollout(base(extra)).await;
        assert_eq!((code, report.is_none()), (2, true), "{extra:?}");
    }
    // A finalize command without a target version, a data directory for a node that does not
    // exist: refused.
    for extra in [
        &["--token", token, "--finalize-cmd", "echo done"][..],
        &["--token", token, "--data-dir", "pg7=/nowhere"][..],
    ] {
        let (code, report) = rollout(base(extra)).await;
        assert_eq!((code, report.is_none()), (2, true), "{extra:?}");
    }
    // A dry run with the token prints the plan and changes nothing.
    let (code, report) = rollout(base(&["--token", token, "--dry-run"])).await;
    assert_eq!((code, report.is_none()), (0, true));
    for n in ["pg0", "pg1"] {
        let info = proxy.node_info(n).await;
        assert_eq!(info["admin_state"], "active", "{info}");
    }
    proxy.shutdown().await;
}
