//! One node of a local cluster: its data directory, port and log, and its postmaster — the one
//! we run as a direct child, or one restarted outside the fixture (`pg_ctl`) that we adopt from
//! `postmaster.pid` — starting it, waiting until it accepts connections, signalling it by PID,
//! reaping it, and querying it with `psql` over its Unix socket.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
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

/// A node's running postmaster.
#[derive(Debug)]
enum Postmaster {
    /// Started by us: we wait for it and reap it.
    Child(Child),
    /// Started outside the fixture (`pg_ctl start` after a `pg_ctl stop` of our child), found
    /// through `postmaster.pid`: we signal it by PID and watch `/proc`, but cannot reap it.
    Adopted {
        pid: u32,
        /// Its start time ([`process::start_time_of`]): once it has exited, its PID may be
        /// reused, and only the start time tells the newcomer apart.
        started: u64,
    },
}

impl Postmaster {
    fn pid(&self) -> u32 {
        match self {
            Self::Child(child) => child.id(),
            Self::Adopted { pid, .. } => *pid,
        }
    }
}

/// A node: a data directory and, while it runs, its postmaster.
///
/// Every look at the postmaster ([`Node::refresh`]) first forgets one that has exited (reaping
/// our child) and then, if none is held, adopts the live postmaster that `postmaster.pid` names
/// on our data directory — so a node restarted outside the fixture is still stopped by its PID.
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
    /// Behind a lock so that `&self` queries can reap and adopt.
    postmaster: Mutex<Option<Postmaster>>,
}

/// What a PostgreSQL lock file says: `postmaster.pid` (see PostgreSQL's `pidfile.h`), or a
/// socket's `.s.PGSQL.<port>.lock`, which starts the same way.
#[derive(Debug, PartialEq, Eq)]
struct LockFile {
    /// Line 1: the postmaster's PID.
    pid: u32,
    /// Line 2: its data directory.
    data_dir: PathBuf,
    /// Line 8, once written: `starting`, `stopping`, `ready` or `standby`.
    status: Option<String>,
}

impl LockFile {
    fn read(path: &Path) -> Option<Self> {
        Self::parse(&std::fs::read_to_string(path).ok()?)
    }

