//! Table-driven tests of the router's choices: topologies (primary up, down, drained, standbys
//! within or over the lag bounds, split brain, pause) x targets -> the node chosen and the
//! nodes a bound session may stay on.

use std::time::Duration;

use super::*;
use crate::config::ClientAuth;
use crate::topology::{AdminState, Health, NodeName, NodeStatus, Role, Snapshot, Topology};

/// One node of a test topology, `pg<i>` by its place in the list.
#[derive(Clone, Copy)]
struct N {
    role: Role,
    health: Health,
    admin: AdminState,
    lsn: Option<u64>,
    delay: Option<f64>,
    timeline: Option<u32>,
    /// Sessions bound to it.
    sessions: usize,
}

fn primary() -> N {
    N {
        role: Role::Primary,
        health: Health::Up,
        admin: AdminState::Active,
        lsn: Some(1000),
        delay: None,
        timeline: Some(1),
        sessions: 0,
    }
}

/// A standby that replayed up to `lsn`, `delay` seconds behind.
fn standby(lsn: u64, delay: f64) -> N {
    N {
        role: Role::Standby,
        lsn: Some(lsn),
        delay: Some(delay),
        timeline: None,
        ..primary()
    }
}

impl N {
    fn health(self, health: Health) -> N {
        N { health, ..self }
    }
    fn admin(self, admin: AdminState) -> N {
        N { admin, ..self }
    }
    fn lsn(self, lsn: Option<u64>) -> N {
        N { lsn, ..self }
    }
    fn delay(self, delay: Option<f64>) -> N {
        N { delay, ..self }
    }
    fn timeline(self, timeline: Option<u32>) -> N {
        N { timeline, ..self }
    }
    fn sessions(self, sessions: usize) -> N {
        N { sessions, ..self }
    }
    fn role(self, role: Role) -> N {
        N { role, ..self }
    }
}

fn name(i: usize) -> NodeName {
    NodeName::new(format!("pg{i}"))
}

fn snapshot(nodes: &[N], paused: bool, prefer_highest_timeline: bool) -> Snapshot {
    Snapshot {
        nodes: nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let mut s = NodeStatus::new(NodeConfig {
                    name: name(i),
                    host: "127.0.0.1".into(),
                    port: 5000 + i as u16,
                });
                s.role = n.role;
                s.health = n.health;
                s.admin = n.admin;
                s.wal.lsn = n.lsn;
                s.wal.replay_delay = n.delay;
                s.wal.timeline = n.timeline;
                s
            })
            .collect(),
        paused,
        prefer_highest_timeline,
    }
}

/// Routing without lag bounds or fallback.
fn plain() -> RoutingConfig {
    RoutingConfig::default()
}
fn fallback() -> RoutingConfig {
    RoutingConfig {
        read_fallback_to_primary: true,
        ..plain()
    }
}
/// At most 100 bytes behind the primary.
fn bytes_bound() -> RoutingConfig {
    RoutingConfig {
        max_lag_bytes: Some(100),
        ..plain()
    }
}
/// At most one second behind.
fn time_bound() -> RoutingConfig {
    RoutingConfig {
        max_lag: Some(Duration::from_secs(1)),
        ..plain()
    }
}
fn both_bounds() -> RoutingConfig {
    RoutingConfig {
        max_lag_bytes: Some(100),
        max_lag: Some(Duration::from_secs(1)),
        ..plain()
    }
}

struct Case {
    name: &'static str,
    nodes: Vec<N>,
    prefer_highest_timeline: bool,
    paused: bool,
    routing: RoutingConfig,
    target: Target,
    /// The node `choose` picks.
    chosen: Option<&'static str>,
    /// The nodes `fits` accepts (of all listed, and one that is not).
    fitting: &'static [&'static str],
}

fn case(
    name: &'static str,
    nodes: Vec<N>,
    routing: RoutingConfig,
    target: Target,
    chosen: Option<&'static str>,
    fitting: &'static [&'static str],
) -> Case {
    Case {
        name,
        nodes,
        prefer_highest_timeline: false,
        paused: false,
        routing,
        target,
        chosen,
        fitting,
    }
}

