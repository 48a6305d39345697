//! Attaching a session to a backend connection: the first one at start (greeting the client
//! with the node's parameters), and a new one for a detached session's next request (held until
//! a node fits). Both lease a connection (new, or pooled in transaction mode), set it up for
//! the session (reset, then replay of settings and prepared statements) and close it so that
//! nothing of the session survives on the node.

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tracing::{debug, warn};

use crate::backend::{self, BackendConn};
use crate::config::{NodeConfig, PoolMode};
use crate::error::{BackendError, RequestError, SessionError};
use crate::health;
use crate::load::{Binding, ConnectionGuard};
use crate::pool::{Checkout, PoolKey, PoolSlot};
use crate::protocol::message::{self, TxStatus};
use crate::protocol::SqlClass;
use crate::router;

use super::{message_query, migrate, Session, State, CANCEL_TIMEOUT};

/// Pause between attempts to attach to a node that could not take the session.
const RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(100);
/// A pooled connection idle at least this long is checked before use: the node may have
/// ended it meanwhile (an administrator, `idle_session_timeout`). One read that finds
/// nothing; connections handed over sooner skip it.
const CHECK_IDLE_AFTER: std::time::Duration = std::time::Duration::from_secs(1);
/// How many pooled connections in a row may turn out dead (ended while idle) before the
/// failure is the session's: each is dropped and another leased, not counted against the node.
const STALE_RETRIES: usize = 3;

/// A backend connection the session runs on, counted against its node.
pub(super) struct Attached {
    pub(super) conn: BackendConn,
    pub(super) guard: ConnectionGuard,
    pub(super) binding: Binding,
    /// In transaction mode: the pool the connection goes back to.
    pub(super) slot: Option<PoolSlot>,
    /// The session is pinned to a node it should leave: it looks again whether it may move
    /// at its first boundary after this.
    pub(super) recheck_at: Option<std::time::Instant>,
}

impl Attached {
    /// Ends the session's binding to the node; the connection, its count and its pool slot
    /// are the caller's to close or give back.
    pub(super) fn unbind(self) -> (BackendConn, ConnectionGuard, Option<PoolSlot>) {
        let Attached {
            conn,
            guard,
            binding,
            slot,
            recheck_at: _,
        } = self;
        drop(binding);
        (conn, guard, slot)
    }
}

/// A backend connection obtained for the session, not yet set up for it.
struct Leased {
    conn: BackendConn,
    guard: ConnectionGuard,
    slot: Option<PoolSlot>,
    /// Another session used it last: `DISCARD ALL` first.
    reset: bool,
    /// It was used before (by this session, unless `reset`).
    reused: bool,
    /// How long it sat idle in its pool.
    idle: std::time::Duration,
}

