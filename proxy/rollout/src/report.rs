//! What a rollout did: per node, each step with its timing, command output and outcome; the
//! availability the probe measured over the whole rollout; and, when it stopped, what failed
//! and what to do. Rendered for people ([`Report::human`]) and as JSON (`--json`).

use std::fmt::Write as _;

use std::collections::BTreeMap;

use graywire_api::ProbeStatus;
use serde::Serialize;

use super::command::CommandRun;
use super::{Failure, Step};

#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    pub step: Step,
    /// Seconds since the rollout started.
    pub started_seconds: f64,
    pub seconds: f64,
    pub ok: bool,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<CommandRun>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeReport {
    pub name: String,
    pub was_primary: bool,
    pub version_before: Option<String>,
    pub version_after: Option<String>,
    /// `upgraded`, `skipped: …`, `failed`, `not reached`.
    pub outcome: String,
    pub steps: Vec<StepRecord>,
}

/// The probe's figures over the rollout.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Availability {
    pub window_seconds: f64,
    pub writes_acked: u64,
    pub failed_attempts: u64,
    pub max_stall_seconds: f64,
    pub disruption_seconds: f64,
    /// Over the probe's whole life (the read-back counts everything it has seen).
    pub lost_writes: u64,
    pub gaps: u64,
    /// Errors the probe's writes got, by SQLSTATE.
    pub errors: BTreeMap<String, u64>,
}

impl Availability {
    /// From `GET /v1/probe?window=…`.
    pub fn from_probe(status: &ProbeStatus) -> Availability {
        let w = &status.window;
        let rb = &status.read_back;
        Availability {
            window_seconds: status.window_seconds,
            writes_acked: w.acked,
            failed_attempts: w.failed_attempts,
            max_stall_seconds: w.max_stall_seconds,
            disruption_seconds: w.disruption_seconds,
            lost_writes: rb.lost_writes,
            gaps: rb.gaps,
            errors: w.errors.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub ok: bool,
    /// Unix seconds.
    pub started_at: f64,
    pub seconds: f64,
    pub target_version: Option<String>,
    pub instances: Vec<String>,
    pub nodes: Vec<NodeReport>,
    /// Preflight and the final checks (not about one node).
    pub checks: Vec<StepRecord>,
    pub availability: Option<Availability>,
    pub finalize: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finalize_command: Option<CommandRun>,
    pub failure: Option<Failure>,
}

impl Report {
    /// The report for people.
    pub fn human(&self) -> String {
        let mut out = String::new();
        let verdict = if self.ok { "SUCCEEDED" } else { "FAILED" };
        let target = self
            .target_version
            .as_deref()
            .map(|v| format!(", target {v}"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "graywire rollout {verdict} after {:.1}s{target} ({} instance{})",
            self.seconds,
            self.instances.len(),
            if self.instances.len() == 1 { "" } else { "s" }
        );
        for n in &self.nodes {
            let _ = writeln!(
                out,
                "  {:<10} {:<8} {} → {}  {}",
                n.name,
                if n.was_primary { "primary" } else { "standby" },
                short_version(n.version_before.as_deref()),
                short_version(n.version_after.as_deref()),
                n.outcome
            );
            if !n.steps.is_empty() {
                let steps: Vec<String> = n
                    .steps
                    .iter()
                    .map(|s| {
                        format!(
                            "{} {:.1}s{}",
                            s.step.as_str(),
                            s.seconds,
                            if s.ok { "" } else { " FAILED" }
                        )
                    })
                    .collect();
                let _ = writeln!(out, "             {}", steps.join(" · "));
            }
        }
        if let Some(a) = &self.availability {
            let _ = writeln!(
                out,
                "  measured by the probe over {:.1}s: {} writes acknowledged, {} failed attempts, \
                 max stall {:.3}s, disruption {:.3}s, lost writes {}, gaps {}",
                a.window_seconds,
                a.writes_acked,
                a.failed_attempts,
                a.max_stall_seconds,
                a.disruption_seconds,
                a.lost_writes,
                a.gaps
            );
        }
        let _ = writeln!(out, "  finalize: {}", self.finalize);
        if let Some(f) = &self.failure {
            let _ = writeln!(
                out,
                "\nSTOPPED at {}{}: {}",
                f.node
                    .as_deref()
                    .map(|n| format!("{n}, "))
                    .unwrap_or_default(),
                f.step.as_str(),
                f.what
            );
            if let Some(run) = self.failed_command() {
                let tail = run.tail(20);
                if !tail.is_empty() {
                    let _ = writeln!(out, "  command: {}\n  its last output:", run.command);
                    for line in tail.lines() {
                        let _ = writeln!(out, "    | {line}");
                    }
                }
            }
            let _ = writeln!(out, "  {}", f.advice);
        }
        out
    }

    /// The command of the failed step, if it ran one.
    fn failed_command(&self) -> Option<&CommandRun> {
        if let Some(c) = &self.finalize_command {
            if !c.succeeded() {
                return Some(c);
            }
        }
        self.nodes
            .iter()
            .flat_map(|n| &n.steps)
            .filter(|s| !s.ok)
            .find_map(|s| s.command.as_ref())
    }
}

/// `15.20` out of `15.20 (Debian 15.20-0+deb12u1)`.
fn short_version(v: Option<&str>) -> &str {
    v.and_then(|v| v.split_whitespace().next()).unwrap_or("?")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_report_names_the_step_the_output_and_the_advice() {
        let run = CommandRun {
            command: "upgrade.sh pg1".into(),
            exit_code: Some(3),
            timed_out: false,
            seconds: 0.2,
            stdout: String::new(),
            stderr: "pg_ctl: could not start server\n".into(),
        };
        let r = Report {
            ok: false,
            started_at: 0.0,
            seconds: 12.5,
            target_version: Some("15.20".into()),
            instances: vec!["http://127.0.0.1:9930".into()],
            nodes: vec![NodeReport {
                name: "pg1".into(),
                was_primary: false,
                version_before: Some("15.18 (Debian 15.18-0+deb12u1)".into()),
                version_after: None,
                outcome: "failed".into(),
                steps: vec![StepRecord {
                    step: Step::Upgrade,
                    started_seconds: 1.0,
                    seconds: 0.2,
                    ok: false,
                    detail: run.outcome(),
                    command: Some(run),
                }],
            }],
            checks: vec![],
            availability: Some(Availability::from_probe(&ProbeStatus {
                window_seconds: 12.5,
                window: graywire_api::WindowFigures {
                    acked: 120,
                    failed_attempts: 0,
                    max_stall_seconds: 0.1,
                    disruption_seconds: 0.0,
                    ..Default::default()
                },
                ..Default::default()
            })),
            finalize: "not run: the rollout stopped".into(),
            finalize_command: None,
            failure: Some(Failure {
                node: Some("pg1".into()),
                step: Step::Upgrade,
                what: "the upgrade command exited with code 3".into(),
                advice: "pg1 stays drained.".into(),
            }),
        };
        let text = r.human();
        for want in [
            "FAILED after 12.5s, target 15.20",
            "pg1        standby  15.18 → ?  failed",
            "upgrade 0.2s FAILED",
            "120 writes acknowledged",
            "STOPPED at pg1, upgrade: the upgrade command exited with code 3",
            "| pg_ctl: could not start server",
            "pg1 stays drained.",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["failure"]["step"], "upgrade");
        assert_eq!(json["nodes"][0]["steps"][0]["command"]["exit_code"], 3);
    }
}
