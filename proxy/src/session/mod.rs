//! The session state machine: one client connection, from its first byte to its close. A
//! session outlives its backend connections: it moves between them at transaction boundaries.
//!
//! ```text
//!   Opening ──SSLRequest/GSSENCRequest──▶ answer 'N' ──▶ Opening
//!      │ CancelRequest ──▶ forward to the session's backend, close
//!      ▼ StartupMessage
//!   Authenticating ──unknown user 28000 / bad password 28P01──▶ Closing
//!      ▼ ok
//!   Connecting: hold until a node fits (FATAL 57P03 after hold_timeout), lease a backend
//!      connection (new, or pooled in transaction mode)
//!      ▼ AuthenticationOk, the node's ParameterStatus, graywire's BackendKeyData, ReadyForQuery
//!   ┌▶ Attached: relay; the status comes from each ReadyForQuery
//!   │    │ at a boundary (I, nothing in flight) with something to decide:
//!   │    │   node still fits ─────────────────────────────▶ Attached
//!   │    │   node drained/down/demoted, or pool mode ──capture──▶ pinned? ─yes─▶ Attached
//!   │    │                                                       └─no─▶ Detached
//!   │    │ backend dies (EOF, or the node's FATAL 57P0x, withheld):
//!   │    │   requests in flight get 40001 (in a transaction) / 40003 (COMMIT, autocommit)
//!   │    ▼                                                   ──▶ Detached or Aborted
//!   │  Detached: wait for the client's next request; hold it until a node fits (ERROR 57P03
//!   └─── after hold_timeout); lease a connection, replay settings and statements
//!      Aborted (the transaction died with its backend): answer locally, 25P02 until ROLLBACK
//!      ▼ Terminate or EOF │ shutdown at a boundary (57P01) │ bad message (08P01)
//!   Closing: cancel a query still running, Terminate the backend, FATAL to the client if owed
//! ```
//!
//! Opening and Authenticating together are bounded by `listener.auth_timeout`.

mod auth;
mod failover;
mod local;
mod migrate;
mod relay;
mod signals;
mod startup;
mod tap;
mod tracker;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::{debug, info, info_span, warn, Span};

use crate::backend::{self, BackendConn};
use crate::cancel::{CancelHandle, CancelOutcome};
use crate::config::{Config, NodeConfig, PoolMode, Target, UserConfig};
use crate::context::{Context, SessionSlot};
use crate::error::{BackendError, RequestError, SessionError};
use crate::health;
use crate::load::{Binding, ConnectionGuard};
use crate::metrics as m;
use crate::pool::{Checkout, Pool, PoolKey, PoolSlot};
use crate::protocol::message::{self, TxStatus};
use crate::protocol::startup::StartupParams;
use crate::router;
use crate::topology::{AdminState, Health, NodeName, Snapshot};

use local::Answer;
use migrate::Captured;
pub use relay::{Pipes, RelayEnd};
pub use signals::BoundaryWatch;
use startup::Opening;
pub use tracker::Tracker;

const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a pinned session on a node it should leave looks whether it may move now.
const PINNED_RECHECK: Duration = Duration::from_secs(1);
/// Pause between attempts to attach to a node that could not take the session.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Serves one client connection until it closes. Never panics on client input; every failure
/// ends only this session.
///
/// Log lines of the session carry its span (peer, user, node), made only when a line is
/// logged: making one per session, or entering it on every poll, would cost each short
/// session (connection churn) several registry look-ups and formatted fields.
pub async fn serve(ctx: Arc<Context>, mut client: TcpStream, peer: SocketAddr) {
    let mut who = SessionLabel {
        peer,
        user: None,
        node: None,
    };
    let result = run(&ctx, &mut client, &mut who).await;
    let label: &'static str = match &result {
        Ok(label) => label,
        Err(e) => {
            who.span().in_scope(|| {
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
                    crate::timer::timeout(Duration::from_secs(1), client.write_all(&reply)).await;
            }
            outcome_label(e)
        }
    };
    ctx.session_metrics().connection_ended(label);
    let _ = crate::timer::timeout(Duration::from_secs(1), client.shutdown()).await;
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
            user = self.user.as_deref().unwrap_or(""),
            node = self.node.as_ref().map(NodeName::as_str).unwrap_or(""),
        )
    }
}

