//! Why a session (or one of its requests) failed, which side failed, and the ONLY mapping from
//! a failure to the ErrorResponse and SQLSTATE a client sees. Deep code returns these types;
//! it never writes an ErrorResponse itself.

use bytes::{Bytes, BytesMut};
use thiserror::Error;

use crate::protocol::frame::FrameError;
use crate::protocol::message::{self, Severity};
use crate::protocol::scram::ScramError;
use crate::protocol::startup::StartupError;
use crate::protocol::SqlState;
use crate::topology::NodeName;

/// Which side of graywire a failure came from (logged with every session that ends badly).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Node,
    Graywire,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Node => "node",
            Side::Graywire => "graywire",
        }
    }
}

/// Opening a backend connection failed.
#[derive(Debug, Error)]
pub enum BackendError {
    #[error("cannot connect to node {node}: {source}")]
    Connect {
        node: NodeName,
        source: std::io::Error,
    },
    #[error("node {node} did not finish startup within {timeout:?}")]
    Timeout {
        node: NodeName,
        timeout: std::time::Duration,
    },
    /// The node refused the session with an ErrorResponse, relayed to the client as it is.
    #[error("node {node} refused the session: {message} ({sqlstate})")]
    Refused {
        node: NodeName,
        sqlstate: SqlState,
        message: String,
        raw: Bytes,
    },
    #[error("node {node} asked for {method}, which graywire cannot answer")]
    UnsupportedAuth { node: NodeName, method: String },
    #[error("node {node} broke the protocol during startup: {detail}")]
    Protocol { node: NodeName, detail: String },
    /// Transaction mode: all `size` connections of the pool stayed busy for `hold_timeout`.
    #[error("all {size} pooled connections to node {node} stayed busy")]
    PoolExhausted { node: NodeName, size: usize },
}

impl BackendError {
    /// True when the node itself is unreachable, so the failure counts as a failed check.
    pub fn is_node_failure(&self) -> bool {
        matches!(
            self,
            BackendError::Connect { .. }
                | BackendError::Timeout { .. }
                | BackendError::Protocol { .. }
        )
    }
}

