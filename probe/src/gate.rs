//! The gate: a yes/no verdict over a time window, from the probe's figures and (when the
//! probe runs inside graywire) the nodes' states, with every condition named, bounded and
//! measured. Pure: [`evaluate`] takes figures, returns a verdict.
//!
//! Conditions always checked, because a gate must never pass blind:
//! - no lost write (an acknowledged id missing on read-back) in the window;
//! - at least one write acknowledged in the window;
//! - the verifier read the table back recently.
//!
//! Optional bounds: `max_stall`, `max_gaps`, `max_p99`, `max_lag` (and every node up, when node
//! figures are given).

use std::borrow::Cow;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ledger::WindowStats;

/// Longest window a gate may be asked about.
pub const MAX_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// Why a gate query (an HTTP query string, or `graywire gate`'s and `graywire rollout`'s
/// flags) was refused; each names its parameter.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GateQueryError {
    #[error("{key}={value:?} is not a duration (e.g. 500ms, 30s): {reason}")]
    NotADuration {
        key: String,
        value: String,
        reason: humantime::DurationError,
    },
    #[error("{key}={value} is longer than {MAX_WINDOW:?}")]
    TooLong { key: String, value: String },
    #[error("window must be longer than zero")]
    ZeroWindow,
    #[error("max_gaps={value:?} is not a whole number")]
    NotAWholeNumber { value: String },
    #[error("unknown parameter {name:?} (window, max_stall, max_gaps, max_p99, max_lag)")]
    UnknownParameter { name: String },
}

/// What the caller asks for. Parsed from `window=30s&max_stall=1s&…` by [`GateQuery::parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateQuery {
    pub window: Duration,
    pub max_stall: Option<Duration>,
    pub max_gaps: Option<u64>,
    pub max_p99: Option<Duration>,
    pub max_lag: Option<Duration>,
}

impl Default for GateQuery {
    fn default() -> Self {
        GateQuery {
            window: Duration::from_secs(30),
            max_stall: None,
            max_gaps: None,
            max_p99: None,
            max_lag: None,
        }
    }
}

impl GateQuery {
    /// Parses a URL query string; every problem is reported with its parameter.
    pub fn parse(query: &str) -> Result<GateQuery, GateQueryError> {
        let mut q = GateQuery::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            q.set(k, v)?;
        }
        Ok(q)
    }

    /// Sets one parameter (shared by the HTTP query and the CLI flags).
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), GateQueryError> {
        let duration = |v: &str| -> Result<Duration, GateQueryError> {
            let d =
                humantime::parse_duration(v).map_err(|reason| GateQueryError::NotADuration {
                    key: key.to_owned(),
                    value: v.to_owned(),
                    reason,
                })?;
            if d > MAX_WINDOW {
                return Err(GateQueryError::TooLong {
                    key: key.to_owned(),
                    value: v.to_owned(),
                });
            }
            Ok(d)
        };
        match key {
            "window" => {
                let d = duration(value)?;
                if d.is_zero() {
                    return Err(GateQueryError::ZeroWindow);
                }
                self.window = d;
            }
            "max_stall" => self.max_stall = Some(duration(value)?),
            "max_p99" => self.max_p99 = Some(duration(value)?),
            "max_lag" => self.max_lag = Some(duration(value)?),
            "max_gaps" => {
                self.max_gaps =
                    Some(value.parse().map_err(|_| GateQueryError::NotAWholeNumber {
                        value: value.to_owned(),
                    })?)
            }
            other => {
                return Err(GateQueryError::UnknownParameter {
                    name: other.to_owned(),
                })
            }
        }
        Ok(())
    }

    /// The query string that means this query.
    pub fn to_query(&self) -> String {
        let mut parts = vec![format!("window={}", fmt(self.window))];
        if let Some(d) = self.max_stall {
            parts.push(format!("max_stall={}", fmt(d)));
        }
        if let Some(n) = self.max_gaps {
            parts.push(format!("max_gaps={n}"));
        }
        if let Some(d) = self.max_p99 {
            parts.push(format!("max_p99={}", fmt(d)));
        }
        if let Some(d) = self.max_lag {
            parts.push(format!("max_lag={}", fmt(d)));
        }
        parts.join("&")
    }
}

fn fmt(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// One node as the gate sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeFigure {
    pub name: String,
    /// Answering health checks. A node an operator drained is still up: draining is how
    /// upgrades are done, and the gate is what they wait on.
    pub up: bool,
    /// Taken out of rotation by an operator (draining or drained).
    pub drained: bool,
    /// Replication lag of a standby, seconds (None for a primary or when unknown).
    pub lag_seconds: Option<f64>,
    pub is_standby: bool,
}

/// The probe's figures the gate needs besides the window stats.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReadBack {
    /// Gaps among ids first sent in the window.
    pub gaps_in_window: u64,
    /// Lost writes detected, or sent, in the window.
    pub lost_in_window: u64,
    /// When the verifier last read the table back successfully (seconds ago), if ever.
    pub verified_ago: Option<Duration>,
    /// How old a read-back may be before the gate calls the probe blind.
    pub verify_deadline: Duration,
}

