//! The session state machine: one client connection, from its first byte to its close. A
//! session outlives its backend connections: it moves between them at transaction boundaries.
//!
//! ```text
//!   Opening ──SSLRequest/GSSENCRequest──▶ answer 'N' ──▶ Opening            (startup.rs)
//!      │ CancelRequest ──▶ forward to the session's backend, close
//!      ▼ StartupMessage
//!   Authenticating ──bad password or unknown user 28P01──▶ Closing            (auth.rs)
//!      ▼ ok
//!   Connecting: hold until a node fits (FATAL 57P03 after hold_timeout), lease a backend
//!      connection (new, or pooled in transaction mode)                        (attach.rs)
//!      ▼ AuthenticationOk, the node's ParameterStatus, graywire's BackendKeyData, ReadyForQuery
//!   ┌▶ State::Attached: relay; the status comes from each ReadyForQuery        (relay.rs)
//!   │    │ at a boundary (I, nothing in flight) with something to decide:      (boundary.rs)
//!   │    │   node still fits ─────────────────────────────▶ Attached
//!   │    │   node drained/down/demoted, or pool mode ──capture──▶ pinned? ─yes─▶ Attached
//!   │    │                                                       └─no─▶ Detached
//!   │    │ backend dies (EOF, or the node's FATAL 57P0x, withheld):             (failover.rs)
//!   │    │   requests in flight get 40001 (in a transaction) / 40003 (COMMIT, autocommit)
//!   │    ▼                                                   ──▶ Detached or Aborted
//!   │  State::Detached: wait for the client's next request; hold it until a node fits (ERROR
//!   └─── 57P03 after hold_timeout); lease a connection, replay settings and statements
//!      State::Aborted (the transaction died with its backend): answer locally (local.rs),
//!      25P02 until ROLLBACK, then Detached
//!      ▼ Terminate or EOF │ shutdown at a boundary (57P01) │ bad message (08P01)
//!   Closing: cancel a query still running, Terminate the backend, FATAL to the client if owed
//! ```
//!
//! Opening and Authenticating together are bounded by `listener.auth_timeout`. In code, what
//! the session is bound to is [`State`]; how it ends is [`SessionEnd`] (or a [`SessionError`]).

mod attach;
mod auth;
mod boundary;
mod failover;
mod local;
mod migrate;
mod relay;
mod signals;
mod startup;
mod tap;
mod tracker;

use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::{debug, info_span, warn, Span};

use crate::cancel::CancelHandle;
use crate::config::{Config, PoolMode, Target, UserConfig};
use crate::context::Context;
use crate::error::{RequestError, SessionError};
use crate::metrics as m;
use crate::pool::Pool;
use crate::protocol::message::TxStatus;
use crate::protocol::startup::{StartupParams, MAX_STARTUP_PACKET};
use crate::router;
use crate::topology::NodeName;

use attach::Attached;
use failover::During;
use local::Answer;
use relay::{Pipes, RelayEnd};
use signals::BoundaryWatch;
use tracker::Tracker;

const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves one client connection until it closes. Never panics on client input; every failure
/// ends only this session.
///
/// Log lines of the session carry its span (peer, user, node), made only when a line is
/// logged: making one per session, or entering it on every poll, would cost each short
/// session (connection churn) several registry look-ups and formatted fields.
pub(crate) async fn serve(ctx: Arc<Context>, mut client: TcpStream, peer: SocketAddr) {
    let mut who = SessionLabel {
        peer,
        user: None,
        node: None,
    };
    let result = run(&ctx, &mut client, &mut who).await;
    let label: &'static str = match &result {
        Ok(end) => end.label(),
        Err(e) => {
            who.span().in_scope(|| {
                if e.is_routine() {
                    debug!(error = %e, "session ended");
                } else {
                    let side = e.side().as_str();
                    warn!(error = %e, side, sqlstate = e.sqlstate().map(|s| s.label()), "session ended");
                }
            });
            let reply = e.fatal_response();
            if !reply.is_empty() {
                if let Some(code) = e.sqlstate() {
                    metrics::counter!(m::CLIENT_ERRORS_TOTAL, "sqlstate" => code.label(), "source" => "graywire")
                        .increment(1);
                }
                let _ =
                    crate::timer::timeout(Duration::from_secs(1), client.write_all(&reply)).await;
            }
            outcome_label(e)
        }
    };
    ctx.session_metrics().connection_ended(label);
    let _ = crate::timer::timeout(Duration::from_secs(1), client.shutdown()).await;
}

