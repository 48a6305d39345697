//! Table-driven tests of topology transitions: health checks rising and falling, role
//! changes, passive failures, operator drain states, split brain and the published changes.

use std::time::Duration;

use super::*;

fn config(name: &str, port: u16) -> NodeConfig {
    NodeConfig {
        name: NodeName::new(name),
        host: "127.0.0.1".into(),
        port,
    }
}

/// One event in a node's life.
#[derive(Clone, Copy, Debug)]
enum Ev {
    /// A health check succeeded and saw this role.
    Ok(Role),
    /// A health check failed.
    Fail,
    /// A connection under a session failed ([`NodeStatus::passive_failure`]).
    Passive,
}
use Ev::{Fail, Ok as Up, Passive};

/// What a test looks at after the events.
#[derive(Debug, PartialEq)]
struct Seen {
    health: Health,
    role: Role,
    streak: u32,
    last_error: Option<&'static str>,
    /// The event at which `changed_at` was last set (None: never since creation).
    changed_at: Option<usize>,
}

fn seen(health: Health, role: Role, streak: u32, changed_at: Option<usize>) -> Seen {
    Seen {
        health,
        role,
        streak,
        last_error: None,
        changed_at,
    }
}

impl Seen {
    fn error(self) -> Seen {
        Seen {
            last_error: Some("refused"),
            ..self
        }
    }
}

struct Case {
    name: &'static str,
    fall: u32,
    rise: u32,
    events: Vec<Ev>,
    want: Seen,
}

fn case(name: &'static str, fall: u32, rise: u32, events: Vec<Ev>, want: Seen) -> Case {
    Case {
        name,
        fall,
        rise,
        events,
        want,
    }
}

