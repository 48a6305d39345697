//! What operators watch must be right: the metric catalog (`docs/metrics.md`) against what a
//! running graywire exports, the alert rules with promtool, and a real Prometheus scraping a
//! real graywire in front of a real cluster evaluating every dashboard expression.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use graywire_tests::{
    cluster_op, config_for, eventually, eventually_ok, start_cluster, ProxyOptions, RunningProxy,
    StopMode,
};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn with_probe() -> ProxyOptions {
    ProxyOptions {
        extra: "[shutdown]\ntimeout = \"3s\"\n\n[pool]\nhold_timeout = \"10s\"\n\n\
                [probe]\nuser = \"app\"\npassword = \"app-pw\"\nverify_interval = \"300ms\"\n"
            .into(),
        ..ProxyOptions::default()
    }
}

/// `name → type` of every graywire metric in `docs/metrics.md`'s tables.
fn documented() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(repo().join("docs/metrics.md")).unwrap();
    text.lines()
        .filter_map(|l| {
            let cols: Vec<&str> = l.split('|').map(str::trim).collect();
            let name = cols.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            let kind = cols.get(2)?;
            name.starts_with("graywire_")
                .then(|| (name.to_owned(), (*kind).to_owned()))
        })
        .collect()
}

/// `name → type` of every graywire metric in a /metrics page.
fn exported(page: &str) -> BTreeMap<String, String> {
    page.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("# TYPE ")?;
            let (name, kind) = rest.split_once(' ')?;
            name.starts_with("graywire_")
                .then(|| (name.to_owned(), kind.trim().to_owned()))
        })
        .collect()
}

/// Makes every metric appear: queries, a hold, a drain and undrain, probe writes and a gate.
async fn exercise(proxy: &RunningProxy) {
    let c = proxy.connect("app").await;
    c.simple_query("SELECT 1").await.unwrap();
    c.simple_query("SELECT 1/0").await.unwrap_err();
    proxy.admin_post("/v1/pause").await;
    let held = {
        let dsn = proxy.dsn("app");
        tokio::spawn(async move {
            let c = graywire_tests::connect(&dsn).await;
            c.simple_query("SELECT 1").await.map(|_| ())
        })
    };
    // A request is held (this one, or the probe's: the pause holds its writes too).
    eventually(Duration::from_secs(5), "a held request", || async {
        (proxy.metric("graywire_held_requests").await >= Some(1.0)).then_some(())
    })
    .await;
    proxy.admin_post("/v1/resume").await;
    held.await.unwrap().unwrap();
    let (status, body) = proxy.admin_post("/v1/nodes/pg1/drain?wait=10s").await;
    assert_eq!(status, 200, "{body}");
    proxy.admin_post("/v1/nodes/pg1/undrain").await;
    eventually_ok(Duration::from_secs(20), "the probe running", || async {
        let (_, body) = proxy.admin_get("/v1/probe").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if v["read_back"]["runs_ok"].as_u64() >= Some(2)
            && v["window"]["acked"].as_u64() >= Some(10)
        {
            Ok(())
        } else {
            Err(body)
        }
    })
    .await;
    proxy.admin_get("/v1/gate?window=10s").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metric_catalog_matches_what_graywire_exports_both_ways() {
    let cluster = start_cluster(3).await;
    let proxy = RunningProxy::start(&config_for(&cluster, &with_probe())).await;
    exercise(&proxy).await;
    let (_, page) = proxy.admin_get("/metrics").await;
    let doc = documented();
    let live = exported(&page);
    assert!(doc.len() >= 35, "the catalog lists the metrics: {doc:?}");
    for (name, kind) in &doc {
        match live.get(name) {
            None => panic!("{name} is in docs/metrics.md but graywire does not export it"),
            Some(k) => assert_eq!(k, kind, "{name}: documented as {kind}, exported as {k}"),
        }
    }
    for name in live.keys() {
        assert!(
            doc.contains_key(name),
            "{name} is exported but missing from docs/metrics.md"
        );
    }
    proxy.shutdown().await;
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn tool(name: &str) -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "{name} is not installed: apt-get install -y prometheus (gives prometheus and promtool)"
    );
}

