//! The `graywire rollout` command line: flags, their checks, and the run (used by `main.rs`,
//! and by the tests in-process, so they exercise exactly what the command does).

use std::path::PathBuf;

use clap::Parser;

use super::progress::Progress;
use super::{plan, runner, CommandKind, Fleet, Report, RolloutSpec, Template};

/// A flag that wants a duration and got something else.
#[derive(Debug, thiserror::Error)]
#[error("{given:?} is not a duration (e.g. 500ms, 30s): {reason}")]
pub struct BadDuration {
    given: String,
    reason: humantime::DurationError,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, BadDuration> {
    humantime::parse_duration(s).map_err(|reason| BadDuration {
        given: s.to_owned(),
        reason,
    })
}

/// `graywire rollout` alone, for [`parse`].
#[derive(Parser)]
#[command(name = "graywire rollout")]
struct RolloutCommand {
    #[command(flatten)]
    args: RolloutArgs,
}

/// Parses `graywire rollout`'s flags (without the program and subcommand names).
pub fn parse<I, T>(flags: I) -> Result<RolloutArgs, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let argv = std::iter::once(std::ffi::OsString::from("graywire rollout"))
        .chain(flags.into_iter().map(Into::into));
    RolloutCommand::try_parse_from(argv).map(|c| c.args)
}

#[derive(clap::Args)]
pub struct RolloutArgs {
    /// Admin URL of a graywire instance in front of the cluster (repeat for every instance;
    /// each gets every drain and undrain, and a step proceeds only when all agree).
    #[arg(long = "admin", required = true)]
    pub admins: Vec<String>,
    /// The admin token (default: $GRAYWIRE_ADMIN_TOKEN).
    #[arg(long)]
    pub token: Option<String>,
    /// Upgrades one node (run with sh -c); placeholders {node} {host} {port} {data_dir}
    /// {version}. It must leave the node running again.
    #[arg(long)]
    pub upgrade_cmd: String,
    /// Makes {candidate} the primary instead of {node} (run with sh -c); also
    /// {candidate_host} {candidate_port} {candidate_data_dir} {standby_data_dirs}.
    #[arg(long)]
    pub switchover_cmd: Option<String>,
    /// Run once every node reports --expect-version and the gate passed for the whole
    /// rollout (e.g. an extension update); placeholders are the primary's.
    #[arg(long)]
    pub finalize_cmd: Option<String>,
    /// Do not run --finalize-cmd: keep the cluster able to go back to the old version.
    #[arg(long)]
    pub preserve_downgrade: bool,
    /// The version every upgraded node must report (15.20 matches "15.20 (Debian …)").
    #[arg(long)]
    pub expect_version: Option<String>,
    /// NODE=PATH: the data directory of a node, for {data_dir} (repeatable).
    #[arg(long = "data-dir", value_name = "NODE=PATH")]
    pub data_dirs: Vec<String>,
    /// How long a node must be back, with the gate passing, before the next one.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub settle: std::time::Duration,
    /// Gate bound: longest write stall over a step.
    #[arg(long)]
    pub max_stall: Option<String>,
    /// Gate bound: most gaps over a step.
    #[arg(long)]
    pub max_gaps: Option<String>,
    /// Gate bound: write latency p99 over a step.
    #[arg(long)]
    max_p99: Option<String>,
    /// Gate bound: replication lag.
    #[arg(long)]
    pub max_lag: Option<String>,
    /// How far behind (bytes of WAL) an upgraded standby may be to count as caught up.
    #[arg(long, default_value_t = 16 << 20)]
    pub max_lag_bytes: u64,
    /// How long a drain may wait for the node's sessions to move.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub drain_timeout: std::time::Duration,
    /// Time limit of each command (killed, with its process group, after it).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub command_timeout: std::time::Duration,
    /// How long a node (or a new primary) gets to come back after its command.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub ready_timeout: std::time::Duration,
    /// How long after the settle window the gate gets to pass.
    #[arg(long, default_value = "2m", value_parser = parse_duration)]
    pub gate_timeout: std::time::Duration,
    /// Print the plan and exit without changing anything.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the final report as JSON on stdout (progress stays on stderr).
    #[arg(long)]
    pub json: bool,
    /// No progress display.
    #[arg(long)]
    pub quiet: bool,
}

