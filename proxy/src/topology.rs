//! What graywire believes about the nodes right now: an immutable snapshot behind an
//! `ArcSwap`, replaced whole on every change. Transitions are pure functions of the previous
//! status and one observation; publishing a snapshot wakes whoever waits for a change.

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::config::NodeConfig;
/// Node names are the config's; the topology speaks of nodes by them.
pub use crate::config::NodeName;

/// Discovered with `pg_is_in_recovery()`, never taken from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Standby,
    Unknown,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Standby => "standby",
            Role::Unknown => "unknown",
        }
    }
    pub const ALL: [Role; 3] = [Role::Primary, Role::Standby, Role::Unknown];
}

/// Set by health checks only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// No check has finished yet.
    Pending,
    Up,
    Down,
}

/// Set by an operator only (admin API): whether the node takes new transactions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminState {
    /// In rotation.
    Active,
    /// No new transactions; bound sessions leave at their next boundary.
    Draining,
    /// Draining finished: no sessions and no backend connections remain.
    Drained,
}

/// Where a node's WAL stands, from its health check.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct WalPosition {
    /// `pg_current_wal_lsn()` on a primary, `pg_last_wal_replay_lsn()` on a standby.
    pub lsn: Option<u64>,
    /// On a standby: seconds since the last replayed transaction while WAL is still waiting
    /// to be replayed (0 when replay has caught up with what was received).
    pub replay_delay: Option<f64>,
    /// On a primary: the timeline it writes (a promotion starts a higher one).
    pub timeline: Option<u32>,
}

/// What one health check saw.
#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    Ok {
        role: Role,
        version: String,
        wal: WalPosition,
        /// When the node's postmaster started (Unix seconds): changes when it restarts.
        started_at: Option<f64>,
    },
    Failed {
        reason: String,
    },
}

#[derive(Debug, Clone)]
pub struct NodeStatus {
    pub config: NodeConfig,
    pub role: Role,
    pub health: Health,
    pub version: Option<String>,
    pub wal: WalPosition,
    /// The postmaster's start time last seen (Unix seconds).
    pub started_at: Option<f64>,
    pub admin: AdminState,
    pub last_error: Option<String>,
    /// Consecutive successes (while down) or failures (while up).
    pub streak: u32,
    pub changed_at: Instant,
}

impl NodeStatus {
    pub fn new(config: NodeConfig) -> Self {
        NodeStatus {
            config,
            role: Role::Unknown,
            health: Health::Pending,
            version: None,
            wal: WalPosition::default(),
            started_at: None,
            admin: AdminState::Active,
            last_error: None,
            streak: 0,
            changed_at: Instant::now(),
        }
    }

    pub fn name(&self) -> &NodeName {
        &self.config.name
    }

    /// The node state of the vocabulary in docs/contract.md: down wins over the operator's drain states.
    pub fn state_str(&self) -> &'static str {
        match (self.health, self.admin) {
            (Health::Down | Health::Pending, _) => "down",
            (Health::Up, AdminState::Active) => "up",
            (Health::Up, AdminState::Draining) => "draining",
            (Health::Up, AdminState::Drained) => "drained",
        }
    }

    /// Up and in rotation: may take new transactions.
    pub fn in_rotation(&self) -> bool {
        self.health == Health::Up && self.admin == AdminState::Active
    }

    /// The status after one observation, with `fall` failures needed to go down and `rise`
    /// successes to come back. A node's first observation decides at once.
    pub fn observe(&self, obs: &Observation, fall: u32, rise: u32, now: Instant) -> NodeStatus {
        let mut next = self.clone();
        match obs {
            Observation::Ok {
                role,
                version,
                wal,
                started_at,
            } => {
                next.version = Some(version.clone());
                next.started_at = *started_at;
                next.wal = *wal;
                next.last_error = None;
                match self.health {
                    Health::Up => {
                        next.streak = 0;
                        next.role = *role;
                    }
                    Health::Pending => {
                        next.health = Health::Up;
                        next.role = *role;
                        next.streak = 0;
                    }
                    Health::Down => {
                        next.streak = self.streak + 1;
                        if next.streak >= rise {
                            next.health = Health::Up;
                            next.role = *role;
                            next.streak = 0;
                        }
                    }
                }
            }
            Observation::Failed { reason } => {
                next.last_error = Some(reason.clone());
                match self.health {
                    Health::Up => {
                        next.streak = self.streak + 1;
                        if next.streak >= fall {
                            next.health = Health::Down;
                            next.streak = 0;
                        }
                    }
                    Health::Pending | Health::Down => {
                        next.health = Health::Down;
                        next.streak = 0;
                    }
                }
            }
        }
        if next.health != self.health || next.role != self.role {
            next.changed_at = now;
        }
        next
    }

    /// A connection to the node failed or died under a session: count it as a failed check.
    pub fn passive_failure(&self, reason: &str, fall: u32, now: Instant) -> NodeStatus {
        self.observe(
            &Observation::Failed {
                reason: reason.to_owned(),
            },
            fall,
            u32::MAX,
            now,
        )
    }

    /// Up, in rotation and claiming primary.
    pub fn is_usable_primary(&self) -> bool {
        self.in_rotation() && self.role == Role::Primary
    }
}

