//! Which node serves a session's next transaction, and waiting (holding) until one can.

use std::time::{Duration, Instant};

use crate::config::NodeConfig;
use crate::error::SessionError;
use crate::metrics as m;
use crate::topology::{Snapshot, Topology};

/// The node that takes writes: the one node that is up and claims primary. None while there
/// is no such node, and none while two claim it (split brain: writes go to neither).
pub fn primary(snapshot: &Snapshot) -> Option<&NodeConfig> {
    let mut primaries = snapshot.primaries();
    let first = primaries.next()?;
    if primaries.next().is_some() {
        return None;
    }
    Some(&first.config)
}

/// Holds until a primary is known, or fails with 57P03 after `hold_timeout`.
pub async fn wait_for_primary(
    topology: &Topology,
    hold_timeout: Duration,
) -> Result<NodeConfig, SessionError> {
    let mut changes = topology.subscribe();
    if let Some(n) = primary(&topology.load()) {
        return Ok(n.clone());
    }
    let started = Instant::now();
    let held = metrics::gauge!(m::HELD_REQUESTS);
    held.increment(1.0);
    let deadline = tokio::time::Instant::now() + hold_timeout;
    let result = loop {
        if let Some(n) = primary(&topology.load()) {
            break Ok(n.clone());
        }
        tokio::select! {
            r = changes.changed() => {
                if r.is_err() {
                    break Err(SessionError::NoPrimary(started.elapsed()));
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                break Err(SessionError::NoPrimary(started.elapsed()));
            }
        }
    };
    held.decrement(1.0);
    metrics::histogram!(m::HOLD_DURATION_SECONDS).record(started.elapsed().as_secs_f64());
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{NodeName, Observation, Role};

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

    #[tokio::test(start_paused = true)]
    async fn waiting_ends_when_a_primary_appears_or_times_out() {
        let t = std::sync::Arc::new(Topology::new(&nodes(2)));
        let err = wait_for_primary(&t, Duration::from_secs(2)).await;
        assert!(matches!(err, Err(SessionError::NoPrimary(_))));

        let t2 = t.clone();
        let waiter =
            tokio::spawn(async move { wait_for_primary(&t2, Duration::from_secs(10)).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        see(&t, 1, Role::Primary);
        let got = waiter.await.expect("join").expect("primary");
        assert_eq!(got.port, 5001);
    }
}