#[test]
fn the_router_chooses_by_topology_and_target() {
    use AdminState::{Drained, Draining};
    use Health::{Down, Pending};
    use Target::{ReadOnly, ReadWrite};
    let split = |t0, t1| vec![primary().timeline(t0), primary().timeline(t1)];
    let cases = vec![
        // Writes: the one primary in rotation.
        case(
            "primary up",
            vec![primary()],
            plain(),
            ReadWrite,
            Some("pg0"),
            &["pg0"],
        ),
        case(
            "primary listed last",
            vec![standby(1000, 0.0), standby(1000, 0.0), primary()],
            plain(),
            ReadWrite,
            Some("pg2"),
            &["pg2"],
        ),
        case(
            "primary down",
            vec![primary().health(Down), standby(1000, 0.0)],
            plain(),
            ReadWrite,
            None,
            &[],
        ),
        case(
            "primary not checked yet",
            vec![primary().health(Pending)],
            plain(),
            ReadWrite,
            None,
            &[],
        ),
        case(
            "primary draining",
            vec![primary().admin(Draining)],
            plain(),
            ReadWrite,
            None,
            &[],
        ),
        case(
            "primary drained",
            vec![primary().admin(Drained)],
            plain(),
            ReadWrite,
            None,
            &[],
        ),
        case(
            "a node of unknown role is no primary",
            vec![primary().role(Role::Unknown)],
            fallback(),
            ReadWrite,
            None,
            &[],
        ),
        case(
            "split brain: writes go nowhere",
            split(Some(1), Some(2)),
            plain(),
            ReadWrite,
            None,
            &[],
        ),
        Case {
            prefer_highest_timeline: true,
            ..case(
                "split brain, highest timeline preferred",
                split(Some(1), Some(2)),
                plain(),
                ReadWrite,
                Some("pg1"),
                &["pg1"],
            )
        },
        Case {
            prefer_highest_timeline: true,
            ..case(
                "split brain, highest timeline preferred, listed first",
                split(Some(3), Some(2)),
                plain(),
                ReadWrite,
                Some("pg0"),
                &["pg0"],
            )
        },
        Case {
            prefer_highest_timeline: true,
            ..case(
                "split brain on one timeline: nobody",
                split(Some(2), Some(2)),
                plain(),
                ReadWrite,
                None,
                &[],
            )
        },
        Case {
            prefer_highest_timeline: true,
            ..case(
                "split brain, one timeline unknown: the known one",
                split(None, Some(2)),
                plain(),
                ReadWrite,
                Some("pg1"),
                &["pg1"],
            )
        },
        Case {
            prefer_highest_timeline: true,
            ..case(
                "split brain, no timeline known: nobody",
                split(None, None),
                plain(),
                ReadWrite,
                None,
                &[],
            )
        },
        case(
            "two primaries, one drained: no split brain",
            vec![primary().admin(Drained), primary()],
            plain(),
            ReadWrite,
            Some("pg1"),
            &["pg1"],
        ),
        case(
            "two primaries, one down: no split brain",
            vec![primary(), primary().health(Down)],
            plain(),
            ReadWrite,
            Some("pg0"),
            &["pg0"],
        ),
        Case {
            paused: true,
            ..case(
                "paused: choose ignores the pause",
                vec![primary(), standby(1000, 0.0)],
                plain(),
                ReadWrite,
                Some("pg0"),
                &["pg0"],
            )
        },
        // Reads: a standby in rotation within the bounds, or the primary with fallback.
        case(
            "standby up",
            vec![primary(), standby(1000, 0.0)],
            plain(),
            ReadOnly,
            Some("pg1"),
            &["pg1"],
        ),
        case(
            "standby up, fallback on: the standby, both fit",
            vec![primary(), standby(1000, 0.0)],
            fallback(),
            ReadOnly,
            Some("pg1"),
            &["pg0", "pg1"],
        ),
        case(
            "standby down, no fallback",
            vec![primary(), standby(1000, 0.0).health(Down)],
            plain(),
            ReadOnly,
            None,
            &[],
        ),
        case(
            "standby down, fallback: the primary",
            vec![primary(), standby(1000, 0.0).health(Down)],
            fallback(),
            ReadOnly,
            Some("pg0"),
            &["pg0"],
        ),
        case(
            "standby draining, fallback: the primary",
            vec![primary(), standby(1000, 0.0).admin(Draining)],
            fallback(),
            ReadOnly,
            Some("pg0"),
            &["pg0"],
        ),
        case(
            "standby drained, no fallback",
            vec![primary(), standby(1000, 0.0).admin(Drained)],
            plain(),
            ReadOnly,
            None,
            &[],
        ),
        case(
            "only a primary, no fallback",
            vec![primary()],
            plain(),
            ReadOnly,
            None,
            &[],
        ),
        case(
            "standbys without a primary, no bounds",
            vec![primary().health(Down), standby(900, 3.0)],
            plain(),
            ReadOnly,
            Some("pg1"),
            &["pg1"],
        ),
        case(
            "the least loaded standby",
            vec![
                primary(),
                standby(1000, 0.0).sessions(3),
                standby(1000, 0.0).sessions(1),
                standby(1000, 0.0).sessions(2),
            ],
            plain(),
            ReadOnly,
            Some("pg2"),
            &["pg1", "pg2", "pg3"],
        ),
        case(
            "equal load: the first listed",
            vec![
                primary(),
                standby(1000, 0.0).sessions(1),
                standby(1000, 0.0).sessions(1),
            ],
            plain(),
            ReadOnly,
            Some("pg1"),
            &["pg1", "pg2"],
        ),
        case(
            "a busier standby beats a primary with fallback",
            vec![primary(), standby(1000, 0.0).sessions(50)],
            fallback(),
            ReadOnly,
            Some("pg1"),
            &["pg0", "pg1"],
        ),
        case(
            "lag in bytes within the bound",
            vec![primary(), standby(950, 0.0)],
            bytes_bound(),
            ReadOnly,
            Some("pg1"),
            &["pg1"],
        ),
        case(
            "lag in bytes at the bound",
            vec![primary(), standby(900, 0.0)],
            bytes_bound(),
            ReadOnly,
            Some("pg1"),
            &["pg1"],
        ),
        case(
            "lag in bytes over the bound",
            vec![primary(), standby(899, 0.0)],
            bytes_bound(),
            ReadOnly,
            None,
            &[],
        ),
        case(
            "a standby ahead of the primary's last check is not behind",
            vec![primary(), standby(1200, 0.0)],
            bytes_bound(),
            ReadOnly,
            Some("pg1"),
            &["pg1"],
        ),
        case(
            "over the byte bound: the one within it, though busier",
            vec![primary(), standby(500, 0.0), standby(1000, 0.0).sessions(9)],
            bytes_bound(),
            ReadOnly,
            Some("pg2"),
            &["pg2"],
        ),
        case(
            "standby position unknown: not within the byte bound",
            vec![primary(), standby(1000, 0.0).lsn(None)],
            bytes_bound(),
            ReadOnly,
            None,
            &[],
        ),
        case(
            "primary position unknown: not within the byte bound",
            vec![primary().lsn(None), standby(1000, 0.0)],
            bytes_bound(),
            ReadOnly,
            None,
            &[],
        ),
        case(
            "primary down: a byte lag cannot be known",
            vec![primary().health(Down), standby(1000, 0.0)],
            bytes_bound(),
            ReadOnly,
            None,
            &[],
        ),
        case(
            "primary drained but up: the byte lag is still measured against it",
            vec![primary().admin(Drained), standby(1000, 0.0)],
            bytes_bound(),
            ReadOnly,
            Some("pg1"),
            &["pg1"],
        ),
        case(
            "split brain: a byte lag cannot be known",
            vec![primary(), primary(), standby(1000, 0.0)],
            bytes_bound(),
            ReadOnly,
            None,
            &[],
        ),
        case(
            "lag in time within the bound",
            vec![primary(), standby(1000, 0.5)],
            time_bound(),
            ReadOnly,
            Some("pg1"),
            &["pg1"],
        ),
        case(
            "lag in time at the bound",
            vec![primary(), standby(1000, 1.0)],
            time_bound(),
            ReadOnly,
            Some("pg1"),
            &["pg1"],
        ),
        case(
            "lag in time over the bound",
            vec![primary(), standby(1000, 1.5)],
            time_bound(),
            ReadOnly,
            None,
            &[],
        ),
        case(
            "lag in time over the bound, fallback: the primary",
            vec![primary(), standby(1000, 1.5)],
            RoutingConfig {
                read_fallback_to_primary: true,
                ..time_bound()
            },
            ReadOnly,
            Some("pg0"),
            &["pg0"],
        ),
        case(
            "replay delay unknown: not within the time bound",
            vec![primary(), standby(1000, 0.0).delay(None)],
            time_bound(),
            ReadOnly,
            None,
            &[],
        ),
        case(
            "primary down: the time bound still applies",
            vec![primary().health(Down), standby(1000, 0.2)],
            time_bound(),
            ReadOnly,
            Some("pg1"),
            &["pg1"],
        ),
        case(
            "both bounds: within both",
            vec![primary(), standby(950, 0.5)],
            both_bounds(),
            ReadOnly,
            Some("pg1"),
            &["pg1"],
        ),
        case(
            "both bounds: over the byte bound only",
            vec![primary(), standby(800, 0.5)],
            both_bounds(),
            ReadOnly,
            None,
            &[],
        ),
        case(
            "both bounds: over the time bound only",
            vec![primary(), standby(950, 2.0)],
            both_bounds(),
            ReadOnly,
            None,
            &[],
        ),
        case(
            "split brain, no standby, fallback: nobody",
            vec![primary(), primary()],
            fallback(),
            ReadOnly,
            None,
            &[],
        ),
        Case {
            prefer_highest_timeline: true,
            ..case(
                "split brain resolved by timeline, fallback: the winner",
                split(Some(1), Some(2)),
                fallback(),
                ReadOnly,
                Some("pg1"),
                &["pg1"],
            )
        },
        Case {
            paused: true,
            ..case(
                "paused: reads are chosen too",
                vec![primary(), standby(1000, 0.0)],
                plain(),
                ReadOnly,
                Some("pg1"),
                &["pg1"],
            )
        },
    ];
    for c in cases {
        let snap = snapshot(&c.nodes, c.paused, c.prefer_highest_timeline);
        let loads = NodeLoads::default();
        let _bound: Vec<_> = c
            .nodes
            .iter()
            .enumerate()
            .flat_map(|(i, n)| (0..n.sessions).map(move |_| i))
            .map(|i| loads.bind(&name(i)))
            .collect();
        let chosen = choose(&snap, c.target, &c.routing, &loads).map(|n| n.name.to_string());
        assert_eq!(chosen.as_deref(), c.chosen, "{}: choose", c.name);
        let fitting: Vec<String> = (0..=c.nodes.len())
            .map(name)
            .filter(|n| fits(&snap, n, c.target, &c.routing))
            .map(|n| n.to_string())
            .collect();
        assert_eq!(fitting, c.fitting, "{}: fits", c.name);
        // A write target fits exactly the node `primary` names.
        if c.target == ReadWrite {
            let p = primary_of(&snap);
            assert_eq!(p.as_deref(), c.chosen, "{}: primary", c.name);
        }
    }
}