/// Runs `graywire rollout`: returns the exit code (0 done, 1 stopped on a failure, 2 refused
/// before changing anything) and the report when the rollout started. Prints what the command
/// prints: problems and progress on stderr, the plan or the report on stdout.
pub async fn run(args: RolloutArgs) -> (u8, Option<Report>) {
    let spec = match spec(&args) {
        Ok(s) => s,
        Err(problems) => {
            for p in problems {
                eprintln!("graywire rollout: {p}");
            }
            return (2, None);
        }
    };
    let fleet = match Fleet::connect(&spec.admin_urls, spec.token.clone()).await {
        Ok(f) => f,
        Err(e) => {
            eprintln!("graywire rollout: {e}");
            return (2, None);
        }
    };
    let views = match fleet.views().await {
        Ok(v) => v,
        Err(e) => {
            eprintln!("graywire rollout: {e}");
            return (2, None);
        }
    };
    let the_plan = match plan::make(&spec, &views, fleet.has_probe()) {
        Ok(p) => p,
        Err(problems) => {
            eprintln!("graywire rollout: refusing to start (nothing was changed):");
            for p in problems {
                eprintln!("  - {p}");
            }
            return (2, None);
        }
    };
    let Some(first) = views.first() else {
        return (2, None);
    };
    if args.dry_run {
        print!(
            "{}",
            plan::render(&spec, &the_plan, first, &spec.admin_urls)
        );
        return (0, None);
    }
    let names: Vec<String> = the_plan.items.iter().map(|i| i.node.name.clone()).collect();
    let progress = Progress::new(&names, args.quiet);
    let report = runner::run(&spec, &fleet, &the_plan, &progress).await;
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(j) => println!("{j}"),
            Err(e) => eprintln!("graywire rollout: cannot write the report as JSON: {e}"),
        }
    } else {
        print!("{}", report.human());
    }
    (if report.ok { 0 } else { 1 }, Some(report))
}

