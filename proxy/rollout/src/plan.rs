//! Preflight and order, pure: from what the instances see and what was asked, the nodes in
//! upgrade order (standbys first, the primary last), what to do with each, and every reason
//! not to start at all. No I/O here.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::command::Value;
use super::fleet::{ClusterView, NodeView};
use super::{version_matches, RolloutSpec};

/// What the rollout will do with one node.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Upgrade,
    /// Already on the target version but drained (a rollout stopped after its upgrade): gate,
    /// then undrain.
    Finish,
    Skip(String),
}

#[derive(Debug, Clone)]
pub struct PlanItem {
    pub node: NodeView,
    pub is_primary: bool,
    pub action: Action,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub primary: String,
    pub items: Vec<PlanItem>,
}

/// Checks the cluster and the request; every problem is listed.
pub fn make(
    spec: &RolloutSpec,
    views: &[ClusterView],
    has_probe: bool,
) -> Result<Plan, Vec<String>> {
    let mut problems = Vec::new();
    let Some(first) = views.first() else {
        return Err(vec!["no graywire instance answered".into()]);
    };
    for (i, v) in views.iter().enumerate().skip(1) {
        if node_set(v) != node_set(first) {
            problems.push(format!(
                "instance #{} sees nodes [{}] but instance #1 sees [{}]: every instance must \
                 front the same nodes",
                i + 1,
                node_set(v).join(", "),
                node_set(first).join(", ")
            ));
        }
        if v.primary != first.primary {
            problems.push(format!(
                "instance #{} sees primary {:?} but instance #1 sees {:?}",
                i + 1,
                v.primary,
                first.primary
            ));
        }
    }
    if !has_probe {
        problems.push(
            "none of the instances runs a probe ([probe] in its config): every step is gated \
             on measured availability"
                .into(),
        );
    }
    for v in views {
        if v.split_brain {
            problems.push("split brain: more than one node claims to be primary".into());
        }
        for n in v.nodes.iter().filter(|n| n.state == "down") {
            problems.push(format!(
                "node {} is down: a rollout starts only when every node is up",
                n.name
            ));
        }
    }
    for name in spec.data_dirs.keys() {
        if first.node(name).is_none() {
            problems.push(format!(
                "--data-dir {name}=…: there is no node named {name}"
            ));
        }
    }
    let Some(primary) = first.primary.clone() else {
        problems.push("no primary is known: a rollout starts only on a working cluster".into());
        return Err(dedup(problems));
    };
    let mut items: Vec<PlanItem> = first
        .nodes
        .iter()
        .filter(|n| n.name != primary)
        .map(|n| item(spec, n, false))
        .collect();
    items.sort_by(|a, b| a.node.name.cmp(&b.node.name));
    if let Some(p) = first.node(&primary) {
        items.push(item(spec, p, true));
    }
    for it in &items {
        if it.node.role == "unknown" || it.node.version.is_none() {
            problems.push(format!(
                "node {}: role or version unknown ({})",
                it.node.name,
                it.node.describe()
            ));
        }
    }
    let upgrading: Vec<&PlanItem> = items
        .iter()
        .filter(|i| i.action == Action::Upgrade)
        .collect();
    let standbys: Vec<&PlanItem> = items.iter().filter(|i| !i.is_primary).collect();
    let needs = |t: &super::Template, p: &str| t.uses(p);
    if spec.expect_version.is_none() {
        for t in [
            Some(&spec.upgrade),
            spec.switchover.as_ref(),
            spec.finalize.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            if needs(t, "version") {
                problems.push(format!(
                    "{}: {{version}} needs --expect-version",
                    t.kind().flag()
                ));
            }
        }
    }
    if needs(&spec.upgrade, "data_dir") {
        for it in &upgrading {
            require_dir(
                spec,
                &it.node.name,
                "--upgrade-cmd uses {data_dir}",
                &mut problems,
            );
        }
    }
    if let Some(f) = &spec.finalize {
        if needs(f, "data_dir") {
            require_dir(
                spec,
                &primary,
                "--finalize-cmd uses {data_dir}",
                &mut problems,
            );
        }
        if spec.expect_version.is_none() {
            problems.push(
                "--finalize-cmd needs --expect-version: it runs only once every node reports \
                 the target version"
                    .into(),
            );
        }
    }
    if upgrading.iter().any(|i| i.is_primary) {
        match &spec.switchover {
            None => problems.push(format!(
                "the primary {primary} is to be upgraded: give --switchover-cmd (how a standby \
                 takes over), or --expect-version if it is already upgraded"
            )),
            Some(s) => {
                if standbys.is_empty() {
                    problems.push(format!(
                        "the primary {primary} is the only node: it cannot be upgraded without \
                         an outage"
                    ));
                }
                if s.uses("data_dir") {
                    require_dir(
                        spec,
                        &primary,
                        "--switchover-cmd uses {data_dir}",
                        &mut problems,
                    );
                }
                if s.uses("candidate_data_dir") || s.uses("standby_data_dirs") {
                    for it in &standbys {
                        require_dir(
                            spec,
                            &it.node.name,
                            "--switchover-cmd uses {candidate_data_dir} or {standby_data_dirs}",
                            &mut problems,
                        );
                    }
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(Plan { primary, items })
    } else {
        Err(dedup(problems))
    }
}

fn item(spec: &RolloutSpec, n: &NodeView, is_primary: bool) -> PlanItem {
    let on_target = match (&spec.expect_version, &n.version) {
        (Some(want), Some(have)) => version_matches(have, want),
        _ => false,
    };
    let action = match (on_target, n.state.as_str()) {
        (true, "drained" | "draining") => Action::Finish,
        (true, _) => Action::Skip(format!(
            "already on {}",
            spec.expect_version.as_deref().unwrap_or_default()
        )),
        (false, _) => Action::Upgrade,
    };
    PlanItem {
        node: n.clone(),
        is_primary,
        action,
    }
}

fn node_set(v: &ClusterView) -> Vec<String> {
    let mut s: Vec<String> = v
        .nodes
        .iter()
        .map(|n| format!("{} {}", n.name, n.address))
        .collect();
    s.sort();
    s
}

fn require_dir(spec: &RolloutSpec, node: &str, why: &str, problems: &mut Vec<String>) {
    if !spec.data_dirs.contains_key(node) {
        problems.push(format!("{why}: give --data-dir {node}=PATH"));
    }
}

fn dedup(mut v: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    v.retain(|p| seen.insert(p.clone()));
    v
}

/// The standby to take over from `old_primary`: up and in rotation, on the target version if
/// one is asked, least behind (then by name).
pub fn choose_candidate<'a>(
    view: &'a ClusterView,
    old_primary: &str,
    expect_version: Option<&str>,
) -> Option<&'a NodeView> {
    view.nodes
        .iter()
        .filter(|n| n.name != old_primary && n.role == "standby" && n.state == "up")
        .filter(|n| match (expect_version, &n.version) {
            (Some(want), Some(have)) => version_matches(have, want),
            (Some(_), None) => false,
            (None, _) => true,
        })
        .min_by(|a, b| {
            (a.lag_bytes.unwrap_or(u64::MAX), &a.name)
                .cmp(&(b.lag_bytes.unwrap_or(u64::MAX), &b.name))
        })
}

/// The placeholders' values for a command about `node`.
pub fn node_values(spec: &RolloutSpec, node: &NodeView) -> BTreeMap<&'static str, Value> {
    let mut v = BTreeMap::new();
    v.insert("node", Value::One(node.name.clone()));
    v.insert("host", Value::One(node.host().to_owned()));
    v.insert("port", Value::One(node.port().to_owned()));
    if let Some(d) = spec.data_dirs.get(&node.name) {
        v.insert("data_dir", Value::One(d.display().to_string()));
    }
    if let Some(want) = &spec.expect_version {
        v.insert("version", Value::One(want.clone()));
    }
    v
}

