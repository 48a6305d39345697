//! One node of a local cluster: its data directory, port and log, and the postmaster we run as
//! a direct child — starting it, waiting until it accepts connections, signalling and reaping
//! it, and querying it with `psql` over its Unix socket.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::binaries::PgBinaries;
use super::process::{self, run_bounded, OsIdentity, POLL};
use super::LocalClusterError;

/// How many log lines an error carries.
pub(crate) const TAIL_LINES: usize = 30;

/// How long a postmaster gets to start accepting connections.
const READY_LIMIT: Duration = Duration::from_secs(60);

/// How many times a start is retried when the postmaster could not bind its port.
const BIND_RETRIES: usize = 3;

/// What every node shares: the programs, who runs them, and where.
#[derive(Debug)]
pub(crate) struct Host {
    pub(crate) binaries: PgBinaries,
    pub(crate) identity: OsIdentity,
    /// The cluster's directory, also the working directory of every program we run.
    pub(crate) dir: PathBuf,
    /// Where every node puts its Unix socket.
    pub(crate) socket_dir: PathBuf,
}

/// A node: a data directory and, while it runs, the postmaster child process.
#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) index: usize,
    /// `node<index>`: the cluster_name and the application_name it streams under.
    pub(crate) name: String,
    pub(crate) data_dir: PathBuf,
    pub(crate) log_file: PathBuf,
    pub(crate) port: u16,
    /// A `postgres` program other than the cluster's (a node moved to another minor version).
    pub(crate) postgres: Option<PathBuf>,
    child: Option<Child>,
}

impl Node {
    /// A node that does not exist on disk yet.
    pub(crate) fn new(index: usize, dir: &Path, port: u16) -> Self {
        let name = format!("node{index}");
        Self {
            index,
            data_dir: dir.join(&name),
            log_file: dir.join(format!("{name}.log")),
            name,
            port,
            postgres: None,
            child: None,
        }
    }

    /// The postmaster's PID while we hold it (until it is reaped).
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the postmaster is alive.
    pub(crate) fn is_running(&self) -> bool {
        self.pid().is_some_and(process::process_alive)
    }

    /// Starts the postmaster and waits until it accepts connections. When it cannot bind its
    /// port, retries up to [`BIND_RETRIES`] times: on a fresh port if `may_change_port`, else
    /// on the same port after a pause.
    pub(crate) fn start(
        &mut self,
        host: &Host,
        may_change_port: bool,
    ) -> Result<(), LocalClusterError> {
        self.reap_if_exited();
        if self.child.is_some() {
            return Err(LocalClusterError::AlreadyRunning(self.index));
        }
        let mut attempt = 0;
        loop {
            let log_offset = self.log_len();
            self.spawn(host)?;
            match self.wait_ready(READY_LIMIT, log_offset) {
                Ok(()) => return Ok(()),
                Err(err @ LocalClusterError::NodeExited { .. })
                    if attempt < BIND_RETRIES && self.failed_to_bind(log_offset) =>
                {
                    attempt += 1;
                    tracing::warn!(
                        node = self.index,
                        port = self.port,
                        attempt,
                        "port taken, retrying: {err}"
                    );
                    if may_change_port {
                        self.port = process::free_port()?;
                    } else {
                        std::thread::sleep(Duration::from_secs(1));
                    }
                }
                Err(err) => {
                    if self.child.is_some() {
                        // A postmaster that never got ready is not left behind.
                        let _ = self.kill9();
                    }
                    return Err(err);
                }
            }
        }
    }

