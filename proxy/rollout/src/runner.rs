//! The steps, in order, against the real instances and the operator's commands. Each step is
//! timed into the report; the first failure stops the rollout with the cluster left as safe as
//! it can be (see the module doc of [`super`]).

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::command::{self, CommandRun, Value};
use super::fleet::{ClusterView, Fleet, FleetError, NodeView};
use super::plan::{self, Action, Plan, PlanItem};
use super::progress::Progress;
use super::report::{Availability, NodeReport, Report, StepRecord};
use super::{version_matches, Failure, RolloutSpec, Step};
use graywire_probe::gate::MAX_WINDOW;

/// How often the instances are asked how a node is doing.
const POLL: Duration = Duration::from_millis(250);
/// How often the gate is asked while it fails.
const GATE_POLL: Duration = Duration::from_secs(1);

struct Runner<'a> {
    spec: &'a RolloutSpec,
    fleet: &'a Fleet,
    progress: &'a Progress,
    started: Instant,
    nodes: Vec<NodeReport>,
    checks: Vec<StepRecord>,
}

/// Runs the rollout `plan`; never panics, always returns the report.
pub async fn run(spec: &RolloutSpec, fleet: &Fleet, plan: &Plan, progress: &Progress) -> Report {
    let started_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let mut r = Runner {
        spec,
        fleet,
        progress,
        started: Instant::now(),
        nodes: plan
            .items
            .iter()
            .map(|i| NodeReport {
                name: i.node.name.clone(),
                was_primary: i.is_primary,
                version_before: i.node.version.clone(),
                version_after: None,
                outcome: "not reached".into(),
                steps: Vec::new(),
            })
            .collect(),
        checks: Vec::new(),
    };
    let ticker = progress.spawn_ticker(fleet.clone());
    let result = r.all(plan).await;
    ticker.abort();
    progress.finish();
    let (finalize, finalize_command, failure) = match result {
        Ok(fin) => (fin.0, fin.1, None),
        Err((failure, finalize_command)) => (
            if failure.step == Step::Finalize {
                "failed".to_owned()
            } else {
                "not run: the rollout stopped".to_owned()
            },
            finalize_command,
            Some(failure),
        ),
    };
    let seconds = r.started.elapsed().as_secs_f64();
    let availability = fleet
        .probe_status(r.started.elapsed())
        .await
        .map(|s| Availability::from_probe(&s));
    if let Ok(views) = fleet.views().await {
        for n in &mut r.nodes {
            n.version_after = views
                .first()
                .and_then(|v| v.node(&n.name))
                .and_then(|v| v.version.clone());
        }
    }
    Report {
        ok: failure.is_none(),
        started_at,
        seconds,
        target_version: spec.expect_version.clone(),
        instances: fleet.instances.iter().map(|i| i.url.clone()).collect(),
        nodes: r.nodes,
        checks: r.checks,
        availability,
        finalize,
        finalize_command,
        failure,
    }
}

type Finalized = (String, Option<CommandRun>);

/// Why waiting for the cluster to reach a state gave up.
#[derive(Debug, thiserror::Error)]
enum WaitError {
    #[error("no new primary within {}: {last}", humantime::format_duration(*.within))]
    NoNewPrimary { within: Duration, last: String },
    /// A condition failed that waiting cannot fix.
    #[error("over the last {:.1}s: {reasons}", .window.as_secs_f64())]
    GateFailed { window: Duration, reasons: String },
    #[error("still failing after {}: {last}", humantime::format_duration(*.after))]
    GateTimedOut { after: Duration, last: String },
}