#[test]
fn health_rises_and_falls_by_consecutive_checks() {
    use Health::{Down, Pending, Up as H};
    use Role::{Primary, Standby, Unknown};
    let p = Up(Primary);
    let s = Up(Standby);
    let cases = vec![
        case(
            "no check yet",
            3,
            2,
            vec![],
            seen(Pending, Unknown, 0, None),
        ),
        case(
            "first success decides at once",
            3,
            2,
            vec![p],
            seen(H, Primary, 0, Some(0)),
        ),
        case(
            "first failure decides at once",
            3,
            2,
            vec![Fail],
            seen(Down, Unknown, 0, Some(0)).error(),
        ),
        case(
            "first success of unknown role: up, role unknown",
            3,
            2,
            vec![Up(Unknown)],
            seen(H, Unknown, 0, Some(0)),
        ),
        case(
            "failures under fall: still up, counted",
            3,
            2,
            vec![p, Fail, Fail],
            seen(H, Primary, 2, Some(0)).error(),
        ),
        case(
            "fall failures: down, count reset",
            3,
            2,
            vec![p, Fail, Fail, Fail],
            seen(Down, Primary, 0, Some(3)).error(),
        ),
        case(
            "fall 1: the first failure takes it down",
            1,
            2,
            vec![p, Fail],
            seen(Down, Primary, 0, Some(1)).error(),
        ),
        case(
            "a success resets the failure count",
            3,
            2,
            vec![p, Fail, Fail, p, Fail, Fail],
            seen(H, Primary, 2, Some(0)).error(),
        ),
        case(
            "a success clears the last error",
            3,
            2,
            vec![p, Fail, p],
            seen(H, Primary, 0, Some(0)),
        ),
        case(
            "down: a failure keeps it down, count zero",
            3,
            2,
            vec![Fail, Fail, Fail],
            seen(Down, Unknown, 0, Some(0)).error(),
        ),
        case(
            "down: successes under rise are counted, the role is not taken",
            3,
            2,
            vec![p, Fail, Fail, Fail, s],
            seen(Down, Primary, 1, Some(3)),
        ),
        case(
            "down: rise successes bring it up with the role seen",
            3,
            2,
            vec![p, Fail, Fail, Fail, s, s],
            seen(H, Standby, 0, Some(5)),
        ),
        case(
            "down: a failure between successes starts the count again",
            3,
            2,
            vec![Fail, s, Fail, s],
            seen(Down, Unknown, 1, Some(0)),
        ),
        case(
            "rise 1: the first success brings it up",
            3,
            1,
            vec![Fail, s],
            seen(H, Standby, 0, Some(1)),
        ),
        case(
            "promotion while up: the role changes at once",
            3,
            2,
            vec![s, s, p],
            seen(H, Primary, 0, Some(2)),
        ),
        case(
            "demotion while up: the role changes at once",
            3,
            2,
            vec![p, s],
            seen(H, Standby, 0, Some(1)),
        ),
        case(
            "a role change resets the failure count",
            3,
            2,
            vec![p, Fail, Fail, s],
            seen(H, Standby, 0, Some(3)),
        ),
        case(
            "the same role again changes nothing",
            3,
            2,
            vec![p, p, p],
            seen(H, Primary, 0, Some(0)),
        ),
        case(
            "a passive failure counts like a failed check",
            3,
            2,
            vec![p, Passive, Fail],
            seen(H, Primary, 2, Some(0)).error(),
        ),
        case(
            "passive failures take it down at fall",
            2,
            2,
            vec![p, Passive, Passive],
            seen(Down, Primary, 0, Some(2)).error(),
        ),
        case(
            "a passive failure while down keeps it down",
            1,
            2,
            vec![p, Fail, Passive],
            seen(Down, Primary, 0, Some(1)).error(),
        ),
        case(
            "a passive failure resets the success count while down",
            3,
            2,
            vec![Fail, s, Passive, s],
            seen(Down, Unknown, 1, Some(0)),
        ),
    ];
    let t0 = Instant::now();
    let at = |i: usize| t0 + Duration::from_secs(i as u64 + 1);
    for c in cases {
        let created = NodeStatus::new(config("pg1", 5432));
        let mut n = created.clone();
        for (i, ev) in c.events.iter().enumerate() {
            n = match ev {
                Up(role) => n.observe(
                    &Observation::Ok {
                        role: *role,
                        version: "16".into(),
                        wal: WalPosition {
                            lsn: Some(i as u64),
                            ..WalPosition::default()
                        },
                        started_at: Some(1.0),
                    },
                    c.fall,
                    c.rise,
                    at(i),
                ),
                Fail => n.observe(
                    &Observation::Failed {
                        reason: "refused".into(),
                    },
                    c.fall,
                    c.rise,
                    at(i),
                ),
                Passive => n.passive_failure("refused", c.fall, at(i)),
            };
            assert_eq!(
                n.admin,
                AdminState::Active,
                "{}: health never drains",
                c.name
            );
        }
        let changed_at = (0..c.events.len()).rfind(|i| n.changed_at == at(*i));
        if changed_at.is_none() {
            assert_eq!(n.changed_at, created.changed_at, "{}", c.name);
        }
        let got = Seen {
            health: n.health,
            role: n.role,
            streak: n.streak,
            last_error: n.last_error.as_deref().map(|_| "refused"),
            changed_at,
        };
        assert_eq!(got, c.want, "{}", c.name);
        // A success, whatever the health it leaves, records what the check saw.
        if let Some(i) = c.events.iter().rposition(|e| matches!(e, Up(_))) {
            if c.events[i + 1..].iter().all(|e| matches!(e, Up(_))) {
                assert_eq!(n.wal.lsn, Some(i as u64), "{}: wal", c.name);
                assert_eq!(n.version.as_deref(), Some("16"), "{}: version", c.name);
                assert_eq!(n.started_at, Some(1.0), "{}: started_at", c.name);
            }
        }
    }
}

#[test]
fn state_and_rotation_follow_health_and_operator_state() {
    use AdminState::{Active, Drained, Draining};
    use Health::{Down, Pending, Up};
    // (health, operator state, state_str, in rotation)
    let cases = [
        (Up, Active, "up", true),
        (Up, Draining, "draining", false),
        (Up, Drained, "drained", false),
        (Down, Active, "down", false),
        (Down, Draining, "down", false),
        (Down, Drained, "down", false),
        (Pending, Active, "down", false),
        (Pending, Draining, "down", false),
        (Pending, Drained, "down", false),
    ];
    for (health, admin, state, in_rotation) in cases {
        for role in Role::ALL {
            let mut n = NodeStatus::new(config("pg1", 5432));
            (n.health, n.admin, n.role) = (health, admin, role);
            let what = format!("{health:?} {admin:?} {role:?}");
            assert_eq!(n.state_str(), state, "{what}");
            assert_eq!(n.in_rotation(), in_rotation, "{what}");
            assert_eq!(
                n.is_usable_primary(),
                in_rotation && role == Role::Primary,
                "{what}"
            );
        }
    }
}

/// A node of a snapshot: health, operator state, role, WAL position.
type Spec = (Health, AdminState, Role, Option<u64>);