/// Runs the state machine; `Ok` carries the metric label of a normal end.
async fn run(
    ctx: &Arc<Context>,
    client: &mut TcpStream,
    who: &mut SessionLabel,
) -> Result<&'static str, SessionError> {
    let config = ctx.config.load_full();
    let opened = crate::timer::timeout(
        config.listener.auth_timeout,
        open_and_authenticate(ctx, client, &config, who),
    )
    .await
    .map_err(|_| SessionError::AuthTimeout)??;
    let Some((params, user, _slot)) = opened else {
        return Ok("cancel");
    };
    let target = router::session_target(&config.routing, user, &params);
    let mut changes = ctx.topology.subscribe();
    changes.mark_unchanged();
    let creds = config.backend_credentials(user);
    let backend_params = backend::startup_key(&params.params, creds);
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
        attached: None,
        pools: Vec::new(),
        settings: Vec::new(),
        changes,
        recheck_at: None,
        unreported_rollback: None,
    };
    session.start().await?;
    let result = session.serve().await;
    session.tracker.publish();
    result
}

/// A backend connection the session runs on, counted against its node.
struct Attached {
    conn: BackendConn,
    guard: ConnectionGuard,
    binding: Binding,
    /// In transaction mode: the pool the connection goes back to.
    slot: Option<PoolSlot>,
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
    attached: Option<Attached>,
    /// Transaction mode: the pool of each node this session has used.
    pools: Vec<Arc<Pool>>,
    /// Session settings captured from the last backend connection, replayed on the next.
    settings: Vec<(String, String)>,
    changes: watch::Receiver<u64>,
    /// A pinned session on a node it should leave looks again at its first boundary after this.
    recheck_at: Option<std::time::Instant>,
    /// The backend died while the session sat inside a transaction: the client learns it
    /// (40001) at its next request.
    unreported_rollback: Option<RequestError>,
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
    /// The loop of the state machine: relay while attached, decide at boundaries, answer
    /// locally or attach when detached.
    async fn serve(&mut self) -> Result<&'static str, SessionError> {
        loop {
            if self.attached.is_some() {
                if let Some(label) = self.relay().await? {
                    return Ok(label);
                }
                continue;
            }
            // Detached: wait for the client's next request.
            if self.pipes.up.buf.is_empty() && !self.wait_for_client().await? {
                return Ok("session");
            }
            if self.tracker.status != TxStatus::Idle {
                // The transaction died with its backend: answer until the client ends it.
                let notice = self.unreported_rollback.take();
                if self.answer_locally(Answer::Aborted(notice)).await? {
                    return Ok("session");
                }
                continue;
            }
            if self.pipes.up.buf[0] == b'X' {
                return Ok("session");
            }
            let cancel = self.cancel.hold_signal();
            let attached = cancel.cancellable(self.attach_for_request()).await;
            let refused = match attached {
                Some(Ok(())) => None,
                Some(Err(RequestError::Shutdown)) => return Err(SessionError::Shutdown),
                Some(Err(e)) => Some(e),
                None => Some(RequestError::Cancelled),
            };
            if let Some(e) = refused {
                if self.answer_locally(Answer::Refuse(e)).await? {
                    return Ok("session");
                }
            }
        }
    }

    /// Relays until something needs deciding. `Some(label)` when the session ends normally.
    async fn relay(&mut self) -> Result<Option<&'static str>, SessionError> {
        let Some(a) = self.attached.as_mut() else {
            return Ok(None);
        };
        let paused = self.ctx.topology.load().paused;
        let pool = match &a.slot {
            Some(slot) if self.mode == PoolMode::Transaction && !a.binding.is_pinned() => {
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
                recheck_at: self.recheck_at,
                pool,
                evictions: &mut a.binding.evictions,
            },
        )
        .await;
        match end {
            Ok(RelayEnd::ClientClosed) | Ok(RelayEnd::ClientTerminated) => {
                // A pooled connection left clean at a boundary goes back; otherwise it closes.
                let pooled = self.attached.as_ref().is_some_and(|a| a.slot.is_some());
                if pooled && self.tracker.at_boundary() {
                    self.release(true).await;
                } else {
                    self.close_backend().await;
                }
                Ok(Some("session"))
            }
            Ok(RelayEnd::Shutdown) => {
                self.close_backend().await;
                Err(SessionError::Shutdown)
            }
            Ok(RelayEnd::BackendClosed(reason)) => self.backend_lost(reason).await.map(|()| None),
            Ok(RelayEnd::Boundary) => self.at_boundary().await.map(|()| None),
            Ok(RelayEnd::Evicted) => self.evicted().await.map(|()| None),
            Err(e) => {
                self.close_backend().await;
                Err(e)
            }
        }
    }

    /// At a transaction boundary with a backend: capture changed settings, leave a node that
    /// no longer fits, hold a request while paused.
    async fn at_boundary(&mut self) -> Result<(), SessionError> {
        let snapshot = self.ctx.topology.load();
        self.changes.mark_unchanged();
        let Some(node) = self.attached.as_ref().map(|a| a.conn.node.clone()) else {
            return Ok(());
        };
        let routing = &self.config.routing;
        let fits = router::fits(&snapshot, &node, self.target, routing);
        let recheck_due = self
            .recheck_at
            .is_some_and(|t| t <= std::time::Instant::now());
        let pooled = self.mode == PoolMode::Transaction
            && self.attached.as_ref().is_some_and(|a| a.slot.is_some());
        // In transaction mode the connection goes back at this boundary unless the session
        // may hold state that cannot move: then look first.
        let look = self.tracker.maybe_pinned && pooled;
        if self.tracker.settings_dirty || !fits || recheck_due || look {
            self.tracker.settings_dirty = false;
            self.tracker.maybe_pinned = false;
            let Some(captured) = self.capture().await? else {
                return Ok(());
            };
            self.settings = captured.settings;
            if !fits || pooled {
                self.leave(&snapshot, &node, captured.pins, !fits).await;
            } else if let Some(a) = self.attached.as_mut() {
                a.binding.set_pinned(false);
                self.recheck_at = None;
            }
        } else if pooled {
            self.release(false).await;
        }
        if snapshot.paused && !self.pipes.up.buf.is_empty() {
            // Paused: the client's next transaction waits here, its connection untouched.
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
                Some(Ok(())) => None,
                Some(Err(SessionError::Shutdown)) => {
                    // As at any boundary during shutdown: the connection is idle, end it.
                    self.close_backend().await;
                    return Err(SessionError::Shutdown);
                }
                Some(Err(_)) => Some(RequestError::NoNode(started.elapsed())),
                None => Some(RequestError::Cancelled),
            };
            if let Some(e) = refused {
                if self.answer_locally(Answer::Refuse(e)).await? {
                    return Err(SessionError::ClientGone(
                        std::io::ErrorKind::UnexpectedEof.into(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Asks the current backend for the session's state. `None` if it died meanwhile (already
    /// handled as a lost backend).
    async fn capture(&mut self) -> Result<Option<Captured>, SessionError> {
        let Some(a) = self.attached.as_mut() else {
            return Ok(None);
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
            Ok(x) => {
                if !x.notifications.is_empty() {
                    self.client
                        .write_all(&x.notifications)
                        .await
                        .map_err(SessionError::ClientGone)?;
                }
                if let Some((code, msg)) = x.errors.first() {
                    warn!(parent: &self.who.span(), sqlstate = %code, error = %msg, "could not read the session's state; it stays where it is");
                    return Ok(None);
                }
                let mut captured = Captured::from_rows(&x.rows);
                // Statements the client defined that exist on the backend right now.
                self.tracker
                    .statements
                    .retain(|name, _| captured.statements.contains(name));
                captured.statements.clear();
                Ok(Some(captured))
            }
            Err(e) => {
                self.backend_lost(e.to_string()).await?;
                Ok(None)
            }
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
            let Some(a) = self.attached.as_mut() else {
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
            self.recheck_at = Some(std::time::Instant::now() + PINNED_RECHECK);
            return;
        }
        self.recheck_at = None;
        if let Some(a) = self.attached.as_mut() {
            a.binding.set_pinned(false);
        }
        if !migrating {
            self.release(false).await;
            return;
        }
        metrics::counter!(m::MIGRATIONS_TOTAL, "reason" => reason).increment(1);
        debug!(parent: &self.who.span(), %node, reason, "leaving the node at a transaction boundary");
        if self.attached.as_ref().is_some_and(|a| a.slot.is_some()) {
            self.release(false).await;
        } else {
            self.close_backend().await;
        }
    }

    /// Gives the connection back to its pool at a boundary (closes it if its node is out of
    /// rotation). When the session is `ending`, the next session on the connection is another
    /// one: `DISCARD ALL` goes out now, and that session's set-up reads the reply, so neither
    /// the ending client nor the next one waits for the reset.
    async fn release(&mut self, ending: bool) {
        let Some(a) = self.attached.take() else {
            return;
        };
        self.cancel.set_target(None);
        let Attached {
            mut conn,
            guard,
            binding,
            slot,
        } = a;
        drop(binding);
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
    async fn evicted(&mut self) -> Result<(), SessionError> {
        let Some(a) = self.attached.as_ref() else {
            return Ok(());
        };
        let node = a.conn.node.clone();
        if a.binding.is_pinned() {
            self.close_backend().await;
            return Err(SessionError::PinnedNodeDrained(node));
        }
        if self.tracker.at_boundary() {
            if let Some(captured) = self.capture().await? {
                self.settings = captured.settings;
            }
            metrics::counter!(m::MIGRATIONS_TOTAL, "reason" => "drain").increment(1);
            self.close_backend().await;
            return Ok(());
        }
        if self.tracker.unanswered > 0 {
            if let Some(target) = self.cancel.target() {
                if let Err(e) = crate::cancel::send_cancel(&target, CANCEL_TIMEOUT).await {
                    warn!(parent: &self.who.span(), error = %e, "could not cancel the query of an evicted session");
                }
            }
        }
        self.backend_gone("the node's drain timed out".into(), false)
            .await
    }

    /// The backend connection died or the node is going away.
    async fn backend_lost(&mut self, reason: String) -> Result<(), SessionError> {
        self.backend_gone(reason, true).await
    }

    /// The backend connection is gone (or given up): answer what was in flight. With
    /// `node_failed`, it counts as a failed health check of the node.
    async fn backend_gone(
        &mut self,
        reason: String,
        node_failed: bool,
    ) -> Result<(), SessionError> {
        let Some(a) = self.attached.take() else {
            return Ok(());
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

        let answer = failover::answer_in_flight(t, &node, &reason);
        let mut out = answer.bytes;
        if answer.requests > 0 {
            warn!(parent: &who.span(), %node, %reason, requests = answer.requests, sqlstate = answer.sqlstate, "backend connection lost under a request; answered it and kept the session");
            metrics::counter!(m::FAILOVERS_TOTAL, "sqlstate" => answer.sqlstate)
                .increment(answer.requests as u64);
        } else if t.status == TxStatus::InTransaction {
            debug!(parent: &who.span(), %node, %reason, "backend connection lost inside an idle transaction");
            metrics::counter!(m::FAILOVERS_TOTAL, "sqlstate" => "40001").increment(1);
            self.unreported_rollback = Some(RequestError::RolledBack {
                node: node.clone(),
                reason: reason.clone(),
            });
        } else {
            debug!(parent: &who.span(), %node, %reason, "backend connection lost between transactions");
        }
        let skip = t.open_extended;
        t.reset_backend_side();
        t.status = answer.status;
        self.client
            .write_all(&out)
            .await
            .map_err(SessionError::ClientGone)?;
        out.clear();
        if skip && self.answer_locally(Answer::SkipToSync).await? {
            return Err(SessionError::ClientGone(
                std::io::ErrorKind::UnexpectedEof.into(),
            ));
        }
        Ok(())
    }

    /// Answers the client's next request without a backend. True when the client left.
    async fn answer_locally(&mut self, answer: Answer) -> Result<bool, SessionError> {
        let outcome = local::answer_request(
            self.client,
            &mut self.pipes.up,
            &mut self.tracker,
            self.config.listener.max_message_size,
            answer,
        )
        .await?;
        Ok(outcome != local::Outcome::Answered)
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

    /// Holds the client's request until a node fits, then attaches to it and replays the
    /// session's state there.
    async fn attach_for_request(&mut self) -> Result<(), RequestError> {
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

    /// The first backend connection: holds until a node fits, then greets the client with the
    /// node's parameters, graywire's BackendKeyData and ReadyForQuery.
    async fn start(&mut self) -> Result<(), SessionError> {
        let node = router::wait_for_node(
            &self.ctx.topology,
            self.target,
            &self.config.routing,
            &self.ctx.loads,
            self.config.hold_timeout,
            &self.ctx.shutdown.soft,
        )
        .await?;
        let leased = match self.lease(&node).await {
            Ok(l) => l,
            Err(e) => {
                if e.is_node_failure() {
                    health::passive_failure(self.ctx, &node.name, &e.to_string());
                }
                return Err(e.into());
            }
        };
        let mut greeting = BytesMut::with_capacity(1024);
        message::authentication_ok(&mut greeting);
        if leased.reused {
            // A pooled connection: its parameters, as of now (after a reset if needed).
            let conn = self.set_up(leased, false).await?;
            let mut conn = conn;
            conn.conn.parameter_messages(&mut greeting);
            // The session's copy is the live one from now on; `release` hands it back.
            self.tracker.parameters = std::mem::take(&mut conn.conn.parameters);
            self.attached = Some(conn);
        } else {
            let mut conn = self.set_up(leased, false).await?;
            greeting.extend_from_slice(&conn.conn.greeting);
            conn.conn.greeting = bytes::Bytes::new();
            self.tracker.parameters = std::mem::take(&mut conn.conn.parameters);
            self.attached = Some(conn);
        }
        let key = self.cancel.key();
        message::backend_key_data(&mut greeting, key.pid, key.secret);
        message::ready_for_query(&mut greeting, TxStatus::Idle);
        self.client
            .write_all(&greeting)
            .await
            .map_err(SessionError::ClientGone)?;
        Ok(())
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
                slot,
            } => {
                return Ok(Leased {
                    conn: *conn,
                    guard,
                    slot: Some(slot),
                    reset,
                    reused: true,
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
        } = leased;
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
        self.pipes.down.buf = std::mem::take(&mut conn.leftover);
        self.pipes.down.ready = 0;
        let binding = self.ctx.loads.bind(&conn.node);
        Ok(Attached {
            conn,
            guard,
            binding,
            slot,
        })
    }

    /// Opens (or takes from the pool) a backend connection to `node` and rebuilds the
    /// session there.
    async fn attach(&mut self, node: &NodeConfig) -> Result<(), BackendError> {
        let leased = self.lease(node).await?;
        let attached = self.set_up(leased, true).await?;
        // Tell the client what differs on this connection (server_version after an upgrade,
        // in_hot_standby, …), as a node reports a changed parameter.
        let mut out = BytesMut::new();
        for (k, v) in attached.conn.parameters.iter() {
            if self.tracker.parameters.get(k) != Some(v) {
                message::parameter_status(&mut out, k, v);
                self.tracker.parameters.set(k, v);
            }
        }
        self.attached = Some(attached);
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
    async fn close_backend(&mut self) {
        let Some(a) = self.attached.take() else {
            return;
        };
        if self.tracker.unanswered > 0 {
            if let Some(target) = self.cancel.target() {
                if let Err(e) = crate::cancel::send_cancel(&target, CANCEL_TIMEOUT).await {
                    warn!(parent: &self.who.span(), error = %e, "could not cancel the query of a closed session");
                }
            }
        }
        self.cancel.set_target(None);
        let Attached {
            conn,
            guard,
            binding,
            slot,
        } = a;
        drop(binding);
        backend::terminate(conn.stream).await;
        drop(guard);
        // A connection ended this way is never pooled again.
        drop(slot);
    }
}

/// A node that is starting up, shutting down or in recovery refuses with class 57; the session
/// waits for it (or another) rather than failing.
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

fn is_transient_refusal(e: &BackendError) -> bool {
    matches!(e, BackendError::Refused { sqlstate, .. } if sqlstate.starts_with("57"))
}

fn message_query(out: &mut BytesMut, sql: &str) {
    // The capture query is a constant without NUL bytes.
    let _ = postgres_protocol::message::frontend::query(sql, out);
}

/// Opening and authentication. `None` for a CancelRequest (already handled).
async fn open_and_authenticate<'c>(
    ctx: &Arc<Context>,
    client: &mut TcpStream,
    config: &'c Config,
    who: &mut SessionLabel,
) -> Result<Option<(StartupParams, &'c Arc<UserConfig>, SessionSlot)>, SessionError> {
    let params = match startup::read_opening(client).await? {
        Opening::Cancel(key) => {
            let outcome = ctx.cancels.forward(key, CANCEL_TIMEOUT).await;
            let result = match &outcome {
                CancelOutcome::Forwarded => "forwarded",
                CancelOutcome::UnknownKey => "unknown_key",
                CancelOutcome::Idle => "idle",
                CancelOutcome::HeldCancelled => "held_cancelled",
                CancelOutcome::Failed(reason) => {
                    warn!(parent: &who.span(), %reason, "could not forward a cancel request");
                    "failed"
                }
            };
            metrics::counter!(m::CANCEL_REQUESTS_TOTAL, "result" => result).increment(1);
            return Ok(None);
        }
        Opening::Session(params) => params,
    };
    let user_name: &str = who
        .user
        .insert(params.get("user").unwrap_or_default().to_owned());
    let slot = ctx
        .try_open_session()
        .ok_or(SessionError::TooManyConnections)?;
    let user = config
        .user(user_name)
        .ok_or_else(|| SessionError::UnknownUser(user_name.to_owned()))?;
    auth::authenticate(client, user).await?;
    Ok(Some((params, user, slot)))
}