/// How a session ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SessionEnd {
    /// The client sent Terminate or closed its connection.
    ClientLeft,
    /// The connection carried a CancelRequest, now handled.
    Cancel,
}

impl SessionEnd {
    /// The `result` label of `graywire_client_connections_total`.
    fn label(self) -> &'static str {
        match self {
            SessionEnd::ClientLeft => "session",
            SessionEnd::Cancel => "cancel",
        }
    }
}

/// What a step of the session's loop tells the loop: go on, or the session is over.
type Step = ControlFlow<SessionEnd>;

fn outcome_label(e: &SessionError) -> &'static str {
    match e {
        SessionError::ClientGone(_) => "closed",
        SessionError::TooManyConnections => "refused_limit",
        SessionError::BadPassword(_) => "auth_failed",
        SessionError::Scram(crate::protocol::scram::ScramError::BadProof) => "auth_failed",
        SessionError::Backend(_)
        | SessionError::NoPrimary(_)
        | SessionError::BackendLost { .. }
        | SessionError::StateUnreadable { .. } => "backend_error",
        SessionError::Shutdown => "shutdown",
        _ => "protocol_error",
    }
}

/// Who a session is, for its log lines.
struct SessionLabel {
    peer: SocketAddr,
    user: Option<String>,
    node: Option<NodeName>,
}

impl SessionLabel {
    /// The span to log a line of this session under (made on the spot: lines are rare).
    fn span(&self) -> Span {
        info_span!(
            "session",
            peer = %self.peer,
            user = ?self.user.as_deref().unwrap_or(""),
            node = self.node.as_ref().map(NodeName::as_str).unwrap_or(""),
        )
    }
}

/// Runs the state machine.
async fn run(
    ctx: &Arc<Context>,
    client: &mut TcpStream,
    who: &mut SessionLabel,
) -> Result<SessionEnd, SessionError> {
    let config = ctx.config.load_full();
    let opened = crate::timer::timeout(
        config.listener.auth_timeout,
        startup::open_and_authenticate(ctx, client, &config, who),
    )
    .await
    .map_err(|_| SessionError::AuthTimeout)??;
    let Some((params, user, _slot)) = opened else {
        return Ok(SessionEnd::Cancel);
    };
    let target = router::session_target(&config.routing, user, &params);
    let mut changes = ctx.topology.subscribe();
    changes.mark_unchanged();
    let creds = config.backend_credentials(user);
    let backend_params = crate::backend::startup_key(&params.params, creds);
    let size = crate::backend::startup_packet_len(&backend_params);
    if size > MAX_STARTUP_PACKET {
        // Refused here, before any node sees a packet it would close the connection on.
        return Err(SessionError::StartupTooLarge {
            size,
            limit: MAX_STARTUP_PACKET,
        });
    }
    let mode = config.pool_mode_of(user);
    let mut session = Session {
        ctx,
        config: config.clone(),
        client,
        who,
        user: user.clone(),
        params,
        backend_params,
        target,
        mode,
        id: ctx.new_session_id(),
        cancel: ctx.cancels.register(),
        tracker: Tracker::new(
            Default::default(),
            TxStatus::Idle,
            config.listener.max_message_size,
            // Only a session whose connection goes back to a pool between transactions needs
            // the hint that it may have bound state to it.
            mode == PoolMode::Transaction,
            ctx.session_metrics(),
        ),
        pipes: Pipes::default(),
        state: State::Detached,
        pools: Vec::new(),
        settings: Vec::new(),
        changes,
    };
    session.start().await?;
    let result = session.serve().await;
    session.tracker.publish();
    result
}

