//! The graywire instances in front of the cluster, as the rollout talks to them over their
//! admin APIs: every signal (drain, undrain) goes to all of them, and a step proceeds only when
//! all of them agree on what they see.

use std::time::Duration;

use graywire_api::{admin_address, http_call, AdminUrlError, DrainReply, GateReply, ProbeStatus};

/// How long a read-only admin call may take.
const CALL_LIMIT: Duration = Duration::from_secs(10);

/// One node as an instance reports it (`GET /v1/nodes`).
pub use graywire_api::Node as NodeView;
/// What one instance sees (`GET /v1/nodes`).
pub use graywire_api::NodeList as ClusterView;

/// What went wrong talking to the instances; every variant names the instance (its URL).
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("give at least one --admin URL")]
    NoInstances,
    #[error("--admin: {0}")]
    BadUrl(#[from] AdminUrlError),
    /// The request got no answer.
    #[error("{url}: {method} {path}: {reason}")]
    Call {
        url: String,
        method: &'static str,
        path: String,
        reason: std::io::Error,
    },
    /// An instance that did not answer while the fleet was being put together.
    #[error("{url}: {reason}")]
    Unreachable {
        url: String,
        reason: Box<FleetError>,
    },
    /// An answer with a status the call does not expect.
    #[error("{url}: {call} answered {status}: {body}")]
    Answered {
        url: String,
        call: &'static str,
        status: u16,
        body: String,
    },
    #[error(
        "{url}: the admin token is {} (--token or $GRAYWIRE_ADMIN_TOKEN)",
        if *.given { "wrong" } else { "missing" }
    )]
    Token { url: String, given: bool },
    #[error("{url}: GET /v1/nodes is not a graywire node list ({reason}): {body}")]
    NotNodeList {
        url: String,
        reason: serde_json::Error,
        body: String,
    },
    #[error("{url}: the gate answer is not JSON ({reason}): {body}")]
    NotVerdict {
        url: String,
        reason: serde_json::Error,
        body: String,
    },
    /// A drain that did not complete within its wait, with what is left (JSON).
    #[error("{url}: {node} did not empty within {wait:?}: {remaining}")]
    NotEmptied {
        url: String,
        node: String,
        wait: Duration,
        remaining: String,
    },
    #[error("drain call failed: {0}")]
    DrainTask(tokio::task::JoinError),
    /// One problem per instance, for calls that go to all of them.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Several(Vec<FleetError>),
}

impl FleetError {
    /// `problems` as one error, or `Ok` when there are none.
    fn from_problems(mut problems: Vec<FleetError>) -> Result<(), FleetError> {
        match problems.len() {
            0 => Ok(()),
            1 => Err(problems.remove(0)),
            _ => Err(FleetError::Several(problems)),
        }
    }
}

/// One graywire instance.
#[derive(Debug, Clone)]
pub struct Instance {
    pub url: String,
    addr: String,
    /// Runs a probe, so it can answer the gate.
    pub has_probe: bool,
}

/// A gate verdict from every instance that runs a probe.
#[derive(Debug, Clone)]
pub struct GateAnswer {
    pub pass: bool,
    /// `url: condition: measured …, bound …` for every failing condition.
    pub reasons: Vec<String>,
    /// A failing condition that waiting cannot fix (a lost write, a gap, a stall or a slow
    /// write inside the window stays inside it as the window grows).
    pub final_failure: bool,
    /// The verdicts, as the instances gave them.
    pub verdicts: Vec<GateReply>,
}

/// Conditions whose failure does not heal while the window keeps covering the step.
const LASTING_CONDITIONS: &[&str] = &["lost_writes", "gaps", "max_stall", "write_latency_p99"];

/// The instances.
#[derive(Debug, Clone)]
pub struct Fleet {
    pub instances: Vec<Instance>,
    token: Option<String>,
}

impl Fleet {
    /// Checks every URL answers `/v1/nodes` and finds which instances run a probe.
    pub async fn connect(urls: &[String], token: Option<String>) -> Result<Fleet, FleetError> {
        if urls.is_empty() {
            return Err(FleetError::NoInstances);
        }
        let mut instances = Vec::new();
        for url in urls {
            let addr = admin_address(url)?;
            let mut instance = Instance {
                url: url.trim_end_matches('/').to_owned(),
                addr,
                has_probe: false,
            };
            let (status, body) = call(&instance, "GET", "/v1/gate?window=1s", None, CALL_LIMIT)
                .await
                .map_err(|e| FleetError::Unreachable {
                    url: instance.url.clone(),
                    reason: Box::new(e),
                })?;
            instance.has_probe = status != 404;
            if !matches!(status, 200 | 503 | 404) {
                return Err(FleetError::Answered {
                    url: instance.url,
                    call: "GET /v1/gate",
                    status,
                    body,
                });
            }
            instances.push(instance);
        }
        let fleet = Fleet { instances, token };
        fleet.views().await?;
        fleet.check_token().await?;
        Ok(fleet)
    }

