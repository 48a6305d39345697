//! A backend connection that died under a session: what the session does about it, and the
//! answers to the requests that were in flight on it, so the client learns the truth and keeps
//! its connection (docs/contract.md, "7. Failover"):
//!
//! - inside an explicit transaction, not COMMIT: `40001`, then ReadyForQuery `E` — nothing of
//!   the transaction was committed, it is safe to retry;
//! - COMMIT, or a statement outside a transaction block: `40003`, then ReadyForQuery `I` —
//!   the node may or may not have committed it;
//! - a simple-protocol ROLLBACK: it happened (the dead backend's transaction is gone), so
//!   `ROLLBACK` and ReadyForQuery `I`.

use std::ops::ControlFlow;

use bytes::{Buf, BytesMut};
use tokio::io::AsyncWriteExt;
use tracing::{debug, warn};

use crate::config::PoolMode;
use crate::error::{RequestError, SessionError};
use crate::health;
use crate::liveness::SESSION_END_CHECK;
use crate::metrics as m;
use crate::protocol::message::{self, TxStatus};
use crate::protocol::SqlState;
use crate::topology::NodeName;

use super::local::Answer;
use super::tracker::Tracker;
use super::{Session, State, Step};

/// What graywire sends for the lost requests.
#[derive(Debug)]
pub struct FailoverAnswer {
    pub bytes: BytesMut,
    /// The session's transaction status afterwards.
    pub status: TxStatus,
    /// Requests answered with an error (and, with `open_extended`, one more begun without
    /// its Sync yet).
    pub requests: u32,
    /// The error they were answered with; `None` when they were ROLLBACKs, answered as done.
    pub sqlstate: Option<SqlState>,
}

/// Builds the answer for every request the tracker counts as unanswered. When extended
/// messages were sent after the last Sync, the error is sent now and the caller skips the
/// client's messages up to that Sync.
pub fn answer_in_flight(t: &Tracker, node: &NodeName, reason: &str) -> FailoverAnswer {
    let mut bytes = BytesMut::new();
    let in_transaction = t.status != TxStatus::Idle;
    let f = t.in_flight;
    let (error, status) = if !in_transaction || f.commit {
        (
            RequestError::OutcomeUnknown {
                node: node.clone(),
                reason: reason.to_owned(),
            },
            TxStatus::Idle,
        )
    } else {
        (
            RequestError::RolledBack {
                node: node.clone(),
                reason: reason.to_owned(),
            },
            TxStatus::Failed,
        )
    };
    let requests = t.unanswered + u32::from(t.open_extended);
    let rollback_last = t.rollback_after.filter(|_| !t.more_after_rollback);
    if let Some(before) = rollback_last.filter(|_| !f.commit && !f.extended && in_transaction) {
        // The requests before the first ROLLBACK ran inside the dead transaction; the
        // ROLLBACKs happened (the transaction is gone either way).
        let before = before.min(t.unanswered);
        for _ in 0..before {
            error.write_response(&mut bytes);
            message::ready_for_query(&mut bytes, TxStatus::Failed);
        }
        for _ in before..t.unanswered {
            message::command_complete(&mut bytes, "ROLLBACK");
            message::ready_for_query(&mut bytes, TxStatus::Idle);
        }
        return FailoverAnswer {
            bytes,
            status: TxStatus::Idle,
            requests: before,
            sqlstate: (before > 0).then(|| error.sqlstate()),
        };
    }
    for _ in 0..t.unanswered {
        error.write_response(&mut bytes);
        message::ready_for_query(&mut bytes, status);
    }
    if t.open_extended {
        error.write_response(&mut bytes);
    }
    FailoverAnswer {
        bytes,
        status,
        requests,
        sqlstate: Some(error.sqlstate()),
    }
}

/// Why a backend connection under a session ended, as far as graywire can tell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Ending {
    /// The node itself is failing (it said so, or it no longer takes sessions: the check's
    /// finding): a failed check of the node; requests in flight are answered (40001/40003),
    /// the session goes on.
    NodeFailing(Option<String>),
    /// Only this backend connection was ended (`cause`, a value of
    /// [`m::TERMINATION_CAUSES`]): its FATAL reaches the client and the session ends, as on
    /// a direct connection.
    SessionEnded(&'static str),
    /// The connection broke without a word while the node still takes sessions: answered
    /// like a failover (the outcome of a request in flight is unknown), the session goes on,
    /// and the node is not counted as failing.
    ConnectionLost,
}