/// What a session is bound to between two steps of its loop.
// One per session, held in place for its life: boxing `Attached` would cost an allocation
// per attach (every transaction in transaction mode) to save bytes nobody copies.
#[allow(clippy::large_enum_variant)]
enum State {
    /// Relaying on a backend connection.
    Attached(Attached),
    /// No backend connection, no transaction: the client's next request attaches.
    Detached,
    /// The transaction died with its backend connection: graywire answers every request
    /// itself (25P02, or the rollback's own error first) until the client ends it.
    Aborted {
        /// The backend died while the session sat idle inside the transaction: its next
        /// request learns it (40001) rather than getting 25P02.
        unreported: Option<RequestError>,
    },
}

/// One authenticated session: the client connection and, while it has one, its backend
/// connection. Everything here outlives a backend connection.
struct Session<'a> {
    ctx: &'a Arc<Context>,
    config: Arc<Config>,
    client: &'a mut TcpStream,
    who: &'a mut SessionLabel,
    user: Arc<UserConfig>,
    params: StartupParams,
    /// The startup parameters as sent to nodes (pools are keyed by them).
    backend_params: Arc<[u8]>,
    target: Target,
    mode: PoolMode,
    /// This session's number (a pooled connection remembers the last session that used it).
    id: u64,
    cancel: CancelHandle,
    tracker: Tracker,
    pipes: Pipes,
    state: State,
    /// Transaction mode: the pool of each node this session has used.
    pools: Vec<Arc<Pool>>,
    /// Session settings captured from the last backend connection, replayed on the next.
    settings: Vec<(String, String)>,
    changes: watch::Receiver<u64>,
}

