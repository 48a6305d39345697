//! Table-driven tests of the pool's lease and return rules. Each case is a script of pool
//! operations with the outcome expected of each. Connections are real [`BackendConn`]s made by
//! [`backend::connect`] to a fake node on loopback that only greets (AuthenticationOk,
//! BackendKeyData with a pid counting up from 1, ReadyForQuery) and notes Terminate; no
//! PostgreSQL is needed.

use std::collections::HashMap;
use std::sync::atomic::AtomicU32;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;
use crate::config::{Credentials, NodeConfig};
use crate::load::NodeLoads;
use crate::protocol::scram::ClientKeyCache;
use crate::topology::{Health, NodeStatus};

// ---------------------------------------------------------------------------------------------
// A fake node

/// Pids of the connections that sent Terminate, in order.
type Terminated = Arc<Mutex<Vec<u32>>>;

async fn fake_node() -> (NodeConfig, Terminated) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let terminated = Terminated::default();
    let seen = terminated.clone();
    let next_pid = Arc::new(AtomicU32::new(1));
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let pid = next_pid.fetch_add(1, Ordering::Relaxed);
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut len = [0; 4];
                s.read_exact(&mut len).await.expect("startup length");
                let mut startup = vec![0; u32::from_be_bytes(len) as usize - 4];
                s.read_exact(&mut startup).await.expect("startup");
                let mut out = BytesMut::new();
                out.put_slice(b"R\0\0\0\x08\0\0\0\0");
                out.put_slice(b"K\0\0\0\x0c");
                out.put_u32(pid);
                out.put_u32(0);
                out.put_slice(b"Z\0\0\0\x05I");
                s.write_all(&out).await.expect("greeting");
                let mut buf = [0; 64];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    if buf[0] == b'X' {
                        seen.lock().expect("lock").push(pid);
                    }
                }
            });
        }
    });
    (
        NodeConfig {
            name: NodeName::new("pg0"),
            host: "127.0.0.1".into(),
            port,
        },
        terminated,
    )
}

// ---------------------------------------------------------------------------------------------
// Scripts

/// What a checkout should give.
#[derive(Debug, PartialEq, Clone, Copy)]
enum Want {
    /// Room for a new connection (the script opens it: the next pid).
    Open,
    /// The idle connection with this pid; `reset` when another session used it last.
    Reused { pid: u32, reset: bool },
    /// Nothing before the deadline.
    Exhausted,
}
use Want::{Exhausted, Open, Reused};