/// One condition of the verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Condition {
    /// Static when evaluated here; owned when read back from `GET /v1/gate`.
    pub name: Cow<'static, str>,
    pub pass: bool,
    pub bound: String,
    pub measured: String,
}

/// The verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub pass: bool,
    pub window_seconds: f64,
    pub conditions: Vec<Condition>,
}

impl Verdict {
    /// The failing conditions, one line each.
    pub fn reasons(&self) -> Vec<String> {
        self.conditions
            .iter()
            .filter(|c| !c.pass)
            .map(|c| format!("{}: measured {}, bound {}", c.name, c.measured, c.bound))
            .collect()
    }
}

fn secs(d: Duration) -> String {
    format!("{:.3}s", d.as_secs_f64())
}

/// Evaluates `query` over the figures.
pub fn evaluate(
    query: &GateQuery,
    stats: &WindowStats,
    read_back: &ReadBack,
    nodes: Option<&[NodeFigure]>,
) -> Verdict {
    let mut c = Vec::new();
    c.push(Condition {
        name: Cow::Borrowed("lost_writes"),
        pass: read_back.lost_in_window == 0,
        bound: "0".into(),
        measured: read_back.lost_in_window.to_string(),
    });
    c.push(Condition {
        name: Cow::Borrowed("writes_acknowledged"),
        pass: stats.acked > 0,
        bound: ">= 1".into(),
        measured: stats.acked.to_string(),
    });
    c.push(Condition {
        name: Cow::Borrowed("read_back_fresh"),
        pass: read_back
            .verified_ago
            .is_some_and(|a| a <= read_back.verify_deadline),
        bound: format!("<= {}", secs(read_back.verify_deadline)),
        measured: read_back
            .verified_ago
            .map_or_else(|| "never".to_owned(), secs),
    });
    if let Some(max) = query.max_stall {
        c.push(Condition {
            name: Cow::Borrowed("max_stall"),
            pass: stats.max_stall <= max,
            bound: format!("<= {}", secs(max)),
            measured: secs(stats.max_stall),
        });
    }
    if let Some(max) = query.max_gaps {
        c.push(Condition {
            name: Cow::Borrowed("gaps"),
            pass: read_back.gaps_in_window <= max,
            bound: format!("<= {max}"),
            measured: read_back.gaps_in_window.to_string(),
        });
    }
    if let Some(max) = query.max_p99 {
        c.push(Condition {
            name: Cow::Borrowed("write_latency_p99"),
            pass: stats.latency_p99.is_some_and(|p| p <= max),
            bound: format!("<= {}", secs(max)),
            measured: stats.latency_p99.map_or_else(|| "none".to_owned(), secs),
        });
    }
    if let Some(nodes) = nodes {
        let down: Vec<&str> = nodes
            .iter()
            .filter(|n| !n.up)
            .map(|n| n.name.as_str())
            .collect();
        let drained: Vec<&str> = nodes
            .iter()
            .filter(|n| n.up && n.drained)
            .map(|n| n.name.as_str())
            .collect();
        c.push(Condition {
            name: Cow::Borrowed("nodes_up"),
            pass: down.is_empty() && !nodes.is_empty(),
            bound: "all nodes up (drained counts as up)".into(),
            measured: match (down.is_empty(), drained.is_empty()) {
                (false, _) => format!("not up: {}", down.join(", ")),
                (true, true) => format!("{} up", nodes.len()),
                (true, false) => format!("{} up, drained: {}", nodes.len(), drained.join(", ")),
            },
        });
        if let Some(max) = query.max_lag {
            let mut worst: Option<(f64, &str)> = None;
            let mut unknown = Vec::new();
            for n in nodes.iter().filter(|n| n.is_standby) {
                match n.lag_seconds {
                    Some(l) if worst.is_none_or(|(w, _)| l > w) => worst = Some((l, &n.name)),
                    Some(_) => {}
                    None => unknown.push(n.name.as_str()),
                }
            }
            let over = worst.is_some_and(|(l, _)| l > max.as_secs_f64());
            c.push(Condition {
                name: Cow::Borrowed("replication_lag"),
                pass: !over && unknown.is_empty(),
                bound: format!("<= {}", secs(max)),
                measured: match (worst, unknown.is_empty()) {
                    (_, false) => format!("unknown for {}", unknown.join(", ")),
                    (Some((l, n)), true) => format!("{l:.3}s ({n})"),
                    (None, true) => "no standbys".into(),
                },
            });
        }
    } else if query.max_lag.is_some() {
        c.push(Condition {
            name: Cow::Borrowed("replication_lag"),
            pass: false,
            bound: "max_lag needs node figures".into(),
            measured: "unavailable: this probe runs outside graywire".into(),
        });
    }
    Verdict {
        pass: c.iter().all(|x| x.pass),
        window_seconds: query.window.as_secs_f64(),
        conditions: c,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy() -> (WindowStats, ReadBack) {
        (
            WindowStats {
                acked: 100,
                latency_p99: Some(Duration::from_millis(5)),
                max_stall: Duration::from_millis(20),
                ..WindowStats::default()
            },
            ReadBack {
                verified_ago: Some(Duration::from_millis(500)),
                verify_deadline: Duration::from_secs(5),
                ..ReadBack::default()
            },
        )
    }

    /// A node as the gate sees it: name, up, drained, lag, standby.
    fn figure(name: &str, up: bool, drained: bool, lag: Option<f64>, standby: bool) -> NodeFigure {
        NodeFigure {
            name: name.into(),
            up,
            drained,
            lag_seconds: lag,
            is_standby: standby,
        }
    }

    #[test]
    fn queries_parse_and_refuse_bad_values_with_the_parameter() {
        let q = GateQuery::parse("window=10s&max_stall=1s&max_gaps=0&max_p99=250ms&max_lag=2s")
            .expect("valid");
        assert_eq!(q.window, Duration::from_secs(10));
        assert_eq!(q.max_stall, Some(Duration::from_secs(1)));
        assert_eq!(q.max_gaps, Some(0));
        assert_eq!(GateQuery::parse(&q.to_query()), Ok(q));
        for (bad, says) in [
            ("window=soon", "window=\"soon\" is not a duration"),
            ("window=0s", "window must be longer than zero"),
            ("max_gaps=-1", "max_gaps=\"-1\" is not a whole number"),
            ("max_stall=2days", "max_stall=2days is longer"),
            ("maxstall=1s", "unknown parameter \"maxstall\""),
        ] {
            let e = GateQuery::parse(bad).expect_err(bad).to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn a_healthy_window_passes_every_bound() {
        let (s, r) = healthy();
        let q = GateQuery::parse("max_stall=1s&max_gaps=0&max_p99=250ms&max_lag=1s").expect("q");
        let nodes = [
            figure("pg1", true, false, None, false),
            figure("pg2", true, false, Some(0.2), true),
        ];
        let v = evaluate(&q, &s, &r, Some(&nodes));
        assert!(v.pass, "{:?}", v.reasons());
        assert_eq!(v.conditions.len(), 8);
    }

    #[test]
    fn each_failing_condition_is_named_with_its_measure() {
        let (mut s, mut r) = healthy();
        s.max_stall = Duration::from_millis(3_100);
        r.lost_in_window = 2;
        r.gaps_in_window = 3;
        let q = GateQuery::parse("max_stall=1s&max_gaps=0").expect("q");
        let v = evaluate(&q, &s, &r, None);
        assert!(!v.pass);
        let reasons = v.reasons().join("\n");
        assert!(
            reasons.contains("lost_writes: measured 2, bound 0"),
            "{reasons}"
        );
        assert!(
            reasons.contains("max_stall: measured 3.100s, bound <= 1.000s"),
            "{reasons}"
        );
        assert!(
            reasons.contains("gaps: measured 3, bound <= 0"),
            "{reasons}"
        );
    }

    #[test]
    fn a_blind_probe_never_passes() {
        let (mut s, mut r) = healthy();
        s.acked = 0;
        r.verified_ago = None;
        let v = evaluate(&GateQuery::default(), &s, &r, None);
        assert!(!v.pass);
        let reasons = v.reasons().join("\n");
        assert!(reasons.contains("writes_acknowledged"), "{reasons}");
        assert!(
            reasons.contains("read_back_fresh: measured never"),
            "{reasons}"
        );
    }

    #[test]
    fn a_drained_node_that_is_up_passes_and_is_named() {
        let (s, r) = healthy();
        let nodes = [
            figure("pg1", true, false, None, false),
            figure("pg2", true, true, Some(0.0), true),
        ];
        let v = evaluate(&GateQuery::default(), &s, &r, Some(&nodes));
        assert!(v.pass, "{:?}", v.reasons());
        let up = v
            .conditions
            .iter()
            .find(|c| c.name == "nodes_up")
            .expect("nodes_up");
        assert_eq!(up.measured, "2 up, drained: pg2");
    }

    #[test]
    fn nodes_down_or_lagging_fail_the_gate() {
        let (s, r) = healthy();
        let q = GateQuery::parse("max_lag=1s").expect("q");
        let nodes = [
            figure("pg2", false, false, Some(4.0), true),
            figure("pg3", true, false, None, true),
        ];
        let v = evaluate(&q, &s, &r, Some(&nodes));
        let reasons = v.reasons().join("\n");
        assert!(
            reasons.contains("nodes_up: measured not up: pg2"),
            "{reasons}"
        );
        assert!(
            reasons.contains("replication_lag: measured unknown for pg3"),
            "{reasons}"
        );
        let v = evaluate(&q, &s, &r, None);
        assert!(v
            .reasons()
            .join("\n")
            .contains("max_lag needs node figures"));
    }
}
