//! Processes of the local cluster: the OS identity PostgreSQL runs as, running its client
//! programs with a time bound, signalling by PID, and finding a postmaster's children and
//! working directory in `/proc`.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::{geteuid, Pid, User};

use super::LocalClusterError;

/// How often bounded waits look again.
pub(crate) const POLL: Duration = Duration::from_millis(50);

/// How often bounded waits that run a program (`psql`) look again.
pub(crate) const POLL_SLOW: Duration = Duration::from_millis(100);

/// Who PostgreSQL processes run as: the current user, or — when we are root, which PostgreSQL
/// refuses — the `postgres` OS user.
#[derive(Debug, Clone)]
pub(crate) struct OsIdentity {
    /// `Some` when we are root and switch to the `postgres` user for every PostgreSQL program.
    switch_to: Option<User>,
}

impl OsIdentity {
    /// The current user, or the `postgres` user when running as root.
    pub(crate) fn resolve() -> Result<Self, LocalClusterError> {
        if !geteuid().is_root() {
            return Ok(Self { switch_to: None });
        }
        match User::from_name("postgres") {
            Ok(Some(user)) => Ok(Self {
                switch_to: Some(user),
            }),
            Ok(None) => Err(LocalClusterError::NoPostgresUser),
            Err(errno) => Err(LocalClusterError::io(
                "looking up the `postgres` OS user",
                std::io::Error::from(errno),
            )),
        }
    }

    /// A command for a PostgreSQL program: run as this identity, in `cwd` (which that identity
    /// can enter), with no inherited `PG*` variables, the C locale and stdin closed.
    pub(crate) fn command(&self, program: &Path, cwd: &Path) -> Command {
        let mut cmd = Command::new(program);
        for (key, _) in std::env::vars_os() {
            if key.as_encoded_bytes().starts_with(b"PG") {
                cmd.env_remove(&key);
            }
        }
        cmd.env("LC_ALL", "C").current_dir(cwd).stdin(Stdio::null());
        if let Some(user) = &self.switch_to {
            // std drops the supplementary groups when a root parent sets the uid.
            cmd.uid(user.uid.as_raw())
                .gid(user.gid.as_raw())
                .env("HOME", &user.dir)
                .env("USER", &user.name)
                .env("LOGNAME", &user.name);
        }
        cmd
    }

    /// Gives `path` to this identity (a no-op unless we switched user).
    pub(crate) fn chown(&self, path: &Path) -> Result<(), LocalClusterError> {
        let Some(user) = &self.switch_to else {
            return Ok(());
        };
        std::os::unix::fs::chown(path, Some(user.uid.as_raw()), Some(user.gid.as_raw())).map_err(
            |e| LocalClusterError::io(format!("chown {} to user {}", path.display(), user.name), e),
        )
    }

    /// Fails with a clear message when this identity cannot reach `dir` because an ancestor
    /// directory denies it search permission (a base dir under `/root`, say).
    pub(crate) fn check_can_enter(&self, dir: &Path) -> Result<(), LocalClusterError> {
        let Some(user) = &self.switch_to else {
            return Ok(());
        };
        for ancestor in dir.ancestors().skip(1) {
            let meta = std::fs::metadata(ancestor)
                .map_err(|e| LocalClusterError::io(format!("stat {}", ancestor.display()), e))?;
            let mode = meta.mode();
            let allowed = if meta.uid() == user.uid.as_raw() {
                mode & 0o100 != 0
            } else if meta.gid() == user.gid.as_raw() {
                mode & 0o010 != 0
            } else {
                mode & 0o001 != 0
            };
            if !allowed {
                return Err(LocalClusterError::InvalidSpec(format!(
                    "the `{}` OS user, which runs PostgreSQL because we are root, cannot enter {} \
                     (mode {:o}); choose a base_dir it can reach, such as /tmp",
                    user.name,
                    ancestor.display(),
                    mode & 0o7777
                )));
            }
        }
        Ok(())
    }
}