/// One consistent view of every node.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub nodes: Vec<NodeStatus>,
    /// An operator paused all new transactions (`POST /v1/pause`).
    pub paused: bool,
    /// When two nodes claim primary, the one on the highest timeline takes writes
    /// (`routing.split_brain = "highest_timeline"`); otherwise neither does.
    pub prefer_highest_timeline: bool,
}

impl Snapshot {
    /// Bytes a standby's replay is behind the primary's current WAL position, when both are
    /// known (each from its own latest health check).
    pub fn lag_bytes(&self, standby: &NodeStatus) -> Option<u64> {
        if standby.role != Role::Standby {
            return None;
        }
        let mut primaries = self
            .nodes
            .iter()
            .filter(|n| n.health == Health::Up && n.role == Role::Primary);
        let primary = primaries.next()?;
        if primaries.next().is_some() {
            return None;
        }
        Some(primary.wal.lsn?.saturating_sub(standby.wal.lsn?))
    }

    pub fn node(&self, name: &NodeName) -> Option<&NodeStatus> {
        self.nodes.iter().find(|n| n.name() == name)
    }

    /// Nodes that are up, in rotation and claim to be primary. A drained former primary does
    /// not count: the operator took it out of rotation, which settles the ambiguity.
    pub fn primaries(&self) -> impl Iterator<Item = &NodeStatus> {
        self.nodes.iter().filter(|n| n.is_usable_primary())
    }

    /// True when more than one node in rotation claims to be primary.
    pub fn split_brain(&self) -> bool {
        self.primaries().count() > 1
    }
}

/// The shared, swappable topology.
pub struct Topology {
    current: ArcSwap<Snapshot>,
    changed: watch::Sender<u64>,
}

impl Topology {
    pub fn new(nodes: &[NodeConfig]) -> Self {
        let snapshot = Snapshot {
            nodes: nodes.iter().cloned().map(NodeStatus::new).collect(),
            paused: false,
            prefer_highest_timeline: false,
        };
        Topology {
            current: ArcSwap::from_pointee(snapshot),
            changed: watch::channel(0).0,
        }
    }

    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Applies `f` to one node's status; publishes (and wakes waiters) only if it changed
    /// something a router cares about. Returns the old and new status.
    pub fn update(
        &self,
        name: &NodeName,
        f: impl Fn(&NodeStatus) -> NodeStatus,
    ) -> Option<(NodeStatus, NodeStatus)> {
        let mut result = None;
        self.current.rcu(|snap| {
            let mut next = Snapshot::clone(snap);
            result = None;
            if let Some(slot) = next.nodes.iter_mut().find(|n| n.name() == name) {
                let new = f(slot);
                result = Some((slot.clone(), new.clone()));
                *slot = new;
            }
            next
        });
        if let Some((old, new)) = &result {
            if old.health != new.health || old.role != new.role || old.admin != new.admin {
                self.changed.send_modify(|g| *g += 1);
            }
        }
        result
    }

    /// Pauses or resumes new transactions everywhere; returns the previous setting.
    pub fn set_paused(&self, paused: bool) -> bool {
        let before = self.current.load().paused;
        self.current.rcu(|snap| {
            let mut next = Snapshot::clone(snap);
            next.paused = paused;
            next
        });
        if before != paused {
            self.changed.send_modify(|g| *g += 1);
        }
        before
    }

    /// Sets the split-brain policy (from the config).
    pub fn set_prefer_highest_timeline(&self, on: bool) {
        self.current.rcu(|snap| {
            let mut next = Snapshot::clone(snap);
            next.prefer_highest_timeline = on;
            next
        });
        self.changed.send_modify(|g| *g += 1);
    }