/// The rollout's request from its flags; every problem is listed.
pub fn spec(args: &RolloutArgs) -> Result<RolloutSpec, Vec<String>> {
    let mut problems = Vec::new();
    let mut template = |kind, text: Option<&String>| {
        text.and_then(|t| match Template::parse(kind, t) {
            Ok(t) => Some(t),
            Err(e) => {
                problems.push(e.to_string());
                None
            }
        })
    };
    let upgrade = template(CommandKind::Upgrade, Some(&args.upgrade_cmd));
    let switchover = template(CommandKind::Switchover, args.switchover_cmd.as_ref());
    let finalize = template(CommandKind::Finalize, args.finalize_cmd.as_ref());
    for url in &args.admins {
        if let Err(e) = graywire_api::admin_address(url) {
            problems.push(format!("--admin: {e}"));
        }
    }
    let mut data_dirs = std::collections::BTreeMap::new();
    for d in &args.data_dirs {
        match d.split_once('=') {
            Some((node, path)) if !node.is_empty() && path.starts_with('/') => {
                if data_dirs
                    .insert(node.to_owned(), PathBuf::from(path))
                    .is_some()
                {
                    problems.push(format!("--data-dir: {node} is given twice"));
                }
            }
            _ => problems.push(format!("--data-dir {d:?}: expected NODE=/absolute/path")),
        }
    }
    let mut gate = graywire_probe::gate::GateQuery::default();
    for (key, value) in [
        ("max_stall", &args.max_stall),
        ("max_gaps", &args.max_gaps),
        ("max_p99", &args.max_p99),
        ("max_lag", &args.max_lag),
    ] {
        if let Some(v) = value {
            if let Err(e) = gate.set(key, v) {
                problems.push(format!("--{}: {e}", key.replace('_', "-")));
            }
        }
    }
    if args.drain_timeout > std::time::Duration::from_secs(3600) {
        problems.push("--drain-timeout may be at most 1h (what a drain call waits at most)".into());
    }
    if args.settle > graywire_probe::gate::MAX_WINDOW {
        problems.push("--settle may be at most 24h (the longest gate window)".into());
    }
    if args.settle.is_zero() {
        problems.push("--settle must be longer than zero".into());
    }
    if args
        .expect_version
        .as_deref()
        .is_some_and(|v| v.trim().is_empty())
    {
        problems.push("--expect-version is empty".into());
    }
    let Some(upgrade) = upgrade else {
        return Err(problems);
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(RolloutSpec {
        admin_urls: args.admins.clone(),
        token: args
            .token
            .clone()
            .or_else(|| std::env::var("GRAYWIRE_ADMIN_TOKEN").ok())
            .filter(|t| !t.is_empty()),
        upgrade,
        switchover,
        finalize,
        preserve_downgrade: args.preserve_downgrade,
        expect_version: args.expect_version.clone(),
        data_dirs,
        gate,
        settle: args.settle,
        max_lag_bytes: args.max_lag_bytes,
        drain_timeout: args.drain_timeout,
        command_timeout: args.command_timeout,
        ready_timeout: args.ready_timeout,
        gate_timeout: args.gate_timeout,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn flags(extra: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = [
            "--admin",
            "http://127.0.0.1:9930",
            "--upgrade-cmd",
            "up.sh {node}",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }

    #[test]
    fn good_flags_make_a_spec() {
        let args = parse(flags(&[
            "--data-dir",
            "pg1=/var/lib/pg1",
            "--max-stall",
            "2s",
            "--max-gaps",
            "0",
            "--settle",
            "10s",
            "--expect-version",
            "15.20",
        ]))
        .unwrap();
        let s = spec(&args).unwrap();
        assert_eq!(s.data_dirs["pg1"], PathBuf::from("/var/lib/pg1"));
        assert_eq!(s.gate.max_stall, Some(std::time::Duration::from_secs(2)));
        assert_eq!(s.settle, std::time::Duration::from_secs(10));
        assert!(s.upgrade.uses("node"));
    }

    #[test]
    fn every_bad_flag_is_refused_with_its_name() {
        let args = parse(flags(&[
            "--admin",
            "https://x:1",
            "--data-dir",
            "pg1",
            "--data-dir",
            "pg2=relative/path",
            "--data-dir",
            "pg3=/a",
            "--data-dir",
            "pg3=/b",
            "--max-stall",
            "soon",
            "--max-gaps=-1",
            "--switchover-cmd",
            "sw {nope}",
            "--expect-version",
            " ",
            "--drain-timeout",
            "2h",
            "--settle",
            "25h",
        ]))
        .unwrap();
        let problems = spec(&args).unwrap_err().join("\n");
        for want in [
            "--admin: \"https://x:1\" is not an admin URL",
            "--data-dir \"pg1\": expected NODE=/absolute/path",
            "--data-dir \"pg2=relative/path\": expected NODE=/absolute/path",
            "--data-dir: pg3 is given twice",
            "--max-stall: max_stall=\"soon\" is not a duration",
            "--max-gaps: max_gaps=\"-1\" is not a whole number",
            "--switchover-cmd: unknown placeholder {nope}",
            "--expect-version is empty",
            "--drain-timeout may be at most 1h",
            "--settle may be at most 24h",
        ] {
            assert!(problems.contains(want), "missing {want:?} in:\n{problems}");
        }
    }

    #[test]
    fn clap_refuses_missing_and_malformed_flags() {
        let e = parse(["--admin", "http://127.0.0.1:1"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("--upgrade-cmd"), "{e}");
        let e = parse(flags(&["--settle", "forever"]))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("is not a duration"), "{e}");
        let e = parse(flags(&["--zap"])).err().unwrap().to_string();
        assert!(e.contains("--zap"), "{e}");
    }

    #[tokio::test]
    async fn an_unreachable_instance_is_refused_before_anything_changes() {
        // A port nothing listens on: bind one, then free it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut f = flags(&[]);
        f[1] = format!("http://127.0.0.1:{port}");
        let (code, report) = run(parse(f).unwrap()).await;
        assert_eq!(code, 2);
        assert!(report.is_none());
    }
}
