//! The session state machine: one client connection, from its first byte to its close.
//!
//! ```text
//!   Opening ──SSLRequest/GSSENCRequest──▶ answer 'N' ──▶ Opening
//!      │ CancelRequest ──▶ forward to the session's backend, close
//!      ▼ StartupMessage
//!   Authenticating ──unknown user 28000 / bad password 28P01──▶ Closing
//!      ▼ ok
//!   Connecting: hold until a primary is known (57P03 after hold_timeout), open a backend
//!      connection with graywire's credentials (the node's refusal is relayed as it is)
//!      ▼ AuthenticationOk, the node's ParameterStatus, graywire's BackendKeyData, ReadyForQuery
//!   Ready ⇄ InTransaction: relay; the status comes from each ReadyForQuery
//!      ▼ Terminate or EOF │ node lost (08006) │ shutdown at a boundary (57P01) │ bad message (08P01)
//!   Closing: cancel a query still running, Terminate the backend, FATAL to the client if owed
//! ```
//!
//! Opening and Authenticating together are bounded by `listener.auth_timeout`.

mod auth;
mod relay;
mod startup;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::{debug, field, info_span, warn, Instrument, Span};

use crate::backend::{self, BackendConn};
use crate::cancel::{CancelHandle, CancelOutcome};
use crate::config::{Config, UserConfig};
use crate::context::{Context, SessionSlot};
use crate::error::SessionError;
use crate::health;
use crate::metrics as m;
use crate::protocol::message;
use crate::protocol::startup::StartupParams;
use crate::router;
use crate::topology::NodeName;

pub use relay::{RelayEnd, Tracker};
use startup::Opening;

const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves one client connection until it closes. Never panics on client input; every failure
/// ends only this session.
///
/// The session's span (peer, user, node) is entered while the session starts and ends and for
/// its log lines, not around the relay: entering a span on every poll would cost each round
/// trip two registry look-ups.
pub async fn serve(ctx: Arc<Context>, mut client: TcpStream, peer: SocketAddr) {
    let span = info_span!("session", %peer, user = field::Empty, node = field::Empty);
    let result = run(&ctx, &mut client, &span).await;
    let label: &'static str = match &result {
        Ok(label) => label,
        Err(e) => {
            span.in_scope(|| {
                if e.is_routine() {
                    debug!(error = %e, "session ended");
                } else {
                    warn!(error = %e, sqlstate = e.sqlstate().map(|s| s.code()), "session ended");
                }
            });
            let reply = e.fatal_response();
            if !reply.is_empty() {
                if let Some(code) = e.sqlstate() {
                    metrics::counter!(m::CLIENT_ERRORS_TOTAL, "sqlstate" => code.code(), "source" => "graywire")
                        .increment(1);
                }
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), client.write_all(&reply)).await;
            }
            outcome_label(e)
        }
    };
    metrics::counter!(m::CLIENT_CONNECTIONS_TOTAL, "result" => label).increment(1);
    let _ = tokio::time::timeout(Duration::from_secs(1), client.shutdown()).await;
}

fn outcome_label(e: &SessionError) -> &'static str {
    match e {
        SessionError::ClientGone(_) => "closed",
        SessionError::TooManyConnections => "refused_limit",
        SessionError::UnknownUser(_) | SessionError::BadPassword(_) => "auth_failed",
        SessionError::Scram(crate::protocol::scram::ScramError::BadProof) => "auth_failed",
        SessionError::Backend(_)
        | SessionError::NoPrimary(_)
        | SessionError::BackendLost { .. } => "backend_error",
        SessionError::Shutdown => "shutdown",
        _ => "protocol_error",
    }
}