    /// Checks every instance accepts the token for mutating calls, without changing
    /// anything: an undrain of a node that does not exist answers 404 when authorized and 401
    /// when not.
    async fn check_token(&self) -> Result<(), FleetError> {
        let path = "/v1/nodes/graywire-rollout-token-check/undrain";
        for i in &self.instances {
            match call(i, "POST", path, self.token.as_deref(), CALL_LIMIT).await? {
                (404, _) => {}
                (401, _) => {
                    return Err(FleetError::Token {
                        url: i.url.clone(),
                        given: self.token.is_some(),
                    })
                }
                (status, body) => {
                    return Err(FleetError::Answered {
                        url: i.url.clone(),
                        call: "the token check",
                        status,
                        body,
                    })
                }
            }
        }
        Ok(())
    }

    pub fn has_probe(&self) -> bool {
        self.instances.iter().any(|i| i.has_probe)
    }

    /// What every instance sees, in order.
    pub async fn views(&self) -> Result<Vec<ClusterView>, FleetError> {
        let mut out = Vec::new();
        for i in &self.instances {
            let (status, body) = call(i, "GET", "/v1/nodes", None, CALL_LIMIT).await?;
            if status != 200 {
                return Err(FleetError::Answered {
                    url: i.url.clone(),
                    call: "GET /v1/nodes",
                    status,
                    body,
                });
            }
            let view: ClusterView = match serde_json::from_str(&body) {
                Ok(v) => v,
                Err(reason) => {
                    return Err(FleetError::NotNodeList {
                        url: i.url.clone(),
                        reason,
                        body,
                    })
                }
            };
            out.push(view);
        }
        Ok(out)
    }

    /// Drains `node` on every instance, each waiting up to `wait` for it to empty. Errors
    /// name the instance; a drain that did not complete in time is an error with what is left.
    pub async fn drain(&self, node: &str, wait: Duration) -> Result<(), FleetError> {
        let path = format!("/v1/nodes/{node}/drain?wait={}ms", wait.as_millis());
        let mut calls = Vec::new();
        for i in &self.instances {
            let path = path.clone();
            let token = self.token.clone();
            let i = i.clone();
            calls.push(tokio::spawn(async move {
                let answer = call(&i, "POST", &path, token.as_deref(), wait + CALL_LIMIT).await;
                (i.url, answer)
            }));
        }
        let mut problems = Vec::new();
        for c in calls {
            match c.await {
                Ok((_, Ok((200, _)))) => {}
                Ok((url, Ok((202, body)))) => problems.push(FleetError::NotEmptied {
                    url,
                    node: node.to_owned(),
                    wait,
                    remaining: remaining(&body),
                }),
                Ok((url, Ok((status, body)))) => problems.push(FleetError::Answered {
                    url,
                    call: "drain",
                    status,
                    body,
                }),
                Ok((_, Err(e))) => problems.push(e),
                Err(e) => problems.push(FleetError::DrainTask(e)),
            }
        }
        FleetError::from_problems(problems)
    }

    /// Puts `node` back in rotation on every instance (all are tried even when one fails).
    pub async fn undrain(&self, node: &str) -> Result<(), FleetError> {
        let path = format!("/v1/nodes/{node}/undrain");
        let mut problems = Vec::new();
        for i in &self.instances {
            match call(i, "POST", &path, self.token.as_deref(), CALL_LIMIT).await {
                Ok((200, _)) => {}
                Ok((status, body)) => problems.push(FleetError::Answered {
                    url: i.url.clone(),
                    call: "undrain",
                    status,
                    body,
                }),
                Err(e) => problems.push(e),
            }
        }
        FleetError::from_problems(problems)
    }

