//! The operator's commands: templates with `{placeholder}`s, checked when the rollout starts,
//! expanded with shell-quoted values, and run with `sh -c` in their own process group under a
//! time limit, their output captured for the report.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag};
use nix::unistd::Pid;
use serde::Serialize;
use tokio::io::AsyncReadExt;

/// Most output kept per stream (the end of it: that is where the error is).
const OUTPUT_KEPT: usize = 16 * 1024;

/// How long output is still read after the command exited (a daemon it started may hold the
/// pipe open; we do not wait for that).
const OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// Which command a template is; decides which placeholders it may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandKind {
    Upgrade,
    Switchover,
    Finalize,
}

impl CommandKind {
    pub fn flag(self) -> &'static str {
        match self {
            CommandKind::Upgrade => "--upgrade-cmd",
            CommandKind::Switchover => "--switchover-cmd",
            CommandKind::Finalize => "--finalize-cmd",
        }
    }

    /// The placeholders this kind of command may use.
    pub fn placeholders(self) -> &'static [&'static str] {
        const NODE: &[&str] = &["node", "host", "port", "data_dir", "version"];
        const SWITCHOVER: &[&str] = &[
            "node",
            "host",
            "port",
            "data_dir",
            "version",
            "candidate",
            "candidate_host",
            "candidate_port",
            "candidate_data_dir",
            "standby_data_dirs",
        ];
        match self {
            CommandKind::Upgrade | CommandKind::Finalize => NODE,
            CommandKind::Switchover => SWITCHOVER,
        }
    }

    /// The placeholders as a template writes them: `{node}, {host}, …`.
    fn placeholder_list(self) -> String {
        self.placeholders()
            .iter()
            .map(|p| format!("{{{p}}}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A command template: text with `{name}` placeholders (`{{` and `}}` are literal braces).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    kind: CommandKind,
    text: String,
    /// The placeholders used, in order of first use.
    used: Vec<String>,
}

/// Why a template's text cannot be split into text and placeholders.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyntaxError {
    #[error("unclosed {{ at byte {0}")]
    Unclosed(usize),
    #[error("stray }} at byte {0} (write }}}} for a literal brace)")]
    Stray(usize),
}

/// Why a template was refused, or could not be expanded; each names the template's flag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("{}: the command is empty", .kind.flag())]
    Empty { kind: CommandKind },
    #[error("{}: {syntax}", .kind.flag())]
    Syntax {
        kind: CommandKind,
        syntax: SyntaxError,
    },
    #[error(
        "{}: unknown placeholder {{{name}}} (this command may use {})",
        .kind.flag(),
        .kind.placeholder_list()
    )]
    UnknownPlaceholder { kind: CommandKind, name: String },
    #[error("{}: no value for {{{name}}} here", .kind.flag())]
    NoValue { kind: CommandKind, name: String },
}

enum Piece<'a> {
    Text(&'a str),
    Placeholder(&'a str),
}

/// Splits a template into text and placeholders.
fn pieces(text: &str) -> Result<Vec<Piece<'_>>, SyntaxError> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let Some(i) = rest.find(['{', '}']) else {
            out.push(Piece::Text(rest));
            break;
        };
        out.push(Piece::Text(&rest[..i]));
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix("{{").or_else(|| tail.strip_prefix("}}")) {
            out.push(Piece::Text(&tail[..1]));
            rest = after;
        } else if let Some(inner) = tail.strip_prefix('{') {
            let end = inner.find('}').ok_or(SyntaxError::Unclosed(i))?;
            out.push(Piece::Placeholder(&inner[..end]));
            rest = &inner[end + 1..];
        } else {
            return Err(SyntaxError::Stray(i));
        }
        // Keep byte offsets meaningful only for the first problem; that is enough.
    }
    Ok(out)
}