/// What a finished program printed.
#[derive(Debug)]
pub(crate) struct Output {
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

/// Runs `cmd` to completion within `limit`, killing it when the limit passes. Success means
/// exit status 0; anything else is an error carrying its output.
pub(crate) fn run_bounded(
    mut cmd: Command,
    what: &str,
    limit: Duration,
) -> Result<Output, LocalClusterError> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| LocalClusterError::io(format!("starting {what}"), e))?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = wait_child(&mut child, limit)
        .map_err(|e| LocalClusterError::io(format!("waiting for {what}"), e))?;
    let status = match status {
        Some(status) => status,
        None => {
            // Killing an exited-but-unreaped child is harmless; its errors add nothing.
            let _ = child.kill();
            let _ = child.wait();
            let output = collect(stdout, stderr);
            return Err(LocalClusterError::Timeout {
                what: what.to_owned(),
                waited: limit,
                context: format!("killed it; its output so far:\n{}", output.combined()),
            });
        }
    };
    let output = collect(stdout, stderr);
    if status.success() {
        Ok(output)
    } else {
        Err(LocalClusterError::Command {
            what: what.to_owned(),
            status: status.to_string(),
            output: output.combined(),
        })
    }
}

impl Output {
    /// Stdout and stderr together, for error messages.
    pub(crate) fn combined(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
            .trim_end()
            .to_owned()
    }
}

/// Reads a pipe to its end on a thread, so a chatty program never blocks on a full pipe.
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut pipe) = pipe {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            // A read error just truncates the diagnostics.
            let _ = pipe.read_to_end(&mut buf);
            let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
        });
    }
    rx
}

/// Collects drained pipes, waiting only briefly: a grandchild that inherited a pipe (the WAL
/// streamer that pg_basebackup forks, say) must not make us wait forever.
fn collect(stdout: mpsc::Receiver<String>, stderr: mpsc::Receiver<String>) -> Output {
    let grace = Duration::from_secs(5);
    Output {
        stdout: stdout.recv_timeout(grace).unwrap_or_default(),
        stderr: stderr.recv_timeout(grace).unwrap_or_default(),
    }
}

/// Polls `child` until it exits (`Some`, reaped) or `limit` passes (`None`).
pub(crate) fn wait_child(
    child: &mut Child,
    limit: Duration,
) -> std::io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn nix_pid(pid: u32) -> Option<Pid> {
    i32::try_from(pid)
        .ok()
        .filter(|p| *p > 0)
        .map(Pid::from_raw)
}

/// Sends `signal` to the process `pid` — one process, never a group. A process that is already
/// gone is not an error.
pub(crate) fn signal(pid: u32, signal: Signal) -> Result<(), LocalClusterError> {
    let Some(target) = nix_pid(pid) else {
        return Ok(());
    };
    match kill(target, signal) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(source) => Err(LocalClusterError::Signal {
            signal: signal.as_str().to_owned(),
            pid,
            source,
        }),
    }
}

/// Whether process `pid` exists and is not a zombie (an orphaned postmaster child that nobody
/// reaps stays a zombie, but it holds no port, shared memory or files).
pub fn process_alive(pid: u32) -> bool {
    let Some(target) = nix_pid(pid) else {
        return false;
    };
    match kill(target, None) {
        Ok(()) | Err(Errno::EPERM) => {
            !matches!(proc_stat(pid), Some((state, _)) if state == 'Z' || state == 'X')
        }
        Err(_) => false,
    }
}

/// The fields of `/proc/<pid>/stat` from the state (field 3) on.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ..."; comm may hold spaces and parentheses, so split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// The state letter and parent PID of `pid`, from `/proc/<pid>/stat`.
fn proc_stat(pid: u32) -> Option<(char, u32)> {
    let fields = stat_fields(pid)?;
    let state = fields.first()?.chars().next()?;
    let ppid = fields.get(1)?.parse().ok()?;
    Some((state, ppid))
}

/// When process `pid` started, in clock ticks since boot (field 22 of `/proc/<pid>/stat`).
/// With the PID it names one process: a process that reuses the PID starts later.
pub(crate) fn start_time_of(pid: u32) -> Option<u64> {
    stat_fields(pid)?.get(19)?.parse().ok()
}

