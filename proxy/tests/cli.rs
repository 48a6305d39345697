//! The `graywire` binary as a user runs it: `check-config` exit codes and messages, and
//! `graywire demo` end to end (a real cluster, psql through graywire, SIGTERM, clean-up).
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_graywire");

/// Checks `check` every 25 ms until it returns `Ok`, and returns that value; panics naming
/// `what`, `limit` and the last `Err` once `limit` has passed (at most `limit / 25 ms + 2`
/// checks). The blocking twin of graywire-tests' `eventually_ok`, which this crate cannot use
/// (graywire-tests depends on graywire). A check is not interrupted: keep each one short.
fn eventually<T>(limit: Duration, what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
    const POLL: Duration = Duration::from_millis(25);
    let deadline = Instant::now() + limit;
    let max_checks = limit.as_millis() / POLL.as_millis() + 2;
    let mut last = String::new();
    for _ in 0..max_checks {
        match check() {
            Ok(value) => return value,
            Err(e) => last = e,
        }
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        std::thread::sleep(POLL.min(deadline - now));
    }
    panic!("eventually: {what}: not so within {limit:?}; last check: {last}")
}

#[test]
fn eventually_returns_the_first_ok_and_panics_after_its_limit() {
    let mut calls = 0;
    let v = eventually(Duration::from_secs(5), "the third call", || {
        calls += 1;
        if calls == 3 {
            Ok(calls)
        } else {
            Err(format!("call {calls}"))
        }
    });
    assert_eq!(v, 3);
    let started = Instant::now();
    let e = std::panic::catch_unwind(|| {
        eventually(Duration::from_millis(200), "never", || {
            Err::<(), _>("still no".to_owned())
        })
    })
    .unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(200));
    let message = e.downcast_ref::<String>().unwrap();
    assert!(
        message.contains("never") && message.contains("200ms"),
        "{message}"
    );
    assert!(message.ends_with("last check: still no"), "{message}");
}

fn reference_config() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/graywire.toml"
    ))
}

#[test]
fn check_config_accepts_the_reference_and_names_the_bad_key() {
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(reference_config())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("valid"));

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(reference_config())
        .unwrap()
        .replacen("port = 5432", "port = 70000", 1)
        .replacen("interval = \"250ms\"", "interval = \"soon\"", 1);
    std::fs::write(&bad, text).unwrap();
    let out = Command::new(BIN)
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nodes[0].port: 70000 is not a port"), "{err}");
    assert!(
        err.contains("health.interval: \"soon\" is not a duration"),
        "{err}"
    );

    // `run` refuses the same file before it binds anything.
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));

    let out = Command::new(BIN)
        .arg("check-config")
        .arg(dir.path().join("missing.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

#[test]
fn demo_without_postgresql_names_the_package_to_install() {
    let out = Command::new(BIN)
        .args(["demo", "--port", "0", "--admin-port", "0"])
        .env("GRAYWIRE_PG_BINDIR", "/nonexistent/pg/bin")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("apt-get install -y postgresql-15"), "{err}");
}

/// Finds running processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmd).contains(needle) {
                found.push(pid);
            }
        }
    }
    found
}