fn snapshot(specs: &[Spec]) -> Snapshot {
    Snapshot {
        nodes: specs
            .iter()
            .enumerate()
            .map(|(i, (health, admin, role, lsn))| {
                let mut n = NodeStatus::new(config(&format!("pg{i}"), 5000 + i as u16));
                (n.health, n.admin, n.role, n.wal.lsn) = (*health, *admin, *role, *lsn);
                n
            })
            .collect(),
        paused: false,
        prefer_highest_timeline: false,
    }
}

#[test]
fn split_brain_primaries_and_lag_come_from_the_snapshot() {
    use AdminState::{Active, Drained, Draining};
    use Health::{Down, Pending, Up};
    use Role::{Primary, Standby, Unknown};
    struct Case {
        name: &'static str,
        nodes: Vec<Spec>,
        primaries: &'static [&'static str],
        split_brain: bool,
        /// `lag_bytes` of each node, in order.
        lag: Vec<Option<u64>>,
    }
    let cases = vec![
        Case {
            name: "no nodes",
            nodes: vec![],
            primaries: &[],
            split_brain: false,
            lag: vec![],
        },
        Case {
            name: "one primary, two standbys",
            nodes: vec![
                (Up, Active, Primary, Some(1000)),
                (Up, Active, Standby, Some(900)),
                (Up, Active, Standby, Some(1000)),
            ],
            primaries: &["pg0"],
            split_brain: false,
            lag: vec![None, Some(100), Some(0)],
        },
        Case {
            name: "a standby ahead of the primary's last check: no lag",
            nodes: vec![
                (Up, Active, Primary, Some(1000)),
                (Up, Active, Standby, Some(1100)),
            ],
            primaries: &["pg0"],
            split_brain: false,
            lag: vec![None, Some(0)],
        },
        Case {
            name: "positions unknown: lag unknown",
            nodes: vec![
                (Up, Active, Primary, None),
                (Up, Active, Standby, Some(10)),
                (Up, Active, Primary, Some(10)),
                (Up, Active, Standby, None),
            ],
            primaries: &["pg0", "pg2"],
            split_brain: true,
            lag: vec![None, None, None, None],
        },
        Case {
            name: "primary down: no primary, lag unknown",
            nodes: vec![
                (Down, Active, Primary, Some(1000)),
                (Up, Active, Standby, Some(900)),
            ],
            primaries: &[],
            split_brain: false,
            lag: vec![None, None],
        },
        Case {
            name: "primary pending: no primary",
            nodes: vec![
                (Pending, Active, Primary, Some(1000)),
                (Up, Active, Standby, Some(900)),
            ],
            primaries: &[],
            split_brain: false,
            lag: vec![None, None],
        },
        Case {
            name: "primary draining: not in rotation, lag still measured against it",
            nodes: vec![
                (Up, Draining, Primary, Some(1000)),
                (Up, Active, Standby, Some(900)),
            ],
            primaries: &[],
            split_brain: false,
            lag: vec![None, Some(100)],
        },
        Case {
            name: "a standby's lag does not depend on its own state",
            nodes: vec![
                (Up, Active, Primary, Some(1000)),
                (Down, Drained, Standby, Some(400)),
            ],
            primaries: &["pg0"],
            split_brain: false,
            lag: vec![None, Some(600)],
        },
        Case {
            name: "two primaries in rotation: split brain, lag unknown",
            nodes: vec![
                (Up, Active, Primary, Some(1000)),
                (Up, Active, Primary, Some(500)),
                (Up, Active, Standby, Some(400)),
            ],
            primaries: &["pg0", "pg1"],
            split_brain: true,
            lag: vec![None, None, None],
        },
        Case {
            name: "two primaries, one drained: no split brain",
            nodes: vec![
                (Up, Drained, Primary, Some(1000)),
                (Up, Active, Primary, Some(500)),
            ],
            primaries: &["pg1"],
            split_brain: false,
            lag: vec![None, None],
        },
        Case {
            name: "two primaries, one draining: no split brain",
            nodes: vec![
                (Up, Active, Primary, Some(1000)),
                (Up, Draining, Primary, Some(500)),
            ],
            primaries: &["pg0"],
            split_brain: false,
            lag: vec![None, None],
        },
        Case {
            name: "two primaries, one down: no split brain",
            nodes: vec![
                (Down, Active, Primary, Some(1000)),
                (Up, Active, Primary, Some(500)),
                (Up, Active, Standby, Some(400)),
            ],
            primaries: &["pg1"],
            split_brain: false,
            lag: vec![None, None, Some(100)],
        },
        Case {
            name: "three primaries",
            nodes: vec![
                (Up, Active, Primary, None),
                (Up, Active, Primary, None),
                (Up, Active, Primary, None),
            ],
            primaries: &["pg0", "pg1", "pg2"],
            split_brain: true,
            lag: vec![None, None, None],
        },
        Case {
            name: "a node of unknown role is neither",
            nodes: vec![
                (Up, Active, Unknown, Some(1000)),
                (Up, Active, Standby, Some(900)),
            ],
            primaries: &[],
            split_brain: false,
            lag: vec![None, None],
        },
    ];
    for c in cases {
        let snap = snapshot(&c.nodes);
        let primaries: Vec<&str> = snap.primaries().map(|n| n.name().as_str()).collect();
        assert_eq!(primaries, c.primaries, "{}: primaries", c.name);
        assert_eq!(snap.split_brain(), c.split_brain, "{}: split brain", c.name);
        let lag: Vec<Option<u64>> = snap.nodes.iter().map(|n| snap.lag_bytes(n)).collect();
        assert_eq!(lag, c.lag, "{}: lag", c.name);
        for n in &snap.nodes {
            assert_eq!(
                snap.node(n.name()).map(|m| m.config.port),
                Some(n.config.port),
                "{}: node()",
                c.name
            );
        }
        assert!(snap.node(&NodeName::new("ghost")).is_none(), "{}", c.name);
    }
}