/// The working directory of process `pid` (a postmaster's is its data directory); `None` when
/// the process is gone or we may not inspect it.
pub(crate) fn cwd_of(pid: u32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/cwd")).ok()
}

/// The live processes whose parent is `pid` (a postmaster's backends and auxiliary processes).
pub(crate) fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|candidate| {
            matches!(proc_stat(*candidate), Some((state, ppid)) if ppid == pid && state != 'Z')
        })
        .collect()
}

/// Waits until every process in `pids` is gone, for at most `limit`; returns the survivors.
pub(crate) fn wait_gone(pids: &[u32], limit: Duration) -> Vec<u32> {
    let deadline = Instant::now() + limit;
    loop {
        let alive: Vec<u32> = pids.iter().copied().filter(|p| process_alive(*p)).collect();
        if alive.is_empty() || Instant::now() >= deadline {
            return alive;
        }
        std::thread::sleep(POLL);
    }
}

/// Waits (10 s) for the former children of a dead postmaster to exit by themselves — they
/// notice their parent's death — then SIGKILLs the stragglers and waits 5 s more.
pub(crate) fn finish_orphans(pids: &[u32], what: &str) -> Result<(), LocalClusterError> {
    let survivors = wait_gone(pids, Duration::from_secs(10));
    if survivors.is_empty() {
        return Ok(());
    }
    tracing::warn!(
        ?survivors,
        "{what} outlived their postmaster; sending SIGKILL"
    );
    for pid in &survivors {
        signal(*pid, Signal::SIGKILL)?;
    }
    let survivors = wait_gone(&survivors, Duration::from_secs(5));
    if survivors.is_empty() {
        Ok(())
    } else {
        Err(LocalClusterError::Timeout {
            what: format!("waiting for {what} to exit"),
            waited: Duration::from_secs(15),
            context: format!("still alive after SIGKILL: {survivors:?}"),
        })
    }
}

/// A loopback TCP port that was free a moment ago (the caller retries if it is taken by then).
pub(crate) fn free_port() -> Result<u16, LocalClusterError> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))
        .map_err(|e| LocalClusterError::io("binding 127.0.0.1:0 to pick a free port", e))?;
    let port = listener
        .local_addr()
        .map_err(|e| LocalClusterError::io("reading the picked port", e))?
        .port();
    Ok(port)
}

/// The path of program `name` in `bindir`.
pub(crate) fn program(bindir: &Path, name: impl AsRef<OsStr>) -> PathBuf {
    bindir.join(name.as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_has_a_parent() {
        let me = std::process::id();
        assert!(process_alive(me));
        let (state, ppid) = proc_stat(me).expect("own /proc stat");
        assert_ne!(state, 'Z');
        assert!(children_of(ppid).contains(&me));
    }

    #[test]
    fn nonexistent_pid_is_not_alive() {
        assert!(!process_alive(0));
        assert!(!process_alive(u32::MAX));
        assert_eq!(cwd_of(u32::MAX), None);
    }

    #[test]
    fn start_time_tells_processes_apart() {
        let me = start_time_of(std::process::id()).expect("own start time");
        assert_eq!(start_time_of(std::process::id()), Some(me));
        assert!(start_time_of(1).is_some_and(|init| init <= me));
        assert_eq!(start_time_of(u32::MAX), None);
    }

    #[test]
    fn own_working_directory_is_read_from_proc() {
        let here = std::env::current_dir().and_then(std::fs::canonicalize);
        assert_eq!(cwd_of(std::process::id()), here.ok());
    }

    #[test]
    fn bounded_run_kills_a_program_that_overruns() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let started = Instant::now();
        let err = run_bounded(cmd, "sleep 30", Duration::from_millis(200)).expect_err("timeout");
        assert!(matches!(err, LocalClusterError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn bounded_run_reports_output_of_a_failure() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out; echo err >&2; exit 3"]);
        let err = run_bounded(cmd, "sh", Duration::from_secs(10)).expect_err("exit 3");
        let text = err.to_string();
        assert!(
            text.contains("out") && text.contains("err") && text.contains('3'),
            "{text}"
        );
    }
}
