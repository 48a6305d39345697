//! Which node serves a session's next transaction, and waiting (holding) until one can.
//!
//! Pure choices over a topology [`Snapshot`] plus [`hold`], which waits for a choice to become
//! possible. Write-capable sessions go to the one primary in rotation; read-only sessions go to
//! the least-loaded standby within the lag bounds, or to the primary if fallback is on.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::config::{NodeConfig, RoutingConfig, Target, UserConfig};
use crate::error::SessionError;
use crate::load::NodeLoads;
use crate::metrics as m;
use crate::protocol::startup::StartupParams;
use crate::topology::{NodeName, NodeStatus, Role, Snapshot, Topology};

/// The node that takes writes: the one node in rotation that claims primary. None while there
/// is no such node. While two claim it (split brain) writes go to neither, unless the policy
/// says the highest timeline wins and exactly one node is on it.
pub fn primary(snapshot: &Snapshot) -> Option<&NodeConfig> {
    let mut primaries = snapshot.primaries();
    let first = primaries.next()?;
    if primaries.next().is_none() {
        return Some(&first.config);
    }
    if !snapshot.prefer_highest_timeline {
        return None;
    }
    let top = snapshot.primaries().filter_map(|n| n.wal.timeline).max()?;
    let mut on_top = snapshot.primaries().filter(|n| n.wal.timeline == Some(top));
    let winner = on_top.next()?;
    if on_top.next().is_some() {
        return None;
    }
    Some(&winner.config)
}

/// Where a session's transactions go: read-only when its user or database is configured so,
/// or when it asked for `default_transaction_read_only` in its startup packet.
pub fn session_target(
    routing: &RoutingConfig,
    user: &UserConfig,
    params: &StartupParams,
) -> Target {
    if user.target == Target::ReadOnly {
        return Target::ReadOnly;
    }
    let database = params.get("database").or(params.get("user")).unwrap_or("");
    if routing.read_only_databases.iter().any(|d| d == database) {
        return Target::ReadOnly;
    }
    let is_on = |v: &str| matches!(v.to_ascii_lowercase().as_str(), "on" | "true" | "yes" | "1");
    if params
        .get("default_transaction_read_only")
        .is_some_and(is_on)
    {
        return Target::ReadOnly;
    }
    let options = params.get("options").unwrap_or("");
    let wants_read_only = options
        .split_whitespace()
        .filter_map(|w| {
            w.strip_prefix("default_transaction_read_only=")
                .or_else(|| {
                    w.strip_prefix("--default_transaction_read_only=")
                        .or_else(|| w.strip_prefix("--default-transaction-read-only="))
                })
        })
        .any(is_on);
    if wants_read_only {
        Target::ReadOnly
    } else {
        Target::ReadWrite
    }
}

/// A standby within the configured lag bounds (each bound optional).
fn lag_ok(snapshot: &Snapshot, n: &NodeStatus, routing: &RoutingConfig) -> bool {
    if let Some(max) = routing.max_lag_bytes {
        match snapshot.lag_bytes(n) {
            Some(lag) if lag <= max => {}
            _ => return false,
        }
    }
    if let Some(max) = routing.max_lag {
        match n.wal.replay_delay {
            Some(d) if d <= max.as_secs_f64() => {}
            _ => return false,
        }
    }
    true
}

fn readable_standby(snapshot: &Snapshot, n: &NodeStatus, routing: &RoutingConfig) -> bool {
    n.in_rotation() && n.role == Role::Standby && lag_ok(snapshot, n, routing)
}

/// The node for a session's next transaction right now, ignoring a pause; `None` when no node
/// fits (the request is then held).
pub fn choose<'s>(
    snapshot: &'s Snapshot,
    target: Target,
    routing: &RoutingConfig,
    loads: &NodeLoads,
) -> Option<&'s NodeConfig> {
    match target {
        Target::ReadWrite => primary(snapshot),
        Target::ReadOnly => snapshot
            .nodes
            .iter()
            .filter(|n| readable_standby(snapshot, n, routing))
            .min_by_key(|n| loads.figures(n.name()).sessions)
            .map(|n| &n.config)
            .or_else(|| {
                routing
                    .read_fallback_to_primary
                    .then(|| primary(snapshot))
                    .flatten()
            }),
    }
}

/// Whether a session bound to `node` may run its next transaction there, ignoring a pause.
pub fn fits(snapshot: &Snapshot, node: &NodeName, target: Target, routing: &RoutingConfig) -> bool {
    match target {
        Target::ReadWrite => primary(snapshot).is_some_and(|p| &p.name == node),
        Target::ReadOnly => snapshot.node(node).is_some_and(|n| {
            readable_standby(snapshot, n, routing)
                || (routing.read_fallback_to_primary
                    && primary(snapshot).is_some_and(|p| &p.name == node))
        }),
    }
}