impl Session<'_> {
    /// The backend connection the session runs on, if attached.
    fn attached(&self) -> Option<&Attached> {
        match &self.state {
            State::Attached(a) => Some(a),
            _ => None,
        }
    }

    fn attached_mut(&mut self) -> Option<&mut Attached> {
        match &mut self.state {
            State::Attached(a) => Some(a),
            _ => None,
        }
    }

    /// Takes the backend connection away from the session, which is then detached.
    fn detach(&mut self) -> Option<Attached> {
        match std::mem::replace(&mut self.state, State::Detached) {
            State::Attached(a) => Some(a),
            other => {
                self.state = other;
                None
            }
        }
    }

    /// The loop of the state machine: relay while attached, decide at boundaries, answer
    /// locally or attach when detached.
    async fn serve(&mut self) -> Result<SessionEnd, SessionError> {
        loop {
            let step = match &mut self.state {
                State::Attached(_) => self.relay().await?,
                State::Aborted { unreported } => {
                    let notice = unreported.take();
                    self.answer_aborted(notice).await?
                }
                State::Detached => self.serve_detached().await?,
            };
            if let ControlFlow::Break(end) = step {
                return Ok(end);
            }
        }
    }

    /// Aborted: the client's next request is answered locally; its ROLLBACK ends the state.
    async fn answer_aborted(&mut self, notice: Option<RequestError>) -> Result<Step, SessionError> {
        if self.pipes.up.buf.is_empty() && !self.wait_for_client().await? {
            return Ok(ControlFlow::Break(SessionEnd::ClientLeft));
        }
        let step = self.answer_locally(Answer::Aborted(notice)).await?;
        if self.tracker.status == TxStatus::Idle {
            self.state = State::Detached;
        }
        Ok(step)
    }

    /// Detached: wait for the client's next request and attach for it.
    async fn serve_detached(&mut self) -> Result<Step, SessionError> {
        if self.pipes.up.buf.is_empty() && !self.wait_for_client().await? {
            return Ok(ControlFlow::Break(SessionEnd::ClientLeft));
        }
        if self.pipes.up.buf[0] == b'X' {
            return Ok(ControlFlow::Break(SessionEnd::ClientLeft));
        }
        let cancel = self.cancel.hold_signal();
        let attached = cancel.cancellable(self.attach_for_request()).await;
        let refused = match attached {
            Some(Ok(())) => return Ok(ControlFlow::Continue(())),
            Some(Err(RequestError::Shutdown)) => return Err(SessionError::Shutdown),
            Some(Err(e)) => e,
            None => RequestError::Cancelled,
        };
        self.answer_locally(Answer::Refuse(refused)).await
    }

    /// Relays until something needs deciding, then decides it.
    async fn relay(&mut self) -> Result<Step, SessionError> {
        let paused = self.ctx.topology.load().paused;
        let mode = self.mode;
        let State::Attached(a) = &mut self.state else {
            return Ok(ControlFlow::Continue(()));
        };
        let pool = match &a.slot {
            Some(slot) if mode == PoolMode::Transaction && !a.binding.is_pinned() => {
                Some(slot.pool().as_ref())
            }
            _ => None,
        };
        let end = relay::run(
            self.client,
            &mut a.conn.stream,
            &mut self.tracker,
            &mut self.pipes,
            &self.ctx.shutdown,
            BoundaryWatch {
                changes: &mut self.changes,
                hold_requests: paused,
                recheck_at: a.recheck_at,
                pool,
                evictions: &mut a.binding.evictions,
            },
        )
        .await;
        let proceed = Ok(ControlFlow::Continue(()));
        match end {
            Ok(RelayEnd::ClientClosed) | Ok(RelayEnd::ClientTerminated) => {
                if let Some(code) = self.tracker.node_fatal {
                    // The client left on the node's FATAL before the node's close reached us.
                    let cause = failover::termination_cause(code);
                    metrics::counter!(m::BACKEND_TERMINATIONS_TOTAL, "cause" => cause).increment(1);
                }
                // A pooled connection left clean at a boundary goes back; otherwise it closes.
                let pooled = self.attached().is_some_and(|a| a.slot.is_some());
                if pooled && self.tracker.at_boundary() && self.tracker.node_fatal.is_none() {
                    self.release(true).await;
                } else {
                    self.close_backend().await;
                }
                Ok(ControlFlow::Break(SessionEnd::ClientLeft))
            }
            Ok(RelayEnd::Shutdown) => {
                self.close_backend().await;
                Err(SessionError::Shutdown)
            }
            Ok(RelayEnd::BackendClosed(reason)) => self.backend_lost(reason, During::Relay).await,
            Ok(RelayEnd::Boundary) => self.at_boundary().await,
            Ok(RelayEnd::Evicted) => self.evicted().await.and(proceed),
            Err(e) => {
                self.close_backend().await;
                Err(e)
            }
        }
    }

    /// Answers the client's next request without a backend.
    async fn answer_locally(&mut self, answer: Answer) -> Result<Step, SessionError> {
        let outcome = local::answer_request(
            self.client,
            &mut self.pipes.up,
            &mut self.tracker,
            self.config.listener.max_message_size,
            answer,
        )
        .await?;
        Ok(match outcome {
            local::Outcome::Answered => ControlFlow::Continue(()),
            local::Outcome::ClientClosed | local::Outcome::ClientTerminated => {
                ControlFlow::Break(SessionEnd::ClientLeft)
            }
        })
    }

    /// Waits for client bytes while detached. False when the client closed.
    async fn wait_for_client(&mut self) -> Result<bool, SessionError> {
        let up = &mut self.pipes.up;
        up.make_room();
        let soft = self.ctx.shutdown.soft.clone();
        tokio::select! {
            r = self.client.read_buf(&mut up.buf) => {
                Ok(r.map_err(SessionError::ClientGone)? > 0)
            }
            _ = soft.cancelled() => Err(SessionError::Shutdown),
        }
    }
}

/// Appends a simple Query message for `sql`, one of graywire's own constant statements.
fn message_query(out: &mut BytesMut, sql: &str) {
    // graywire's statements are constants without NUL bytes, so this cannot fail.
    let _ = postgres_protocol::message::frontend::query(sql, out);
}
