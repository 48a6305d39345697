//! What a session decides at a transaction boundary while attached: capture its state when a
//! setting may have changed, leave a node that no longer fits (or, in transaction mode, give the
//! connection back), stay pinned when it holds state that cannot move, hold the next request
//! while paused, and leave a node whose drain timed out.

use std::ops::ControlFlow;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tracing::{debug, info, warn};

use crate::backend::{self, BackendConn};
use crate::config::PoolMode;
use crate::error::{RequestError, SessionError};
use crate::metrics as m;
use crate::protocol::message::{self, TxStatus};
use crate::router;
use crate::topology::{AdminState, Health, NodeName, Snapshot};

use super::failover::During;
use super::local::Answer;
use super::migrate::{self, Captured};
use super::{message_query, Session, State, Step};

/// How often a pinned session on a node it should leave looks whether it may move now.
const PINNED_RECHECK: Duration = Duration::from_secs(1);

/// What asking the backend for the session's state gave.
enum Capture {
    Done(Captured),
    /// The node answered with an error (or the session has no backend): the session stays
    /// where it is.
    Unreadable,
    /// The backend died meanwhile, already handled as a lost backend; the step says how the
    /// session goes on.
    BackendLost(Step),
}

/// How a migration or failover is labelled in metrics.
fn leave_reason(snapshot: &Snapshot, node: &NodeName) -> &'static str {
    match snapshot.node(node) {
        None => "removed",
        Some(n) if n.health != Health::Up => "node_down",
        Some(n) if n.admin != AdminState::Active => "drain",
        Some(_) => "role_change",
    }
}

