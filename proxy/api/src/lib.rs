//! graywire's admin API contract: the JSON body of every reply the admin server sends (the
//! server, graywire's `admin.rs`, builds them from these types; `graywire gate`,
//! `graywire rollout` and the tests read them back through them), and [`client`], the small
//! HTTP/1.0 client those callers use.
//!
//! The probe's own endpoints serve the probe's types: `GET /v1/gate` a [`GateReply`] (the
//! probe's [`Verdict`] plus its reasons) and `GET /v1/probe` a [`ProbeStatus`]. Replies that
//! are not 2xx carry an [`ErrorReply`].
//!
//! Counters, flags and `admin_state` read as zero, false or empty when a reply lacks them.

pub mod client;

use serde::{Deserialize, Serialize};

pub use client::{admin_address, http_call, http_get, split_http_response, AdminUrlError};
pub use graywire_probe::gate::{Condition, Verdict};
pub use graywire_probe::status::{ProbeStatus, ReadBackFigures, TotalFigures, WindowFigures};

/// `GET /v1/nodes`: every node, and the proxy's overall state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeList {
    pub nodes: Vec<Node>,
    /// Open client sessions.
    #[serde(default)]
    pub sessions: u64,
    #[serde(default)]
    pub paused: bool,
    #[serde(default)]
    pub split_brain: bool,
    /// The node new transactions that need a primary go to, if one is known.
    pub primary: Option<String>,
}

impl NodeList {
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

/// One node in [`NodeList`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    /// `host:port`.
    pub address: String,
    /// `primary`, `standby` or `unknown`.
    pub role: String,
    /// `up`, `down`, `draining` or `drained`.
    pub state: String,
    /// What an operator set: `active`, `draining` or `drained`.
    #[serde(default)]
    pub admin_state: String,
    /// `server_version`, once a health check has seen it.
    pub version: Option<String>,
    /// Unix seconds the postmaster started.
    pub started_at: Option<f64>,
    pub lag_bytes: Option<u64>,
    /// Replay delay of a standby (None for a primary or when unknown).
    pub lag_seconds: Option<f64>,
    #[serde(default)]
    pub sessions: i64,
    #[serde(default)]
    pub backend_connections: i64,
    #[serde(default)]
    pub pinned_sessions: i64,
    pub last_error: Option<String>,
}

impl Node {
    pub fn host(&self) -> &str {
        self.address
            .rsplit_once(':')
            .map_or(self.address.as_str(), |(h, _)| h)
    }

    pub fn port(&self) -> &str {
        self.address.rsplit_once(':').map_or("", |(_, p)| p)
    }

    /// One line for messages: state, role, version and lag.
    pub fn describe(&self) -> String {
        format!(
            "state {}, role {}, version {}, lag {}",
            self.state,
            self.role,
            self.version.as_deref().unwrap_or("unknown"),
            self.lag_bytes
                .map_or_else(|| "unknown".to_owned(), |b| format!("{b} bytes"))
        )
    }
}

/// `POST /v1/nodes/{name}/drain?wait=…`: 200 when the node emptied, 202 when it did not
/// within the wait.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrainReply {
    pub node: String,
    /// The node's state after the call (`removed` if it left the config meanwhile).
    pub state: String,
    pub drained: bool,
    pub waited_seconds: f64,
    pub remaining: Remaining,
}

/// What is still on a node being drained.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Remaining {
    #[serde(default)]
    pub sessions: i64,
    #[serde(default)]
    pub backend_connections: i64,
    #[serde(default)]
    pub pinned_sessions: i64,
}

/// `POST /v1/nodes/{name}/undrain`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UndrainReply {
    pub node: String,
    /// Always `active`.
    pub state: String,
    /// The operator state before: `active`, `draining` or `drained`.
    pub was: String,
}

/// `POST /v1/pause` and `POST /v1/resume`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PauseReply {
    pub paused: bool,
    pub was_paused: bool,
}

/// `GET /readyz` when ready (otherwise 503 with an [`ErrorReply`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadyReply {
    /// Always true.
    pub ready: bool,
    pub primary: String,
}

/// `GET /v1/gate?…`: 200 when the verdict passes, 503 when it fails.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateReply {
    #[serde(flatten)]
    pub verdict: Verdict,
    /// The failing conditions, one line each ([`Verdict::reasons`]).
    #[serde(default)]
    pub reasons: Vec<String>,
}

impl From<Verdict> for GateReply {
    fn from(verdict: Verdict) -> GateReply {
        GateReply {
            reasons: verdict.reasons(),
            verdict,
        }
    }
}

/// Every error reply: 400, 401, 404, 405, 503.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub error: String,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_gate_reply_is_the_verdict_with_its_reasons_alongside() {
        let verdict = Verdict {
            pass: false,
            window_seconds: 30.0,
            conditions: vec![Condition {
                name: "gaps".into(),
                pass: false,
                bound: "<= 0".into(),
                measured: "2".into(),
            }],
        };
        let json = serde_json::to_value(GateReply::from(verdict.clone())).unwrap();
        assert_eq!(json["conditions"][0]["name"], "gaps");
        assert_eq!(json["reasons"][0], "gaps: measured 2, bound <= 0");
        let back: GateReply = serde_json::from_value(json).unwrap();
        assert_eq!(back.verdict, verdict);
    }
}
