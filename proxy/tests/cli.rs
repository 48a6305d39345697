//! The `graywire` binary as a user runs it: `check-config` exit codes and messages, and
//! `graywire demo` end to end (a real cluster, psql through graywire, SIGTERM, clean-up).
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_graywire");

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
    let bindir = graywire::localcluster::PgBinaries::locate().unwrap();
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
    let deadline = Instant::now() + Duration::from_secs(120);
    while url.is_none() || admin.is_none() || roles.len() < 3 {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("demo prints its connection string within two minutes");
        if let Some(rest) = line.split("connect: psql \"").nth(1) {
            url = Some(rest.trim_end_matches('"').to_owned());
        }
        if let Some(rest) = line.split("admin:   ").nth(1) {
            admin = Some(rest.trim().to_owned());
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
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "demo exits after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
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
