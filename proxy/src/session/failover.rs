//! Answering the requests that were in flight on a backend connection that died, so the
//! client learns the truth and keeps its connection (DESIGN.md, behaviour contract 4):
//!
//! - inside an explicit transaction, not COMMIT: `40001`, then ReadyForQuery `E` — nothing of
//!   the transaction was committed, it is safe to retry;
//! - COMMIT, or a statement outside a transaction block: `40003`, then ReadyForQuery `I` —
//!   the node may or may not have committed it;
//! - a simple-protocol ROLLBACK: it happened (the dead backend's transaction is gone), so
//!   `ROLLBACK` and ReadyForQuery `I`.

use bytes::BytesMut;

use crate::error::RequestError;
use crate::protocol::message::{self, TxStatus};
use crate::topology::NodeName;

use super::tracker::Tracker;

/// What graywire sends for the lost requests.
#[derive(Debug)]
pub struct FailoverAnswer {
    pub bytes: BytesMut,
    /// The session's transaction status afterwards.
    pub status: TxStatus,
    /// Requests answered (and, with `open_extended`, one more begun without its Sync yet).
    pub requests: u32,
    pub sqlstate: &'static str,
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
            sqlstate: "",
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
        sqlstate: error.sqlstate().code(),
    }
}
#[cfg(test)]
mod tests;
