//! What the session learns from the messages passing through: the transaction status from
//! each ReadyForQuery, requests in flight, the node's parameters, the client's named prepared
//! statements, and hints that a setting changed or state got bound to the backend connection.
//! The relay feeds it the bytes it scans; it does no I/O.

use std::cell::RefCell;
use std::collections::HashMap;

use bytes::{BufMut, Bytes, BytesMut};

use crate::clock::Stamp;
use crate::error::SessionError;
use crate::metrics as m;
use crate::protocol::frame::{
    check_frontend_header, read_cstr, Flow, Framer, Handling, Scanned, HEADER_LEN,
};
use crate::protocol::message::{Parameters, TxStatus};
use crate::protocol::sqltext::{leading_command, mentions_session_advisory_lock, Command};
use crate::protocol::SqlState;

/// The client's named prepared statements by name. Looked up on every Bind, so hashed with
/// FxHash rather than SipHash: the names come from the session's own client, which can only
/// slow down its own lookups.
pub type Statements = HashMap<String, Statement, rustc_hash::FxBuildHasher>;

/// How much of a Query's text must have arrived before it is classified (all of it when it
/// is shorter): its first words, after any leading comments and blanks.
const QUERY_PEEK: usize = 1024;

/// Relayed bytes are published to the shared counters per this many (and at least every
/// [`m::PUBLISH_PERIOD`] while requests complete).
const BYTES_BATCH: u64 = 64 * 1024;

/// A protocol-level prepared statement as the client defined it, kept to re-prepare it on
/// another backend connection.
#[derive(Debug, Clone)]
pub struct Statement {
    /// The client's Parse message, whole.
    pub parse: Bytes,
    pub command: Command,
}

/// What the request in flight (since the last ReadyForQuery) contains, for answering it if
/// its backend dies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InFlight {
    pub commit: bool,
    pub rollback: bool,
    /// The request used the extended protocol (its replies need more than CommandComplete).
    pub extended: bool,
}

/// A FATAL error the node sent that may mean the node is going away, kept whole so that it
/// can still be relayed when only this backend connection was ended.
#[derive(Debug, Clone)]
pub struct WithheldFatal {
    pub sqlstate: SqlState,
    pub message: String,
    /// The ErrorResponse's body (its fields), without the tag and length.
    pub body: Bytes,
}

impl WithheldFatal {
    /// Why the backend connection ended, for log lines and answers.
    pub fn reason(&self) -> String {
        format!("{} ({})", self.message, self.sqlstate)
    }

    /// The whole ErrorResponse message, as the node sent it.
    pub fn message_bytes(&self) -> BytesMut {
        let mut out = BytesMut::with_capacity(self.body.len() + 5);
        out.put_u8(b'E');
        out.put_u32((self.body.len() + 4) as u32);
        out.extend_from_slice(&self.body);
        out
    }
}

/// Protocol facts the session learns from the messages passing through.
pub struct Tracker {
    pub status: TxStatus,
    /// Query, Sync and FunctionCall messages forwarded and not yet answered by ReadyForQuery.
    pub unanswered: u32,
    /// Extended-protocol messages were forwarded after the last Sync.
    pub open_extended: bool,
    pub in_flight: InFlight,
    /// How many requests in flight came before the first simple-protocol ROLLBACK among
    /// them (when a backend dies, those ran inside the transaction, which the ROLLBACK ended).
    pub rollback_after: Option<u32>,
    /// A request other than ROLLBACK followed that ROLLBACK.
    pub more_after_rollback: bool,
    /// The node is in a COPY started by the current request.
    pub in_copy: bool,
    /// A statement that may change a session setting ran; capture settings at the boundary.
    pub settings_dirty: bool,
    /// A statement that may create state bound to the backend connection ran (see
    /// [`Command::SessionState`]); transaction mode looks before giving the connection back.
    pub maybe_pinned: bool,
    /// Statement text is searched for session advisory locks (for `maybe_pinned`); only
    /// transaction mode needs it.
    watch_pins: bool,
    /// The latest value of every parameter the node reported.
    pub parameters: Parameters,
    /// Named protocol-level prepared statements the client defined.
    pub statements: Statements,
    /// The SQLSTATE of the FATAL error the node sent and graywire relayed (the node ends the
    /// connection itself).
    pub node_fatal: Option<SqlState>,
    /// The node's FATAL that says it is going away, withheld from the client until graywire
    /// knows whether the node or only this backend is going.
    pub withheld_fatal: Option<WithheldFatal>,
    /// While the session runs on a backend whose pid is not the one its client was given:
    /// (that backend's pid, the advertised pid). NotificationResponses from the backend
    /// itself are rewritten to the advertised pid, so a client recognises its own.
    pub pid_rewrite: Option<(u32, u32)>,
    /// Offsets, in the bytes last scanned, of NotificationResponse pids to rewrite.
    pub pid_patches: Vec<usize>,
    request_started: Option<Stamp>,
    pub(super) frontend: Framer,
    backend: Framer,
    max_message_size: usize,
    /// Request durations not yet added to [`m::QUERY_DURATION`].
    durations: m::LocalHistogram,
    /// When the local counts were last published (they are published at least every
    /// [`m::PUBLISH_PERIOD`] while requests complete).
    published_at: Stamp,
    bytes_up: metrics::Counter,
    bytes_down: metrics::Counter,
    /// Bytes relayed but not yet added to the shared counters (published in batches, so the
    /// hot path does not touch a cache line every session shares).
    unpublished_up: u64,
    unpublished_down: u64,
}