impl Session<'_> {
    /// The first backend connection: holds until a node fits, then greets the client with the
    /// node's parameters, graywire's BackendKeyData and ReadyForQuery.
    pub(super) async fn start(&mut self) -> Result<(), SessionError> {
        let node = router::wait_for_node(
            &self.ctx.topology,
            self.target,
            &self.config.routing,
            &self.ctx.loads,
            self.config.hold_timeout,
            &self.ctx.shutdown.soft,
        )
        .await?;
        let mut stale = 0;
        let (mut conn, reused) = loop {
            let leased = match self.lease(&node).await {
                Ok(l) => l,
                Err(e) => {
                    if e.is_node_failure() {
                        health::passive_failure(self.ctx, &node.name, &e.to_string());
                    }
                    return Err(e.into());
                }
            };
            let reused = leased.reused;
            match self.set_up(leased, false).await {
                Ok(conn) => break (conn, reused),
                Err(e) if reused && stale < STALE_RETRIES => {
                    stale += 1;
                    debug!(parent: &self.who.span(), node = %node.name, error = %e, "a pooled connection was gone; taking another");
                }
                Err(e) => return Err(e.into()),
            }
        };
        let mut greeting = BytesMut::with_capacity(1024);
        message::authentication_ok(&mut greeting);
        if reused {
            // A pooled connection: its parameters, as of now (after a reset if needed).
            conn.conn.parameter_messages(&mut greeting);
        } else {
            greeting.extend_from_slice(&conn.conn.greeting);
            conn.conn.greeting = bytes::Bytes::new();
        }
        // The session's copy is the live one from now on; `release` hands it back.
        self.tracker.parameters = std::mem::take(&mut conn.conn.parameters);
        // The client is told its first backend's pid, as on a direct connection.
        let key = self.cancel.adopt_pid(conn.conn.key.pid);
        self.tracker.pid_rewrite = None;
        self.state = State::Attached(conn);
        message::backend_key_data(&mut greeting, key.pid, key.secret);
        message::ready_for_query(&mut greeting, TxStatus::Idle);
        self.client
            .write_all(&greeting)
            .await
            .map_err(SessionError::ClientGone)?;
        Ok(())
    }

    /// Holds the client's request until a node fits, then attaches to it and replays the
    /// session's state there.
    pub(super) async fn attach_for_request(&mut self) -> Result<(), RequestError> {
        let deadline = std::time::Instant::now() + self.config.hold_timeout;
        let started = std::time::Instant::now();
        loop {
            let routing = &self.config.routing;
            let loads = &self.ctx.loads;
            let target = self.target;
            let node = router::hold(
                &self.ctx.topology,
                deadline,
                &self.ctx.shutdown.soft,
                |snap| {
                    if snap.paused {
                        return None;
                    }
                    router::choose(snap, target, routing, loads).cloned()
                },
            )
            .await
            .map_err(|e| match e {
                SessionError::Shutdown => RequestError::Shutdown,
                _ => RequestError::NoNode(started.elapsed()),
            })?;
            match self.attach(&node).await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_node_failure() || is_transient_refusal(&e) => {
                    health::passive_failure(self.ctx, &node.name, &e.to_string());
                    debug!(parent: &self.who.span(), node = %node.name, error = %e, "node could not take the session yet");
                    if std::time::Instant::now() >= deadline {
                        return Err(RequestError::NoNode(started.elapsed()));
                    }
                    // Let the health checker catch up before asking again.
                    crate::timer::sleep(RETRY_PAUSE.min(deadline - std::time::Instant::now()))
                        .await;
                }
                Err(e) => {
                    return Err(RequestError::NodeRefused {
                        node: node.name.clone(),
                        message: e.to_string(),
                    })
                }
            }
        }
    }

    /// A backend connection to `node`: a new one in session mode, a pooled one in
    /// transaction mode (waiting for a free one up to `hold_timeout`).
    async fn lease(&mut self, node: &NodeConfig) -> Result<Leased, BackendError> {
        let creds = self.config.backend_credentials(&self.user);
        let timeout = self.config.backend_connect_timeout;
        let transaction_mode = self.mode == PoolMode::Transaction;
        let pool = match self.pools.iter().find(|p| p.node() == &node.name) {
            Some(p) => p.clone(),
            None => {
                let key = PoolKey {
                    node: node.name.clone(),
                    user: creds.user.clone(),
                    params: self.backend_params.clone(),
                    transaction_mode,
                };
                let p = self.ctx.pools.pool(&key, self.config.pool_size);
                self.pools.push(p.clone());
                p
            }
        };
        let checkout = if transaction_mode {
            let deadline = std::time::Instant::now() + self.config.hold_timeout;
            pool.checkout(self.id, deadline)
                .await
                .ok_or_else(|| BackendError::PoolExhausted {
                    node: node.name.clone(),
                    size: self.config.pool_size,
                })?
        } else {
            pool.reuse()
        };
        let slot = match checkout {
            Checkout::Reused {
                conn,
                guard,
                reset,
                idle,
                slot,
            } => {
                return Ok(Leased {
                    conn: *conn,
                    guard,
                    slot: Some(slot),
                    reset,
                    reused: true,
                    idle,
                })
            }
            Checkout::Open(slot) => Some(slot),
        };
        let conn = backend::connect(
            node,
            creds,
            &self.params.params,
            timeout,
            &self.ctx.scram_keys,
        )
        .await?;
        let guard = self.ctx.loads.connection(&node.name);
        Ok(Leased {
            conn,
            guard,
            slot,
            reset: false,
            reused: false,
            idle: std::time::Duration::ZERO,
        })
    }

    /// Makes a leased connection this session's: `DISCARD ALL` if another session used it,
    /// then (with `replay`, when the connection is new to the session) the session's settings
    /// and prepared statements, all in one round trip.
    async fn set_up(&mut self, leased: Leased, replay: bool) -> Result<Attached, BackendError> {
        let Leased {
            mut conn,
            guard,
            slot,
            reset,
            reused,
            idle,
        } = leased;
        if reused && idle >= CHECK_IDLE_AFTER && !conn.reset_sent && conn.leftover.is_empty() {
            // Nothing may be waiting on an idle connection: bytes (a FATAL) or EOF mean the
            // node ended it while it sat in the pool.
            let mut probe = [0u8; 1];
            match conn.stream.try_read(&mut probe) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                _ => {
                    backend::terminate(conn.stream).await;
                    return Err(BackendError::Connect {
                        node: conn.node.clone(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::ConnectionAborted,
                            "the pooled connection was ended while idle",
                        ),
                    });
                }
            }
        }
        let mut request = BytesMut::new();
        let mut ready = 0;
        if conn.reset_sent {
            // The last session's DISCARD ALL: its reply comes first.
            conn.reset_sent = false;
            ready += 1;
        } else if reset {
            message_query(&mut request, "DISCARD ALL");
            ready += 1;
        }
        if replay && (reset || !reused) {
            let (replayed, n) = migrate::replay_request(&self.settings, &self.tracker.statements);
            request.extend_from_slice(&replayed);
            ready += n;
        }
        if ready > 0 {
            let reply = backend::exchange(
                &conn.node,
                &mut conn.stream,
                &mut conn.leftover,
                &request,
                ready,
                self.config.backend_connect_timeout,
            )
            .await;
            let reply = match reply {
                Ok(r) => r,
                Err(e) => {
                    // Its state is unknown now: it never goes back to a pool.
                    backend::terminate(conn.stream).await;
                    return Err(e);
                }
            };
            for (code, msg) in &reply.errors {
                warn!(parent: &self.who.span(), node = %conn.node, sqlstate = %code, error = %msg, "could not set up part of the session's state");
            }
            for (k, v) in &reply.parameters {
                conn.parameters.set(k, v);
            }
        }
        self.cancel.set_target(Some(conn.cancel_target()));
        self.who.node = Some(conn.node.clone());
        self.tracker.reset_backend_side();
        // Before the greeting the session has no key yet (and `start` adopts this pid).
        self.tracker.pid_rewrite = self
            .cancel
            .key()
            .map(|k| k.pid)
            .filter(|advertised| *advertised != conn.key.pid)
            .map(|advertised| (conn.key.pid, advertised));
        self.pipes.down.buf = std::mem::take(&mut conn.leftover);
        self.pipes.down.ready = 0;
        let binding = self.ctx.loads.bind(&conn.node);
        Ok(Attached {
            conn,
            guard,
            binding,
            slot,
            recheck_at: None,
        })
    }

    /// Opens (or takes from the pool) a backend connection to `node` and rebuilds the
    /// session there.
    async fn attach(&mut self, node: &NodeConfig) -> Result<(), BackendError> {
        let mut stale = 0;
        let attached = loop {
            let leased = self.lease(node).await?;
            let reused = leased.reused;
            match self.set_up(leased, true).await {
                Ok(attached) => break attached,
                Err(e) if reused && stale < STALE_RETRIES => {
                    stale += 1;
                    debug!(parent: &self.who.span(), node = %node.name, error = %e, "a pooled connection was gone; taking another");
                }
                Err(e) => return Err(e),
            }
        };
        // Tell the client what differs on this connection (server_version after an upgrade,
        // in_hot_standby, …), as a node reports a changed parameter.
        let mut out = BytesMut::new();
        for (k, v) in attached.conn.parameters.iter() {
            if self.tracker.parameters.get(k) != Some(v) {
                message::parameter_status(&mut out, k, v);
                self.tracker.parameters.set(k, v);
            }
        }
        self.state = State::Attached(attached);
        if !out.is_empty() {
            if let Err(e) = self.client.write_all(&out).await {
                self.close_backend().await;
                return Err(BackendError::Connect {
                    node: node.name.clone(),
                    source: e,
                });
            }
        }
        Ok(())
    }

    /// Ends the backend connection so that nothing of the session survives on the node: a
    /// query still running is cancelled; closing the connection rolls back an open transaction.
    pub(super) async fn close_backend(&mut self) {
        let Some(a) = self.detach() else {
            return;
        };
        if self.tracker.unanswered > 0 {
            self.cancel_running("a closed session").await;
        }
        self.cancel.set_target(None);
        let (conn, guard, slot) = a.unbind();
        backend::terminate(conn.stream).await;
        drop(guard);
        // A connection ended this way is never pooled again.
        drop(slot);
    }

    /// Cancels the query running on the session's backend (logged when that fails).
    pub(super) async fn cancel_running(&self, whose: &str) {
        if let Some(target) = self.cancel.target() {
            if let Err(e) = crate::cancel::send_cancel(&target, CANCEL_TIMEOUT).await {
                warn!(parent: &self.who.span(), error = %e, "could not cancel the query of {whose}");
            }
        }
    }
}

/// A node that is starting up, shutting down or in recovery refuses with class 57 (operator
/// intervention); the session waits for it (or another) rather than failing.
fn is_transient_refusal(e: &BackendError) -> bool {
    matches!(e, BackendError::Refused { sqlstate, .. } if sqlstate.class() == SqlClass::OPERATOR_INTERVENTION)
}