impl Runner<'_> {
    async fn all(&mut self, plan: &Plan) -> Result<Finalized, (Failure, Option<CommandRun>)> {
        self.preflight_gate().await.map_err(|f| (f, None))?;
        for (i, item) in plan.items.iter().enumerate() {
            self.node(i, item).await.map_err(|f| (f, None))?;
        }
        self.verify().await.map_err(|f| (f, None))?;
        self.finalize().await
    }

    fn elapsed(&self, at: Instant) -> f64 {
        at.duration_since(self.started).as_secs_f64()
    }

    fn record(
        &mut self,
        node: Option<usize>,
        step: Step,
        began: Instant,
        ok: bool,
        detail: String,
        command: Option<CommandRun>,
    ) {
        let rec = StepRecord {
            step,
            started_seconds: self.elapsed(began),
            seconds: began.elapsed().as_secs_f64(),
            ok,
            detail,
            command,
        };
        match node {
            Some(i) => self.nodes[i].steps.push(rec),
            None => self.checks.push(rec),
        }
    }

    /// The gate over the settle window before anything is touched.
    async fn preflight_gate(&mut self) -> Result<(), Failure> {
        let began = Instant::now();
        self.progress
            .event("preflight: the gate must pass before anything changes");
        let result = self.gate_until_pass(None, began, Instant::now()).await;
        let detail = match &result {
            Ok(()) => "passed".to_owned(),
            Err(e) => e.to_string(),
        };
        self.record(None, Step::Preflight, began, result.is_ok(), detail, None);
        result.map_err(|what| Failure {
            node: None,
            step: Step::Preflight,
            what: format!("the gate does not pass before the rollout: {what}"),
            advice: "Nothing was changed. Find out why the gate fails (GET /v1/gate on each \
                     instance names every failing condition) and start the rollout again."
                .into(),
        })
    }

    async fn node(&mut self, i: usize, item: &PlanItem) -> Result<(), Failure> {
        let name = item.node.name.clone();
        let step_start = Instant::now();
        match &item.action {
            Action::Skip(why) => {
                self.nodes[i].outcome = format!("skipped: {why}");
                self.progress.step(&name, &format!("skipped ({why})"));
                return Ok(());
            }
            Action::Finish => {
                self.progress
                    .step(&name, "already upgraded: gate, then undrain");
                self.gate_step(i, &name, step_start, Instant::now()).await?;
                self.undrain_step(i, &name).await?;
                self.nodes[i].outcome = "undrained (was upgraded by an earlier run)".into();
                return Ok(());
            }
            Action::Upgrade => {}
        }
        let candidate = if item.is_primary {
            Some(self.pick_candidate(i, &name).await?)
        } else {
            None
        };
        self.drain_step(i, &name, item.is_primary).await?;
        if let Some(candidate) = candidate {
            self.switchover_step(i, &item.node, &candidate).await?;
        }
        let before = self.current(&name).await.and_then(|n| n.started_at);
        self.upgrade_step(i, &item.node).await?;
        let ready_at = self.wait_ready_step(i, &name, before).await?;
        self.gate_step(i, &name, step_start, ready_at).await?;
        self.undrain_step(i, &name).await?;
        self.nodes[i].outcome = "upgraded".into();
        self.progress.step(&name, "done");
        Ok(())
    }

    /// The node as the first instance sees it now.
    async fn current(&self, name: &str) -> Option<NodeView> {
        let views = self.fleet.views().await.ok()?;
        views.first()?.node(name).cloned()
    }

    async fn pick_candidate(&mut self, i: usize, name: &str) -> Result<NodeView, Failure> {
        let began = Instant::now();
        let views = self
            .fleet
            .views()
            .await
            .map_err(|e| self.fail_unreachable(name, Step::Switchover, e))?;
        let want = self.spec.expect_version.as_deref();
        match views
            .first()
            .and_then(|v| plan::choose_candidate(v, name, want))
        {
            Some(c) => Ok(c.clone()),
            None => {
                let what = format!(
                    "no standby can take over from {name}: none is up, in rotation{}",
                    want.map(|v| format!(" and on {v}")).unwrap_or_default()
                );
                self.record(Some(i), Step::Switchover, began, false, what.clone(), None);
                self.nodes[i].outcome = "failed".into();
                Err(Failure {
                    node: Some(name.to_owned()),
                    step: Step::Switchover,
                    what,
                    advice: format!(
                        "Nothing was done to {name}; it still serves as primary. Bring a \
                         standby up (and upgraded) and run the rollout again."
                    ),
                })
            }
        }
    }

    fn fail_unreachable(&self, name: &str, step: Step, e: FleetError) -> Failure {
        Failure {
            node: Some(name.to_owned()),
            step,
            what: format!("an instance did not answer: {e}"),
            advice: self.drained_advice(name),
        }
    }

    fn drained_advice(&self, name: &str) -> String {
        let url = self
            .fleet
            .instances
            .first()
            .map_or("http://…", |i| i.url.as_str());
        format!(
            "{name} stays drained on every instance: no new transaction goes to it. Fix the \
             cause, then run the same rollout again (nodes already on the target version are \
             skipped, a drained one is gated and undrained), or put it back in rotation by \
             hand: curl -X POST {url}/v1/nodes/{name}/undrain (on every instance)."
        )
    }

    async fn drain_step(&mut self, i: usize, name: &str, primary: bool) -> Result<(), Failure> {
        let began = Instant::now();
        self.progress.step(
            name,
            if primary {
                "drain (writes held)"
            } else {
                "drain"
            },
        );
        let result = self.fleet.drain(name, self.spec.drain_timeout).await;
        let ok = result.is_ok();
        let detail = result
            .as_ref()
            .map_or_else(ToString::to_string, |_| "drained on every instance".into());
        self.record(Some(i), Step::Drain, began, ok, detail, None);
        result.map_err(|what| {
            self.nodes[i].outcome = "failed".into();
            Failure {
                node: Some(name.to_owned()),
                step: Step::Drain,
                what: format!("{name} did not drain: {what}"),
                advice: format!(
                    "{} Sessions pinned to the node (temporary tables, LISTEN, session advisory \
                     locks, WITH HOLD cursors) keep it from emptying: end them, raise \
                     --drain-timeout, or set drain.on_timeout = \"end_transactions\".{}",
                    self.drained_advice(name),
                    if primary {
                        " While the primary stays drained, writes are held: undrain it now if \
                         the rollout cannot go on."
                    } else {
                        ""
                    }
                ),
            }
        })
    }

    async fn switchover_step(
        &mut self,
        i: usize,
        old: &NodeView,
        candidate: &NodeView,
    ) -> Result<(), Failure> {
        let name = old.name.clone();
        let Some(template) = &self.spec.switchover else {
            return Err(Failure {
                node: Some(name),
                step: Step::Switchover,
                what: "no --switchover-cmd".into(),
                advice: "Give --switchover-cmd.".into(),
            });
        };
        let began = Instant::now();
        self.progress
            .step(&name, &format!("switchover to {}", candidate.name));
        let views = self.fleet.views().await.unwrap_or_default();
        let others: Vec<NodeView> = views
            .first()
            .map(|v| {
                v.nodes
                    .iter()
                    .filter(|n| n.name != old.name && n.name != candidate.name)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let other_refs: Vec<&NodeView> = others.iter().collect();
        let values = plan::switchover_values(self.spec, old, candidate, &other_refs);
        let run = match template.expand(&values) {
            Ok(line) => command::run(&line, &env_for(&values), self.spec.command_timeout).await,
            Err(e) => {
                self.record(Some(i), Step::Switchover, began, false, e.to_string(), None);
                return Err(self.switchover_failed(i, &name, e.to_string()).await);
            }
        };
        let ok = run.succeeded();
        let outcome = format!("the switchover command {}", run.outcome());
        self.record(
            Some(i),
            Step::Switchover,
            began,
            ok,
            outcome.clone(),
            Some(run),
        );
        if !ok {
            return Err(self.switchover_failed(i, &name, outcome).await);
        }
        let began = Instant::now();
        self.progress.step(&name, "wait for the new primary");
        let result = self.wait_new_primary(&name).await;
        let detail = match &result {
            Ok(p) => format!("every instance sees primary {p}"),
            Err(e) => e.to_string(),
        };
        self.record(
            Some(i),
            Step::WaitPrimary,
            began,
            result.is_ok(),
            detail,
            None,
        );
        match result {
            Ok(p) => {
                self.progress
                    .event(&format!("{p} is the primary; writes flow there"));
                Ok(())
            }
            Err(e) => Err(self.switchover_failed(i, &name, e.to_string()).await),
        }
    }

    /// After a failed switchover: when no other primary appeared and the old one still
    /// serves, put it back in rotation so writes go on; say what state the cluster is in.
    async fn switchover_failed(&mut self, i: usize, old: &str, what: String) -> Failure {
        self.nodes[i].outcome = "failed".into();
        let views = self.fleet.views().await.unwrap_or_default();
        let other_primary = views
            .iter()
            .filter_map(|v| v.primary.clone())
            .find(|p| p != old);
        let old_serves = !views.is_empty()
            && views.iter().all(|v| {
                v.node(old)
                    .is_some_and(|n| n.role == "primary" && n.state != "down")
            });
        let advice = match (other_primary, old_serves) {
            (None, true) => match self.fleet.undrain(old).await {
                Ok(()) => format!(
                    "No other node became primary and {old} still serves as primary, so it was \
                     undrained again: writes go on there, on the old version. Find out why the \
                     switchover failed, then run the rollout again (upgraded standbys are \
                     skipped)."
                ),
                Err(e) => format!(
                    "{old} still serves as primary but undraining it failed ({e}): writes are \
                     held. Undrain it by hand now on every instance: curl -X POST \
                     URL/v1/nodes/{old}/undrain."
                ),
            },
            (Some(p), _) => format!(
                "{p} is now the primary; {old} stays drained. Check {old}'s state (it should \
                 be a standby of {p}), then run the rollout again."
            ),
            (None, false) => format!(
                "No node serves as primary: writes are held by graywire until one does (and \
                 fail after pool.hold_timeout). Promote a standby by hand, now. {old} stays \
                 drained."
            ),
        };
        Failure {
            node: Some(old.to_owned()),
            step: Step::Switchover,
            what,
            advice,
        }
    }

    /// Waits until every instance sees one primary other than `old`, in rotation.
    async fn wait_new_primary(&self, old: &str) -> Result<String, WaitError> {
        let deadline = Instant::now() + self.spec.ready_timeout;
        loop {
            let last = match self.fleet.views().await {
                Ok(views) => {
                    let primaries: Vec<Option<&NodeView>> = views
                        .iter()
                        .map(|v| v.primary.as_deref().and_then(|p| v.node(p)))
                        .collect();
                    let first = primaries.first().copied().flatten();
                    match first {
                        Some(p)
                            if p.name != old
                                && p.state == "up"
                                && primaries
                                    .iter()
                                    .all(|q| q.is_some_and(|q| q.name == p.name)) =>
                        {
                            return Ok(p.name.clone());
                        }
                        _ => format!(
                            "instances see primary {:?}",
                            views.iter().map(|v| v.primary.clone()).collect::<Vec<_>>()
                        ),
                    }
                }
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(WaitError::NoNewPrimary {
                    within: self.spec.ready_timeout,
                    last,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn upgrade_step(&mut self, i: usize, node: &NodeView) -> Result<(), Failure> {
        let name = node.name.clone();
        let began = Instant::now();
        self.progress.step(&name, "upgrade command");
        let values = plan::node_values(self.spec, node);
        let run = match self.spec.upgrade.expand(&values) {
            Ok(line) => command::run(&line, &env_for(&values), self.spec.command_timeout).await,
            Err(e) => {
                self.record(Some(i), Step::Upgrade, began, false, e.to_string(), None);
                self.nodes[i].outcome = "failed".into();
                return Err(Failure {
                    node: Some(name.clone()),
                    step: Step::Upgrade,
                    what: e.to_string(),
                    advice: self.drained_advice(&name),
                });
            }
        };
        let ok = run.succeeded();
        let outcome = format!("the upgrade command {}", run.outcome());
        self.record(
            Some(i),
            Step::Upgrade,
            began,
            ok,
            outcome.clone(),
            Some(run),
        );
        if ok {
            return Ok(());
        }
        self.nodes[i].outcome = "failed".into();
        Err(Failure {
            node: Some(name.clone()),
            step: Step::Upgrade,
            what: outcome,
            advice: format!(
                "{} Read the command's output above; the node may be stopped or half \
                 upgraded: check it before anything else.",
                self.drained_advice(&name)
            ),
        })
    }

    /// Waits until every instance sees `name` back: restarted since `before` (when both
    /// start times are known), up, a standby, on the target version, caught up.
    async fn wait_ready_step(
        &mut self,
        i: usize,
        name: &str,
        before: Option<f64>,
    ) -> Result<Instant, Failure> {
        let began = Instant::now();
        self.progress.step(name, "wait until back and caught up");
        let deadline = began + self.spec.ready_timeout;
        loop {
            let last = match self.fleet.views().await {
                Ok(views) => match self.not_ready(&views, name, before) {
                    None => {
                        let detail = views
                            .first()
                            .and_then(|v| v.node(name))
                            .map_or_else(String::new, NodeView::describe);
                        self.record(Some(i), Step::WaitReady, began, true, detail, None);
                        return Ok(Instant::now());
                    }
                    Some(why) => why,
                },
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                let what = format!(
                    "{name} is not back within {}: {last}",
                    humantime::format_duration(self.spec.ready_timeout)
                );
                self.record(Some(i), Step::WaitReady, began, false, what.clone(), None);
                self.nodes[i].outcome = "failed".into();
                return Err(Failure {
                    node: Some(name.to_owned()),
                    step: Step::WaitReady,
                    what,
                    advice: self.drained_advice(name),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Why `name` is not ready on some instance, or `None` when it is on all.
    fn not_ready(&self, views: &[ClusterView], name: &str, before: Option<f64>) -> Option<String> {
        for (k, v) in views.iter().enumerate() {
            let url = self.fleet.instances.get(k).map_or("?", |i| i.url.as_str());
            let Some(n) = v.node(name) else {
                return Some(format!("{url} no longer lists {name}"));
            };
            let restarted = match (before, n.started_at) {
                (Some(b), Some(now)) => (now - b).abs() > 1e-3,
                _ => true,
            };
            let version_ok = match (&self.spec.expect_version, &n.version) {
                (Some(want), Some(have)) => version_matches(have, want),
                (Some(_), None) => false,
                (None, _) => true,
            };
            let caught_up = n.lag_bytes.is_some_and(|b| b <= self.spec.max_lag_bytes);
            let problem = if !restarted {
                Some("it has not restarted (its postmaster start time is unchanged)")
            } else if n.state == "down" {
                Some("it is down")
            } else if n.role != "standby" {
                Some("it is not a standby")
            } else if !version_ok {
                Some("it does not report the expected version")
            } else if !caught_up {
                Some("it has not caught up")
            } else {
                None
            };
            if let Some(p) = problem {
                return Some(format!("{url} sees {name}: {p} ({})", n.describe()));
            }
        }
        None
    }

    /// Lets the node settle, then asks the gate over the whole step (at least the settle
    /// window) until it passes, a lasting condition fails, or the gate timeout passes.
    async fn gate_step(
        &mut self,
        i: usize,
        name: &str,
        step_start: Instant,
        ready_at: Instant,
    ) -> Result<(), Failure> {
        let began = Instant::now();
        self.progress.step(
            name,
            &format!(
                "settle {} + gate",
                humantime::format_duration(self.spec.settle)
            ),
        );
        let result = self.gate_until_pass(Some(name), step_start, ready_at).await;
        let detail = match &result {
            Ok(()) => "passed".to_owned(),
            Err(e) => e.to_string(),
        };
        self.record(Some(i), Step::Gate, began, result.is_ok(), detail, None);
        result.map_err(|what| {
            self.nodes[i].outcome = "failed".into();
            Failure {
                node: Some(name.to_owned()),
                step: Step::Gate,
                what: format!("the gate failed after {name}'s step: {what}"),
                advice: format!(
                    "{name} is upgraded but stays drained, because the measurements say the \
                     step did harm or the cluster is not healthy. {}",
                    self.drained_advice(name)
                ),
            }
        })
    }

    /// Waits until `ready_at + settle`, then polls the gate with a window covering
    /// `step_start..now` (at least the settle window).
    async fn gate_until_pass(
        &self,
        node: Option<&str>,
        step_start: Instant,
        ready_at: Instant,
    ) -> Result<(), WaitError> {
        let settle_until = ready_at + self.spec.settle;
        let now = Instant::now();
        if settle_until > now && node.is_some() {
            tokio::time::sleep(settle_until - now).await;
        }
        let deadline = Instant::now() + self.spec.gate_timeout;
        loop {
            let mut q = self.spec.gate.clone();
            q.window = gate_window(step_start.elapsed(), self.spec.settle);
            let last = match self.fleet.gate(&q.to_query()).await {
                Ok(a) if a.pass => return Ok(()),
                Ok(a) if a.final_failure => {
                    return Err(WaitError::GateFailed {
                        window: q.window,
                        reasons: a.reasons.join("; "),
                    })
                }
                Ok(a) => a.reasons.join("; "),
                Err(e) => e.to_string(),
            };
            if Instant::now() + GATE_POLL > deadline {
                return Err(WaitError::GateTimedOut {
                    after: self.spec.gate_timeout,
                    last,
                });
            }
            tokio::time::sleep(GATE_POLL).await;
        }
    }

    async fn undrain_step(&mut self, i: usize, name: &str) -> Result<(), Failure> {
        let began = Instant::now();
        self.progress.step(name, "undrain");
        let result = self.fleet.undrain(name).await;
        let detail = result.as_ref().map_or_else(ToString::to_string, |_| {
            "back in rotation on every instance".into()
        });
        self.record(Some(i), Step::Undrain, began, result.is_ok(), detail, None);
        result.map_err(|what| {
            self.nodes[i].outcome = "failed".into();
            Failure {
                node: Some(name.to_owned()),
                step: Step::Undrain,
                what: format!("undraining {name} failed: {what}"),
                advice: format!(
                    "{name} is upgraded and passed the gate but is not back in rotation \
                     everywhere. Undrain it by hand on every instance: curl -X POST \
                     URL/v1/nodes/{name}/undrain."
                ),
            }
        })
    }

    /// Every node on the target version, seen by every instance, and the gate over the whole
    /// rollout.
    async fn verify(&mut self) -> Result<(), Failure> {
        let began = Instant::now();
        self.progress
            .event("verify: every node's version, and the gate over the whole rollout");
        let mut problems = Vec::new();
        match self.fleet.views().await {
            Ok(views) => {
                if let Some(want) = &self.spec.expect_version {
                    for v in &views {
                        for n in &v.nodes {
                            if !n
                                .version
                                .as_deref()
                                .is_some_and(|h| version_matches(h, want))
                            {
                                problems.push(format!(
                                    "{} is not on {want} ({})",
                                    n.name,
                                    n.describe()
                                ));
                            }
                        }
                    }
                }
            }
            Err(e) => problems.push(e.to_string()),
        }
        let mut q = self.spec.gate.clone();
        q.window = gate_window(self.started.elapsed(), self.spec.settle);
        match self.fleet.gate(&q.to_query()).await {
            Ok(a) if a.pass => {}
            Ok(a) => problems.push(format!(
                "the gate over the whole rollout fails: {}",
                a.reasons.join("; ")
            )),
            Err(e) => problems.push(e.to_string()),
        }
        problems.dedup();
        let ok = problems.is_empty();
        let detail = if ok {
            "passed".to_owned()
        } else {
            problems.join("; ")
        };
        self.record(None, Step::Verify, began, ok, detail.clone(), None);
        if ok {
            Ok(())
        } else {
            Err(Failure {
                node: None,
                step: Step::Verify,
                what: detail,
                advice: "Every node was stepped through, but the end state is not what was \
                         asked; the finalize command was not run. Look at the nodes named above."
                    .into(),
            })
        }
    }

    async fn finalize(&mut self) -> Result<Finalized, (Failure, Option<CommandRun>)> {
        let Some(template) = &self.spec.finalize else {
            return Ok(("no finalize command given".into(), None));
        };
        if self.spec.preserve_downgrade {
            self.progress
                .event("finalize skipped: --preserve-downgrade");
            return Ok((
                "skipped (--preserve-downgrade): the cluster can still go back to the old \
                 version; run the finalize command yourself once you are sure"
                    .into(),
                None,
            ));
        }
        let began = Instant::now();
        self.progress.event("finalize");
        let views = self.fleet.views().await.unwrap_or_default();
        let Some(primary) = views
            .first()
            .and_then(|v| v.primary.as_deref().and_then(|p| v.node(p)).cloned())
        else {
            let what = "no primary is known for the finalize command".to_owned();
            self.record(None, Step::Finalize, began, false, what.clone(), None);
            return Err((
                Failure {
                    node: None,
                    step: Step::Finalize,
                    what,
                    advice: "Every node is upgraded; run the finalize command by hand once a \
                             primary is back."
                        .into(),
                },
                None,
            ));
        };
        let values = plan::node_values(self.spec, &primary);
        let run = match template.expand(&values) {
            Ok(line) => command::run(&line, &env_for(&values), self.spec.command_timeout).await,
            Err(e) => {
                self.record(None, Step::Finalize, began, false, e.to_string(), None);
                return Err((
                    Failure {
                        node: Some(primary.name),
                        step: Step::Finalize,
                        what: e.to_string(),
                        advice:
                            "Every node is upgraded; fix the finalize command and run it by hand."
                                .into(),
                    },
                    None,
                ));
            }
        };
        let ok = run.succeeded();
        let outcome = format!("the finalize command {}", run.outcome());
        self.record(None, Step::Finalize, began, ok, outcome.clone(), None);
        if ok {
            Ok((format!("ran on {}: {outcome}", primary.name), Some(run)))
        } else {
            Err((
                Failure {
                    node: Some(primary.name),
                    step: Step::Finalize,
                    what: outcome,
                    advice: "Every node is upgraded and in rotation; only the finalize command \
                             failed. Read its output, fix the cause, and run it by hand."
                        .into(),
                },
                Some(run),
            ))
        }
    }
}

/// A gate window covering `elapsed`, at least `settle`, at most what the gate accepts; whole
/// milliseconds, as the query carries them.
fn gate_window(elapsed: Duration, settle: Duration) -> Duration {
    let ms = elapsed.max(settle).as_millis().min(MAX_WINDOW.as_millis());
    Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX))
}

/// The placeholders' values also as environment variables (`GRAYWIRE_NODE`, …), for scripts
/// that prefer them.
fn env_for(values: &BTreeMap<&'static str, Value>) -> BTreeMap<String, String> {
    values
        .iter()
        .map(|(k, v)| {
            let text = match v {
                Value::One(s) => s.clone(),
                Value::List(items) => items.join(" "),
            };
            (format!("GRAYWIRE_{}", k.to_ascii_uppercase()), text)
        })
        .collect()
}