#[test]
fn promtool_checks_the_rules_and_config_and_every_alert_has_a_unit_test() {
    let dir = repo().join("config/prometheus");
    for args in [
        vec!["check", "rules", "alerts.yml"],
        vec!["test", "rules", "alerts_test.yml"],
        vec!["check", "config", "prometheus.yml"],
    ] {
        let out = std::process::Command::new(tool("promtool"))
            .args(&args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Every alert has a test that expects it to fire.
    let rules = std::fs::read_to_string(dir.join("alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(dir.join("alerts_test.yml")).unwrap();
    for line in rules.lines() {
        if let Some(name) = line.trim().strip_prefix("- alert: ") {
            assert!(
                tests.contains(&format!("alertname: {name}")),
                "alert {name} has no unit test in alerts_test.yml"
            );
        }
    }
}

/// Percent-encodes a PromQL expression for a query string.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every PromQL expression of the dashboard: panel targets and annotations, with its title.
fn dashboard_expressions() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo().join("dashboards/graywire.json")).unwrap();
    let d: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(d["uid"], "graywire-main");
    assert!(
        d["schemaVersion"].as_u64().unwrap() >= 36,
        "Grafana 10 schema"
    );
    assert_eq!(d["templating"]["list"][0]["type"], "datasource");
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                p["title"].as_str().unwrap().to_owned(),
                t["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    for a in d["annotations"]["list"].as_array().unwrap() {
        if let Some(e) = a["expr"].as_str() {
            out.push((format!("annotation {}", a["name"]), e.to_owned()));
        }
    }
    out
}

/// A Prometheus server run by this test, stopped by PID when dropped.
struct Prometheus {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_prometheus(target: std::net::SocketAddr) -> Prometheus {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let rules = repo().join("config/prometheus/alerts.yml");
    let config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
         scrape_configs:\n  - job_name: graywire\n    static_configs:\n      - targets: [\"{target}\"]\n",
        rules.canonicalize().unwrap().display()
    );
    std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
    let child = std::process::Command::new(tool("prometheus"))
        .arg(format!(
            "--config.file={}",
            dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let p = Prometheus {
        child,
        addr,
        _dir: dir,
    };
    eventually(Duration::from_secs(30), "prometheus ready", || async {
        (tokio::net::TcpStream::connect(addr).await.is_ok()
            && prom_get(addr, "/-/ready").await.0 == 200)
            .then_some(())
    })
    .await;
    p
}

/// GET on Prometheus (HTTP/1.0, so it answers without chunked encoding).
async fn prom_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    graywire_api::http_get(&addr.to_string(), path)
        .await
        .expect("prometheus answers")
}

async fn query(prom: &Prometheus, expr: &str) -> (bool, usize, String) {
    let (status, body) =
        prom_get(prom.addr, &format!("/api/v1/query?query={}", encode(expr))).await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let ok = status == 200 && v["status"] == "success";
    let n = v["data"]["result"].as_array().map_or(0, Vec::len);
    (ok, n, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_evaluates_every_dashboard_expression_and_the_rules() {
    let cluster = Arc::new(Mutex::new(start_cluster(3).await));
    let config = config_for(&cluster.lock().unwrap(), &with_probe());
    let proxy = RunningProxy::start(&config).await;
    let prom = start_prometheus(proxy.admin).await;
    exercise(&proxy).await;
    // A node stop: a standby goes down (the node panels and the NodeDown rule see it).
    cluster_op(&cluster, |c| c.stop(2, StopMode::Fast))
        .await
        .unwrap();
    proxy
        .wait_node("pg2", "state", "down", Duration::from_secs(5))
        .await;
    let core = [
        "Gate verdict (last served)",
        "Acknowledged writes per second",
        "Stall (max per minute)",
        "Node health (1 = up)",
        "Lost writes",
        "Time since last acknowledged write",
    ];
    let exprs = dashboard_expressions();
    // Enough scrapes for rate() over the window and for the stop to be seen: the core panels
    // have data, pg2 shows down and NodeDown is pending for it.
    eventually_ok(
        Duration::from_secs(30),
        "Prometheus sees the load and the stopped node",
        || async {
            for (title, expr) in &exprs {
                if core.contains(&title.as_str()) && query(&prom, expr).await.1 == 0 {
                    return Err(format!("core panel {title:?} has no data yet"));
                }
            }
            for expr in [
                "graywire_node_up{node=\"pg2\"} == 0",
                "ALERTS{alertname=\"GraywireNodeDown\", node=\"pg2\"}",
            ] {
                if query(&prom, expr).await.1 != 1 {
                    return Err(format!("{expr}: no result yet"));
                }
            }
            Ok(())
        },
    )
    .await;
    // A gate verdict served after the stop, and scraped.
    proxy.admin_get("/v1/gate?window=10s").await;
    let served = unix_now();
    eventually_ok(
        Duration::from_secs(10),
        "a scrape after the gate was served",
        || async {
            let (_, _, body) = query(&prom, "timestamp(up{job=\"graywire\"})").await;
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let scraped = v["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|t| t.parse::<f64>().ok());
            if scraped > Some(served) {
                Ok(())
            } else {
                Err(format!(
                    "last scrape at {scraped:?}, the gate served at {served}"
                ))
            }
        },
    )
    .await;

    let (ok, n, body) = query(&prom, "up{job=\"graywire\"}").await;
    assert!(ok && n == 1, "graywire is scraped: {body}");
    assert!(exprs.len() >= 30, "{}", exprs.len());
    for (title, expr) in &exprs {
        let (ok, n, body) = query(&prom, expr).await;
        assert!(ok, "panel {title:?}: {expr} does not evaluate: {body}");
        if core.contains(&title.as_str()) {
            assert!(
                n > 0,
                "core panel {title:?} returns no data: {expr}\n{body}"
            );
        }
    }
    let (_, n, body) = query(&prom, "graywire_node_up{node=\"pg2\"} == 0").await;
    assert_eq!(n, 1, "the stopped node shows down: {body}");

    // The rules loaded, and the node stop made NodeDown pending or firing.
    let (status, body) = prom_get(prom.addr, "/api/v1/rules").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let rules = v["data"]["groups"][0]["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 8, "{body}");
    let (_, n, body) = query(
        &prom,
        "ALERTS{alertname=\"GraywireNodeDown\", node=\"pg2\"}",
    )
    .await;
    assert_eq!(n, 1, "GraywireNodeDown is pending for pg2: {body}");
    let (_, n, body) = query(&prom, "ALERTS{alertname=\"GraywireLostWrites\"}").await;
    assert_eq!(n, 0, "no lost-writes alert: {body}");
    proxy.shutdown().await;
}

/// Every `graywire_…` metric name in `text` (PromQL or YAML).
fn metric_names(text: &str) -> Vec<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("graywire_"))
        .map(str::to_owned)
        .collect()
}

/// True when `name` is a documented metric or a series of a documented histogram.
fn in_catalog(catalog: &BTreeMap<String, String>, name: &str) -> bool {
    if catalog.contains_key(name) {
        return true;
    }
    ["_bucket", "_sum", "_count"].iter().any(|suffix| {
        name.strip_suffix(suffix)
            .is_some_and(|base| catalog.get(base).is_some_and(|k| k == "histogram"))
    })
}

#[test]
fn every_metric_the_dashboard_and_the_alerts_use_is_in_the_catalog() {
    let catalog = documented();
    let mut used = 0;
    for (title, expr) in dashboard_expressions() {
        for name in metric_names(&expr) {
            used += 1;
            assert!(
                in_catalog(&catalog, &name),
                "panel {title:?} uses {name}, which graywire does not export (docs/metrics.md)"
            );
        }
    }
    let rules = std::fs::read_to_string(repo().join("config/prometheus/alerts.yml")).unwrap();
    for line in rules
        .lines()
        .filter(|l| l.trim_start().starts_with("expr:") || l.starts_with("          "))
    {
        for name in metric_names(line) {
            used += 1;
            assert!(
                in_catalog(&catalog, &name),
                "alerts.yml uses {name}, which graywire does not export"
            );
        }
    }
    assert!(used > 40, "expressions were read: {used}");
    // A typo is caught.
    assert!(!in_catalog(&catalog, "graywire_probe_lost_write"));
    assert!(!in_catalog(&catalog, "graywire_sessions_bucket"));
}

/// The series names a PromQL expression or alert rule line uses, as exported (a histogram's
/// `_bucket`, `_sum` and `_count` included).
fn used_names() -> Vec<String> {
    let mut names: Vec<String> = dashboard_expressions()
        .into_iter()
        .flat_map(|(_, expr)| metric_names(&expr))
        .collect();
    let rules = std::fs::read_to_string(repo().join("config/prometheus/alerts.yml")).unwrap();
    for line in rules
        .lines()
        .filter(|l| l.trim_start().starts_with("expr:") || l.starts_with("          "))
    {
        names.extend(metric_names(line));
    }
    names.sort();
    names.dedup();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_graywire_exports_every_series_its_dashboard_and_alerts_use() {
    let cluster = start_cluster(2).await;
    let mut opts = with_probe();
    // Bounds no probe can meet (a p99 write latency of a microsecond).
    let failing = "window=30s&max_p99=1us";
    opts.extra.push_str(&format!("gate = \"{failing}\"\n"));
    let proxy = RunningProxy::start(&config_for(&cluster, &opts)).await;
    // Before any client, drain or gate request. A standby's replication lag is known once
    // the health checks have seen both it and the primary (a check or two after start), so
    // the page is read until it holds every name, for at most a few seconds.
    let names = used_names();
    assert!(names.len() > 20, "{names:?}");
    eventually_ok(
        Duration::from_secs(5),
        "every series the dashboard and alerts use, before any traffic",
        || async {
            let (_, page) = proxy.admin_get("/metrics").await;
            let present: std::collections::BTreeSet<&str> = page
                .lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| l.split(['{', ' ']).next())
                .collect();
            let missing: Vec<&String> = names
                .iter()
                .filter(|n| !present.contains(n.as_str()))
                .collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("not exported: {missing:?}"))
            }
        },
    )
    .await;
    // The gate gauge holds the verdict for the configured bounds, as /v1/gate gives it.
    let (status, _) = proxy.admin_get(&format!("/v1/gate?{failing}")).await;
    assert_eq!(proxy.metric("graywire_probe_gate_pass").await, Some(0.0));
    assert_eq!(status, 503, "no write takes a microsecond");
    proxy.shutdown().await;

    // Bounds it meets once it has written a little: the gauge follows on its own.
    let mut opts = with_probe();
    opts.extra.push_str("gate = \"window=2s\"\n");
    let proxy = RunningProxy::start(&config_for(&cluster, &opts)).await;
    eventually(
        Duration::from_secs(20),
        "the gate gauge passing",
        || async { (proxy.metric("graywire_probe_gate_pass").await == Some(1.0)).then_some(()) },
    )
    .await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_chosen_sqlstates_add_a_bounded_number_of_series() {
    let cluster = start_cluster(1).await;
    let proxy = RunningProxy::in_front_of(&cluster).await;
    let series = |page: &str| {
        page.lines()
            .filter(|l| l.starts_with("graywire_client_errors_total{"))
            .count()
    };
    let (_, before) = proxy.admin_get("/metrics").await;
    let c = proxy.connect("app").await;
    // 3,000 distinct SQLSTATEs, each raised by the client: half in a documented class with
    // one documented code (2D, invalid transaction termination: 2D000), half in a class
    // PostgreSQL does not document (Q7).
    let digits = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ";
    for i in 0..3_000usize {
        let class = if i % 2 == 0 { "2D" } else { "Q7" };
        let n = i / 2;
        let code = format!(
            "{class}{}{}{}",
            digits[n / 1296 % 36] as char,
            digits[n / 36 % 36] as char,
            digits[n % 36] as char
        );
        let e = c
            .batch_execute(&format!(
                "DO $$BEGIN RAISE EXCEPTION 'chosen' USING ERRCODE = '{code}'; END$$"
            ))
            .await
            .unwrap_err();
        assert_eq!(
            graywire_tests::sqlstate(&e).as_deref(),
            Some(code.as_str()),
            "the client still gets its own SQLSTATE"
        );
    }
    let (_, after) = proxy.admin_get("/metrics").await;
    let added = series(&after) - series(&before);
    println!("3000 distinct SQLSTATEs added {added} series");
    // 2D000 (the class's own code, which one of them is, and the label of the rest) and
    // "other".
    assert!(added <= 2, "{added} series added:\n{after}");
    assert!(after.contains("sqlstate=\"other\""), "{after}");
    assert!(after.contains("sqlstate=\"2D000\""), "{after}");
    proxy.shutdown().await;
}