#[test]
fn updates_publish_only_what_routing_cares_about() {
    use AdminState::{Active, Drained, Draining};
    // A change to the node pg0 of a topology where it is an active primary (up).
    type Change = fn(&NodeStatus) -> NodeStatus;
    // (case, change, published)
    let cases: Vec<(&str, Change, bool)> = vec![
        ("nothing", |n| n.clone(), false),
        (
            "drain",
            |n| NodeStatus {
                admin: Draining,
                ..n.clone()
            },
            true,
        ),
        (
            "drained",
            |n| NodeStatus {
                admin: Drained,
                ..n.clone()
            },
            true,
        ),
        (
            "undrain (already active)",
            |n| NodeStatus {
                admin: Active,
                ..n.clone()
            },
            false,
        ),
        (
            "goes down",
            |n| NodeStatus {
                health: Health::Down,
                ..n.clone()
            },
            true,
        ),
        (
            "demoted",
            |n| NodeStatus {
                role: Role::Standby,
                ..n.clone()
            },
            true,
        ),
        (
            "a failed check under fall (streak only)",
            |n| {
                n.observe(
                    &Observation::Failed { reason: "x".into() },
                    3,
                    2,
                    Instant::now(),
                )
            },
            false,
        ),
        (
            "a new WAL position",
            |n| {
                let mut next = n.clone();
                next.wal.lsn = Some(42);
                next.wal.timeline = Some(2);
                next
            },
            false,
        ),
        (
            "a failed check at fall 1",
            |n| {
                n.observe(
                    &Observation::Failed { reason: "x".into() },
                    1,
                    2,
                    Instant::now(),
                )
            },
            true,
        ),
    ];
    for (name, change, published) in cases {
        let topo = Topology::new(&[config("pg0", 5000), config("pg1", 5001)]);
        let pg0 = NodeName::new("pg0");
        topo.update(&pg0, |n| NodeStatus {
            health: Health::Up,
            role: Role::Primary,
            ..n.clone()
        });
        let mut rx = topo.subscribe();
        rx.mark_unchanged();
        let (old, new) = topo.update(&pg0, change).expect("pg0 exists");
        assert_eq!(old.role, Role::Primary, "{name}: old");
        let now = topo.load();
        let stored = now.node(&pg0).expect("pg0");
        assert_eq!(
            (stored.health, stored.role, stored.admin, stored.streak),
            (new.health, new.role, new.admin, new.streak),
            "{name}: stored"
        );
        assert_eq!(
            rx.has_changed().expect("open"),
            published,
            "{name}: published"
        );
        // The other node is untouched.
        assert_eq!(
            now.node(&NodeName::new("pg1")).map(|n| n.health),
            Some(Health::Pending),
            "{name}"
        );
    }
}

