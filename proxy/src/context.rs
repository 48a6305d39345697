//! The state every task of one running graywire shares: config, topology, cancel keys, the
//! session count and the shutdown signals. Built once by [`crate::Proxy::new`]; no globals.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::ArcSwap;

use crate::cancel::CancelRegistry;
use tokio::task::JoinHandle;

use crate::config::{Config, NodeConfig};
use crate::load::NodeLoads;
use crate::metrics::SessionMetrics;
use crate::pool::Pools;
use crate::protocol::scram::ClientKeyCache;
use crate::shutdown::Shutdown;
use crate::topology::{NodeName, Topology};

pub struct Context {
    pub config: ArcSwap<Config>,
    pub topology: Topology,
    pub cancels: Arc<CancelRegistry>,
    pub shutdown: Shutdown,
    /// SCRAM keys for logging in to nodes, derived once per password and salt.
    pub scram_keys: ClientKeyCache,
    /// Sessions, backend connections and pinned sessions per node.
    pub loads: NodeLoads,
    /// Backend connection pools (transaction mode).
    pub pools: Pools,
    /// Kept connections that tell a node going away from one backend ended on its own.
    pub(crate) liveness: Arc<crate::liveness::Liveness>,
    /// Salts the mock SCRAM exchange of unknown users (the same salt for a name on every
    /// attempt, never the same across processes).
    pub(crate) mock_secret: [u8; 32],
    /// Numbers sessions (pooled connections remember their last one).
    next_session_id: AtomicU64,
    /// The health checker of each configured node.
    pub checkers: Mutex<HashMap<NodeName, (NodeConfig, JoinHandle<()>)>>,
    sessions: AtomicUsize,
    /// Made at the first session, after the metrics recorder was installed.
    session_metrics: OnceLock<SessionMetrics>,
}

impl Context {
    pub fn new(config: Config) -> Self {
        let topology = Topology::new(&config.nodes);
        topology.set_prefer_highest_timeline(config.routing.split_brain_highest_timeline);
        Context {
            topology,
            config: ArcSwap::from_pointee(config),
            cancels: Arc::new(CancelRegistry::default()),
            shutdown: Shutdown::default(),
            scram_keys: ClientKeyCache::default(),
            loads: NodeLoads::default(),
            checkers: Mutex::new(HashMap::new()),
            pools: Pools::default(),
            liveness: Arc::default(),
            mock_secret: rand::random(),
            next_session_id: AtomicU64::new(1),
            sessions: AtomicUsize::new(0),
            session_metrics: OnceLock::new(),
        }
    }

    /// Takes one of `max_client_connections` session slots, or `None` when all are taken.
    pub fn try_open_session(self: &Arc<Self>) -> Option<SessionSlot> {
        let max = self.config.load().listener.max_client_connections;
        let prev = self.sessions.fetch_add(1, Ordering::AcqRel);
        if prev >= max {
            self.sessions.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        self.session_metrics().sessions.increment(1.0);
        Some(SessionSlot { ctx: self.clone() })
    }

    /// A number no other session of this process has.
    pub fn new_session_id(&self) -> u64 {
        self.next_session_id.fetch_add(1, Ordering::Relaxed)
    }

    /// The handles of the metrics every session records.
    pub fn session_metrics(&self) -> &SessionMetrics {
        self.session_metrics.get_or_init(SessionMetrics::new)
    }

    pub fn open_sessions(&self) -> usize {
        self.sessions.load(Ordering::Acquire)
    }
}

/// One open session; gives its slot back when dropped.
pub struct SessionSlot {
    ctx: Arc<Context>,
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.ctx.sessions.fetch_sub(1, Ordering::AcqRel);
        self.ctx.session_metrics().sessions.decrement(1.0);
    }
}

/// Prunes the pools on every topology change and every second, until the hard stop. It lives
/// here, not in `pool.rs`, so that the pools know nothing of the context that holds them.
pub async fn pool_janitor(ctx: Arc<Context>) {
    let stop = ctx.shutdown.hard.clone();
    let mut changes = ctx.topology.subscribe();
    loop {
        let idle_timeout = ctx.config.load().pool_idle_timeout;
        ctx.pools.prune(&ctx.topology.load(), idle_timeout);
        tokio::select! {
            _ = changes.changed() => {}
            _ = crate::timer::sleep(std::time::Duration::from_secs(1)) => {}
            _ = stop.cancelled() => return,
        }
    }
}
