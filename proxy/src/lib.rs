//! graywire: a high-availability proxy for the PostgreSQL wire protocol. [`Proxy`] is the
//! injectable entry (`run(listener, admin, shutdown)`, `reload(config)`).
//!
//! The map of the modules and how one connection flows through them is
//! `docs/ARCHITECTURE.md` (the one codemap); start with `session/` for the state machine. Only
//! what the binary and the tests use is public: the config, the runtimes, the admin server, the
//! metrics exporter and the timers; everything else is `pub(crate)`, so the dead-code lint sees
//! what nothing uses.

pub mod admin;
pub(crate) mod backend;
pub(crate) mod cancel;
pub(crate) mod clock;
pub mod config;
pub(crate) mod context;
pub(crate) mod drain;
pub(crate) mod error;
pub(crate) mod health;
pub(crate) mod listener;
pub(crate) mod liveness;
pub(crate) mod load;
pub mod metrics;
pub(crate) mod pool;
pub(crate) mod probe;
pub(crate) mod protocol;
pub(crate) mod router;
pub mod runtime;
pub(crate) mod session;
pub(crate) mod shutdown;
pub mod timer;
pub(crate) mod topology;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::Config;
use crate::context::Context;
use crate::topology::Snapshot;

/// How long sessions get after the soft deadline before their sockets are dropped.
const HARD_GRACE: Duration = Duration::from_secs(5);

/// One graywire instance, built from a validated config.
pub struct Proxy {
    ctx: Arc<Context>,
    /// Where the probe runs (it needs tokio's timer; see [`runtime`]).
    probe_runtime: tokio::runtime::Handle,
}

impl Proxy {
    /// A proxy whose tasks all run on the current runtime.
    pub fn new(config: Config) -> Self {
        Self::with_probe_runtime(config, tokio::runtime::Handle::current())
    }

    /// A proxy whose probe (if configured) runs on `probe_runtime`, the rest on the current
    /// runtime (see [`runtime::Runtimes`]).
    pub fn with_probe_runtime(config: Config, probe_runtime: tokio::runtime::Handle) -> Self {
        clock::calibrate();
        Proxy {
            ctx: Arc::new(Context::new(config)),
            probe_runtime,
        }
    }

    /// The current view of the nodes.
    pub fn topology(&self) -> Arc<Snapshot> {
        self.ctx.topology.load()
    }

    /// Applies a new, already validated config to the running proxy: nodes are added, removed
    /// or changed live (sessions on a removed node move at their next transaction boundary),
    /// users, credentials, routing, health and timeouts take effect for what comes next.
    /// Listener addresses and the thread count stay as they were (they need a restart); the
    /// returned list names such changes.
    pub fn reload(&self, new: Config) -> Vec<String> {
        let ctx = &self.ctx;
        let old = ctx.config.load_full();
        let mut needs_restart = Vec::new();
        if old.listener.address != new.listener.address {
            needs_restart.push("listener.address".to_owned());
        }
        if old.admin.address != new.admin.address {
            needs_restart.push("admin.address".to_owned());
        }
        if old.worker_threads != new.worker_threads {
            needs_restart.push("runtime.worker_threads".to_owned());
        }
        let mut new = new;
        new.listener.address = old.listener.address;
        new.admin.address = old.admin.address;
        new.worker_threads = old.worker_threads;
        let nodes_changed = old.nodes != new.nodes;
        let nodes = new.nodes.clone();
        let highest_timeline = new.routing.split_brain_highest_timeline;
        ctx.config.store(Arc::new(new));
        if highest_timeline != old.routing.split_brain_highest_timeline {
            ctx.topology.set_prefer_highest_timeline(highest_timeline);
        }
        if nodes_changed {
            ctx.topology.set_nodes(&nodes);
            health::sync_checkers(ctx);
            ctx.liveness.retain(&nodes);
        }
        info!(nodes = nodes.len(), nodes_changed, "configuration reloaded");
        for key in &needs_restart {
            tracing::warn!(key = %key, "changed in the reloaded configuration but only takes effect after a restart");
        }
        needs_restart
    }

    /// Waits until every node has been checked at least once (bounded by `timeout`).
    pub async fn wait_for_first_checks(&self, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut changes = self.ctx.topology.subscribe();
        loop {
            let checked = self
                .topology()
                .nodes
                .iter()
                .all(|n| n.health != topology::Health::Pending);
            if checked {
                return true;
            }
            if timer::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return false;
            }
        }
    }

    /// Serves clients on `listener` (and the admin API on `admin`, when given) until `shutdown`
    /// is cancelled; then stops accepting, lets sessions reach a transaction boundary for up to
    /// `shutdown.timeout`, and ends the rest with 57P01.
    pub async fn run(
        &self,
        listener: TcpListener,
        admin: Option<TcpListener>,
        shutdown: CancellationToken,
    ) {
        let ctx = &self.ctx;
        let config = ctx.config.load_full();
        let metrics_handle = metrics::install();
        let probe = match (&config.probe, listener.local_addr()) {
            (Some(settings), Ok(addr)) => {
                let _on_probe_runtime = self.probe_runtime.enter();
                Some(probe::start(ctx, settings, addr))
            }
            (Some(_), Err(e)) => {
                tracing::error!(error = %e, "the probe cannot learn the listener's address; not started");
                None
            }
            (None, _) => None,
        };
        health::sync_checkers(ctx);
        tokio::spawn(context::pool_janitor(ctx.clone()));
        if let Some(h) = &metrics_handle {
            tokio::spawn(metrics::upkeep(h.clone(), ctx.shutdown.hard.clone()));
        }
        if let Some(admin) = admin {
            let server = Arc::new(admin::Admin {
                ctx: Some(ctx.clone()),
                probe,
                metrics: metrics_handle,
                stop: ctx.shutdown.hard.clone(),
            });
            tokio::spawn(admin::serve(server, admin));
        }
        let soft = ctx.shutdown.soft.clone();
        let forward = tokio::spawn(async move {
            shutdown.cancelled().await;
            soft.cancel();
        });
        listener::accept_loop(ctx.clone(), listener).await;
        info!(
            sessions = ctx.open_sessions(),
            "stopped accepting; waiting for sessions to reach a transaction boundary"
        );
        let (at_soft, at_hard) = ctx
            .shutdown
            .drain(config.shutdown_timeout, HARD_GRACE)
            .await;
        if at_soft > 0 {
            info!(
                at_soft,
                at_hard, "ended sessions still in a transaction with 57P01"
            );
        }
        forward.abort();
        health::stop_checkers(ctx);
        ctx.shutdown.hard.cancel();
    }
}

/// Runs graywire with `config` on already-bound listeners until `shutdown` is cancelled.
pub async fn run(
    config: Config,
    listener: TcpListener,
    admin: Option<TcpListener>,
    shutdown: CancellationToken,
) {
    Proxy::new(config).run(listener, admin, shutdown).await
}