    /// Replaces the node list (config reload): nodes kept by name keep their status, new ones
    /// start pending, removed ones disappear.
    pub fn set_nodes(&self, nodes: &[NodeConfig]) {
        self.current.rcu(|snap| {
            let mut next = Snapshot::clone(snap);
            next.nodes = nodes
                .iter()
                .map(|c| match snap.nodes.iter().find(|n| n.name() == &c.name) {
                    Some(old) if old.config == *c => old.clone(),
                    _ => NodeStatus::new(c.clone()),
                })
                .collect();
            next
        });
        self.changed.send_modify(|g| *g += 1);
    }

    /// A receiver that sees every published change of health, role, drain state or pause.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> NodeStatus {
        NodeStatus::new(NodeConfig {
            name: NodeName::new("pg1"),
            host: "127.0.0.1".into(),
            port: 5432,
        })
    }

    fn ok(role: Role) -> Observation {
        Observation::Ok {
            role,
            version: "15".into(),
            wal: WalPosition::default(),
            started_at: None,
        }
    }

    fn fail() -> Observation {
        Observation::Failed {
            reason: "refused".into(),
        }
    }

    #[test]
    fn fall_and_rise_count_consecutive_observations() {
        let t = Instant::now();
        let (fall, rise) = (3, 2);
        let mut n = node().observe(&ok(Role::Primary), fall, rise, t);
        assert_eq!((n.health, n.role), (Health::Up, Role::Primary));
        n = n.observe(&fail(), fall, rise, t);
        n = n.observe(&fail(), fall, rise, t);
        assert_eq!(n.health, Health::Up, "two failures of three");
        n = n.observe(&ok(Role::Primary), fall, rise, t);
        n = n.observe(&fail(), fall, rise, t);
        n = n.observe(&fail(), fall, rise, t);
        assert_eq!(n.health, Health::Up, "a success resets the count");
        n = n.observe(&fail(), fall, rise, t);
        assert_eq!(n.health, Health::Down);
        n = n.observe(&ok(Role::Standby), fall, rise, t);
        assert_eq!(n.health, Health::Down, "one success of two");
        assert_eq!(
            n.role,
            Role::Primary,
            "role is not taken from a node still down"
        );
        n = n.observe(&ok(Role::Standby), fall, rise, t);
        assert_eq!((n.health, n.role), (Health::Up, Role::Standby));
    }

    #[test]
    fn first_observation_decides_at_once() {
        let t = Instant::now();
        assert_eq!(node().observe(&fail(), 3, 2, t).health, Health::Down);
        assert_eq!(
            node().observe(&ok(Role::Standby), 3, 2, t).health,
            Health::Up
        );
    }

    #[test]
    fn split_brain_is_two_usable_primaries() {
        let t = Instant::now();
        let mut a = node().observe(&ok(Role::Primary), 3, 2, t);
        let mut b = a.clone();
        b.config.name = NodeName::new("pg2");
        let snap = Snapshot {
            nodes: vec![a.clone(), b.clone()],
            paused: false,
            prefer_highest_timeline: false,
        };
        assert!(snap.split_brain());
        let mut drained = a.clone();
        drained.admin = AdminState::Drained;
        let snap = Snapshot {
            nodes: vec![drained, b.clone()],
            paused: false,
            prefer_highest_timeline: false,
        };
        assert!(!snap.split_brain(), "a drained node is out of rotation");
        a = a.passive_failure("gone", 1, t);
        let snap = Snapshot {
            nodes: vec![a, b],
            paused: false,
            prefer_highest_timeline: false,
        };
        assert!(!snap.split_brain());
        assert_eq!(snap.primaries().count(), 1);
    }

    #[test]
    fn updates_publish_changes() {
        let topo = Topology::new(&[node().config]);
        let mut rx = topo.subscribe();
        let name = NodeName::new("pg1");
        topo.update(&name, |n| {
            n.observe(&ok(Role::Primary), 3, 2, Instant::now())
        });
        assert!(rx.has_changed().expect("open"));
        rx.mark_unchanged();
        // Same health and role again: no wake-up.
        topo.update(&name, |n| {
            n.observe(&ok(Role::Primary), 3, 2, Instant::now())
        });
        assert!(!rx.has_changed().expect("open"));
        assert!(topo.load().node(&name).expect("node").is_usable_primary());
    }
}
#[cfg(test)]
mod table_tests;