/// The cause label of a FATAL a node sent to end one session.
pub(super) fn termination_cause(code: SqlState) -> &'static str {
    match code {
        SqlState::ADMIN_SHUTDOWN => "admin_command",
        SqlState::IDLE_SESSION_TIMEOUT => "idle_session_timeout",
        SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT => "idle_in_transaction_timeout",
        SqlState::DATABASE_DROPPED => "database_dropped",
        SqlState::SERIALIZATION_FAILURE | SqlState::DEADLOCK_DETECTED => "recovery_conflict",
        _ => "node_fatal",
    }
}

/// What the session was doing when its backend connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum During {
    /// Relaying the client's requests.
    Relay,
    /// Reading the session's state at a boundary: a session that cannot carry its state must
    /// not go on without it.
    Capture,
}

impl Session<'_> {
    /// Decides what the end of the session's backend connection to `node` means. A FATAL
    /// that ended only this session is final; a node that said it is going away (other than
    /// with 57P01, which `pg_terminate_backend` sends too) is failing; otherwise asking the
    /// node decides ([`crate::liveness`]), bounded by [`SESSION_END_CHECK`].
    async fn classify(&self, node: &NodeName) -> Ending {
        let t = &self.tracker;
        if let Some(code) = t.node_fatal {
            return Ending::SessionEnded(termination_cause(code));
        }
        let withheld = t.withheld_fatal.as_ref().map(|f| f.sqlstate);
        match withheld {
            Some(SqlState::CRASH_SHUTDOWN | SqlState::CANNOT_CONNECT_NOW) => {
                return Ending::NodeFailing(None)
            }
            // Withheld because it came between transactions in transaction mode.
            Some(code) if code != SqlState::ADMIN_SHUTDOWN => {
                return Ending::SessionEnded(termination_cause(code))
            }
            _ => {}
        }
        let Some(config) = self.config.nodes.iter().find(|n| &n.name == node) else {
            // Removed from the config meanwhile: nothing to check, nothing to count.
            return Ending::NodeFailing(None);
        };
        let liveness = &self.ctx.liveness;
        let (creds, database) = (&self.config.backend, &self.config.health.database);
        match liveness
            .takes_sessions(
                config,
                creds,
                database,
                SESSION_END_CHECK,
                withheld.is_some(),
            )
            .await
        {
            Err(why) => {
                debug!(parent: &self.who.span(), %node, %why, "the node does not take sessions");
                Ending::NodeFailing(Some(why))
            }
            Ok(()) if withheld.is_some() => Ending::SessionEnded("admin_command"),
            Ok(()) => Ending::ConnectionLost,
        }
    }

    /// In transaction mode, between transactions, with nothing bound to the connection
    /// (not pinned, no state that may pin it, no setting changed since the last capture):
    /// losing it loses nothing of the session.
    fn may_lose_backend_quietly(&self) -> bool {
        let t = &self.tracker;
        self.mode == PoolMode::Transaction
            && t.at_boundary()
            && !t.settings_dirty
            && !t.maybe_pinned
            && self.attached().is_some_and(|a| !a.binding.is_pinned())
    }

    /// The backend connection died (or the node said it is going away) while the session
    /// was `during` something: decide what that means (see [`Ending`]) and act on it.
    pub(super) async fn backend_lost(
        &mut self,
        reason: String,
        during: During,
    ) -> Result<Step, SessionError> {
        let Some(node) = self.attached().map(|a| a.conn.node.clone()) else {
            return Ok(ControlFlow::Continue(()));
        };
        let ending = self.classify(&node).await;
        match ending {
            Ending::NodeFailing(finding) => {
                let reason = match finding {
                    Some(why) => format!("{reason}; then {why}"),
                    None => reason,
                };
                health::passive_failure(self.ctx, &node, &reason);
                self.answer_lost_backend(reason).await
            }
            Ending::SessionEnded(cause) if self.may_lose_backend_quietly() => {
                // Transaction mode, between transactions, nothing bound to the connection:
                // the client did not own it and never hears of it (as with PgBouncer).
                metrics::counter!(m::BACKEND_TERMINATIONS_TOTAL, "cause" => cause).increment(1);
                debug!(parent: &self.who.span(), %node, %reason, cause, "the node ended the session's idle connection; the session goes on");
                if self.detach().is_some() {
                    self.cancel.set_target(None);
                }
                self.tracker.reset_backend_side();
                self.pipes.down.buf.clear();
                self.pipes.down.ready = 0;
                Ok(ControlFlow::Continue(()))
            }
            Ending::SessionEnded(cause) => {
                metrics::counter!(m::BACKEND_TERMINATIONS_TOTAL, "cause" => cause).increment(1);
                debug!(parent: &self.who.span(), %node, %reason, cause, "the node ended this session");
                // Already closed by the node: nothing to cancel, nothing to pool.
                if self.detach().is_some() {
                    self.cancel.set_target(None);
                }
                if let Some(fatal) = self.tracker.withheld_fatal.take() {
                    // Relayed as a direct connection would have received it.
                    self.client
                        .write_all(&fatal.message_bytes())
                        .await
                        .map_err(SessionError::ClientGone)?;
                }
                Err(SessionError::NodeEnded)
            }
            Ending::ConnectionLost if during == During::Capture => {
                metrics::counter!(m::BACKEND_TERMINATIONS_TOTAL, "cause" => "state_capture_failed")
                    .increment(1);
                self.close_backend().await;
                Err(SessionError::StateUnreadable { node, reason })
            }
            Ending::ConnectionLost => {
                metrics::counter!(m::BACKEND_TERMINATIONS_TOTAL, "cause" => "connection_lost")
                    .increment(1);
                self.answer_lost_backend(reason).await
            }
        }
    }

    /// The backend connection is gone (or given up): answer what was in flight. The session
    /// is then detached, or aborted when its transaction died with the connection.
    pub(super) async fn answer_lost_backend(
        &mut self,
        reason: String,
    ) -> Result<Step, SessionError> {
        let Some(a) = self.detach() else {
            return Ok(ControlFlow::Continue(()));
        };
        let node = a.conn.node.clone();
        self.cancel.set_target(None);
        drop(a);
        let who = &*self.who;
        let t = &mut self.tracker;
        if t.node_fatal.is_some() {
            // The node told the client why itself (e.g. a FATAL error of its own).
            return Err(SessionError::NodeEnded);
        }
        if !t.backend_at_message_start() || t.in_copy {
            // Mid-message or mid-COPY: nothing graywire could add would make sense.
            return Err(SessionError::BackendLost { node, reason });
        }
        // Deliver whole node messages already scanned, drop the rest of the node's bytes and
        // the client's bytes that belonged to the failed requests.
        let down = &mut self.pipes.down;
        down.buf.truncate(down.ready);
        down.flush_all_to(self.client)
            .await
            .map_err(SessionError::ClientGone)?;
        down.buf.clear();
        let up = &mut self.pipes.up;
        up.buf.advance(up.ready);
        up.ready = 0;

        let answer = answer_in_flight(t, &node, &reason);
        let mut unreported = None;
        match answer.sqlstate {
            Some(code) if answer.requests > 0 => {
                warn!(parent: &who.span(), %node, %reason, requests = answer.requests, sqlstate = %code, "backend connection lost under a request; answered it and kept the session");
                metrics::counter!(m::FAILOVERS_TOTAL, "sqlstate" => code.label())
                    .increment(answer.requests as u64);
            }
            _ if t.status == TxStatus::InTransaction => {
                debug!(parent: &who.span(), %node, %reason, "backend connection lost inside an idle transaction");
                let rolled_back = RequestError::RolledBack {
                    node: node.clone(),
                    reason: reason.clone(),
                };
                metrics::counter!(m::FAILOVERS_TOTAL, "sqlstate" => rolled_back.sqlstate().label())
                    .increment(1);
                unreported = Some(rolled_back);
            }
            _ => {
                debug!(parent: &who.span(), %node, %reason, "backend connection lost between transactions");
            }
        }
        let skip = t.open_extended;
        t.reset_backend_side();
        t.status = answer.status;
        self.client
            .write_all(&answer.bytes)
            .await
            .map_err(SessionError::ClientGone)?;
        let step = if skip {
            self.answer_locally(Answer::SkipToSync).await?
        } else {
            ControlFlow::Continue(())
        };
        if self.tracker.status != TxStatus::Idle {
            self.state = State::Aborted { unreported };
        }
        Ok(step)
    }
}
#[cfg(test)]
mod tests;