impl Template {
    /// Parses `text` for `kind`; an unknown placeholder is refused with the list of known ones.
    pub fn parse(kind: CommandKind, text: &str) -> Result<Template, TemplateError> {
        if text.trim().is_empty() {
            return Err(TemplateError::Empty { kind });
        }
        let mut used: Vec<String> = Vec::new();
        for piece in pieces(text).map_err(|syntax| TemplateError::Syntax { kind, syntax })? {
            if let Piece::Placeholder(name) = piece {
                if !kind.placeholders().contains(&name) {
                    return Err(TemplateError::UnknownPlaceholder {
                        kind,
                        name: name.to_owned(),
                    });
                }
                if !used.iter().any(|u| u == name) {
                    used.push(name.to_owned());
                }
            }
        }
        Ok(Template {
            kind,
            text: text.to_owned(),
            used,
        })
    }

    pub fn kind(&self) -> CommandKind {
        self.kind
    }

    pub fn uses(&self, placeholder: &str) -> bool {
        self.used.iter().any(|u| u == placeholder)
    }

    /// The command line with every placeholder replaced by its shell-quoted value (a list:
    /// one quoted word per item); a missing value is an error naming it.
    pub fn expand(&self, values: &BTreeMap<&str, Value>) -> Result<String, TemplateError> {
        let kind = self.kind;
        let mut out = String::with_capacity(self.text.len());
        for piece in pieces(&self.text).map_err(|syntax| TemplateError::Syntax { kind, syntax })? {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Placeholder(name) => match values.get(name) {
                    Some(Value::One(v)) => out.push_str(&shell_quote(v)),
                    Some(Value::List(items)) => out.push_str(
                        &items
                            .iter()
                            .map(|i| shell_quote(i))
                            .collect::<Vec<_>>()
                            .join(" "),
                    ),
                    None => {
                        return Err(TemplateError::NoValue {
                            kind,
                            name: name.to_owned(),
                        })
                    }
                },
            }
        }
        Ok(out)
    }
}

/// A placeholder's value: one shell word, or a list of words (`{standby_data_dirs}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    One(String),
    List(Vec<String>),
}

impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::One(s)
    }
}