fn psql(url: &str, sql: &str) -> String {
    let bindir = graywire_localcluster::PgBinaries::locate().unwrap();
    let out = Command::new(bindir.program("psql"))
        .args([url, "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn demo_serves_psql_and_cleans_up_on_sigterm() {
    let mut child = Command::new(BIN)
        .args(["demo", "--port", "0", "--admin-port", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let guard = KillOnDrop(pid);
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (mut url, mut admin, mut dir, mut roles) = (None, None, None, Vec::new());
    let mut gate = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    while url.is_none() || admin.is_none() || gate.is_none() || roles.len() < 3 {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("demo prints its connection string within two minutes");
        if let Some(rest) = line.split("connect: psql \"").nth(1) {
            url = Some(rest.trim_end_matches('"').to_owned());
        }
        if let Some(rest) = line.split("admin:   ").nth(1) {
            admin = Some(rest.trim().to_owned());
        }
        if let Some(rest) = line.split("gate:    http://").nth(1) {
            gate = Some(rest.trim().to_owned());
        }
        if let Some(rest) = line.split("(cluster in ").nth(1) {
            dir = Some(rest.trim_end_matches(')').to_owned());
        }
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() == 4 && cols[0].starts_with("pg") && cols[3] == "up" {
            roles.push(cols[2].to_owned());
        }
    }
    let (url, dir) = (url.unwrap(), dir.unwrap());
    assert!(admin.unwrap().ends_with("/v1/nodes"));
    // The demo's probe writes through graywire; its gate passes once it has a read-back.
    let gate = gate.unwrap();
    let (host, path) = gate.split_once('/').unwrap();
    let path = format!("/{path}");
    eventually(Duration::from_secs(20), "the demo's gate passes", || {
        let body = http_get(host, &path);
        if body.contains("\"pass\":true") {
            Ok(())
        } else {
            Err(body)
        }
    });
    roles.sort();
    assert_eq!(
        roles,
        vec!["primary", "standby", "standby"],
        "the node table shows discovered roles"
    );
    assert!(!processes_mentioning(&dir).is_empty(), "the cluster runs");

    assert_eq!(psql(&url, "SELECT 1"), "1");
    psql(
        &url,
        "CREATE TABLE demo_check (id int PRIMARY KEY, note text)",
    );
    psql(
        &url,
        "INSERT INTO demo_check VALUES (1, 'through graywire'), (2, 'still here')",
    );
    assert_eq!(
        psql(
            &url,
            "SELECT string_agg(note, '|' ORDER BY id) FROM demo_check"
        ),
        "through graywire|still here"
    );

    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let status = eventually(Duration::from_secs(90), "demo exits after SIGTERM", || {
        child
            .try_wait()
            .unwrap()
            .ok_or_else(|| "running".to_owned())
    });
    std::mem::forget(guard);
    assert!(status.success(), "demo exit status {status:?}");
    assert!(!std::path::Path::new(&dir).exists(), "{dir} removed");
    assert!(
        processes_mentioning(&dir).is_empty(),
        "no PostgreSQL process of the demo is left"
    );
}

/// Kills the demo if the test fails half-way (its own Drop then stops the cluster).
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.to_string()])
            .status();
    }
}

/// A GET on the admin API with std only; returns the body.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits (bounded) until `/v1/nodes` lists exactly `names`.
fn wait_for_nodes(admin: &str, names: &[&str]) {
    let what = format!("/v1/nodes lists {names:?}");
    eventually(Duration::from_secs(15), &what, || {
        let body = if std::net::TcpStream::connect(admin).is_ok() {
            http_get(admin, "/v1/nodes")
        } else {
            String::new()
        };
        let listed: Vec<String> = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["nodes"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|n| n["name"].as_str().map(String::from))
            .collect();
        if listed == names {
            Ok(())
        } else {
            Err(format!("nodes {listed:?}: {body}"))
        }
    });
}

#[test]
fn sighup_reloads_nodes_and_keeps_the_old_config_when_the_new_one_is_invalid() {
    use graywire_localcluster::{ClusterSpec, LocalCluster};
    let cluster = LocalCluster::start(ClusterSpec::new(2).unwrap()).unwrap();
    let (listen, admin) = (free_port(), free_port());
    let config = |nodes: &[usize], port_override: Option<&str>| {
        let mut t = format!(
            "[listener]\naddress = \"127.0.0.1:{listen}\"\n[admin]\naddress = \"127.0.0.1:{admin}\"\n\
             [backend]\nuser = \"{}\"\npassword = \"{}\"\n[[users]]\nname = \"app\"\nauth = \"trust\"\n",
            cluster.superuser(),
            cluster.password()
        );
        for i in nodes {
            let port = port_override.map_or(cluster.port(*i).to_string(), String::from);
            t.push_str(&format!(
                "[[nodes]]\nname = \"pg{i}\"\nhost = \"127.0.0.1\"\nport = {port}\n"
            ));
        }
        t
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("graywire.toml");
    std::fs::write(&file, config(&[0, 1], None)).unwrap();
    let log = dir.path().join("stderr.log");
    let mut child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&file)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id();
    let _guard = KillOnDrop(pid);
    let admin_addr = format!("127.0.0.1:{admin}");
    wait_for_nodes(&admin_addr, &["pg0", "pg1"]);
    let url = format!("postgres://app@127.0.0.1:{listen}/postgres");
    assert_eq!(psql(&url, "SELECT 1"), "1");
    let hup = || {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap()
    };

    // Invalid: refused with the reason, the running config stays.
    std::fs::write(&file, config(&[0], Some("70000"))).unwrap();
    hup();
    eventually(
        Duration::from_secs(10),
        "a log line for the refused reload",
        || {
            let text = std::fs::read_to_string(&log).unwrap();
            if text.contains("70000 is not a port") {
                Ok(())
            } else {
                Err(text)
            }
        },
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "graywire keeps running"
    );
    wait_for_nodes(&admin_addr, &["pg0", "pg1"]);

    // Valid, with pg1 removed: it is gone from the topology, the proxy keeps serving.
    std::fs::write(&file, config(&[0], None)).unwrap();
    hup();
    wait_for_nodes(&admin_addr, &["pg0"]);
    assert_eq!(psql(&url, "SELECT 2"), "2");
    // And back.
    std::fs::write(&file, config(&[0, 1], None)).unwrap();
    hup();
    wait_for_nodes(&admin_addr, &["pg0", "pg1"]);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = eventually(Duration::from_secs(20), "graywire stops on SIGTERM", || {
        child
            .try_wait()
            .unwrap()
            .ok_or_else(|| "running".to_owned())
    });
    assert!(status.success(), "graywire exits cleanly: {status}");
}