impl Tracker {
    pub fn new(
        parameters: Parameters,
        status: TxStatus,
        max_message_size: usize,
        watch_pins: bool,
        handles: &m::SessionMetrics,
    ) -> Self {
        Tracker {
            status,
            unanswered: 0,
            open_extended: false,
            in_flight: InFlight::default(),
            rollback_after: None,
            more_after_rollback: false,
            in_copy: false,
            settings_dirty: false,
            maybe_pinned: false,
            watch_pins,
            parameters,
            statements: Statements::default(),
            node_fatal: None,
            withheld_fatal: None,
            pid_rewrite: None,
            pid_patches: Vec::new(),
            request_started: None,
            frontend: Framer::default(),
            backend: Framer::default(),
            max_message_size,
            durations: m::LocalHistogram::default(),
            published_at: Stamp::now(),
            bytes_up: handles.bytes_up.clone(),
            bytes_down: handles.bytes_down.clone(),
            unpublished_up: 0,
            unpublished_down: 0,
        }
    }

    pub(super) fn count_up(&mut self, n: usize) {
        self.unpublished_up += n as u64;
        if self.unpublished_up >= BYTES_BATCH {
            self.publish();
        }
    }

    pub(super) fn count_down(&mut self, n: usize) {
        self.unpublished_down += n as u64;
        if self.unpublished_down >= BYTES_BATCH {
            self.publish();
        }
    }

    /// Adds the locally counted bytes and request durations to the shared metrics.
    pub fn publish(&mut self) {
        self.published_at = Stamp::now();
        self.durations.publish(&m::QUERY_DURATION);
        self.bytes_up
            .increment(std::mem::take(&mut self.unpublished_up));
        self.bytes_down
            .increment(std::mem::take(&mut self.unpublished_down));
    }

    /// A transaction boundary with nothing in flight in either direction.
    pub fn at_boundary(&self) -> bool {
        self.status == TxStatus::Idle && self.between_requests()
    }

    /// Nothing in flight in either direction (the transaction may still be open).
    pub fn between_requests(&self) -> bool {
        self.unanswered == 0
            && !self.open_extended
            && self.frontend.at_message_start()
            && self.backend.at_message_start()
    }

    /// The node stream stands between messages (graywire may write its own to the client).
    pub fn backend_at_message_start(&self) -> bool {
        self.backend.at_message_start()
    }

    /// Where a request stands relative to the first ROLLBACK in flight (called before it is
    /// counted as a request).
    fn note_rollback_order(&mut self, is_rollback: bool) {
        match self.rollback_after {
            None if is_rollback => self.rollback_after = Some(self.unanswered),
            Some(_) if !is_rollback => self.more_after_rollback = true,
            _ => {}
        }
    }

    fn forget_rollback(&mut self) {
        self.rollback_after = None;
        self.more_after_rollback = false;
    }

    /// Forgets what the dead backend connection was doing, after graywire answered for it.
    pub fn reset_backend_side(&mut self) {
        self.backend = Framer::default();
        self.unanswered = 0;
        self.open_extended = false;
        self.forget_rollback();
        self.in_flight = InFlight::default();
        self.in_copy = false;
        self.node_fatal = None;
        self.withheld_fatal = None;
        self.request_started = None;
    }

