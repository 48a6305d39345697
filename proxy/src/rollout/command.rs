//! The operator's commands: templates with `{placeholder}`s, checked when the rollout starts,
//! expanded with shell-quoted values, and run with `sh -c` in their own process group under a
//! time limit, their output captured for the report.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

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
}

/// A command template: text with `{name}` placeholders (`{{` and `}}` are literal braces).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    kind: CommandKind,
    text: String,
    /// The placeholders used, in order of first use.
    used: Vec<String>,
}

enum Piece<'a> {
    Text(&'a str),
    Placeholder(&'a str),
}

/// Splits a template into text and placeholders.
fn pieces(text: &str) -> Result<Vec<Piece<'_>>, String> {
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
            let end = inner
                .find('}')
                .ok_or_else(|| format!("unclosed {{ at byte {i}"))?;
            out.push(Piece::Placeholder(&inner[..end]));
            rest = &inner[end + 1..];
        } else {
            return Err(format!(
                "stray }} at byte {i} (write }}}} for a literal brace)"
            ));
        }
        // Keep byte offsets meaningful only for the first problem; that is enough.
    }
    Ok(out)
}

impl Template {
    /// Parses `text` for `kind`; an unknown placeholder is refused with the list of known ones.
    pub fn parse(kind: CommandKind, text: &str) -> Result<Template, String> {
        let flag = kind.flag();
        if text.trim().is_empty() {
            return Err(format!("{flag}: the command is empty"));
        }
        let mut used: Vec<String> = Vec::new();
        for piece in pieces(text).map_err(|e| format!("{flag}: {e}"))? {
            if let Piece::Placeholder(name) = piece {
                if !kind.placeholders().contains(&name) {
                    return Err(format!(
                        "{flag}: unknown placeholder {{{name}}} (this command may use {})",
                        kind.placeholders()
                            .iter()
                            .map(|p| format!("{{{p}}}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
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
    pub fn expand(&self, values: &BTreeMap<&str, Value>) -> Result<String, String> {
        let mut out = String::with_capacity(self.text.len());
        for piece in pieces(&self.text).map_err(|e| format!("{}: {e}", self.kind.flag()))? {
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
                        return Err(format!(
                            "{}: no value for {{{name}}} here",
                            self.kind.flag()
                        ))
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
/// process group is killed. Never fails: a command that cannot start is reported as exit 127.
pub async fn run(command: &str, env: &BTreeMap<String, String>, limit: Duration) -> CommandRun {
    let started = Instant::now();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
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
    let stdout = tokio::spawn(read_tail(child.stdout.take()));
    let stderr = tokio::spawn(read_tail(child.stderr.take()));
    let (exit_code, timed_out) = match tokio::time::timeout(limit, child.wait()).await {
        Ok(Ok(status)) => (status.code(), false),
        Ok(Err(_)) => (None, false),
        Err(_) => {
            if let Some(pid) = child.id() {
                // The whole group: sh and whatever it started in the foreground.
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = child.wait().await;
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

/// Reads a stream to its end, keeping the last [`OUTPUT_KEPT`] bytes.
async fn read_tail(stream: Option<impl AsyncRead + Unpin>) -> String {
    let Some(mut stream) = stream else {
        return String::new();
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
            let e = Template::parse(kind, text).unwrap_err();
            assert!(e.starts_with(kind.flag()), "{e}");
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn a_missing_value_is_an_error_and_quoting_survives_hostile_values() {
        let t = Template::parse(CommandKind::Upgrade, "echo {data_dir} {version}").unwrap();
        assert!(t.expand(&values()).unwrap_err().contains("{version}"));
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
}
