//! The graywire instances in front of the cluster, as the rollout talks to them over their
//! admin APIs: every signal (drain, undrain) goes to all of them, and a step proceeds only when
//! all of them agree on what they see.

use std::time::Duration;

use graywire_api::{admin_address, http_call, DrainReply, GateReply, ProbeStatus};

/// How long a read-only admin call may take.
const CALL_LIMIT: Duration = Duration::from_secs(10);

/// One node as an instance reports it (`GET /v1/nodes`).
pub use graywire_api::Node as NodeView;
/// What one instance sees (`GET /v1/nodes`).
pub use graywire_api::NodeList as ClusterView;

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
    pub async fn connect(urls: &[String], token: Option<String>) -> Result<Fleet, String> {
        if urls.is_empty() {
            return Err("give at least one --admin URL".into());
        }
        let mut instances = Vec::new();
        for url in urls {
            let addr = admin_address(url).map_err(|e| format!("--admin: {e}"))?;
            let mut instance = Instance {
                url: url.trim_end_matches('/').to_owned(),
                addr,
                has_probe: false,
            };
            let (status, body) = call(&instance, "GET", "/v1/gate?window=1s", None, CALL_LIMIT)
                .await
                .map_err(|e| format!("{}: {e}", instance.url))?;
            instance.has_probe = status != 404;
            if !matches!(status, 200 | 503 | 404) {
                return Err(format!(
                    "{}: GET /v1/gate answered {status}: {body}",
                    instance.url
                ));
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
    async fn check_token(&self) -> Result<(), String> {
        let path = "/v1/nodes/graywire-rollout-token-check/undrain";
        for i in &self.instances {
            match call(i, "POST", path, self.token.as_deref(), CALL_LIMIT).await? {
                (404, _) => {}
                (401, _) => {
                    return Err(format!(
                        "{}: the admin token is {} (--token or $GRAYWIRE_ADMIN_TOKEN)",
                        i.url,
                        if self.token.is_some() {
                            "wrong"
                        } else {
                            "missing"
                        }
                    ))
                }
                (status, body) => {
                    return Err(format!(
                        "{}: the token check answered {status}: {body}",
                        i.url
                    ))
                }
            }
        }
        Ok(())
    }

    pub fn has_probe(&self) -> bool {
        self.instances.iter().any(|i| i.has_probe)
    }

    /// What every instance sees, in order.
    pub async fn views(&self) -> Result<Vec<ClusterView>, String> {
        let mut out = Vec::new();
        for i in &self.instances {
            let (status, body) = call(i, "GET", "/v1/nodes", None, CALL_LIMIT).await?;
            if status != 200 {
                return Err(format!(
                    "{}: GET /v1/nodes answered {status}: {body}",
                    i.url
                ));
            }
            let view: ClusterView = serde_json::from_str(&body).map_err(|e| {
                format!(
                    "{}: GET /v1/nodes is not a graywire node list ({e}): {body}",
                    i.url
                )
            })?;
            out.push(view);
        }
        Ok(out)
    }

    /// Drains `node` on every instance, each waiting up to `wait` for it to empty. Errors
    /// name the instance; a drain that did not complete in time is an error with what is left.
    pub async fn drain(&self, node: &str, wait: Duration) -> Result<(), String> {
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
                Ok((url, Ok((202, body)))) => problems.push(format!(
                    "{url}: {node} did not empty within {wait:?}: {}",
                    remaining(&body)
                )),
                Ok((url, Ok((status, body)))) => {
                    problems.push(format!("{url}: drain answered {status}: {body}"))
                }
                Ok((_, Err(e))) => problems.push(e),
                Err(e) => problems.push(format!("drain call failed: {e}")),
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    /// Puts `node` back in rotation on every instance (all are tried even when one fails).
    pub async fn undrain(&self, node: &str) -> Result<(), String> {
        let path = format!("/v1/nodes/{node}/undrain");
        let mut problems = Vec::new();
        for i in &self.instances {
            match call(i, "POST", &path, self.token.as_deref(), CALL_LIMIT).await {
                Ok((200, _)) => {}
                Ok((status, body)) => {
                    problems.push(format!("{}: undrain answered {status}: {body}", i.url))
                }
                Err(e) => problems.push(e),
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    /// The gate over `query` from every instance that runs a probe.
    pub async fn gate(&self, query: &str) -> Result<GateAnswer, String> {
        let mut answer = GateAnswer {
            pass: true,
            reasons: Vec::new(),
            final_failure: false,
            verdicts: Vec::new(),
        };
        for i in self.instances.iter().filter(|i| i.has_probe) {
            let (status, body) =
                call(i, "GET", &format!("/v1/gate?{query}"), None, CALL_LIMIT).await?;
            let verdict: GateReply = serde_json::from_str(&body)
                .map_err(|e| format!("{}: the gate answer is not JSON ({e}): {body}", i.url))?;
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
                _ => return Err(format!("{}: GET /v1/gate answered {status}: {body}", i.url)),
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
    method: &str,
    path: &str,
    token: Option<&str>,
    limit: Duration,
) -> Result<(u16, String), String> {
    http_call(&i.addr, method, path, token, limit)
        .await
        .map_err(|e| format!("{}: {method} {path}: {e}", i.url))
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
}
