//! Operator actions on the topology: drain and undrain a node, pause and resume new
//! transactions. The admin API calls these; sessions react at their next transaction boundary
//! (see `session`), so nothing here touches a connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::config::DrainTimeoutAction;
use crate::context::Context;
use crate::load::LoadFigures;
use crate::metrics as m;
use crate::topology::{AdminState, NodeName};

/// How often a drain looks whether the node is empty.
const POLL: Duration = Duration::from_millis(20);

/// What a drain call reports.
#[derive(Debug, Clone, PartialEq)]
pub struct DrainReport {
    pub drained: bool,
    pub remaining: LoadFigures,
    pub waited: Duration,
}

/// Unknown node name.
#[derive(Debug, PartialEq, Eq)]
pub struct NoSuchNode;

/// Sets a node's operator state, exporting it; returns the previous one.
pub fn set_admin_state(
    ctx: &Context,
    node: &NodeName,
    state: AdminState,
) -> Result<AdminState, NoSuchNode> {
    let (old, new) = ctx
        .topology
        .update(node, |s| {
            let mut next = s.clone();
            next.admin = state;
            next
        })
        .ok_or(NoSuchNode)?;
    export_admin_state(node, new.admin);
    let known = crate::router::primary(&ctx.topology.load()).is_some();
    metrics::gauge!(m::PRIMARY_KNOWN).set(if known { 1.0 } else { 0.0 });
    if old.admin != new.admin {
        info!(%node, from = admin_str(old.admin), to = admin_str(new.admin), "node operator state changed");
    }
    Ok(old.admin)
}

pub fn admin_str(s: AdminState) -> &'static str {
    match s {
        AdminState::Active => "active",
        AdminState::Draining => "draining",
        AdminState::Drained => "drained",
    }
}

pub fn export_admin_state(node: &NodeName, state: AdminState) {
    for s in [
        AdminState::Active,
        AdminState::Draining,
        AdminState::Drained,
    ] {
        let v = if s == state { 1.0 } else { 0.0 };
        metrics::gauge!(m::NODE_ADMIN_STATE, "node" => node.to_string(), "state" => admin_str(s))
            .set(v);
    }
}

/// Starts draining `node` (no new transactions there; sessions leave at their next boundary)
/// and waits up to `wait` for it to be empty. The node becomes `drained` once empty, whether or
/// not anyone waits.
pub async fn drain(
    ctx: &Arc<Context>,
    node: &NodeName,
    wait: Duration,
) -> Result<DrainReport, NoSuchNode> {
    let before = ctx
        .topology
        .load()
        .node(node)
        .map(|n| n.admin)
        .ok_or(NoSuchNode)?;
    if before == AdminState::Active {
        set_admin_state(ctx, node, AdminState::Draining)?;
        metrics::counter!(m::DRAINS_TOTAL, "node" => node.to_string()).increment(1);
        tokio::spawn(finish_when_empty(ctx.clone(), node.clone()));
    }
    let started = Instant::now();
    let deadline = Instant::now() + wait;
    loop {
        let remaining = ctx.loads.figures(node);
        if remaining.is_empty() || Instant::now() >= deadline {
            let drained = remaining.is_empty();
            if drained {
                // Do not wait for the background task to notice.
                mark_drained(ctx, node);
            }
            let waited = started.elapsed();
            metrics::histogram!(m::DRAIN_DURATION_SECONDS).record(waited.as_secs_f64());
            return Ok(DrainReport {
                drained,
                remaining,
                waited,
            });
        }
        crate::timer::sleep(POLL).await;
    }
}

/// Draining → drained, unless an operator changed the state meanwhile.
fn mark_drained(ctx: &Context, node: &NodeName) {
    let still_draining = ctx
        .topology
        .load()
        .node(node)
        .is_some_and(|n| n.admin == AdminState::Draining);
    if still_draining {
        let _ = set_admin_state(ctx, node, AdminState::Drained);
    }
}

/// Watches a draining node until it is empty (then drained) or no longer draining; at
/// `drain.timeout` with `on_timeout = "end_transactions"`, tells the sessions left to go now.
async fn finish_when_empty(ctx: Arc<Context>, node: NodeName) {
    let stop = ctx.shutdown.hard.clone();
    let started = Instant::now();
    let mut evicted = false;
    loop {
        let draining = ctx
            .topology
            .load()
            .node(&node)
            .is_some_and(|n| n.admin == AdminState::Draining);
        if !draining {
            return;
        }
        let figures = ctx.loads.figures(&node);
        if figures.is_empty() {
            mark_drained(&ctx, &node);
            return;
        }
        let config = ctx.config.load();
        if let Some(timeout) = config.drain_timeout {
            if !evicted
                && started.elapsed() >= timeout
                && config.drain_on_timeout == DrainTimeoutAction::EndTransactions
            {
                warn!(%node, sessions = figures.sessions, pinned = figures.pinned, "drain timeout: ending the transactions still on the node");
                ctx.loads.evict(&node);
                evicted = true;
            }
        }
        tokio::select! {
            _ = crate::timer::sleep(POLL) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Puts a node back into rotation.
pub fn undrain(ctx: &Context, node: &NodeName) -> Result<AdminState, NoSuchNode> {
    set_admin_state(ctx, node, AdminState::Active)
}

/// Holds (true) or releases (false) every new transaction at its boundary.
pub fn set_paused(ctx: &Context, paused: bool) -> bool {
    let before = ctx.topology.set_paused(paused);
    metrics::gauge!(m::PAUSED).set(if paused { 1.0 } else { 0.0 });
    if before != paused {
        info!(
            paused,
            "new transactions {}",
            if paused { "paused" } else { "resumed" }
        );
    }
    before
}