    /// The gate over `query` from every instance that runs a probe.
    pub async fn gate(&self, query: &str) -> Result<GateAnswer, FleetError> {
        let mut answer = GateAnswer {
            pass: true,
            reasons: Vec::new(),
            final_failure: false,
            verdicts: Vec::new(),
        };
        for i in self.instances.iter().filter(|i| i.has_probe) {
            let (status, body) =
                call(i, "GET", &format!("/v1/gate?{query}"), None, CALL_LIMIT).await?;
            let verdict: GateReply = match serde_json::from_str(&body) {
                Ok(v) => v,
                Err(reason) => {
                    return Err(FleetError::NotVerdict {
                        url: i.url.clone(),
                        reason,
                        body,
                    })
                }
            };
            match status {
                200 => {}
                503 => {
                    answer.pass = false;
                    for c in verdict.verdict.conditions.iter().filter(|c| !c.pass) {
                        let name = c.name.as_ref();
                        answer.final_failure |= LASTING_CONDITIONS.contains(&name);
                        answer.reasons.push(format!(
                            "{}: {name}: measured {}, bound {}",
                            i.url, c.measured, c.bound
                        ));
                    }
                }
                _ => {
                    return Err(FleetError::Answered {
                        url: i.url.clone(),
                        call: "GET /v1/gate",
                        status,
                        body,
                    })
                }
            }
            answer.verdicts.push(verdict);
        }
        Ok(answer)
    }

    /// The probe's figures over `window` from the first instance that runs a probe.
    pub async fn probe_status(&self, window: Duration) -> Option<ProbeStatus> {
        let i = self.instances.iter().find(|i| i.has_probe)?;
        let path = format!("/v1/probe?window={}ms", window.as_millis().max(1));
        match call(i, "GET", &path, None, CALL_LIMIT).await {
            Ok((200, body)) => serde_json::from_str(&body).ok(),
            _ => None,
        }
    }
}

async fn call(
    i: &Instance,
    method: &'static str,
    path: &str,
    token: Option<&str>,
    limit: Duration,
) -> Result<(u16, String), FleetError> {
    http_call(&i.addr, method, path, token, limit)
        .await
        .map_err(|reason| FleetError::Call {
            url: i.url.clone(),
            method,
            path: path.to_owned(),
            reason,
        })
}

/// What a 202 drain answer says is left on the node, as JSON (keys in alphabetical order,
/// as the server writes them).
fn remaining(body: &str) -> String {
    serde_json::from_str::<DrainReply>(body)
        .ok()
        .and_then(|r| serde_json::to_value(r.remaining).ok())
        .map(|v| v.to_string())
        .unwrap_or_else(|| body.to_owned())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn node_views_parse_the_admin_api_and_split_their_address() {
        let body = r#"{"nodes":[{"name":"pg1","address":"127.0.0.1:5433","role":"standby",
            "state":"drained","version":"15.20 (Debian 15.20-0+deb12u1)","started_at":1.5e9,
            "lag_bytes":0,"lag_seconds":0.0,"sessions":0,"backend_connections":0,
            "pinned_sessions":0,"last_error":null}],"sessions":3,"paused":false,
            "split_brain":false,"primary":"pg0"}"#;
        let v: ClusterView = serde_json::from_str(body).unwrap();
        let n = v.node("pg1").unwrap();
        assert_eq!((n.host(), n.port()), ("127.0.0.1", "5433"));
        assert_eq!(v.primary.as_deref(), Some("pg0"));
        assert!(n
            .describe()
            .contains("state drained, role standby, version 15.20"));
    }

    #[test]
    fn fleet_errors_name_the_instance_and_join_per_instance_problems() {
        let call = |url: &str| FleetError::Call {
            url: url.into(),
            method: "GET",
            path: "/v1/nodes".into(),
            reason: std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer within 10s"),
        };
        assert_eq!(
            call("http://a:1").to_string(),
            "http://a:1: GET /v1/nodes: no answer within 10s"
        );
        let token = |given| FleetError::Token {
            url: "http://a:1".into(),
            given,
        };
        assert_eq!(
            token(false).to_string(),
            "http://a:1: the admin token is missing (--token or $GRAYWIRE_ADMIN_TOKEN)"
        );
        assert!(token(true).to_string().contains("the admin token is wrong"));
        let drained = FleetError::NotEmptied {
            url: "http://b:2".into(),
            node: "pg1".into(),
            wait: Duration::from_secs(1),
            remaining: remaining(
                r#"{"node":"pg1","state":"draining","drained":false,"waited_seconds":1.0,
                   "remaining":{"sessions":1,"backend_connections":1,"pinned_sessions":1}}"#,
            ),
        };
        let both = FleetError::from_problems(vec![call("http://a:1"), drained]).unwrap_err();
        assert_eq!(
            both.to_string(),
            "http://a:1: GET /v1/nodes: no answer within 10s; http://b:2: pg1 did not empty \
             within 1s: {\"backend_connections\":1,\"pinned_sessions\":1,\"sessions\":1}"
        );
        assert!(FleetError::from_problems(Vec::new()).is_ok());
    }
}
