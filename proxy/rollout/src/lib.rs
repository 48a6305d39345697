//! `graywire rollout`: a rolling upgrade of every node behind one or more graywire instances,
//! one node at a time, never moving on until the measurements say the last step did no harm.
//!
//! ```text
//!   preflight ── every instance sees the same nodes and primary, none down, a probe runs,
//!       │        and the gate passes over the settle window
//!       ▼
//!   for each standby, then the primary:
//!   drain (wait) ──▶ [primary: switchover command ──▶ new primary seen by every instance]
//!       ──▶ upgrade command ──▶ node back: restarted, expected role and version, caught up
//!       ──▶ settle, then the gate over the whole step passes ──▶ undrain
//!       ▼
//!   every node on the target version and the gate over the whole rollout passes
//!       ──▶ finalize command (unless --preserve-downgrade)
//! ```
//!
//! Any failure stops the rollout where it is: the node stays drained (so no transaction is
//! routed to a node in an unknown state), the report says what failed and what to do. One
//! exception keeps writes alive: when the switchover did not produce a new primary and the old
//! one still serves, the old primary is undrained again.
//!
//! Modules: [`command`] (templates, running them), [`fleet`] (the instances' admin APIs),
//! [`plan`] (preflight checks and the order; pure), [`runner`] (the steps), [`report`] (what
//! happened, human and JSON), [`progress`] (the live display).
//!
//! This crate depends on `graywire-api`, not on `graywire`: it reaches graywire instances only
//! through their admin API, and the compiler holds it to that.
#![allow(clippy::disallowed_methods)] // `graywire rollout` runs on a runtime with tokio's timer.

pub mod cli;
pub mod command;
pub mod fleet;
pub mod plan;
pub mod progress;
pub mod report;
pub mod runner;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use graywire_probe::gate::GateQuery;
use serde::Serialize;

pub use command::{CommandKind, Template};
pub use fleet::Fleet;
pub use plan::Plan;
pub use report::Report;

/// Everything a rollout is asked to do.
#[derive(Debug, Clone)]
pub struct RolloutSpec {
    /// The admin URLs of every graywire instance in front of the cluster.
    pub admin_urls: Vec<String>,
    /// The admin token (the same for every instance), for drain and undrain.
    pub token: Option<String>,
    pub upgrade: Template,
    /// Required when the primary is to be upgraded.
    pub switchover: Option<Template>,
    pub finalize: Option<Template>,
    pub preserve_downgrade: bool,
    /// The version every upgraded node must report (`15.20` matches `15.20 (Debian …)`).
    pub expect_version: Option<String>,
    /// Data directories by node name, for `{data_dir}` and friends.
    pub data_dirs: BTreeMap<String, PathBuf>,
    /// The gate's bounds; its window is set per step.
    pub gate: GateQuery,
    /// How long a node must be back, and the gate passing, before the next node.
    pub settle: Duration,
    /// How far behind a standby may be to count as caught up.
    pub max_lag_bytes: u64,
    pub drain_timeout: Duration,
    pub command_timeout: Duration,
    /// How long a node (or a new primary) gets to come back.
    pub ready_timeout: Duration,
    /// How long after the settle window the gate gets to pass.
    pub gate_timeout: Duration,
}

/// A step of the rollout, for progress and the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Preflight,
    Drain,
    Switchover,
    WaitPrimary,
    Upgrade,
    WaitReady,
    Gate,
    Undrain,
    Verify,
    Finalize,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Preflight => "preflight",
            Step::Drain => "drain",
            Step::Switchover => "switchover",
            Step::WaitPrimary => "wait for new primary",
            Step::Upgrade => "upgrade",
            Step::WaitReady => "wait until back",
            Step::Gate => "gate",
            Step::Undrain => "undrain",
            Step::Verify => "verify",
            Step::Finalize => "finalize",
        }
    }
}

/// Why the rollout stopped.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    /// The node being worked on, if any.
    pub node: Option<String>,
    pub step: Step,
    /// What failed, measured.
    pub what: String,
    /// The state the rollout left the cluster in, and what to do next.
    pub advice: String,
}

/// Whether a reported `server_version` is `expected`: equal, or `expected` followed by
/// anything but a digit (`15.20 (Debian …)` is 15.20 and is 15; `15.200` is not 15.20).
pub fn version_matches(reported: &str, expected: &str) -> bool {
    reported
        .strip_prefix(expected)
        .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn versions_match_on_whole_components() {
        assert!(version_matches("15.20 (Debian 15.20-0+deb12u1)", "15.20"));
        assert!(version_matches("15.20", "15.20"));
        assert!(!version_matches("15.200", "15.20"));
        assert!(!version_matches("15.2", "15.20"));
        assert!(!version_matches("15.18 (Debian 15.18-0+deb12u1)", "15.20"));
        assert!(version_matches("15.20 (Debian 15.20-0+deb12u1)", "15"));
    }
}