    fn parse(text: &str) -> Option<Self> {
        let mut lines = text.lines();
        let pid = lines.next()?.trim().parse().ok()?;
        let data_dir = PathBuf::from(lines.next()?);
        let status = lines.nth(5).map(|line| line.trim().to_owned());
        Some(Self {
            pid,
            data_dir,
            status,
        })
    }
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
            postmaster: Mutex::new(None),
        }
    }

    /// The PID of the running postmaster (our child or an adopted one), after [`Self::refresh`].
    pub(crate) fn pid(&self) -> Option<u32> {
        self.refresh()
    }

    /// Whether a postmaster runs on this node (our child or an adopted one).
    pub(crate) fn is_running(&self) -> bool {
        self.pid().is_some()
    }

    /// Forgets a postmaster that has exited (reaping our child), then, if none is held, adopts
    /// the live postmaster `postmaster.pid` names on our data directory (one restarted outside
    /// the fixture). Returns the PID of the postmaster held now.
    pub(crate) fn refresh(&self) -> Option<u32> {
        let mut held = self.held();
        self.forget_exited(&mut held);
        if held.is_none() {
            if let Some(adopted) = self.foreign_postmaster() {
                tracing::info!(
                    node = self.index,
                    pid = adopted.pid(),
                    "adopted a postmaster started outside the fixture"
                );
                *held = Some(adopted);
            }
        }
        held.as_ref().map(Postmaster::pid)
    }

    fn held(&self) -> MutexGuard<'_, Option<Postmaster>> {
        // The state stays consistent even if a holder panicked: it is one assignment.
        self.postmaster
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets the held postmaster if it has exited, reaping it if it is our child; true when
    /// none is held any more. Adopts nothing.
    fn forget_exited(&self, held: &mut Option<Postmaster>) -> bool {
        let exited = match held.as_mut() {
            None => return true,
            Some(Postmaster::Child(child)) => match child.try_wait() {
                Ok(Some(status)) => {
                    let pid = child.id();
                    tracing::debug!(node = self.index, pid, %status, "postmaster exited");
                    true
                }
                Ok(None) => false,
                Err(e) => {
                    tracing::warn!(node = self.index, "cannot wait for the postmaster: {e}");
                    false
                }
            },
            Some(Postmaster::Adopted { pid, started }) => {
                let gone =
                    !process::process_alive(*pid) || process::start_time_of(*pid) != Some(*started);
                if gone {
                    tracing::debug!(node = self.index, pid, "adopted postmaster exited");
                }
                gone
            }
        };
        if exited {
            *held = None;
        }
        exited
    }

    /// The live postmaster `postmaster.pid` names, if the file and the process's working
    /// directory (a postmaster changes into its data directory) are both our data directory.
    /// The second check refuses a PID reused by another process after a crash left the file.
    fn foreign_postmaster(&self) -> Option<Postmaster> {
        let lock = self.lock_file()?;
        let ours = std::fs::canonicalize(&self.data_dir).ok()?;
        let named_ours = std::fs::canonicalize(&lock.data_dir).ok()? == ours;
        let runs_in_ours = process::cwd_of(lock.pid)? == ours;
        let started = process::start_time_of(lock.pid)?;
        (named_ours && runs_in_ours && process::process_alive(lock.pid)).then_some(
            Postmaster::Adopted {
                pid: lock.pid,
                started,
            },
        )
    }

    fn lock_file(&self) -> Option<LockFile> {
        LockFile::read(&self.data_dir.join("postmaster.pid"))
    }

    /// Starts the postmaster and waits until it accepts connections. When it cannot bind its
    /// port, retries up to [`BIND_RETRIES`] times: on a fresh port if `may_change_port`, else
    /// on the same port after a pause. A node whose postmaster runs, ours or adopted, is
    /// [`LocalClusterError::AlreadyRunning`].
    pub(crate) fn start(
        &mut self,
        host: &Host,
        may_change_port: bool,
    ) -> Result<(), LocalClusterError> {
        if self.refresh().is_some() {
            return Err(LocalClusterError::AlreadyRunning(self.index));
        }
        // A SIGKILLed adopted postmaster leaves lock files naming a zombie we cannot reap.
        remove_if_stale(&self.data_dir.join("postmaster.pid"))?;
        remove_if_stale(&host.socket_dir.join(format!(".s.PGSQL.{}.lock", self.port)))?;
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
                    let ours_still_held = matches!(*self.held(), Some(Postmaster::Child(_)));
                    if ours_still_held {
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
        *self.held() = Some(Postmaster::Child(child));
        Ok(())
    }

    /// Polls until `postmaster.pid` names our child with status `ready` or `standby`.
    fn wait_ready(&mut self, limit: Duration, log_offset: u64) -> Result<(), LocalClusterError> {
        let deadline = Instant::now() + limit;
        let mut last_status = String::from("no postmaster.pid yet");
        loop {
            let mut held = self.held();
            let Some(Postmaster::Child(child)) = held.as_mut() else {
                return Err(LocalClusterError::NotRunning(self.index));
            };
            let pid = child.id();
            let exited = child.try_wait();
            if matches!(exited, Ok(Some(_))) {
                *held = None;
            }
            drop(held);
            match exited {
                Ok(Some(status)) => {
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
        self.lock_file().filter(|lock| lock.pid == pid)?.status
    }

    /// Whether the log written since `offset` says the postmaster could not listen on its port.
    fn failed_to_bind(&self, offset: u64) -> bool {
        let text = self.tail_since(offset);
        text.contains("could not bind") || text.contains("could not create any TCP/IP sockets")
    }

    /// Sends `signal` to the postmaster alone (ours or adopted).
    pub(crate) fn send(&self, signal: Signal) -> Result<(), LocalClusterError> {
        match self.pid() {
            Some(pid) => process::signal(pid, signal),
            None => Err(LocalClusterError::NotRunning(self.index)),
        }
    }

    /// Waits up to `limit` for the held postmaster to exit; true when it has (and, if it is our
    /// child, was reaped). An adopted postmaster, not our child, counts as exited once
    /// [`process::process_alive`] says so (or its PID names a process started since). Adopts
    /// nothing while waiting.
    pub(crate) fn wait_exit(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.forget_exited(&mut self.held()) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Signals the postmaster (ours or adopted) by PID, waits up to `limit` for it to exit,
    /// then waits for the children it had to be gone.
    pub(crate) fn stop(
        &mut self,
        signal: Signal,
        limit: Duration,
    ) -> Result<(), LocalClusterError> {
        let Some(pid) = self.refresh() else {
            return Err(LocalClusterError::NotRunning(self.index));
        };
        let children = process::children_of(pid);
        process::signal(pid, signal)?;
        if !self.wait_exit(limit) {
            return Err(LocalClusterError::Timeout {
                what: format!(
                    "waiting for {} (pid {pid}) to exit after {}",
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

    /// SIGKILLs the postmaster (ours or adopted) and waits (10 s) until it is gone and the
    /// children it had are gone too (they notice their parent's death by themselves;
    /// stragglers are SIGKILLed after 10 s), so the port and shared memory are free for a
    /// restart.
    pub(crate) fn kill9(&mut self) -> Result<(), LocalClusterError> {
        self.stop(Signal::SIGKILL, Duration::from_secs(10))
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

/// Removes the lock file at `path` (`postmaster.pid`, or the socket's `.s.PGSQL.<port>.lock`,
/// which starts the same way) if it names a process that is not alive. PostgreSQL removes such
/// a file itself unless the PID still exists — as a zombie, which is what an adopted postmaster
/// that we SIGKILLed stays until its parent (pid 1 or a subreaper) reaps it, if ever; the next
/// postmaster would then refuse to start ("lock file … already exists").
fn remove_if_stale(path: &Path) -> Result<(), LocalClusterError> {
    let Some(lock) = LockFile::read(path) else {
        return Ok(());
    };
    if process::process_alive(lock.pid) {
        return Ok(());
    }
    match std::fs::remove_file(path) {
        Ok(()) => {
            tracing::debug!(pid = lock.pid, "removed the stale {}", path.display());
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(LocalClusterError::io(
            format!("removing the stale {}", path.display()),
            e,
        )),
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
    fn lock_file_gives_pid_data_dir_and_status_once_written() {
        let lock = |status: Option<&str>| LockFile {
            pid: 4242,
            data_dir: PathBuf::from("/tmp/c/node1"),
            status: status.map(str::to_owned),
        };
        let ready = "4242\n/tmp/c/node1\n1700000000\n5433\n/tmp/c/sock\n127.0.0.1\n  \
                     1234567    98304\nready   \n";
        let cases = [
            (ready, Some(lock(Some("ready")))),
            ("4242\n/tmp/c/node1\n1700000000\n", Some(lock(None))),
            ("4242\n", None),
            ("not a pid\n/tmp/c/node1\n", None),
            ("", None),
        ];
        for (text, want) in cases {
            assert_eq!(LockFile::parse(text), want, "{text:?}");
        }
    }

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