/// Holds until `ready` finds what it needs in the topology (re-asked on every change), or
/// fails with 57P03 at `deadline`, or with [`SessionError::Shutdown`] once `stop` is cancelled
/// (graywire is stopping: a request that has no node yet is not kept waiting). Counted as held
/// only if it had to wait.
pub async fn hold<T>(
    topology: &Topology,
    deadline: std::time::Instant,
    stop: &CancellationToken,
    mut ready: impl FnMut(&Snapshot) -> Option<T>,
) -> Result<T, SessionError> {
    let mut changes = topology.subscribe();
    if let Some(x) = ready(&topology.load()) {
        return Ok(x);
    }
    let started = Instant::now();
    let held = metrics::gauge!(m::HELD_REQUESTS);
    held.increment(1.0);
    let result = loop {
        changes.mark_unchanged();
        if let Some(x) = ready(&topology.load()) {
            break Ok(x);
        }
        tokio::select! {
            r = changes.changed() => {
                if r.is_err() {
                    break Err(SessionError::NoPrimary(started.elapsed()));
                }
            }
            _ = crate::timer::sleep_until(deadline) => {
                break Err(SessionError::NoPrimary(started.elapsed()));
            }
            () = stop.cancelled() => break Err(SessionError::Shutdown),
        }
    };
    held.decrement(1.0);
    metrics::histogram!(m::HOLD_DURATION_SECONDS).record(started.elapsed().as_secs_f64());
    result
}