    /// A request begins (Query, Sync or FunctionCall forwarded).
    fn request(&mut self) {
        if self.unanswered == 0 {
            self.request_started = Some(Stamp::now());
        }
        self.unanswered += 1;
    }

    fn note_command(&mut self, command: Command) {
        match command {
            Command::SessionSetting => self.settings_dirty = true,
            Command::Commit => self.in_flight.commit = true,
            Command::Rollback => self.in_flight.rollback = true,
            // DISCARD ALL, DEALLOCATE [ALL] name: settings and statements may be gone, or only
            // one statement, or none (DISCARD PLANS/TEMP/SEQUENCES): the capture at the
            // boundary reads which statements still exist rather than guessing from the text.
            Command::Discard => self.settings_dirty = true,
            Command::SessionState => self.maybe_pinned = true,
            Command::Other => {}
        }
    }

    /// Records a Parse (named statements are kept to re-prepare them elsewhere).
    fn on_parse(&mut self, msg: &[u8]) -> Result<(), SessionError> {
        let bad = || SessionError::Protocol("malformed Parse message".into());
        let (name, rest) = read_cstr(&msg[HEADER_LEN..]).ok_or_else(bad)?;
        let command = leading_command(rest);
        self.note_command(command);
        if self.watch_pins && mentions_session_advisory_lock(rest) {
            self.maybe_pinned = true;
        }
        if !name.is_empty() {
            self.statements.insert(
                name.to_owned(),
                Statement {
                    parse: Bytes::copy_from_slice(msg),
                    command,
                },
            );
        }
        Ok(())
    }

    /// Records a Close of a named statement.
    fn on_close(&mut self, msg: &[u8]) -> Result<(), SessionError> {
        let body = &msg[HEADER_LEN..];
        let bad = || SessionError::Protocol("malformed Close message".into());
        let (&kind, rest) = body.split_first().ok_or_else(bad)?;
        let (name, _) = read_cstr(rest).ok_or_else(bad)?;
        if kind == b'S' {
            self.statements.remove(name);
        }
        Ok(())
    }

    /// Scans client bytes: validates every header, counts requests, watches statements, stops
    /// at Terminate.
    pub(super) fn scan_frontend(&mut self, buf: &[u8]) -> Result<Scanned, SessionError> {
        let mut framer = std::mem::take(&mut self.frontend);
        let max = self.max_message_size;
        // Both callbacks update the tracker; they never run at the same time.
        let this = RefCell::new(&mut *self);
        let result = framer.scan(
            buf,
            |tag, len, body| {
                check_frontend_header(tag, len, max)?;
                let mut this = this.borrow_mut();
                // Each header is classified exactly once, so counting here is exact.
                Ok(match tag {
                    b'X' | b'P' | b'C' => Handling::Inspect,
                    b'Q' => {
                        // Classify from the first words: wait until they are here (a COMMIT
                        // cut after its header would otherwise count as another statement).
                        if body.len() < (len - 4).min(QUERY_PEEK) {
                            return Ok(Handling::Wait);
                        }
                        let command = leading_command(body);
                        this.note_command(command);
                        this.note_rollback_order(command == Command::Rollback);
                        if this.watch_pins && mentions_session_advisory_lock(body) {
                            this.maybe_pinned = true;
                        }
                        this.request();
                        Handling::Stream
                    }
                    b'S' => {
                        this.open_extended = false;
                        this.note_rollback_order(false);
                        this.request();
                        Handling::Stream
                    }
                    b'F' => {
                        this.note_rollback_order(false);
                        this.request();
                        Handling::Stream
                    }
                    b'B' => {
                        this.open_extended = true;
                        this.in_flight.extended = true;
                        // Bind: portal name, then statement name.
                        let command = read_cstr(body)
                            .and_then(|(_, rest)| read_cstr(rest))
                            .and_then(|(name, _)| this.statements.get(name))
                            .map(|s| s.command);
                        if let Some(c) = command {
                            this.note_command(c);
                        }
                        Handling::Stream
                    }
                    b'D' | b'E' | b'H' => {
                        this.open_extended = true;
                        this.in_flight.extended = true;
                        Handling::Stream
                    }
                    _ => Handling::Stream,
                })
            },
            |tag, msg| {
                let mut this = this.borrow_mut();
                match tag {
                    b'P' => {
                        this.open_extended = true;
                        this.in_flight.extended = true;
                        this.on_parse(msg)?;
                    }
                    b'C' => {
                        this.open_extended = true;
                        this.in_flight.extended = true;
                        this.on_close(msg)?;
                    }
                    _ => return Ok::<_, SessionError>(Flow::Stop),
                }
                Ok(Flow::Forward)
            },
        );
        self.frontend = framer;
        result
    }