impl Session<'_> {
    /// At a transaction boundary with a backend: capture changed settings, leave a node that
    /// no longer fits, hold a request while paused.
    pub(super) async fn at_boundary(&mut self) -> Result<Step, SessionError> {
        let snapshot = self.ctx.topology.load();
        self.changes.mark_unchanged();
        let Some(a) = self.attached() else {
            return Ok(ControlFlow::Continue(()));
        };
        let node = a.conn.node.clone();
        let recheck_due = a.recheck_at.is_some_and(|t| t <= std::time::Instant::now());
        let pooled = self.mode == PoolMode::Transaction && a.slot.is_some();
        let routing = &self.config.routing;
        let fits = router::fits(&snapshot, &node, self.target, routing);
        // In transaction mode the connection goes back at this boundary unless the session
        // may hold state that cannot move: then look first.
        let look = self.tracker.maybe_pinned && pooled;
        if self.tracker.settings_dirty || !fits || recheck_due || look {
            self.tracker.settings_dirty = false;
            self.tracker.maybe_pinned = false;
            let captured = match self.capture().await? {
                Capture::Done(c) => c,
                Capture::Unreadable => return Ok(ControlFlow::Continue(())),
                Capture::BackendLost(step) => return Ok(step),
            };
            self.settings = captured.settings;
            if !fits || pooled {
                self.leave(&snapshot, &node, captured.pins, !fits).await;
            } else if let Some(a) = self.attached_mut() {
                a.binding.set_pinned(false);
                a.recheck_at = None;
            }
        } else if pooled {
            self.release(false).await;
        }
        if snapshot.paused && !self.pipes.up.buf.is_empty() {
            return self.hold_while_paused().await;
        }
        Ok(ControlFlow::Continue(()))
    }

    /// Paused: the client's next transaction waits here, its connection (if any) untouched,
    /// until the pause ends, `hold_timeout` passes (57P03) or the client cancels (57014).
    async fn hold_while_paused(&mut self) -> Result<Step, SessionError> {
        let deadline = std::time::Instant::now() + self.config.hold_timeout;
        let started = std::time::Instant::now();
        let stop = &self.ctx.shutdown.soft;
        let held = self
            .cancel
            .cancellable(router::hold(&self.ctx.topology, deadline, stop, |s| {
                (!s.paused).then_some(())
            }))
            .await;
        let refused = match held {
            Some(Ok(())) => return Ok(ControlFlow::Continue(())),
            Some(Err(SessionError::Shutdown)) => {
                // As at any boundary during shutdown: the connection is idle, end it.
                self.close_backend().await;
                return Err(SessionError::Shutdown);
            }
            Some(Err(_)) => RequestError::NoNode(started.elapsed()),
            None => RequestError::Cancelled,
        };
        self.answer_locally(Answer::Refuse(refused)).await
    }

    /// Asks the current backend for the session's state.
    async fn capture(&mut self) -> Result<Capture, SessionError> {
        let State::Attached(a) = &mut self.state else {
            return Ok(Capture::Unreadable);
        };
        let mut request = BytesMut::new();
        message_query(&mut request, migrate::CAPTURE_SQL);
        let reply = backend::exchange(
            &a.conn.node,
            &mut a.conn.stream,
            &mut self.pipes.down.buf,
            &request,
            1,
            self.config.backend_connect_timeout,
        )
        .await;
        match reply {
            Ok(mut x) => {
                if !x.notifications.is_empty() {
                    if let Some((from, to)) = self.tracker.pid_rewrite {
                        message::rewrite_notification_pids(&mut x.notifications, from, to);
                    }
                    self.client
                        .write_all(&x.notifications)
                        .await
                        .map_err(SessionError::ClientGone)?;
                }
                if let Some((code, msg)) = x.errors.first() {
                    warn!(parent: &self.who.span(), sqlstate = %code, error = %msg, "could not read the session's state; it stays where it is");
                    return Ok(Capture::Unreadable);
                }
                let mut captured = Captured::from_rows(&x.rows);
                // Statements the client defined that exist on the backend right now.
                self.tracker
                    .statements
                    .retain(|name, _| captured.statements.contains(name));
                captured.statements.clear();
                Ok(Capture::Done(captured))
            }
            Err(e) => Ok(Capture::BackendLost(
                self.backend_lost(e.to_string(), During::Capture).await?,
            )),
        }
    }

    /// Leaves the node (or, in transaction mode, gives the connection back) at this boundary
    /// unless the session is pinned to it. `migrating`: the node no longer fits the session.
    async fn leave(
        &mut self,
        snapshot: &Snapshot,
        node: &NodeName,
        pins: Vec<String>,
        migrating: bool,
    ) {
        let reason = leave_reason(snapshot, node);
        if !pins.is_empty() {
            let who = &*self.who;
            let State::Attached(a) = &mut self.state else {
                return;
            };
            if !a.binding.is_pinned() {
                for p in &pins {
                    if let Some(state) = migrate::PIN_STATES.iter().find(|s| *s == p) {
                        metrics::counter!(m::PINNED_TOTAL, "state" => *state).increment(1);
                    }
                }
                info!(parent: &who.span(), %node, state = ?pins, "session is pinned: it holds state that cannot move");
            }
            a.binding.set_pinned(true);
            a.recheck_at = Some(std::time::Instant::now() + PINNED_RECHECK);
            return;
        }
        if let Some(a) = self.attached_mut() {
            a.binding.set_pinned(false);
            a.recheck_at = None;
        }
        if !migrating {
            self.release(false).await;
            return;
        }
        metrics::counter!(m::MIGRATIONS_TOTAL, "reason" => reason).increment(1);
        debug!(parent: &self.who.span(), %node, reason, "leaving the node at a transaction boundary");
        if self.attached().is_some_and(|a| a.slot.is_some()) {
            self.release(false).await;
        } else {
            self.close_backend().await;
        }
    }

    /// Gives the connection back to its pool at a boundary (closes it if its node is out of
    /// rotation). When the session is `ending`, the next session on the connection is another
    /// one: `DISCARD ALL` goes out now, and that session's set-up reads the reply, so neither
    /// the ending client nor the next one waits for the reset.
    pub(super) async fn release(&mut self, ending: bool) {
        let Some(a) = self.detach() else {
            return;
        };
        self.cancel.set_target(None);
        let (mut conn, guard, slot) = a.unbind();
        let in_rotation = self
            .ctx
            .topology
            .load()
            .node(&conn.node)
            .is_some_and(|n| n.in_rotation());
        let clean = in_rotation && self.tracker.at_boundary() && (!ending || send_reset(&mut conn));
        match slot {
            Some(slot) if clean => {
                if ending {
                    conn.parameters = std::mem::take(&mut self.tracker.parameters);
                } else {
                    conn.parameters.clone_from(&self.tracker.parameters);
                }
                conn.leftover = std::mem::take(&mut self.pipes.down.buf);
                conn.status = TxStatus::Idle;
                slot.give_back(conn, guard, self.id);
            }
            _ => {
                backend::terminate(conn.stream).await;
                drop(guard);
            }
        }
    }

    /// The node's drain timed out (`drain.on_timeout = "end_transactions"`): leave it now. A
    /// pinned session cannot move and is closed; a transaction in progress ends with the
    /// same answers as a failover.
    pub(super) async fn evicted(&mut self) -> Result<Step, SessionError> {
        let Some(a) = self.attached() else {
            return Ok(ControlFlow::Continue(()));
        };
        let node = a.conn.node.clone();
        if a.binding.is_pinned() {
            self.close_backend().await;
            return Err(SessionError::PinnedNodeDrained(node));
        }
        if self.tracker.at_boundary() {
            match self.capture().await? {
                Capture::Done(captured) => self.settings = captured.settings,
                Capture::BackendLost(ControlFlow::Break(end)) => {
                    return Ok(ControlFlow::Break(end))
                }
                Capture::Unreadable | Capture::BackendLost(ControlFlow::Continue(())) => {}
            }
            metrics::counter!(m::MIGRATIONS_TOTAL, "reason" => "drain").increment(1);
            self.close_backend().await;
            return Ok(ControlFlow::Continue(()));
        }
        if self.tracker.unanswered > 0 {
            self.cancel_running("an evicted session").await;
        }
        self.answer_lost_backend("the node's drain timed out".into())
            .await
    }
}

/// Writes `DISCARD ALL` to an idle connection without waiting: true if it went out whole
/// (the socket takes it at once unless something is badly wrong, and then the connection is
/// not worth keeping).
fn send_reset(conn: &mut BackendConn) -> bool {
    let mut request = BytesMut::with_capacity(32);
    message_query(&mut request, "DISCARD ALL");
    let sent = matches!(conn.stream.try_write(&request), Ok(n) if n == request.len());
    conn.reset_sent = sent;
    sent
}
