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

use crate::error::{RequestError, SessionError};
use crate::health;
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
    if f.rollback && !f.commit && !f.extended && in_transaction {
        for _ in 0..t.unanswered {
            message::command_complete(&mut bytes, "ROLLBACK");
            message::ready_for_query(&mut bytes, TxStatus::Idle);
        }
        return FailoverAnswer {
            bytes,
            status: TxStatus::Idle,
            requests: 0,
            sqlstate: None,
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

impl Session<'_> {
    /// The backend connection died or the node is going away.
    pub(super) async fn backend_lost(&mut self, reason: String) -> Result<Step, SessionError> {
        self.backend_gone(reason, true).await
    }

    /// The backend connection is gone (or given up): answer what was in flight. With
    /// `node_failed`, it counts as a failed health check of the node. The session is then
    /// detached, or aborted when its transaction died with the connection.
    pub(super) async fn backend_gone(
        &mut self,
        reason: String,
        node_failed: bool,
    ) -> Result<Step, SessionError> {
        let Some(a) = self.detach() else {
            return Ok(ControlFlow::Continue(()));
        };
        let node = a.conn.node.clone();
        self.cancel.set_target(None);
        if node_failed {
            health::passive_failure(self.ctx, &node, &reason);
        }
        drop(a);
        let who = &*self.who;
        let t = &mut self.tracker;
        if t.node_said_fatal {
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