#[test]
fn drain_and_undrain_take_a_primary_out_of_and_back_into_rotation() {
    use AdminState::{Active, Drained, Draining};
    // (operator state set, in rotation, split brain with a second primary)
    let cases = [
        (Draining, false, false),
        (Drained, false, false),
        (Active, true, true),
    ];
    let topo = Topology::new(&[config("pg0", 5000), config("pg1", 5001)]);
    for i in 0..2 {
        topo.update(&NodeName::new(format!("pg{i}")), |n| NodeStatus {
            health: Health::Up,
            role: Role::Primary,
            ..n.clone()
        });
    }
    assert!(topo.load().split_brain());
    let pg0 = NodeName::new("pg0");
    for (admin, in_rotation, split_brain) in cases {
        topo.update(&pg0, |n| NodeStatus { admin, ..n.clone() });
        let snap = topo.load();
        let n = snap.node(&pg0).expect("pg0");
        assert_eq!(n.in_rotation(), in_rotation, "{admin:?}");
        assert_eq!(snap.split_brain(), split_brain, "{admin:?}");
        // A health check does not undo the operator's state.
        topo.update(&pg0, |n| {
            n.observe(
                &Observation::Ok {
                    role: Role::Primary,
                    version: "16".into(),
                    wal: WalPosition::default(),
                    started_at: None,
                },
                3,
                2,
                Instant::now(),
            )
        });
        assert_eq!(topo.load().node(&pg0).expect("pg0").admin, admin);
    }
}

#[test]
fn pause_and_split_brain_policy_are_published() {
    struct Case {
        name: &'static str,
        /// What happens; returns what `set_paused` returned last, if it was called.
        action: fn(&Topology) -> Option<bool>,
        returned: Option<bool>,
        paused: bool,
        prefer_highest_timeline: bool,
        published: bool,
    }
    let cases = [
        Case {
            name: "pause",
            action: |t| Some(t.set_paused(true)),
            returned: Some(false),
            paused: true,
            prefer_highest_timeline: false,
            published: true,
        },
        Case {
            name: "resume while running",
            action: |t| Some(t.set_paused(false)),
            returned: Some(false),
            paused: false,
            prefer_highest_timeline: false,
            published: false,
        },
        Case {
            name: "pause twice",
            action: |t| {
                t.set_paused(true);
                Some(t.set_paused(true))
            },
            returned: Some(true),
            paused: true,
            prefer_highest_timeline: false,
            published: true,
        },
        Case {
            name: "pause then resume",
            action: |t| {
                t.set_paused(true);
                Some(t.set_paused(false))
            },
            returned: Some(true),
            paused: false,
            prefer_highest_timeline: false,
            published: true,
        },
        Case {
            name: "prefer the highest timeline",
            action: |t| {
                t.set_prefer_highest_timeline(true);
                None
            },
            returned: None,
            paused: false,
            prefer_highest_timeline: true,
            published: true,
        },
    ];
    for c in cases {
        let topo = Topology::new(&[config("pg0", 5000)]);
        let mut rx = topo.subscribe();
        rx.mark_unchanged();
        assert_eq!((c.action)(&topo), c.returned, "{}: returned", c.name);
        let snap = topo.load();
        assert_eq!(snap.paused, c.paused, "{}: paused", c.name);
        assert_eq!(
            snap.prefer_highest_timeline, c.prefer_highest_timeline,
            "{}: policy",
            c.name
        );
        assert_eq!(rx.has_changed().expect("open"), c.published, "{}", c.name);
    }
}

#[test]
fn a_reload_keeps_the_status_of_unchanged_nodes_only() {
    // (node config after the reload, status kept)
    let cases = [
        (config("pg0", 5000), true),
        (config("pg1", 6001), false),
        (config("pg3", 5003), false),
    ];
    let topo = Topology::new(&[
        config("pg0", 5000),
        config("pg1", 5001),
        config("pg2", 5002),
    ]);
    for i in 0..3 {
        topo.update(&NodeName::new(format!("pg{i}")), |n| NodeStatus {
            health: Health::Up,
            role: Role::Standby,
            admin: AdminState::Drained,
            ..n.clone()
        });
    }
    let mut rx = topo.subscribe();
    rx.mark_unchanged();
    let reloaded: Vec<NodeConfig> = cases.iter().map(|(c, _)| c.clone()).collect();
    topo.set_nodes(&reloaded);
    assert!(rx.has_changed().expect("open"));
    let snap = topo.load();
    let names: Vec<&str> = snap.nodes.iter().map(|n| n.name().as_str()).collect();
    assert_eq!(names, ["pg0", "pg1", "pg3"], "in the new order, pg2 gone");
    for (c, kept) in cases {
        let n = snap.node(&c.name).expect("listed");
        assert_eq!(n.config, c, "{}", c.name);
        let status = (n.health, n.role, n.admin);
        if kept {
            assert_eq!(
                status,
                (Health::Up, Role::Standby, AdminState::Drained),
                "{}",
                c.name
            );
        } else {
            assert_eq!(
                status,
                (Health::Pending, Role::Unknown, AdminState::Active),
                "{}",
                c.name
            );
        }
    }
}