/// `value` as one shell word.
pub fn shell_quote(value: &str) -> String {
    if !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=@,+%".contains(&b))
    {
        return value.to_owned();
    }
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// What running a command gave.
#[derive(Debug, Clone, Serialize)]
pub struct CommandRun {
    pub command: String,
    /// The exit code; `None` when killed by a signal or by the time limit.
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    pub seconds: f64,
    /// The end of standard output and standard error.
    pub stdout: String,
    pub stderr: String,
}

impl CommandRun {
    pub fn succeeded(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out
    }

    /// One line saying how it ended.
    pub fn outcome(&self) -> String {
        match (self.timed_out, self.exit_code) {
            (true, _) => format!("timed out after {:.1}s and was killed", self.seconds),
            (false, Some(0)) => format!("succeeded in {:.1}s", self.seconds),
            (false, Some(c)) => format!("exited with code {c} after {:.1}s", self.seconds),
            (false, None) => format!("was killed by a signal after {:.1}s", self.seconds),
        }
    }

    /// The last lines of its output (stderr first), for an error message.
    pub fn tail(&self, lines: usize) -> String {
        let text = if self.stderr.trim().is_empty() {
            &self.stdout
        } else {
            &self.stderr
        };
        let all: Vec<&str> = text.trim_end().lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// Runs `command` with `sh -c`, extra environment `env`, at most `limit`: on timeout the whole
/// process group is killed, as it is when the returned future is dropped before the command
/// ended. Never fails: a command that cannot start is reported as exit 127.
///
/// The child is a `std::process` child, not a tokio one: tokio's process support would add a
/// reaping step to every sleep of every runtime in the binary, the proxy's included. Its exit is
/// awaited on a blocking thread and its output read through non-blocking pipes.
pub async fn run(command: &str, env: &BTreeMap<String, String>, limit: Duration) -> CommandRun {
    let started = Instant::now();
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return CommandRun {
                command: command.to_owned(),
                exit_code: Some(127),
                timed_out: false,
                seconds: 0.0,
                stdout: String::new(),
                stderr: format!("cannot run sh: {e}"),
            }
        }
    };
    let stdout = tokio::spawn(read_tail(child.stdout.take().map(OwnedFd::from)));
    let stderr = tokio::spawn(read_tail(child.stderr.take().map(OwnedFd::from)));
    let group = Group::new(child);
    let mut exited = group.exited();
    let (exit_code, timed_out) = match tokio::time::timeout(limit, &mut exited).await {
        Ok(Ok(Ok(status))) => (status.code(), false),
        Ok(_) => (None, false),
        Err(_) => {
            group.kill();
            let _ = exited.await;
            (None, true)
        }
    };
    let collect = |h: tokio::task::JoinHandle<String>| async move {
        let abort = h.abort_handle();
        match tokio::time::timeout(OUTPUT_GRACE, h).await {
            Ok(Ok(s)) => s,
            _ => {
                abort.abort();
                "(output still open: a process the command started holds it)".to_owned()
            }
        }
    };
    CommandRun {
        command: command.to_owned(),
        exit_code,
        timed_out,
        seconds: started.elapsed().as_secs_f64(),
        stdout: collect(stdout).await,
        stderr: collect(stderr).await,
    }
}

/// A command's process group, led by its `sh`. The leader is reaped only under the lock and
/// the group is signalled only under the lock while the leader is not reaped, so its PID (the
/// group's id) cannot have been reused by then. Dropping the group kills it.
struct Group {
    leader: Arc<Mutex<Option<std::process::Child>>>,
    pid: Pid,
}

impl Group {
    fn new(child: std::process::Child) -> Group {
        // A PID always fits: the kernel's pid_max is at most 2^22.
        let pid = Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
        Group {
            leader: Arc::new(Mutex::new(Some(child))),
            pid,
        }
    }

    /// The leader's exit status, once it exited (on a blocking thread: waiting for a child
    /// blocks).
    fn exited(&self) -> tokio::task::JoinHandle<io::Result<ExitStatus>> {
        let leader = self.leader.clone();
        let pid = self.pid;
        tokio::task::spawn_blocking(move || {
            // Wait for the exit without reaping, so the PID stays the group's until the lock
            // is held.
            loop {
                match waitid(Id::Pid(pid), WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
                    Ok(_) => break,
                    Err(Errno::EINTR) => continue,
                    Err(e) => return Err(io::Error::from(e)),
                }
            }
            match lock(&leader).take() {
                Some(mut child) => child.wait(),
                None => Err(io::Error::other("the command was already reaped")),
            }
        })
    }

    /// Kills the whole group (sh and whatever it started in the foreground), unless its leader
    /// was reaped already.
    fn kill(&self) {
        let leader = lock(&self.leader);
        if leader.is_some() {
            let _ = killpg(self.pid, Signal::SIGKILL);
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.kill();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Reads a pipe to its end, keeping the last [`OUTPUT_KEPT`] bytes.
async fn read_tail(pipe: Option<OwnedFd>) -> String {
    let Some(fd) = pipe else {
        return String::new();
    };
    let mut stream = match tokio::net::unix::pipe::Receiver::from_owned_fd(fd) {
        Ok(s) => s,
        Err(e) => return format!("(the command's output could not be read: {e})"),
    };
    let mut kept: Vec<u8> = Vec::new();
    let mut buf = [0u8; 8192];
    let mut dropped = false;
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > OUTPUT_KEPT {
                    let cut = kept.len() - OUTPUT_KEPT;
                    kept.drain(..cut);
                    dropped = true;
                }
            }
        }
    }
    let text = String::from_utf8_lossy(&kept).into_owned();
    if dropped {
        format!("[… earlier output dropped]\n{text}")
    } else {
        text
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn values() -> BTreeMap<&'static str, Value> {
        BTreeMap::from([
            ("node", Value::One("pg1".into())),
            ("host", Value::One("10.0.0.1".into())),
            ("port", Value::One("5432".into())),
            ("data_dir", Value::One("/var/lib/pg data/main".into())),
        ])
    }

    #[test]
    fn templates_expand_with_quoted_values_and_literal_braces() {
        let t = Template::parse(
            CommandKind::Upgrade,
            "upgrade.sh {node} {host}:{port} {data_dir} '{{x}}'",
        )
        .unwrap();
        assert!(t.uses("data_dir") && !t.uses("version"));
        assert_eq!(
            t.expand(&values()).unwrap(),
            "upgrade.sh pg1 10.0.0.1:5432 '/var/lib/pg data/main' '{x}'"
        );
    }

    #[test]
    fn bad_templates_are_refused_with_the_flag_and_the_problem() {
        let cases = [
            (CommandKind::Upgrade, "", "empty"),
            (CommandKind::Upgrade, "x {nod}", "unknown placeholder {nod}"),
            (
                CommandKind::Upgrade,
                "x {candidate}",
                "unknown placeholder {candidate}",
            ),
            (CommandKind::Switchover, "x {node", "unclosed {"),
            (CommandKind::Finalize, "x }", "stray }"),
        ];
        for (kind, text, want) in cases {
            let e = Template::parse(kind, text).unwrap_err().to_string();
            assert!(e.starts_with(kind.flag()), "{e}");
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn a_missing_value_is_an_error_and_quoting_survives_hostile_values() {
        let t = Template::parse(CommandKind::Upgrade, "echo {data_dir} {version}").unwrap();
        assert!(t
            .expand(&values())
            .unwrap_err()
            .to_string()
            .contains("{version}"));
        let mut v = values();
        v.insert("version", Value::One("15'; rm -rf / #".into()));
        let line = t.expand(&v).unwrap();
        assert_eq!(line, r"echo '/var/lib/pg data/main' '15'\''; rm -rf / #'");
        v.insert("data_dir", Value::List(vec!["/a b".into(), "/c".into()]));
        v.insert("version", Value::List(vec![]));
        assert_eq!(t.expand(&v).unwrap(), "echo '/a b' /c ");
    }

    #[tokio::test]
    async fn commands_report_exit_codes_output_and_time_limits() {
        let env = BTreeMap::from([("GRAYWIRE_NODE".to_owned(), "pg9".to_owned())]);
        let ok = run(
            "echo out $GRAYWIRE_NODE; echo err >&2",
            &env,
            Duration::from_secs(10),
        )
        .await;
        assert!(ok.succeeded(), "{ok:?}");
        assert_eq!(ok.stdout, "out pg9\n");
        assert_eq!(ok.tail(5), "err");
        let failed = run("echo nope >&2; exit 3", &env, Duration::from_secs(10)).await;
        assert_eq!(failed.exit_code, Some(3));
        assert!(failed.outcome().contains("code 3"));
        let started = Instant::now();
        let slow = run("sleep 30; echo never", &env, Duration::from_millis(300)).await;
        assert!(slow.timed_out && !slow.succeeded(), "{slow:?}");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(slow.outcome().contains("timed out"));
    }

    /// Whether `pid` is still a process (a zombie counts: it was not reaped).
    fn exists(pid: i32) -> bool {
        nix::sys::signal::kill(Pid::from_raw(pid), None).is_ok()
    }

    /// Whether `pid` is still running (a zombie waiting for its parent to reap it is not).
    fn running(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // The state follows the parenthesised command name.
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
            Err(_) => false,
        }
    }

    #[tokio::test]
    async fn a_dropped_run_kills_the_whole_group_and_reaps_its_leader() {
        let dir = tempfile::tempdir().unwrap();
        let pids = dir.path().join("pids");
        let line = format!(
            "echo $$ > '{0}'; sleep 30 & echo $! >> '{0}'; wait",
            pids.display()
        );
        let env = BTreeMap::new();
        // The caller gives up (a cancelled rollout): the future is dropped mid-command.
        let gave_up = tokio::time::timeout(
            Duration::from_millis(500),
            run(&line, &env, Duration::from_secs(60)),
        )
        .await;
        assert!(
            gave_up.is_err(),
            "the command ended on its own: {gave_up:?}"
        );
        let text = std::fs::read_to_string(&pids).unwrap();
        let pids: Vec<i32> = text.lines().map(|l| l.trim().parse().unwrap()).collect();
        assert_eq!(pids.len(), 2, "{text}");
        // sh is graywire's child: it must be reaped, not left a zombie. The background sleep
        // is sh's: it must be killed (its new parent reaps it).
        let (sh, sleep) = (pids[0], pids[1]);
        let deadline = Instant::now() + Duration::from_secs(5);
        while (exists(sh) || running(sleep)) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            !exists(sh),
            "sh ({sh}) of the dropped command was not reaped"
        );
        assert!(
            !running(sleep),
            "the command's background sleep ({sleep}) still runs"
        );
    }
}