#[test]
fn gate_refuses_bad_flags_with_exit_2_and_reports_an_unreachable_admin_with_1() {
    for args in [
        vec!["gate", "--window", "soon"],
        vec!["gate", "--max-gaps", "many"],
        vec!["gate", "--admin", "ftp://x"],
    ] {
        let out = Command::new(BIN).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(!out.stderr.is_empty());
    }
    let port = free_port();
    let out = Command::new(BIN)
        .args(["gate", "--admin", &format!("http://127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
}

#[test]
fn a_standalone_probe_serves_its_gate_and_graywire_gate_waits_on_it() {
    use graywire_localcluster::{ClusterSpec, LocalCluster, StopMode};
    let mut cluster = LocalCluster::start(ClusterSpec::new(1).unwrap()).unwrap();
    let listen = free_port();
    let mut child = Command::new(BIN)
        .args(["probe", "--target", &cluster.dsn(0), "--listen"])
        .arg(format!("127.0.0.1:{listen}"))
        .args([
            "--writer",
            "cli-test",
            "--verify-interval",
            "300ms",
            "--attempt-timeout",
            "500ms",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let guard = KillOnDrop(child.id());
    let admin = format!("http://127.0.0.1:{listen}");
    let gate = |extra: &[&str]| {
        Command::new(BIN)
            .args([
                "gate",
                "--admin",
                &admin,
                "--window",
                "3s",
                "--max-stall",
                "500ms",
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = gate(&["--wait", "--timeout", "20s", "--poll", "200ms"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let metrics = http_get(&format!("127.0.0.1:{listen}"), "/metrics");
    assert!(
        metrics.contains("graywire_probe_writes_total{result=\"ok\"}"),
        "{metrics}"
    );
    assert!(http_get(&format!("127.0.0.1:{listen}"), "/v1/nodes").contains("standalone probe"));

    cluster.stop(0, StopMode::Fast).unwrap();
    // Not a synchronisation: the node stays down for a second, a stall longer than the gate's
    // --max-stall of 500 ms.
    std::thread::sleep(Duration::from_secs(1));
    let out = gate(&[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_stall"), "{err}");
    cluster.start_node(0).unwrap();
    let out = gate(&["--wait", "--timeout", "20s", "--poll", "200ms"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(guard); // SIGTERM
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "the probe exits cleanly on SIGTERM: {status}"
    );
}

#[test]
fn demo_rolling_upgrade_moves_every_node_and_reports_no_loss() {
    let child = Command::new(BIN)
        .args([
            "demo",
            "--rolling-upgrade",
            "--port",
            "0",
            "--admin-port",
            "0",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let guard = KillOnDrop(child.id());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = rx
        .recv_timeout(Duration::from_secs(300))
        .expect("the rolling-upgrade demo ends within five minutes")
        .unwrap();
    // It has exited and was reaped: its PID must not be signalled any more.
    std::mem::forget(guard);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("graywire rollout SUCCEEDED"), "{stdout}");
    assert!(stdout.contains("lost writes 0, gaps 0"), "{stdout}");
    assert!(
        stdout.contains("every one of them is in the table"),
        "{stdout}"
    );
    assert!(
        stdout.contains("0 errors, 0 closed connections"),
        "{stdout}"
    );
    assert!(stdout.contains("rolling upgrade demo: OK"), "{stdout}");
    // On bookworm's 15.18 the demo upgrades for real; elsewhere it must say it only restarts.
    assert!(
        stdout.contains("from 15.18 to 15.20") || stdout.contains("RESTART-ONLY"),
        "{stdout}"
    );
    // Progress went to stderr, a line per step.
    assert!(stderr.contains("switchover to"), "{stderr}");
    // The report, for the log (nextest shows it for this test: .config/nextest.toml).
    println!("{stdout}");
}