fn primary_of(snap: &Snapshot) -> Option<String> {
    super::primary(snap).map(|n| n.name.to_string())
}

#[test]
fn the_session_target_comes_from_user_database_and_startup_parameters() {
    use Target::{ReadOnly, ReadWrite};
    let routing = RoutingConfig {
        read_only_databases: vec!["reports".into(), "ro".into()],
        ..RoutingConfig::default()
    };
    /// Startup parameters, in order.
    type Params = &'static [(&'static str, &'static str)];
    // (case, user's target, startup parameters, expected)
    let cases: &[(&str, Target, Params, Target)] = &[
        ("plain", ReadWrite, &[("user", "u")], ReadWrite),
        ("read-only user", ReadOnly, &[("user", "u")], ReadOnly),
        (
            "read-only user asking for writes still reads",
            ReadOnly,
            &[("user", "u"), ("default_transaction_read_only", "off")],
            ReadOnly,
        ),
        (
            "read-only database",
            ReadWrite,
            &[("user", "u"), ("database", "reports")],
            ReadOnly,
        ),
        (
            "no database: the user name is the database",
            ReadWrite,
            &[("user", "ro")],
            ReadOnly,
        ),
        (
            "a database is named: the user name is not looked at",
            ReadWrite,
            &[("user", "ro"), ("database", "shop")],
            ReadWrite,
        ),
        (
            "database names match exactly",
            ReadWrite,
            &[("user", "u"), ("database", "Reports")],
            ReadWrite,
        ),
        (
            "parameter on",
            ReadWrite,
            &[("user", "u"), ("default_transaction_read_only", "on")],
            ReadOnly,
        ),
        (
            "parameter TRUE",
            ReadWrite,
            &[("user", "u"), ("default_transaction_read_only", "TRUE")],
            ReadOnly,
        ),
        (
            "parameter yes",
            ReadWrite,
            &[("user", "u"), ("default_transaction_read_only", "yes")],
            ReadOnly,
        ),
        (
            "parameter 1",
            ReadWrite,
            &[("user", "u"), ("default_transaction_read_only", "1")],
            ReadOnly,
        ),
        (
            "parameter off",
            ReadWrite,
            &[("user", "u"), ("default_transaction_read_only", "off")],
            ReadWrite,
        ),
        (
            "parameter 0",
            ReadWrite,
            &[("user", "u"), ("default_transaction_read_only", "0")],
            ReadWrite,
        ),
        (
            "options -c",
            ReadWrite,
            &[
                ("user", "u"),
                ("options", "-c default_transaction_read_only=on"),
            ],
            ReadOnly,
        ),
        (
            "options --name=value",
            ReadWrite,
            &[
                ("user", "u"),
                ("options", "--default_transaction_read_only=yes"),
            ],
            ReadOnly,
        ),
        (
            "options with dashes",
            ReadWrite,
            &[
                ("user", "u"),
                ("options", "--default-transaction-read-only=on"),
            ],
            ReadOnly,
        ),
        (
            "options among others",
            ReadWrite,
            &[
                ("user", "u"),
                (
                    "options",
                    "-c work_mem=8MB -c default_transaction_read_only=true",
                ),
            ],
            ReadOnly,
        ),
        (
            "options off",
            ReadWrite,
            &[
                ("user", "u"),
                ("options", "-c default_transaction_read_only=off"),
            ],
            ReadWrite,
        ),
        (
            "options about another setting",
            ReadWrite,
            &[("user", "u"), ("options", "-c transaction_read_only=on")],
            ReadWrite,
        ),
    ];
    for (name, user_target, params, want) in cases {
        let user = UserConfig {
            name: "u".into(),
            auth: ClientAuth::Trust,
            backend: None,
            target: *user_target,
            pool_mode: None,
        };
        let params = StartupParams {
            params: params
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            minor: 0,
        };
        assert_eq!(session_target(&routing, &user, &params), *want, "{name}");
    }
}