/// Runs the state machine; `Ok` carries the metric label of a normal end.
async fn run(
    ctx: &Arc<Context>,
    client: &mut TcpStream,
    span: &Span,
) -> Result<&'static str, SessionError> {
    let config = ctx.config.load_full();
    let opened = tokio::time::timeout(
        config.listener.auth_timeout,
        open_and_authenticate(ctx, client, &config).instrument(span.clone()),
    )
    .await
    .map_err(|_| SessionError::AuthTimeout)??;
    let Some((params, user, _slot)) = opened else {
        return Ok("cancel");
    };

    let mut backend = connect_backend(ctx, &config, user, &params)
        .instrument(span.clone())
        .await?;
    span.record("node", backend.node.as_str());
    let cancel = ctx.cancels.register();
    cancel.set_target(Some(backend.cancel_target()));
    let _bound = NodeBinding::new(&backend.node);

    let mut greeting = BytesMut::with_capacity(backend.greeting.len() + 64);
    message::authentication_ok(&mut greeting);
    greeting.extend_from_slice(&backend.greeting);
    let key = cancel.key();
    message::backend_key_data(&mut greeting, key.pid, key.secret);
    message::ready_for_query(&mut greeting, backend.status);
    client
        .write_all(&greeting)
        .await
        .map_err(SessionError::ClientGone)?;

    let mut tracker = Tracker::new(
        std::mem::take(&mut backend.parameters),
        backend.status,
        config.listener.max_message_size,
    );
    let end = relay::run(client, &mut backend.stream, &mut tracker, &ctx.shutdown).await;
    tracker.publish_bytes();
    match end {
        Ok(RelayEnd::ClientClosed) | Ok(RelayEnd::ClientTerminated) => {
            close_backend(backend, &tracker, &cancel)
                .instrument(span.clone())
                .await;
            Ok("session")
        }
        Ok(RelayEnd::Shutdown) => {
            close_backend(backend, &tracker, &cancel)
                .instrument(span.clone())
                .await;
            Err(SessionError::Shutdown)
        }
        Ok(RelayEnd::BackendClosed(reason)) => {
            if tracker.node_said_fatal {
                // The node told the client why itself (e.g. pg_terminate_backend).
                return Ok("session");
            }
            Err(SessionError::BackendLost {
                node: backend.node.clone(),
                reason,
            })
        }
        Err(e) => {
            close_backend(backend, &tracker, &cancel)
                .instrument(span.clone())
                .await;
            Err(e)
        }
    }
}

/// Opening and authentication. `None` for a CancelRequest (already handled).
async fn open_and_authenticate<'c>(
    ctx: &Arc<Context>,
    client: &mut TcpStream,
    config: &'c Config,
) -> Result<Option<(StartupParams, &'c UserConfig, SessionSlot)>, SessionError> {
    let params = match startup::read_opening(client).await? {
        Opening::Cancel(key) => {
            let outcome = ctx.cancels.forward(key, CANCEL_TIMEOUT).await;
            let result = match &outcome {
                CancelOutcome::Forwarded => "forwarded",
                CancelOutcome::UnknownKey => "unknown_key",
                CancelOutcome::Idle => "idle",
                CancelOutcome::Failed(reason) => {
                    warn!(%reason, "could not forward a cancel request");
                    "failed"
                }
            };
            metrics::counter!(m::CANCEL_REQUESTS_TOTAL, "result" => result).increment(1);
            return Ok(None);
        }
        Opening::Session(params) => params,
    };
    let user_name = params.get("user").unwrap_or_default().to_owned();
    Span::current().record("user", user_name.as_str());
    let slot = ctx
        .try_open_session()
        .ok_or(SessionError::TooManyConnections)?;
    let user = config
        .user(&user_name)
        .ok_or_else(|| SessionError::UnknownUser(user_name.clone()))?;
    auth::authenticate(client, user).await?;
    Ok(Some((params, user, slot)))
}

/// Holds until a primary is known, then opens the backend connection; a node that cannot be
/// reached counts as a failed health check.
async fn connect_backend(
    ctx: &Arc<Context>,
    config: &Config,
    user: &UserConfig,
    params: &StartupParams,
) -> Result<BackendConn, SessionError> {
    let node = router::wait_for_primary(&ctx.topology, config.hold_timeout).await?;
    let creds = config.backend_credentials(user);
    let timeout = config.backend_connect_timeout;
    match backend::connect(&node, creds, &params.params, timeout, &ctx.scram_keys).await {
        Ok(b) => Ok(b),
        Err(e) => {
            if e.is_node_failure() {
                health::passive_failure(ctx, &node.name, &e.to_string());
            }
            Err(e.into())
        }
    }
}

/// Ends a backend connection so that nothing of the session survives on the node: a query
/// still running is cancelled; closing the connection rolls back an open transaction.
async fn close_backend(backend: BackendConn, tracker: &Tracker, cancel: &CancelHandle) {
    if tracker.unanswered > 0 {
        if let Some(target) = cancel.target() {
            if let Err(e) = crate::cancel::send_cancel(&target, CANCEL_TIMEOUT).await {
                warn!(error = %e, "could not cancel the query of a closed session");
            }
        }
    }
    cancel.set_target(None);
    backend::terminate(backend.stream).await;
}

/// Counts a session and its backend connection against a node while it lives.
struct NodeBinding {
    node: NodeName,
}

impl NodeBinding {
    fn new(node: &NodeName) -> Self {
        metrics::gauge!(m::NODE_SESSIONS, "node" => node.to_string()).increment(1.0);
        metrics::gauge!(m::BACKEND_CONNECTIONS, "node" => node.to_string()).increment(1.0);
        NodeBinding { node: node.clone() }
    }
}

impl Drop for NodeBinding {
    fn drop(&mut self) {
        metrics::gauge!(m::NODE_SESSIONS, "node" => self.node.to_string()).decrement(1.0);
        metrics::gauge!(m::BACKEND_CONNECTIONS, "node" => self.node.to_string()).decrement(1.0);
    }
}