/// The values for a switchover from `old` to `candidate`, the other standbys being `others`.
pub fn switchover_values(
    spec: &RolloutSpec,
    old: &NodeView,
    candidate: &NodeView,
    others: &[&NodeView],
) -> BTreeMap<&'static str, Value> {
    let mut v = node_values(spec, old);
    v.insert("candidate", Value::One(candidate.name.clone()));
    v.insert("candidate_host", Value::One(candidate.host().to_owned()));
    v.insert("candidate_port", Value::One(candidate.port().to_owned()));
    if let Some(d) = spec.data_dirs.get(&candidate.name) {
        v.insert("candidate_data_dir", Value::One(d.display().to_string()));
    }
    let dirs: Option<Vec<String>> = others
        .iter()
        .map(|n| spec.data_dirs.get(&n.name).map(|d| d.display().to_string()))
        .collect();
    if let Some(dirs) = dirs {
        v.insert("standby_data_dirs", Value::List(dirs));
    }
    v
}

/// The plan as text (`--dry-run`).
pub fn render(spec: &RolloutSpec, plan: &Plan, view: &ClusterView, urls: &[String]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Rollout plan (dry run: nothing was changed)");
    let _ = writeln!(out, "  instances: {}", urls.join(", "));
    let mut bounds = spec.gate.clone();
    bounds.window = spec.settle;
    let _ = writeln!(
        out,
        "  gate: {} — over each whole step, at least the settle window ({})",
        bounds.to_query(),
        humantime::format_duration(spec.settle)
    );
    let target = spec.expect_version.as_deref().unwrap_or("(not checked)");
    for (i, it) in plan.items.iter().enumerate() {
        let n = &it.node;
        let _ = writeln!(
            out,
            "  {}. {} {} {} — {} → {}",
            i + 1,
            n.name,
            if it.is_primary { "primary" } else { "standby" },
            n.address,
            n.version.as_deref().unwrap_or("?"),
            target
        );
        let values = node_values(spec, n);
        let upgrade = spec
            .upgrade
            .expand(&values)
            .unwrap_or_else(|e| format!("(cannot expand: {e})"));
        let ready = format!(
            "wait until restarted, a standby{}, lag ≤ {} bytes",
            spec.expect_version
                .as_deref()
                .map(|v| format!(", on {v}"))
                .unwrap_or_default(),
            spec.max_lag_bytes
        );
        let tail = format!(
            "{ready}\n       settle {}, gate → undrain",
            humantime::format_duration(spec.settle)
        );
        match (&it.action, it.is_primary) {
            (Action::Skip(why), _) => {
                let _ = writeln!(out, "     skip: {why}");
            }
            (Action::Finish, _) => {
                let _ = writeln!(out, "     already upgraded but drained: gate → undrain");
            }
            (Action::Upgrade, false) => {
                let _ = writeln!(
                    out,
                    "     drain (wait {}) → upgrade:\n       {upgrade}\n     → {tail}",
                    humantime::format_duration(spec.drain_timeout)
                );
            }
            (Action::Upgrade, true) => {
                let candidate = choose_candidate(view, &n.name, None);
                let switchover = match (candidate, &spec.switchover) {
                    (Some(c), Some(t)) => {
                        let others: Vec<&NodeView> = view
                            .nodes
                            .iter()
                            .filter(|o| o.name != c.name && o.name != n.name)
                            .collect();
                        format!(
                            "to {} (the least-behind standby now; chosen again at this step):\n       {}",
                            c.name,
                            t.expand(&switchover_values(spec, n, c, &others))
                                .unwrap_or_else(|e| format!("(cannot expand: {e})"))
                        )
                    }
                    _ => "(no standby can take over now)".into(),
                };
                let _ = writeln!(
                    out,
                    "     drain (writes held at their transaction boundaries) → switchover {switchover}\n     \
                     → wait until every instance sees the new primary → upgrade:\n       {upgrade}\n     → {tail}"
                );
            }
        }
    }
    let finalize = match (&spec.finalize, spec.preserve_downgrade) {
        (None, _) => "no finalize command".to_owned(),
        (Some(_), true) => "finalize skipped (--preserve-downgrade)".to_owned(),
        (Some(t), false) => match view.node(&plan.primary) {
            Some(p) => format!(
                "finalize on the primary of that time:\n       {}",
                t.expand(&node_values(spec, p))
                    .unwrap_or_else(|e| format!("(cannot expand: {e})"))
            ),
            None => "finalize".to_owned(),
        },
    };
    let _ = writeln!(
        out,
        "  then: every node on {target}, the gate over the whole rollout → {finalize}"
    );
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{CommandKind, Template};
    use std::time::Duration;

    fn node(name: &str, role: &str, state: &str, version: &str, lag: u64) -> NodeView {
        NodeView {
            name: name.into(),
            address: format!("127.0.0.1:{}", 5430 + name[2..].parse::<u16>().unwrap()),
            role: role.into(),
            state: state.into(),
            version: Some(version.into()),
            started_at: Some(1.0),
            lag_bytes: (role == "standby").then_some(lag),
            lag_seconds: None,
            sessions: 0,
            ..Default::default()
        }
    }

    fn cluster() -> ClusterView {
        ClusterView {
            nodes: vec![
                node("pg0", "primary", "up", "15.18", 0),
                node("pg2", "standby", "up", "15.18", 10),
                node("pg1", "standby", "up", "15.18", 0),
            ],
            primary: Some("pg0".into()),
            split_brain: false,
            ..Default::default()
        }
    }

    fn spec() -> RolloutSpec {
        RolloutSpec {
            admin_urls: vec!["http://127.0.0.1:9930".into()],
            token: None,
            upgrade: Template::parse(CommandKind::Upgrade, "up.sh {data_dir} {version}").unwrap(),
            switchover: Some(
                Template::parse(
                    CommandKind::Switchover,
                    "sw.sh {data_dir} {candidate_data_dir} {standby_data_dirs}",
                )
                .unwrap(),
            ),
            finalize: None,
            preserve_downgrade: false,
            expect_version: Some("15.20".into()),
            data_dirs: ["pg0", "pg1", "pg2"]
                .iter()
                .map(|n| (n.to_string(), format!("/d/{n}").into()))
                .collect(),
            gate: Default::default(),
            settle: Duration::from_secs(5),
            max_lag_bytes: 1 << 20,
            drain_timeout: Duration::from_secs(30),
            command_timeout: Duration::from_secs(60),
            ready_timeout: Duration::from_secs(60),
            gate_timeout: Duration::from_secs(60),
        }
    }

    #[test]
    fn standbys_come_first_by_name_and_the_primary_last() {
        let plan = make(&spec(), &[cluster()], true).unwrap();
        let order: Vec<&str> = plan.items.iter().map(|i| i.node.name.as_str()).collect();
        assert_eq!(order, ["pg1", "pg2", "pg0"]);
        assert!(plan.items[2].is_primary);
        assert!(plan.items.iter().all(|i| i.action == Action::Upgrade));
        let text = render(&spec(), &plan, &cluster(), &spec().admin_urls);
        assert!(text.contains("up.sh /d/pg1 15.20"), "{text}");
        assert!(text.contains("sw.sh /d/pg0 /d/pg1 /d/pg2"), "{text}");
    }

    #[test]
    fn nodes_already_upgraded_are_skipped_or_finished() {
        let mut c = cluster();
        c.nodes[1] = node("pg2", "standby", "up", "15.20 (Debian)", 0);
        c.nodes[2] = node("pg1", "standby", "drained", "15.20 (Debian)", 0);
        let plan = make(&spec(), &[c], true).unwrap();
        assert_eq!(plan.items[0].action, Action::Finish);
        assert_eq!(
            plan.items[1].action,
            Action::Skip("already on 15.20".into())
        );
        assert_eq!(plan.items[2].action, Action::Upgrade);
    }

    #[test]
    fn every_reason_not_to_start_is_listed() {
        let mut c = cluster();
        c.nodes[1].state = "down".into();
        let mut other = cluster();
        other.primary = Some("pg1".into());
        other.nodes.pop();
        let mut s = spec();
        s.data_dirs.remove("pg2");
        s.data_dirs.insert("pg9".into(), "/x".into());
        s.switchover = None;
        s.expect_version = None;
        s.finalize = Some(Template::parse(CommandKind::Finalize, "fin {version}").unwrap());
        let problems = make(&s, &[c, other], false).unwrap_err().join("\n");
        for want in [
            "instance #2 sees nodes",
            "instance #2 sees primary Some(\"pg1\")",
            "none of the instances runs a probe",
            "node pg2 is down",
            "--data-dir pg9=…: there is no node named pg9",
            "--upgrade-cmd uses {data_dir}: give --data-dir pg2=PATH",
            "--upgrade-cmd: {version} needs --expect-version",
            "--finalize-cmd needs --expect-version",
            "give --switchover-cmd",
        ] {
            assert!(problems.contains(want), "missing {want:?} in:\n{problems}");
        }
    }

    #[test]
    fn a_lone_primary_is_refused_and_split_brain_too() {
        let c = ClusterView {
            nodes: vec![node("pg0", "primary", "up", "15.18", 0)],
            primary: Some("pg0".into()),
            split_brain: false,
            ..Default::default()
        };
        let problems = make(&spec(), &[c], true).unwrap_err().join("\n");
        assert!(problems.contains("the only node"), "{problems}");
        let mut c = cluster();
        c.split_brain = true;
        c.primary = None;
        let problems = make(&spec(), &[c], true).unwrap_err().join("\n");
        assert!(
            problems.contains("split brain") && problems.contains("no primary"),
            "{problems}"
        );
    }

    #[test]
    fn the_candidate_is_the_least_behind_standby_in_rotation_on_the_target() {
        let mut c = cluster();
        assert_eq!(choose_candidate(&c, "pg0", None).unwrap().name, "pg1");
        c.nodes[2].state = "drained".into();
        assert_eq!(choose_candidate(&c, "pg0", None).unwrap().name, "pg2");
        assert!(choose_candidate(&c, "pg0", Some("15.20")).is_none());
        c.nodes[1].version = Some("15.20 (Debian)".into());
        assert_eq!(
            choose_candidate(&c, "pg0", Some("15.20")).unwrap().name,
            "pg2"
        );
    }
}