    fn spawn(&mut self, host: &Host) -> Result<(), LocalClusterError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_file)
            .map_err(|e| {
                LocalClusterError::io(format!("opening {}", self.log_file.display()), e)
            })?;
        host.identity.chown(&self.log_file)?;
        let log_err = log
            .try_clone()
            .map_err(|e| LocalClusterError::io("duplicating the log file handle", e))?;
        let program = self
            .postgres
            .clone()
            .unwrap_or_else(|| host.binaries.program("postgres"));
        let mut cmd = host.identity.command(&program, &host.dir);
        cmd.arg("-D")
            .arg(&self.data_dir)
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-c")
            .arg(format!("cluster_name={}", self.name))
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        let child = cmd.spawn().map_err(|e| {
            LocalClusterError::io(format!("starting postgres for {}", self.name), e)
        })?;
        tracing::debug!(
            node = self.index,
            pid = child.id(),
            port = self.port,
            "postmaster started"
        );
        self.child = Some(child);
        Ok(())
    }

    /// Polls until `postmaster.pid` names our child with status `ready` or `standby`.
    fn wait_ready(&mut self, limit: Duration, log_offset: u64) -> Result<(), LocalClusterError> {
        let deadline = Instant::now() + limit;
        let mut last_status = String::from("no postmaster.pid yet");
        loop {
            let Some(child) = self.child.as_mut() else {
                return Err(LocalClusterError::NotRunning(self.index));
            };
            let pid = child.id();
            match child.try_wait() {
                Ok(Some(status)) => {
                    self.child = None;
                    return Err(LocalClusterError::NodeExited {
                        node: self.index,
                        status: status.to_string(),
                        log: self.log_file.clone(),
                        tail: self.tail_since(log_offset),
                    });
                }
                Ok(None) => {}
                Err(e) => {
                    return Err(LocalClusterError::io(
                        format!("waiting for {}", self.name),
                        e,
                    ))
                }
            }
            if let Some(status) = self.postmaster_status(pid) {
                if status == "ready" || status == "standby" {
                    return Ok(());
                }
                last_status = format!("postmaster.pid status {status:?}");
            }
            if Instant::now() >= deadline {
                return Err(LocalClusterError::Timeout {
                    what: format!(
                        "waiting for {} (pid {pid}, port {}) to accept connections",
                        self.name, self.port
                    ),
                    waited: limit,
                    context: format!(
                        "last seen: {last_status}; last lines of {}:\n{}",
                        self.log_file.display(),
                        self.tail()
                    ),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// The status line of `postmaster.pid` if the file belongs to `pid` (a stale file left by a
    /// killed postmaster does not count).
    fn postmaster_status(&self, pid: u32) -> Option<String> {
        let text = std::fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        let mut lines = text.lines();
        let owner: u32 = lines.next()?.trim().parse().ok()?;
        let status = lines.nth(6)?.trim();
        (owner == pid).then(|| status.to_owned())
    }

    /// Whether the log written since `offset` says the postmaster could not listen on its port.
    fn failed_to_bind(&self, offset: u64) -> bool {
        let text = self.tail_since(offset);
        text.contains("could not bind") || text.contains("could not create any TCP/IP sockets")
    }

    /// Sends `signal` to the postmaster alone.
    pub(crate) fn send(&self, signal: Signal) -> Result<(), LocalClusterError> {
        match self.pid() {
            Some(pid) => process::signal(pid, signal),
            None => Err(LocalClusterError::NotRunning(self.index)),
        }
    }

    /// Reaps the postmaster if it has exited; true when no postmaster is held any more.
    pub(crate) fn reap_if_exited(&mut self) -> bool {
        let Some(child) = self.child.as_mut() else {
            return true;
        };
        match child.try_wait() {
            Ok(Some(status)) => {
                tracing::debug!(node = self.index, pid = child.id(), %status, "postmaster exited");
                self.child = None;
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!(node = self.index, "cannot wait for the postmaster: {e}");
                false
            }
        }
    }

    /// Waits up to `limit` for the postmaster to exit; true when it has and was reaped.
    pub(crate) fn wait_exit(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.reap_if_exited() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Signals the postmaster, waits up to `limit` for it to exit, reaps it, then waits for
    /// the children it had to be gone.
    pub(crate) fn stop(
        &mut self,
        signal: Signal,
        limit: Duration,
    ) -> Result<(), LocalClusterError> {
        if self.reap_if_exited() {
            return Err(LocalClusterError::NotRunning(self.index));
        }
        let children = self.pid().map(process::children_of).unwrap_or_default();
        self.send(signal)?;
        if !self.wait_exit(limit) {
            return Err(LocalClusterError::Timeout {
                what: format!(
                    "waiting for {} to exit after {}",
                    self.name,
                    signal.as_str()
                ),
                waited: limit,
                context: format!(
                    "it is still running; last lines of {}:\n{}",
                    self.log_file.display(),
                    self.tail()
                ),
            });
        }
        self.finish_children(&children)
    }

    /// SIGKILLs the postmaster, reaps it, and waits until the children it had are gone (they
    /// notice their parent's death by themselves; stragglers are SIGKILLed after 10 s), so the
    /// port and shared memory are free for a restart.
    pub(crate) fn kill9(&mut self) -> Result<(), LocalClusterError> {
        if self.reap_if_exited() {
            return Err(LocalClusterError::NotRunning(self.index));
        }
        let children = self.pid().map(process::children_of).unwrap_or_default();
        self.send(Signal::SIGKILL)?;
        if !self.wait_exit(Duration::from_secs(10)) {
            return Err(LocalClusterError::Timeout {
                what: format!("waiting for {} to die after SIGKILL", self.name),
                waited: Duration::from_secs(10),
                context: "the postmaster did not exit".to_owned(),
            });
        }
        self.finish_children(&children)
    }

    /// Waits for the former children of the postmaster to be gone, SIGKILLing stragglers.
    fn finish_children(&self, children: &[u32]) -> Result<(), LocalClusterError> {
        process::finish_orphans(children, &format!("the children of {}", self.name))
    }

    /// Runs one SQL command with `psql` over the Unix socket (trusted) and returns its
    /// unaligned, tuples-only output, trimmed.
    pub(crate) fn psql(&self, host: &Host, sql: &str) -> Result<String, LocalClusterError> {
        let mut cmd = host
            .identity
            .command(&host.binaries.program("psql"), &host.dir);
        cmd.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&host.socket_dir)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                super::SUPERUSER,
                "-d",
                "postgres",
                "-c",
                sql,
            ])
            .env("PGCONNECT_TIMEOUT", "10")
            .env("PGOPTIONS", "-c statement_timeout=20s");
        let what = format!("psql on {} (port {}): {sql}", self.name, self.port);
        let output = run_bounded(cmd, &what, Duration::from_secs(60))?;
        Ok(output.stdout.trim().to_owned())
    }

    /// The last lines of this node's log.
    pub(crate) fn tail(&self) -> String {
        self.tail_since(0)
    }

    fn tail_since(&self, offset: u64) -> String {
        log_tail(&self.log_file, offset, TAIL_LINES)
    }

    fn log_len(&self) -> u64 {
        std::fs::metadata(&self.log_file)
            .map(|m| m.len())
            .unwrap_or(0)
    }
}

/// The last `lines` lines of `path` written after byte `offset` (at most the last 64 KiB).
pub(crate) fn log_tail(path: &Path, offset: u64, lines: usize) -> String {
    const WINDOW: u64 = 64 * 1024;
    let Ok(mut file) = File::open(path) else {
        return format!("(cannot open {})", path.display());
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = offset.max(len.saturating_sub(WINDOW)).min(len);
    let mut buf = Vec::new();
    if file.seek(SeekFrom::Start(start)).is_err() || file.read_to_end(&mut buf).is_err() {
        return format!("(cannot read {})", path.display());
    }
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_tail_keeps_the_last_lines_after_the_offset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.log");
        let text: String = (1..=50).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, &text).expect("write");
        let tail = log_tail(&path, 0, 3);
        assert_eq!(tail, "line 48\nline 49\nline 50");
        let offset = text.find("line 49").expect("present") as u64;
        assert_eq!(log_tail(&path, offset, 30), "line 49\nline 50");
        assert!(log_tail(&dir.path().join("missing"), 0, 3).contains("cannot open"));
    }
}
