//! The integrated probe: `[probe]` in the config starts a [`graywire_probe::Probe`] that writes
//! through graywire's own listener (the path application traffic takes) and reads its ids back
//! from the current primary directly, with graywire's backend credentials.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use graywire_probe::gate::NodeFigure;
use graywire_probe::{Probe, ProbeConfig, VerifyTarget};

use crate::config::ProbeSettings;
use crate::context::Context;
use crate::topology::{Health, Role};

/// Starts the probe; it stops at graywire's hard shutdown.
pub fn start(ctx: &Arc<Context>, settings: &ProbeSettings, listener: SocketAddr) -> Probe {
    let target = match settings
        .target
        .as_deref()
        .map(str::parse::<tokio_postgres::Config>)
    {
        Some(Ok(t)) => t,
        // Validated with the config; fall back to the listener all the same.
        _ => {
            let mut t = tokio_postgres::Config::new();
            let host = if listener.ip().is_unspecified() {
                "127.0.0.1".to_owned()
            } else {
                listener.ip().to_string()
            };
            t.host(&host)
                .port(listener.port())
                .user(&settings.user)
                .dbname(&settings.database);
            if let Some(p) = &settings.password {
                t.password(p.expose());
            }
            t
        }
    };
    let mut target = target;
    target
        .application_name("graywire probe")
        .connect_timeout(settings.attempt_timeout);
    let mut config = ProbeConfig::new(target);
    if let Some(w) = &settings.writer {
        config.writer = w.clone();
    }
    config.interval = settings.interval;
    config.mode = settings.mode;
    config.attempt_timeout = settings.attempt_timeout;
    config.verify_interval = settings.verify_interval;
    config.horizon = settings.horizon;
    let probe = Probe::start(
        config,
        verify_target(ctx.clone(), settings.database.clone()),
        ctx.shutdown.hard.clone(),
    );
    let figures_of = ctx.clone();
    probe.watch_gate(
        settings.gate.clone(),
        move || Some(node_figures(&figures_of)),
        ctx.shutdown.hard.clone(),
    );
    probe
}

/// The one node that is up and claims primary (drained or not: reading back is harmless),
/// reached with graywire's backend credentials.
fn verify_target(ctx: Arc<Context>, database: String) -> VerifyTarget {
    Arc::new(move || {
        let snapshot = ctx.topology.load();
        let mut primaries = snapshot
            .nodes
            .iter()
            .filter(|n| n.health == Health::Up && n.role == Role::Primary);
        let node = primaries.next()?;
        if primaries.next().is_some() {
            return None;
        }
        let config = ctx.config.load();
        let mut c = tokio_postgres::Config::new();
        c.host(&node.config.host)
            .port(node.config.port)
            .user(&config.backend.user)
            .dbname(&database)
            .application_name("graywire probe read-back")
            .connect_timeout(Duration::from_secs(2));
        if let Some(p) = &config.backend.password {
            c.password(p.expose());
        }
        Some(c)
    })
}

/// The nodes as the gate sees them.
pub fn node_figures(ctx: &Context) -> Vec<NodeFigure> {
    let snapshot = ctx.topology.load();
    snapshot
        .nodes
        .iter()
        .map(|n| NodeFigure {
            name: n.name().to_string(),
            up: n.health == Health::Up,
            drained: n.admin != crate::topology::AdminState::Active,
            lag_seconds: (n.role == Role::Standby)
                .then_some(n.wal.replay_delay)
                .flatten(),
            is_standby: n.role == Role::Standby,
        })
        .collect()
}
