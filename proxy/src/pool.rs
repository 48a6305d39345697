//! Backend connection pools for transaction mode: per node, backend user and startup
//! parameters, at most `pool.size` connections, handed to sessions one transaction at a time.
//!
//! A session takes a connection when its transaction starts and keeps it across boundaries
//! while nobody else needs one; as soon as a session waits for a connection of the pool, every
//! holder gives its connection back at its next transaction boundary (so a full pool
//! multiplexes sessions transaction by transaction, and an ample one costs nothing per
//! transaction). A session gets back the connection it used last whenever that one is idle,
//! which needs no reset; a connection last used by another session is reset (`DISCARD ALL`)
//! and then gets the session's settings and prepared statements replayed before use (see
//! `session`). A connection whose state is unknown (a session ended mid-transaction, an error)
//! is closed, never given back. Idle connections to a node out of rotation, or idle too long,
//! are closed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::backend::{self, BackendConn};
use crate::load::ConnectionGuard;
use crate::topology::{NodeName, Snapshot};

/// Session mode: idle connections beyond the pool's size are closed once they have been idle
/// this long (by the janitor, which runs every second), so a burst of clients leaving and
/// arriving reuses connections instead of closing and reopening them.
pub const SURPLUS_GRACE: Duration = Duration::from_secs(1);

/// Connections are shared only between sessions that would have opened identical ones.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub node: NodeName,
    pub user: String,
    /// The startup parameters sent to the node, in order, as [`crate::backend::startup_key`]
    /// encodes them (shared with the session).
    pub params: Arc<[u8]>,
    /// Transaction-mode pools limit their connections; session-mode ones only keep idle
    /// connections of ended sessions for the next one (up to `size`, beyond it for
    /// [`SURPLUS_GRACE`]).
    pub transaction_mode: bool,
}

/// An idle connection and who used it last.
struct Idle {
    conn: BackendConn,
    guard: ConnectionGuard,
    owner: u64,
    since: Instant,
}

struct State {
    idle: Vec<Idle>,
    /// Connections open or being opened (idle ones included).
    open: usize,
}

/// One session waiting for a pool's connection, counted for as long as it exists.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One pool.
pub struct Pool {
    key: PoolKey,
    size: usize,
    /// One permit per connection a session may hold (or open) at a time.
    permits: Arc<Semaphore>,
    state: Mutex<State>,
    /// Sessions waiting for a permit right now.
    waiting: AtomicUsize,
    /// Woken when a session starts waiting: holders give their connection back at their next
    /// transaction boundary.
    wanted: Notify,
}

impl Pool {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn node(&self) -> &NodeName {
        &self.key.node
    }

    /// True while a session waits for a connection of this pool.
    pub fn is_wanted(&self) -> bool {
        self.waiting.load(Ordering::Acquire) > 0
    }

    /// Completes when a session starts waiting for a connection (enable it before checking
    /// [`Pool::is_wanted`], so no wake-up is lost).
    pub fn wanted(&self) -> tokio::sync::futures::Notified<'_> {
        self.wanted.notified()
    }

    /// Session mode: an idle connection left by an ended session (reset before use), or room
    /// to open a new one. Never waits: session mode has no connection limit besides
    /// `listener.max_client_connections`.
    pub fn reuse(self: &Arc<Self>) -> Checkout {
        let slot = PoolSlot {
            pool: self.clone(),
            permit: None,
            returned: false,
            counted: false,
        };
        let newest = {
            let mut s = self.state();
            let i = s
                .idle
                .iter()
                .enumerate()
                .max_by_key(|(_, c)| c.since)
                .map(|(i, _)| i);
            i.map(|i| s.idle.swap_remove(i))
        };
        match newest {
            Some(Idle {
                conn, guard, since, ..
            }) => Checkout::Reused {
                conn: Box::new(conn),
                guard,
                reset: true,
                idle: since.elapsed(),
                slot,
            },
            None => Checkout::Open(slot),
        }
    }

    /// Waits (until `deadline`) for a connection: the one `owner` used last if idle, else a
    /// new one while the pool is below its size, else the longest-idle one. `None` at the
    /// deadline.
    pub async fn checkout(
        self: &Arc<Self>,
        owner: u64,
        deadline: std::time::Instant,
    ) -> Option<Checkout> {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // Every connection is held: ask the holders for one at their next boundary.
                // Counted while this future waits, dropped (a cancelled hold) or not.
                let _waiting = Waiting::new(&self.waiting);
                self.wanted.notify_waiters();
                let got =
                    crate::timer::timeout_at(deadline, self.permits.clone().acquire_owned()).await;
                got.ok()?.ok()?
            }
        };
        let slot = PoolSlot {
            pool: self.clone(),
            permit: Some(permit),
            returned: false,
            counted: true,
        };
        let mut s = self.state();
        if let Some(i) = s.idle.iter().position(|c| c.owner == owner) {
            let Idle {
                conn, guard, since, ..
            } = s.idle.swap_remove(i);
            drop(s);
            return Some(Checkout::Reused {
                conn: Box::new(conn),
                guard,
                reset: false,
                idle: since.elapsed(),
                slot,
            });
        }
        if s.open < self.size {
            s.open += 1;
            drop(s);
            return Some(Checkout::Open(slot));
        }
        let oldest = s
            .idle
            .iter()
            .enumerate()
            .min_by_key(|(_, c)| c.since)
            .map(|(i, _)| i)?;
        let Idle {
            conn, guard, since, ..
        } = s.idle.swap_remove(oldest);
        drop(s);
        Some(Checkout::Reused {
            conn: Box::new(conn),
            guard,
            reset: true,
            idle: since.elapsed(),
            slot,
        })
    }
}