    /// Scans node bytes: transaction status, parameter changes, errors, COPY.
    pub(super) fn scan_backend(&mut self, buf: &[u8]) -> Scanned {
        let mut framer = std::mem::take(&mut self.backend);
        let this = RefCell::new(&mut *self);
        let result = framer.scan(
            buf,
            |tag, len, _| {
                if len < 4 {
                    return Err(());
                }
                Ok(match tag {
                    b'Z' | b'S' | b'E' => Handling::Inspect,
                    b'A' if this.borrow().pid_rewrite.is_some() => Handling::Inspect,
                    b'G' | b'H' | b'W' => {
                        this.borrow_mut().in_copy = true;
                        Handling::Stream
                    }
                    _ => Handling::Stream,
                })
            },
            |tag, msg| {
                let mut this = this.borrow_mut();
                let body = &msg[HEADER_LEN..];
                match tag {
                    b'Z' => this.on_ready_for_query(body),
                    b'S' => this.on_parameter_status(body),
                    b'E' => return Ok(this.on_error(body)),
                    b'A' => {
                        let from = this.pid_rewrite.map(|(from, _)| from.to_be_bytes());
                        if from.is_some_and(|f| body.get(..4) == Some(&f[..])) {
                            // Where this message's pid sits in `buf` (the framer hands out
                            // sub-slices of it).
                            let at = body.as_ptr().addr() - buf.as_ptr().addr();
                            this.pid_patches.push(at);
                        }
                    }
                    _ => {}
                }
                Ok(Flow::Forward)
            },
        );
        self.backend = framer;
        // A node that sends a length under 4 is broken; forward what is there and let the
        // client's driver report it, as it would on a direct connection.
        result.unwrap_or(Scanned {
            forward: buf.len(),
            stopped: None,
        })
    }

    fn on_ready_for_query(&mut self, body: &[u8]) {
        if let Some(s) = body.first().copied().and_then(TxStatus::from_byte) {
            self.status = s;
        }
        self.in_copy = false;
        self.unanswered = self.unanswered.saturating_sub(1);
        if self.unanswered == 0 {
            self.in_flight = InFlight::default();
            self.forget_rollback();
            if let Some(started) = self.request_started.take() {
                let now = Stamp::now();
                self.durations
                    .record(now.since(started), &m::QUERY_DURATION);
                if now.since(self.published_at) >= m::PUBLISH_PERIOD {
                    self.publish();
                }
            }
        }
    }

    pub(super) fn on_parameter_status(&mut self, body: &[u8]) {
        let Some((name, rest)) = read_cstr(body) else {
            return;
        };
        let Some((value, _)) = read_cstr(rest) else {
            return;
        };
        self.parameters.set(name, value);
    }

    /// Counts the error; a FATAL that says the node may be going away (57P01 admin shutdown,
    /// which `pg_terminate_backend` sends too, 57P02 crash shutdown, 57P03 cannot connect
    /// now) is withheld: the session decides what it means (see `failover.rs`).
    fn on_error(&mut self, body: &[u8]) -> Flow {
        let mut fields = body;
        let mut fatal = false;
        while let Some((&field, rest)) = fields.split_first() {
            if field == 0 {
                break;
            }
            let Some((value, rest)) = read_cstr(rest) else {
                break;
            };
            if field == b'V' {
                fatal = value == "FATAL" || value == "PANIC";
            }
            fields = rest;
        }
        let (sqlstate, message) = crate::backend::error_fields(body);
        let going_away = [
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
        ];
        // In transaction mode a FATAL between transactions ends a connection the client does
        // not own: withheld too, so the session may go on on another (see failover.rs).
        let between_transactions = self.watch_pins && self.at_boundary();
        if fatal && (going_away.contains(&sqlstate) || between_transactions) {
            self.withheld_fatal = Some(WithheldFatal {
                sqlstate,
                message,
                body: Bytes::copy_from_slice(body),
            });
            return Flow::Stop;
        }
        if fatal {
            self.node_fatal = Some(sqlstate);
        }
        metrics::counter!(m::CLIENT_ERRORS_TOTAL, "sqlstate" => sqlstate.label(), "source" => "node")
            .increment(1);
        Flow::Forward
    }
}
#[cfg(test)]
mod tests;