/// `wait_for_node` holds while paused even when `choose` would pick a node.
#[tokio::test(start_paused = true)]
async fn a_pause_holds_every_target_until_the_hold_timeout() {
    // (case, paused, target, expected node; None: held until the timeout)
    let cases: &[(&str, bool, Target, Option<&str>)] = &[
        ("running, writes", false, Target::ReadWrite, Some("pg0")),
        ("running, reads", false, Target::ReadOnly, Some("pg1")),
        ("paused, writes", true, Target::ReadWrite, None),
        ("paused, reads", true, Target::ReadOnly, None),
    ];
    let nodes: Vec<NodeConfig> = snapshot(&[primary(), standby(1000, 0.0)], false, false)
        .nodes
        .into_iter()
        .map(|n| n.config)
        .collect();
    for (case, paused, target, want) in cases {
        let t = Topology::new(&nodes);
        for (i, n) in [primary(), standby(1000, 0.0)].iter().enumerate() {
            t.update(&name(i), |s| {
                let mut s = s.clone();
                s.role = n.role;
                s.health = n.health;
                s
            });
        }
        t.set_paused(*paused);
        let got = wait_for_node(
            &t,
            *target,
            &RoutingConfig::default(),
            &NodeLoads::default(),
            Duration::from_secs(2),
            &CancellationToken::new(),
        )
        .await;
        match (got, want) {
            (Ok(n), Some(w)) => assert_eq!(n.name.as_str(), *w, "{case}"),
            (Err(SessionError::NoPrimary(_)), None) => {}
            (got, _) => panic!("{case}: {:?}", got.map(|n| n.name)),
        }
    }
}
