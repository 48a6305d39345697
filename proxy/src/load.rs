//! How many sessions, backend connections and pinned sessions each node carries right now.
//! The router balances read-only sessions by it, a drain waits for it to reach zero, and the
//! admin API reports it. Counts are kept by RAII guards, so a session that ends any way at all
//! gives its counts back.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use tokio::sync::watch;

use crate::metrics as m;
use crate::topology::NodeName;

/// One node's live counts, and the signal that ends the transactions still on it.
pub struct NodeLoad {
    sessions: AtomicI64,
    backend_connections: AtomicI64,
    pinned: AtomicI64,
    evict: watch::Sender<u64>,
    /// The same counts as gauges, looked up once per node rather than per session.
    sessions_gauge: metrics::Gauge,
    connections_gauge: metrics::Gauge,
    pinned_gauge: metrics::Gauge,
}

impl NodeLoad {
    fn new(node: &NodeName) -> Self {
        NodeLoad {
            sessions: AtomicI64::new(0),
            backend_connections: AtomicI64::new(0),
            pinned: AtomicI64::new(0),
            evict: watch::channel(0).0,
            sessions_gauge: metrics::gauge!(m::NODE_SESSIONS, "node" => node.to_string()),
            connections_gauge: metrics::gauge!(m::BACKEND_CONNECTIONS, "node" => node.to_string()),
            pinned_gauge: metrics::gauge!(m::PINNED_SESSIONS, "node" => node.to_string()),
        }
    }
}

impl std::fmt::Debug for NodeLoad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeLoad")
            .field("sessions", &self.sessions)
            .field("backend_connections", &self.backend_connections)
            .field("pinned", &self.pinned)
            .finish_non_exhaustive()
    }
}

/// A copy of one node's counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadFigures {
    pub sessions: i64,
    pub backend_connections: i64,
    pub pinned: i64,
}

impl LoadFigures {
    /// Nothing of any session remains on the node.
    pub fn is_empty(&self) -> bool {
        self.sessions == 0 && self.backend_connections == 0
    }
}

/// Counts per node name.
#[derive(Debug, Default)]
pub struct NodeLoads {
    nodes: DashMap<NodeName, Arc<NodeLoad>>,
}

impl NodeLoads {
    fn entry(&self, node: &NodeName) -> Arc<NodeLoad> {
        if let Some(l) = self.nodes.get(node) {
            return l.clone();
        }
        self.nodes
            .entry(node.clone())
            .or_insert_with(|| Arc::new(NodeLoad::new(node)))
            .clone()
    }

    pub fn figures(&self, node: &NodeName) -> LoadFigures {
        match self.nodes.get(node) {
            None => LoadFigures::default(),
            Some(l) => LoadFigures {
                sessions: l.sessions.load(Ordering::Acquire),
                backend_connections: l.backend_connections.load(Ordering::Acquire),
                pinned: l.pinned.load(Ordering::Acquire),
            },
        }
    }

    /// Tells every session on `node` to leave it now, ending an open transaction if need be.
    pub fn evict(&self, node: &NodeName) {
        self.entry(node).evict.send_modify(|g| *g += 1);
    }

    /// Counts a session bound to `node` while the guard lives.
    pub fn bind(&self, node: &NodeName) -> Binding {
        let load = self.entry(node);
        load.sessions.fetch_add(1, Ordering::AcqRel);
        load.sessions_gauge.increment(1.0);
        let mut evictions = load.evict.subscribe();
        evictions.mark_unchanged();
        Binding {
            node: node.clone(),
            load,
            pinned: false,
            evictions,
        }
    }

    /// Counts an open backend connection to `node` while the guard lives.
    pub fn connection(&self, node: &NodeName) -> ConnectionGuard {
        let load = self.entry(node);
        load.backend_connections.fetch_add(1, Ordering::AcqRel);
        load.connections_gauge.increment(1.0);
        ConnectionGuard { load }
    }
}

/// One open backend connection, counted against its node.
#[derive(Debug)]
pub struct ConnectionGuard {
    load: Arc<NodeLoad>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.load.backend_connections.fetch_sub(1, Ordering::AcqRel);
        self.load.connections_gauge.decrement(1.0);
    }
}

/// A session bound to a node (running on one of its backend connections).
#[derive(Debug)]
pub struct Binding {
    node: NodeName,
    load: Arc<NodeLoad>,
    pinned: bool,
    /// Changes when the session must leave the node at once (drain timeout).
    pub evictions: watch::Receiver<u64>,
}

impl Binding {
    pub fn node(&self) -> &NodeName {
        &self.node
    }

    /// Marks the session as holding state that cannot move (counted once).
    pub fn set_pinned(&mut self, pinned: bool) {
        if pinned == self.pinned {
            return;
        }
        self.pinned = pinned;
        let d = if pinned { 1 } else { -1 };
        self.load.pinned.fetch_add(d, Ordering::AcqRel);
        self.load.pinned_gauge.increment(d as f64);
    }

    pub fn is_pinned(&self) -> bool {
        self.pinned
    }
}

impl Drop for Binding {
    fn drop(&mut self) {
        self.set_pinned(false);
        self.load.sessions.fetch_sub(1, Ordering::AcqRel);
        self.load.sessions_gauge.decrement(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_give_their_counts_back() {
        let loads = NodeLoads::default();
        let n = NodeName::new("pg1");
        let mut a = loads.bind(&n);
        let b = loads.bind(&n);
        let c1 = loads.connection(&n);
        let c2 = loads.connection(&n);
        a.set_pinned(true);
        a.set_pinned(true);
        assert_eq!(
            loads.figures(&n),
            LoadFigures {
                sessions: 2,
                backend_connections: 2,
                pinned: 1
            }
        );
        drop(a);
        drop(b);
        assert!(!loads.figures(&n).is_empty(), "connections still open");
        drop((c1, c2));
        assert!(loads.figures(&n).is_empty());
        assert_eq!(loads.figures(&n).pinned, 0);
    }
}