#[derive(Debug, Clone, Copy)]
enum Op {
    /// Transaction mode: `owner` checks out a connection into the named hand.
    Lease(&'static str, u64, Want),
    /// Session mode: a new session takes an idle connection or room for one.
    Reuse(&'static str, Want),
    /// The hand's connection goes back to the pool, clean, last used by `owner`.
    GiveBack(&'static str, u64),
    /// The hand drops its slot and connection (its state was unknown: it is closed).
    Close(&'static str),
    /// `owner` starts waiting for a connection into the named hand (transaction mode).
    Wait(&'static str, u64),
    /// The wait of the named hand ends with this.
    Waited(&'static str, Want),
    /// Whether a session waits for a connection of the pool.
    Wanted(bool),
    /// The idle connection with this pid has been idle this much longer.
    Age(u32, Duration),
    /// The janitor runs: node in rotation or not (or gone), idle timeout; pids it closes.
    Prune(Node, Duration, &'static [u32]),
    /// Idle connections, and (transaction mode) connections counted open.
    Count { idle: usize, open: usize },
}
use Op::{Age, Close, Count, GiveBack, Lease, Prune, Reuse, Wait, Waited, Wanted};

/// The node as the janitor sees it.
#[derive(Debug, Clone, Copy)]
enum Node {
    InRotation,
    Down,
    Gone,
}

const LONG: Duration = Duration::from_secs(3600);

struct Case {
    name: &'static str,
    transaction_mode: bool,
    size: usize,
    ops: Vec<Op>,
}

fn tx(name: &'static str, size: usize, ops: Vec<Op>) -> Case {
    Case {
        name,
        transaction_mode: true,
        size,
        ops,
    }
}

fn session(name: &'static str, size: usize, ops: Vec<Op>) -> Case {
    Case {
        name,
        transaction_mode: false,
        size,
        ops,
    }
}

/// A connection a session holds.
struct Hand {
    slot: PoolSlot,
    conn: BackendConn,
    guard: ConnectionGuard,
}

#[tokio::test]
async fn connections_are_leased_and_returned_by_the_rules() {
    let cases = vec![
        tx(
            "the first checkout opens a connection",
            2,
            vec![Lease("a", 1, Open), Count { idle: 0, open: 1 }],
        ),
        tx(
            "a connection given back is idle and still open",
            2,
            vec![
                Lease("a", 1, Open),
                GiveBack("a", 1),
                Count { idle: 1, open: 1 },
            ],
        ),
        tx(
            "a session gets back its own connection, no reset",
            2,
            vec![
                Lease("a", 1, Open),
                GiveBack("a", 1),
                Lease(
                    "a",
                    1,
                    Reused {
                        pid: 1,
                        reset: false,
                    },
                ),
                Count { idle: 0, open: 1 },
            ],
        ),
        tx(
            "below the size another session opens a new one rather than reset an idle one",
            2,
            vec![
                Lease("a", 1, Open),
                GiveBack("a", 1),
                Lease("b", 2, Open),
                Count { idle: 1, open: 2 },
            ],
        ),
        tx(
            "at the size another session's idle connection is reset",
            1,
            vec![
                Lease("a", 1, Open),
                GiveBack("a", 1),
                Lease(
                    "b",
                    2,
                    Reused {
                        pid: 1,
                        reset: true,
                    },
                ),
                Count { idle: 0, open: 1 },
            ],
        ),
        tx(
            "at the size the longest idle is taken",
            2,
            vec![
                Lease("a", 1, Open),
                Lease("b", 2, Open),
                GiveBack("b", 2),
                GiveBack("a", 1),
                Age(2, Duration::from_secs(5)),
                Lease(
                    "c",
                    3,
                    Reused {
                        pid: 2,
                        reset: true,
                    },
                ),
                Lease(
                    "d",
                    4,
                    Reused {
                        pid: 1,
                        reset: true,
                    },
                ),
            ],
        ),
        tx(
            "its own connection wins over a longer idle one",
            2,
            vec![
                Lease("a", 1, Open),
                Lease("b", 2, Open),
                GiveBack("a", 1),
                GiveBack("b", 2),
                Age(1, Duration::from_secs(5)),
                Lease(
                    "b",
                    2,
                    Reused {
                        pid: 2,
                        reset: false,
                    },
                ),
            ],
        ),
        tx(
            "every connection held: nothing until the deadline",
            1,
            vec![
                Lease("a", 1, Open),
                Lease("b", 2, Exhausted),
                Count { idle: 0, open: 1 },
            ],
        ),
        tx(
            "every connection held, even by the same session: nothing",
            1,
            vec![Lease("a", 1, Open), Lease("b", 1, Exhausted)],
        ),
        tx(
            "a connection closed instead of given back frees its place",
            1,
            vec![
                Lease("a", 1, Open),
                Close("a"),
                Count { idle: 0, open: 0 },
                Lease("b", 2, Open),
                Count { idle: 0, open: 1 },
            ],
        ),
        tx(
            "a closed connection is not reused, even by its owner",
            2,
            vec![
                Lease("a", 1, Open),
                Close("a"),
                Lease("a", 1, Open),
                Count { idle: 0, open: 1 },
            ],
        ),
        tx(
            "a waiting session makes the pool wanted and gets the next connection given back",
            1,
            vec![
                Lease("a", 1, Open),
                Wanted(false),
                Wait("b", 2),
                Wanted(true),
                GiveBack("a", 1),
                Waited(
                    "b",
                    Reused {
                        pid: 1,
                        reset: true,
                    },
                ),
                Wanted(false),
                Count { idle: 0, open: 1 },
            ],
        ),
        tx(
            "a waiting session gets room when a connection is closed",
            1,
            vec![
                Lease("a", 1, Open),
                Wait("b", 2),
                Close("a"),
                Waited("b", Open),
                Count { idle: 0, open: 1 },
            ],
        ),
        tx(
            "a wait that times out is no longer wanted",
            1,
            vec![
                Lease("a", 1, Open),
                Wait("b", 2),
                Wanted(true),
                Waited("b", Exhausted),
                Wanted(false),
            ],
        ),
        session(
            "session mode: a new session opens a connection, uncounted",
            1,
            vec![Reuse("a", Open), Count { idle: 0, open: 0 }],
        ),
        session(
            "session mode: the size does not limit sessions",
            1,
            vec![
                Reuse("a", Open),
                Reuse("b", Open),
                Reuse("c", Open),
                Count { idle: 0, open: 0 },
            ],
        ),
        session(
            "session mode: an ended session's connection is reused, always reset",
            1,
            vec![
                Reuse("a", Open),
                GiveBack("a", 1),
                Reuse(
                    "b",
                    Reused {
                        pid: 1,
                        reset: true,
                    },
                ),
                GiveBack("b", 2),
                Reuse(
                    "c",
                    Reused {
                        pid: 1,
                        reset: true,
                    },
                ),
            ],
        ),
        session(
            "session mode: the most recently given back first",
            2,
            vec![
                Reuse("a", Open),
                Reuse("b", Open),
                GiveBack("b", 2),
                GiveBack("a", 1),
                Age(2, Duration::from_secs(5)),
                Reuse(
                    "c",
                    Reused {
                        pid: 1,
                        reset: true,
                    },
                ),
                Reuse(
                    "d",
                    Reused {
                        pid: 2,
                        reset: true,
                    },
                ),
                Reuse("e", Open),
            ],
        ),
        session(
            "session mode: idle beyond the size is kept for a moment",
            1,
            vec![
                Reuse("a", Open),
                Reuse("b", Open),
                GiveBack("a", 1),
                GiveBack("b", 2),
                Count { idle: 2, open: 0 },
                Prune(Node::InRotation, LONG, &[]),
                Count { idle: 2, open: 0 },
            ],
        ),
        session(
            "session mode: the surplus idle past the grace goes, oldest first",
            1,
            vec![
                Reuse("a", Open),
                Reuse("b", Open),
                Reuse("c", Open),
                GiveBack("a", 1),
                GiveBack("b", 2),
                GiveBack("c", 3),
                Age(1, SURPLUS_GRACE * 3),
                Age(2, SURPLUS_GRACE * 2),
                Prune(Node::InRotation, LONG, &[1, 2]),
                Count { idle: 1, open: 0 },
                Reuse(
                    "d",
                    Reused {
                        pid: 3,
                        reset: true,
                    },
                ),
            ],
        ),
        session(
            "session mode: of the surplus only those past the grace go",
            1,
            vec![
                Reuse("a", Open),
                Reuse("b", Open),
                Reuse("c", Open),
                GiveBack("a", 1),
                GiveBack("b", 2),
                GiveBack("c", 3),
                Age(1, SURPLUS_GRACE * 2),
                Prune(Node::InRotation, LONG, &[1]),
                Count { idle: 2, open: 0 },
            ],
        ),
        session(
            "session mode: within the size nothing is surplus",
            2,
            vec![
                Reuse("a", Open),
                Reuse("b", Open),
                GiveBack("a", 1),
                GiveBack("b", 2),
                Age(1, SURPLUS_GRACE * 2),
                Age(2, SURPLUS_GRACE * 2),
                Prune(Node::InRotation, LONG, &[]),
                Count { idle: 2, open: 0 },
            ],
        ),
        tx(
            "idle longer than the idle timeout: closed, its place freed",
            2,
            vec![
                Lease("a", 1, Open),
                Lease("b", 2, Open),
                GiveBack("a", 1),
                GiveBack("b", 2),
                Age(1, Duration::from_secs(20)),
                Prune(Node::InRotation, Duration::from_secs(10), &[1]),
                Count { idle: 1, open: 1 },
                Lease("c", 3, Open),
            ],
        ),
        session(
            "session mode: idle longer than the idle timeout: closed",
            5,
            vec![
                Reuse("a", Open),
                GiveBack("a", 1),
                Age(1, Duration::from_secs(20)),
                Prune(Node::InRotation, Duration::from_secs(10), &[1]),
                Count { idle: 0, open: 0 },
            ],
        ),
        tx(
            "node down: every idle connection closed, held ones kept",
            3,
            vec![
                Lease("a", 1, Open),
                Lease("b", 2, Open),
                Lease("c", 3, Open),
                GiveBack("a", 1),
                GiveBack("b", 2),
                Prune(Node::Down, LONG, &[1, 2]),
                Count { idle: 0, open: 1 },
                GiveBack("c", 3),
                Count { idle: 1, open: 1 },
            ],
        ),
        tx(
            "node gone from the config: every idle connection closed",
            2,
            vec![
                Lease("a", 1, Open),
                GiveBack("a", 1),
                Prune(Node::Gone, LONG, &[1]),
                Count { idle: 0, open: 0 },
            ],
        ),
        tx(
            "in rotation and fresh: nothing closed",
            2,
            vec![
                Lease("a", 1, Open),
                GiveBack("a", 1),
                Prune(Node::InRotation, LONG, &[]),
                Count { idle: 1, open: 1 },
            ],
        ),
    ];
    for c in cases {
        run(&c).await;
    }
}

/// A case's world: the fake node, the pools and what the sessions hold.
struct World {
    node: NodeConfig,
    terminated: Terminated,
    creds: Credentials,
    client_params: [(String, String); 1],
    keys: ClientKeyCache,
    loads: NodeLoads,
    pools: Pools,
    pool: Arc<Pool>,
    hands: HashMap<&'static str, Hand>,
    waiting: HashMap<&'static str, tokio::task::JoinHandle<Option<Checkout>>>,
    /// Connections opened so far (the fake node's last pid).
    opened: u32,
}

impl World {
    async fn new(c: &Case) -> World {
        let (node, terminated) = fake_node().await;
        let creds = Credentials {
            user: "graywire".into(),
            password: None,
        };
        let client_params = [("user".to_owned(), "app".to_owned())];
        let pools = Pools::default();
        let key = PoolKey {
            node: node.name.clone(),
            user: creds.user.clone(),
            params: backend::startup_key(&client_params, &creds),
            transaction_mode: c.transaction_mode,
        };
        let pool = pools.pool(&key, c.size);
        assert!(
            Arc::ptr_eq(&pool, &pools.pool(&key, c.size + 1)),
            "one pool per key"
        );
        World {
            node,
            terminated,
            creds,
            client_params,
            keys: ClientKeyCache::default(),
            loads: NodeLoads::default(),
            pools,
            pool,
            hands: HashMap::new(),
            waiting: HashMap::new(),
            opened: 0,
        }
    }

    /// Takes what a checkout gave into a hand, opening a connection where it gave room.
    async fn take(&mut self, at: &str, hand: &'static str, got: Option<Checkout>, want: Want) {
        let kind = match &got {
            None => Exhausted,
            Some(Checkout::Open(_)) => Open,
            Some(Checkout::Reused { conn, reset, .. }) => Reused {
                pid: conn.key.pid,
                reset: *reset,
            },
        };
        assert_eq!(kind, want, "{at}");
        let held = match got {
            None => return,
            Some(Checkout::Open(slot)) => {
                let conn = backend::connect(
                    &self.node,
                    &self.creds,
                    &self.client_params,
                    Duration::from_secs(5),
                    &self.keys,
                )
                .await
                .expect("the fake node greets");
                self.opened += 1;
                assert_eq!(conn.key.pid, self.opened, "{at}: pids count up");
                let guard = self.loads.connection(&self.node.name);
                Hand { slot, conn, guard }
            }
            Some(Checkout::Reused {
                conn, guard, slot, ..
            }) => Hand {
                slot,
                conn: *conn,
                guard,
            },
        };
        assert!(Arc::ptr_eq(held.slot.pool(), &self.pool), "{at}");
        self.hands.insert(hand, held);
    }

    fn connections(&self) -> i64 {
        self.loads.figures(&self.node.name).backend_connections
    }

    async fn apply(&mut self, at: &str, op: Op) {
        match op {
            Lease(hand, owner, want) => {
                let deadline = std::time::Instant::now() + Duration::from_millis(50);
                let got = self.pool.checkout(owner, deadline).await;
                self.take(at, hand, got, want).await;
            }
            Reuse(hand, want) => {
                let got = self.pool.reuse();
                self.take(at, hand, Some(got), want).await;
            }
            Wait(hand, owner) => {
                let pool = self.pool.clone();
                let wanted = self.pool.wanted();
                tokio::pin!(wanted);
                wanted.as_mut().enable();
                let deadline = std::time::Instant::now() + Duration::from_millis(300);
                let waiter = tokio::spawn(async move { pool.checkout(owner, deadline).await });
                self.waiting.insert(hand, waiter);
                // The waiter tells the holders it wants a connection.
                crate::timer::timeout(Duration::from_secs(5), wanted)
                    .await
                    .expect("holders are told");
            }
            Waited(hand, want) => {
                let waiter = self.waiting.remove(hand).expect("waiting");
                let got = waiter.await.expect("join");
                self.take(at, hand, got, want).await;
            }
            GiveBack(hand, owner) => {
                let h = self.hands.remove(hand).expect("held");
                h.slot.give_back(h.conn, h.guard, owner);
                tokio::task::yield_now().await;
            }
            Close(hand) => {
                // The slot goes first, then the connection and its count.
                drop(self.hands.remove(hand).expect("held"));
                tokio::task::yield_now().await;
            }
            Wanted(wanted) => assert_eq!(self.pool.is_wanted(), wanted, "{at}"),
            Age(pid, by) => {
                let mut s = self.pool.state();
                let idle = s
                    .idle
                    .iter_mut()
                    .find(|c| c.conn.key.pid == pid)
                    .expect("idle connection");
                idle.since -= by;
            }
            Prune(state, idle_timeout, closed_pids) => {
                let before = self.terminated.lock().expect("lock").len();
                let connections = self.connections();
                let closed = self
                    .pools
                    .prune(&janitor_view(&self.node, state), idle_timeout);
                assert_eq!(closed, closed_pids.len(), "{at}: closed");
                let closed_count = closed as i64;
                // The closing runs in the background: wait until it is done.
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                while self.terminated.lock().expect("lock").len() < before + closed
                    || self.connections() > connections - closed_count
                {
                    assert!(std::time::Instant::now() < deadline, "{at}: not closed");
                    crate::timer::sleep(Duration::from_millis(5)).await;
                }
                let mut got = self.terminated.lock().expect("lock")[before..].to_vec();
                got.sort_unstable();
                assert_eq!(got, closed_pids, "{at}: the connections closed");
                assert_eq!(self.connections(), connections - closed_count, "{at}");
            }
            Count { idle, open } => {
                assert_eq!(self.pools.idle_on(&self.node.name), idle, "{at}: idle");
                assert_eq!(self.pool.state().open, open, "{at}: open");
            }
        }
    }
}

async fn run(c: &Case) {
    let mut world = World::new(c).await;
    for (i, op) in c.ops.iter().enumerate() {
        world
            .apply(&format!("{}: op {i} {op:?}", c.name), *op)
            .await;
    }
}

/// The snapshot the janitor sees.
fn janitor_view(node: &NodeConfig, state: Node) -> Snapshot {
    let mut status = NodeStatus::new(node.clone());
    status.health = match state {
        Node::InRotation => Health::Up,
        Node::Down | Node::Gone => Health::Down,
    };
    Snapshot {
        nodes: match state {
            Node::Gone => vec![],
            _ => vec![status],
        },
        paused: false,
        prefer_highest_timeline: false,
    }
}

/// A session whose wait for a pooled connection is abandoned (the client's CancelRequest
/// while the request is held: `HoldCancel::cancellable` drops the `checkout` future) leaves
/// `waiting` incremented for good: the pool stays "wanted" and every holder gives its
/// connection back at every boundary from then on.
#[tokio::test]
async fn an_abandoned_wait_does_not_leave_the_pool_wanted() {
    let (node, _terminated) = fake_node().await;
    let pools = Pools::default();
    let key = PoolKey {
        node: node.name.clone(),
        user: "graywire".into(),
        params: Arc::from(&b""[..]),
        transaction_mode: true,
    };
    let pool = pools.pool(&key, 1);
    let far = std::time::Instant::now() + Duration::from_secs(60);
    let _held = pool.checkout(1, far).await.expect("room");
    let waiter = {
        let pool = pool.clone();
        tokio::spawn(async move { pool.checkout(2, far).await.is_some() })
    };
    tokio::task::yield_now().await;
    assert!(pool.is_wanted(), "the waiter is counted");
    // The client cancels its held request: the wait is dropped.
    waiter.abort();
    let _ = waiter.await;
    assert!(!pool.is_wanted(), "nobody waits any more");
}