/// Holds until a node fits `target` and new transactions are not paused.
pub async fn wait_for_node(
    topology: &Topology,
    target: Target,
    routing: &RoutingConfig,
    loads: &NodeLoads,
    hold_timeout: Duration,
    stop: &CancellationToken,
) -> Result<NodeConfig, SessionError> {
    let deadline = std::time::Instant::now() + hold_timeout;
    hold(topology, deadline, stop, |snap| {
        if snap.paused {
            return None;
        }
        choose(snap, target, routing, loads).cloned()
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{NodeName, Observation, Role};

    /// Holds until a primary is known: [`hold`] with the simplest choice.
    async fn wait_for_primary(
        topology: &Topology,
        hold_timeout: Duration,
        stop: &CancellationToken,
    ) -> Result<NodeConfig, SessionError> {
        let deadline = std::time::Instant::now() + hold_timeout;
        hold(topology, deadline, stop, |snap| primary(snap).cloned()).await
    }

    fn nodes(n: usize) -> Vec<NodeConfig> {
        (0..n)
            .map(|i| NodeConfig {
                name: NodeName::new(format!("pg{i}")),
                host: "127.0.0.1".into(),
                port: 5000 + i as u16,
            })
            .collect()
    }

    fn see(t: &Topology, i: usize, role: Role) {
        t.update(&NodeName::new(format!("pg{i}")), |s| {
            s.observe(
                &Observation::Ok {
                    role,
                    version: "15".into(),
                    wal: Default::default(),
                    started_at: None,
                },
                3,
                2,
                Instant::now(),
            )
        });
    }

    #[test]
    fn the_primary_is_found_wherever_it_is_listed() {
        let t = Topology::new(&nodes(3));
        see(&t, 0, Role::Standby);
        see(&t, 1, Role::Standby);
        see(&t, 2, Role::Primary);
        assert_eq!(primary(&t.load()).map(|n| n.port), Some(5002));
    }

    #[test]
    fn two_primaries_mean_no_primary() {
        let t = Topology::new(&nodes(2));
        see(&t, 0, Role::Primary);
        see(&t, 1, Role::Primary);
        assert!(primary(&t.load()).is_none());
    }

    fn standby_at(t: &Topology, i: usize, lsn: u64, delay: f64) {
        t.update(&NodeName::new(format!("pg{i}")), |s| {
            let mut n = s.clone();
            n.wal.lsn = Some(lsn);
            n.wal.replay_delay = Some(delay);
            n
        });
    }

    #[test]
    fn read_only_sessions_go_to_the_least_loaded_standby_within_the_lag_bounds() {
        let t = Topology::new(&nodes(3));
        see(&t, 0, Role::Primary);
        see(&t, 1, Role::Standby);
        see(&t, 2, Role::Standby);
        standby_at(&t, 0, 1000, 0.0);
        standby_at(&t, 1, 1000, 0.0);
        standby_at(&t, 2, 900, 0.0);
        let loads = NodeLoads::default();
        let _busy = loads.bind(&NodeName::new("pg1"));
        let mut routing = RoutingConfig {
            read_fallback_to_primary: true,
            ..RoutingConfig::default()
        };
        let pick =
            |r: &RoutingConfig| choose(&t.load(), Target::ReadOnly, r, &loads).map(|n| n.port);
        assert_eq!(pick(&routing), Some(5002), "least loaded");
        routing.max_lag_bytes = Some(50);
        assert_eq!(pick(&routing), Some(5001), "pg2 is 100 bytes behind");
        routing.max_lag = Some(Duration::from_secs(1));
        standby_at(&t, 1, 1000, 5.0);
        assert_eq!(
            pick(&routing),
            Some(5000),
            "no standby qualifies: the primary"
        );
        routing.read_fallback_to_primary = false;
        assert_eq!(pick(&routing), None, "without fallback the request is held");
        assert_eq!(
            choose(&t.load(), Target::ReadWrite, &routing, &loads).map(|n| n.port),
            Some(5000)
        );
        assert!(fits(
            &t.load(),
            &NodeName::new("pg0"),
            Target::ReadWrite,
            &routing
        ));
        assert!(!fits(
            &t.load(),
            &NodeName::new("pg1"),
            Target::ReadOnly,
            &routing
        ));
    }

    #[test]
    fn drained_nodes_take_nothing_new() {
        let t = Topology::new(&nodes(2));
        see(&t, 0, Role::Primary);
        see(&t, 1, Role::Standby);
        t.update(&NodeName::new("pg0"), |s| {
            let mut n = s.clone();
            n.admin = crate::topology::AdminState::Draining;
            n
        });
        assert!(primary(&t.load()).is_none());
        let routing = RoutingConfig::default();
        assert_eq!(
            choose(&t.load(), Target::ReadOnly, &routing, &NodeLoads::default()).map(|n| n.port),
            Some(5001)
        );
    }

    #[test]
    fn read_only_is_asked_by_user_database_or_startup_parameter() {
        use crate::config::ClientAuth;
        let user = |target| UserConfig {
            name: "u".into(),
            auth: ClientAuth::Trust,
            backend: None,
            target,
            pool_mode: None,
        };
        let params = |pairs: &[(&str, &str)]| StartupParams {
            params: pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            minor: 0,
        };
        let routing = RoutingConfig {
            read_only_databases: vec!["reports".into()],
            ..RoutingConfig::default()
        };
        let rw = user(Target::ReadWrite);
        let cases: &[(&[(&str, &str)], Target)] = &[
            (&[("user", "u")], Target::ReadWrite),
            (&[("user", "u"), ("database", "reports")], Target::ReadOnly),
            (
                &[("user", "u"), ("default_transaction_read_only", "on")],
                Target::ReadOnly,
            ),
            (
                &[
                    ("user", "u"),
                    ("options", "-c default_transaction_read_only=on"),
                ],
                Target::ReadOnly,
            ),
            (
                &[
                    ("user", "u"),
                    ("options", "--default_transaction_read_only=true"),
                ],
                Target::ReadOnly,
            ),
            (
                &[
                    ("user", "u"),
                    ("options", "-c default_transaction_read_only=off"),
                ],
                Target::ReadWrite,
            ),
        ];
        for (p, want) in cases {
            assert_eq!(session_target(&routing, &rw, &params(p)), *want, "{p:?}");
        }
        assert_eq!(
            session_target(&routing, &user(Target::ReadOnly), &params(&[("user", "u")])),
            Target::ReadOnly
        );
    }

    #[test]
    fn the_highest_timeline_wins_a_split_brain_only_when_configured() {
        let t = Topology::new(&nodes(2));
        see(&t, 0, Role::Primary);
        see(&t, 1, Role::Primary);
        for (i, tli) in [(0, 1), (1, 2)] {
            t.update(&NodeName::new(format!("pg{i}")), |s| {
                let mut n = s.clone();
                n.wal.timeline = Some(tli);
                n
            });
        }
        assert!(
            primary(&t.load()).is_none(),
            "default: wait for an operator"
        );
        t.set_prefer_highest_timeline(true);
        assert_eq!(primary(&t.load()).map(|n| n.port), Some(5001));
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_ends_when_a_primary_appears_or_times_out() {
        let stop = CancellationToken::new();
        let t = std::sync::Arc::new(Topology::new(&nodes(2)));
        let err = wait_for_primary(&t, Duration::from_secs(2), &stop).await;
        assert!(matches!(err, Err(SessionError::NoPrimary(_))));

        let t2 = t.clone();
        let waiter = tokio::spawn(async move {
            wait_for_primary(&t2, Duration::from_secs(10), &CancellationToken::new()).await
        });
        crate::timer::sleep(Duration::from_secs(1)).await;
        see(&t, 1, Role::Primary);
        let got = waiter.await.expect("join").expect("primary");
        assert_eq!(got.port, 5001);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_ends_at_once_when_graywire_stops_unless_a_node_is_ready() {
        let t = std::sync::Arc::new(Topology::new(&nodes(2)));
        let stop = CancellationToken::new();
        let (t2, stop2) = (t.clone(), stop.clone());
        let waiter = tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let r = wait_for_primary(&t2, Duration::from_secs(60), &stop2).await;
            (r, started.elapsed())
        });
        crate::timer::sleep(Duration::from_secs(1)).await;
        stop.cancel();
        let (r, waited) = waiter.await.expect("join");
        assert!(matches!(r, Err(SessionError::Shutdown)), "{r:?}");
        // The paused clock advances in whole milliseconds: the stop ended the hold, not its
        // 60 s deadline.
        assert!(
            waited >= Duration::from_secs(1) && waited < Duration::from_millis(1010),
            "{waited:?}"
        );

        // A node that is there already is taken, stopping or not: nothing was held.
        see(&t, 0, Role::Primary);
        let got = wait_for_primary(&t, Duration::from_secs(60), &stop).await;
        assert_eq!(got.expect("primary").port, 5000);
    }
}
#[cfg(test)]
mod table_tests;