/// What a checkout yields.
pub enum Checkout {
    /// An idle connection; `reset` when another session used it last.
    Reused {
        conn: Box<BackendConn>,
        guard: ConnectionGuard,
        reset: bool,
        /// How long it sat idle in the pool (the node may have ended it meanwhile).
        idle: std::time::Duration,
        slot: PoolSlot,
    },
    /// Room for a new connection: the caller opens it.
    Open(PoolSlot),
}

/// A session's claim on one connection of a pool. Dropped without [`PoolSlot::give_back`],
/// the connection counts as closed.
pub struct PoolSlot {
    pool: Arc<Pool>,
    permit: Option<OwnedSemaphorePermit>,
    returned: bool,
    /// Counted in the pool's open connections (transaction mode).
    counted: bool,
}

impl PoolSlot {
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Puts a clean connection (at a transaction boundary) back as idle, remembering `owner`.
    pub fn give_back(mut self, conn: BackendConn, guard: ConnectionGuard, owner: u64) {
        self.returned = true;
        // Session mode may hold more than `size` idle connections for a moment (see
        // [`Pools::prune`] for when the surplus goes).
        self.pool.state().idle.push(Idle {
            conn,
            guard,
            owner,
            since: Instant::now(),
        });
        self.permit.take();
    }
}

impl Drop for PoolSlot {
    fn drop(&mut self) {
        if !self.returned && self.counted {
            let mut s = self.pool.state();
            s.open = s.open.saturating_sub(1);
        }
    }
}

/// Every pool of one graywire, by key. Looked up once per client connection, with a key of a
/// dozen strings, so hashed with foldhash (seeded at random per process) rather than SipHash.
#[derive(Default)]
pub struct Pools {
    pools: Mutex<HashMap<PoolKey, Arc<Pool>, foldhash::fast::RandomState>>,
}

impl Pools {
    /// The pool for `key`, made with `size` connections if new.
    pub fn pool(&self, key: &PoolKey, size: usize) -> Arc<Pool> {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pool) = pools.get(key) {
            return pool.clone();
        }
        pools
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Pool {
                    key: key.clone(),
                    size,
                    permits: Arc::new(Semaphore::new(size)),
                    state: Mutex::new(State {
                        idle: Vec::new(),
                        open: 0,
                    }),
                    waiting: AtomicUsize::new(0),
                    wanted: Notify::new(),
                })
            })
            .clone()
    }

    /// Closes idle connections to nodes out of rotation (or gone) and those idle longer than
    /// `idle_timeout`, and in session mode the oldest idle connections beyond the pool's size
    /// once they have been idle for [`SURPLUS_GRACE`]. Returns how many were closed.
    ///
    /// The surplus is not closed as it appears: when more clients connect and leave at once
    /// than `size`, a connection given back now is the one the next client takes a moment
    /// later, and closing it would open a new one for that client (measured: pool size 8 and
    /// 16 pgbench `-C` clients opened a backend connection for 42 % of client connections).
    pub fn prune(&self, snapshot: &Snapshot, idle_timeout: Duration) -> usize {
        let pools: Vec<Arc<Pool>> = self
            .pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        let mut closed = Vec::new();
        for pool in pools {
            let in_rotation = snapshot
                .node(&pool.key.node)
                .is_some_and(|n| n.in_rotation());
            let mut s = pool.state();
            let mut i = 0;
            while i < s.idle.len() {
                if !in_rotation || s.idle[i].since.elapsed() >= idle_timeout {
                    closed.push(s.idle.swap_remove(i));
                    if pool.key.transaction_mode {
                        s.open = s.open.saturating_sub(1);
                    }
                } else {
                    i += 1;
                }
            }
            if !pool.key.transaction_mode && s.idle.len() > pool.size {
                // Oldest first (the order of `idle` means nothing else): of the surplus, those
                // idle long enough go.
                s.idle.sort_unstable_by_key(|c| c.since);
                let surplus = s.idle.len() - pool.size;
                let aged = s.idle[..surplus]
                    .iter()
                    .take_while(|c| c.since.elapsed() >= SURPLUS_GRACE)
                    .count();
                closed.extend(s.idle.drain(..aged));
            }
        }
        let n = closed.len();
        for c in closed {
            tokio::spawn(async move {
                backend::terminate(c.conn.stream).await;
                drop(c.guard);
            });
        }
        n
    }

    /// Idle connections of every pool to `node` (for tests and the admin API).
    pub fn idle_on(&self, node: &NodeName) -> usize {
        self.pools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|p| &p.key.node == node)
            .map(|p| p.state().idle.len())
            .sum()
    }
}

#[cfg(test)]
mod tests;