/// Everything that can end a session before or while it runs.
#[derive(Debug, Error)]
pub enum SessionError {
    #[error("client went away: {0}")]
    ClientGone(#[source] std::io::Error),
    #[error("protocol violation: {0}")]
    Frame(#[from] FrameError),
    #[error("{0}")]
    Startup(#[from] StartupError),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("{0}")]
    Scram(#[from] ScramError),
    #[error("client did not finish authentication within the timeout")]
    AuthTimeout,
    /// A wrong password, or a user graywire does not know (refused the same way). The name is
    /// quoted and escaped: it is the client's and goes into log lines.
    #[error("password authentication failed for user {0:?}")]
    BadPassword(String),
    #[error("sorry, too many clients already")]
    TooManyConnections,
    #[error("{0} is not supported by graywire")]
    Unsupported(&'static str),
    #[error("no primary node is available (waited {0:?})")]
    NoPrimary(std::time::Duration),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error("lost the connection to node {node}: {reason}")]
    BackendLost { node: NodeName, reason: String },
    /// Reading the session's state at a boundary failed while its node stayed up: the session
    /// ends rather than go on without its settings.
    #[error("graywire could not read this session's state from node {node} ({reason}); the session ends rather than go on without it")]
    StateUnreadable { node: NodeName, reason: String },
    /// The startup packet graywire would send to the nodes for this client (its parameters
    /// plus graywire's own) is over PostgreSQL's limit: the node would close the connection.
    #[error("the startup packet graywire would send to the node is {size} bytes, over PostgreSQL's limit of {limit}; send fewer or shorter startup parameters")]
    StartupTooLarge { size: usize, limit: usize },
    #[error("graywire is shutting down")]
    Shutdown,
    /// The node ended the session with a FATAL error of its own, already relayed.
    #[error("the node ended the session")]
    NodeEnded,
    /// The session held state that cannot move, and its node's drain timed out.
    #[error("node {0} was drained and this session held state that cannot move (temporary tables, LISTEN, session locks, prepared SQL or held cursors)")]
    PinnedNodeDrained(NodeName),
}

impl SessionError {
    pub fn side(&self) -> Side {
        match self {
            SessionError::ClientGone(_)
            | SessionError::Frame(_)
            | SessionError::Startup(_)
            | SessionError::Protocol(_)
            | SessionError::Scram(_)
            | SessionError::AuthTimeout
            | SessionError::BadPassword(_)
            | SessionError::Unsupported(_)
            | SessionError::StartupTooLarge { .. } => Side::Client,
            SessionError::Backend(_)
            | SessionError::BackendLost { .. }
            | SessionError::StateUnreadable { .. }
            | SessionError::NodeEnded
            | SessionError::NoPrimary(_) => Side::Node,
            SessionError::TooManyConnections
            | SessionError::Shutdown
            | SessionError::PinnedNodeDrained(_) => Side::Graywire,
        }
    }

    /// The SQLSTATE the client sees; `None` when nothing is sent (the client is gone, or the
    /// node's own ErrorResponse is relayed).
    pub fn sqlstate(&self) -> Option<SqlState> {
        Some(match self {
            SessionError::ClientGone(_) | SessionError::NodeEnded => return None,
            SessionError::Backend(BackendError::Refused { .. }) => return None,
            // Like PostgreSQL: an unsupported protocol version is a missing feature.
            SessionError::Startup(StartupError::UnsupportedProtocol { .. }) => {
                SqlState::FEATURE_NOT_SUPPORTED
            }
            // Like PostgreSQL: a startup packet without a user is an authorization problem.
            SessionError::Startup(StartupError::NoUser) => {
                SqlState::INVALID_AUTHORIZATION_SPECIFICATION
            }
            SessionError::Frame(_)
            | SessionError::Startup(_)
            | SessionError::Protocol(_)
            | SessionError::StartupTooLarge { .. }
            | SessionError::AuthTimeout => SqlState::PROTOCOL_VIOLATION,
            SessionError::Scram(ScramError::BadProof) => SqlState::INVALID_PASSWORD,
            SessionError::Scram(_) => SqlState::PROTOCOL_VIOLATION,
            SessionError::BadPassword(_) => SqlState::INVALID_PASSWORD,
            SessionError::TooManyConnections => SqlState::TOO_MANY_CONNECTIONS,
            SessionError::Unsupported(_) => SqlState::FEATURE_NOT_SUPPORTED,
            SessionError::NoPrimary(_) | SessionError::Backend(_) => SqlState::CANNOT_CONNECT_NOW,
            SessionError::BackendLost { .. } | SessionError::StateUnreadable { .. } => {
                SqlState::CONNECTION_FAILURE
            }
            SessionError::Shutdown | SessionError::PinnedNodeDrained(_) => SqlState::ADMIN_SHUTDOWN,
        })
    }

    /// The FATAL message that ends the session, ready to write; empty when nothing is sent.
    pub fn fatal_response(&self) -> Bytes {
        let mut out = BytesMut::new();
        if let SessionError::Backend(BackendError::Refused { raw, .. }) = self {
            return raw.clone();
        }
        if let Some(code) = self.sqlstate() {
            let message = match self {
                // PostgreSQL does not reveal why SCRAM failed beyond this.
                SessionError::Scram(ScramError::BadProof) => {
                    "password authentication failed".to_owned()
                }
                other => other.to_string(),
            };
            message::error_response(&mut out, Severity::Fatal, code, &message, None);
        }
        out.freeze()
    }

    /// A client hanging up is routine; everything else is worth a log line at warn.
    pub fn is_routine(&self) -> bool {
        matches!(
            self,
            SessionError::ClientGone(_) | SessionError::Shutdown | SessionError::NodeEnded
        )
    }
}

/// Why graywire itself answers one request with an ERROR while the session goes on.
#[derive(Debug, Error)]
pub enum RequestError {
    /// The backend died inside an explicit transaction: nothing of it was committed.
    #[error("the transaction was rolled back because node {node} failed ({reason}); it is safe to retry it")]
    RolledBack { node: NodeName, reason: String },
    /// The backend died while a COMMIT or an autocommit statement ran.
    #[error(
        "node {node} failed while the statement ran ({reason}); whether it committed is unknown"
    )]
    OutcomeUnknown { node: NodeName, reason: String },
    /// No suitable node appeared within `hold_timeout`.
    #[error("no suitable node is available (waited {0:?})")]
    NoNode(std::time::Duration),
    /// A node refused the session's new backend connection.
    #[error("node {node} refused a connection for this session: {message}")]
    NodeRefused { node: NodeName, message: String },
    /// The client cancelled its request while it was held.
    #[error("canceling statement due to user request")]
    Cancelled,
    /// graywire began to stop while the request was held. Not answered as an ERROR: the
    /// session ends with FATAL 57P01, like an idle session at shutdown.
    #[error("terminating connection due to administrator command")]
    Shutdown,
    /// Like PostgreSQL: commands in a failed transaction are refused until it ends.
    #[error("current transaction is aborted, commands ignored until end of transaction block")]
    InFailedTransaction,
}

impl RequestError {
    pub fn sqlstate(&self) -> SqlState {
        match self {
            RequestError::RolledBack { .. } => SqlState::SERIALIZATION_FAILURE,
            RequestError::OutcomeUnknown { .. } => SqlState::STATEMENT_COMPLETION_UNKNOWN,
            RequestError::NoNode(_) | RequestError::NodeRefused { .. } => {
                SqlState::CANNOT_CONNECT_NOW
            }
            RequestError::InFailedTransaction => SqlState::IN_FAILED_SQL_TRANSACTION,
            RequestError::Cancelled => SqlState::QUERY_CANCELED,
            RequestError::Shutdown => SqlState::ADMIN_SHUTDOWN,
        }
    }

    /// Appends the ErrorResponse (severity ERROR) the client sees, and counts it.
    pub fn write_response(&self, out: &mut BytesMut) {
        let code = self.sqlstate();
        metrics::counter!(crate::metrics::CLIENT_ERRORS_TOTAL, "sqlstate" => code.label(), "source" => "graywire")
            .increment(1);
        message::error_response(out, Severity::Error, code, &self.to_string(), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code_of(e: SessionError) -> Option<SqlState> {
        e.sqlstate()
    }

    fn code(text: &str) -> Option<SqlState> {
        Some(SqlState::reported(text))
    }

    #[test]
    fn each_failure_maps_to_its_sqlstate() {
        use std::io::{Error, ErrorKind};
        let n = NodeName::new("pg1");
        assert_eq!(code_of(SessionError::Protocol("x".into())), code("08P01"));
        assert_eq!(code_of(StartupError::NoUser.into()), code("28000"));
        assert_eq!(code_of(StartupError::BadLength(3).into()), code("08P01"));
        assert_eq!(
            code_of(StartupError::UnsupportedProtocol { major: 2, minor: 0 }.into()),
            code("0A000")
        );
        assert_eq!(
            code_of(SessionError::BadPassword("u".into())),
            code("28P01")
        );
        assert_eq!(code_of(ScramError::BadProof.into()), code("28P01"));
        assert_eq!(code_of(ScramError::ChannelBinding.into()), code("08P01"));
        assert_eq!(code_of(SessionError::TooManyConnections), code("53300"));
        assert_eq!(code_of(SessionError::Shutdown), code("57P01"));
        assert_eq!(
            code_of(SessionError::NoPrimary(Default::default())),
            code("57P03")
        );
        assert_eq!(
            code_of(SessionError::BackendLost {
                node: n.clone(),
                reason: "eof".into()
            }),
            code("08006")
        );
        assert_eq!(
            code_of(SessionError::ClientGone(Error::from(ErrorKind::BrokenPipe))),
            None
        );
        let refused = BackendError::Refused {
            node: n,
            sqlstate: SqlState::reported("3D000"),
            message: "no db".into(),
            raw: Bytes::from_static(b"E..."),
        };
        let e = SessionError::from(refused);
        assert_eq!(e.sqlstate(), None);
        assert_eq!(
            &e.fatal_response()[..],
            b"E...",
            "node errors are relayed unchanged"
        );
    }

    #[test]
    fn request_errors_map_to_their_sqlstates() {
        let n = NodeName::new("pg1");
        let r = |reason: &str| reason.to_owned();
        let cases = [
            (
                RequestError::RolledBack {
                    node: n.clone(),
                    reason: r("eof"),
                },
                "40001",
            ),
            (
                RequestError::OutcomeUnknown {
                    node: n.clone(),
                    reason: r("eof"),
                },
                "40003",
            ),
            (RequestError::NoNode(Default::default()), "57P03"),
            (
                RequestError::NodeRefused {
                    node: n,
                    message: r("starting up"),
                },
                "57P03",
            ),
            (RequestError::InFailedTransaction, "25P02"),
            (RequestError::Cancelled, "57014"),
            (RequestError::Shutdown, "57P01"),
        ];
        for (e, code) in cases {
            assert_eq!(e.sqlstate().code(), code, "{e}");
            let mut out = BytesMut::new();
            e.write_response(&mut out);
            let text = String::from_utf8_lossy(&out);
            assert!(text.contains("ERROR") && text.contains(code), "{text}");
        }
    }

    #[test]
    fn fatal_response_is_an_error_message() {
        let r = SessionError::TooManyConnections.fatal_response();
        assert_eq!(r[0], b'E');
        let text = String::from_utf8_lossy(&r);
        assert!(text.contains("FATAL") && text.contains("53300"), "{text}");
    }
}
