//! The message pump between a client and its backend connection.
//!
//! Bytes move in large batches: one read fills a buffer with as many messages as have arrived,
//! the [`Framer`] finds their boundaries (and shows graywire the few it must see), and the
//! whole scanned run goes out in one write. Each direction has its own buffer and waits only on
//! its own sockets, so a slow reader on one side never stalls the other direction.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::net::tcp::WriteHalf;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::error::SessionError;
use crate::metrics as m;
use crate::pool::Pool;
use crate::protocol::frame::{
    check_frontend_header, read_cstr, Flow, Framer, Handling, Scanned, HEADER_LEN,
};
use crate::protocol::message::TxStatus;
use crate::protocol::sqltext::{leading_command, mentions_session_advisory_lock, Command};
use crate::shutdown::Shutdown;

/// Each read asks for at least this much room.
const READ_CHUNK: usize = 64 * 1024;
const MIN_FREE: usize = 8 * 1024;
/// Relayed bytes are published to the shared counters per this many.
const BYTES_BATCH: u64 = 64 * 1024;

/// Why a relay stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum RelayEnd {
    /// The client closed its connection (EOF).
    ClientClosed,
    /// The client sent Terminate.
    ClientTerminated,
    /// The backend connection ended or failed, or the node said it is shutting down (that
    /// FATAL is not passed on: the session outlives its backend connection).
    BackendClosed(String),
    /// graywire is shutting down and the session is at a boundary (or the hard deadline hit).
    Shutdown,
    /// The node's drain timed out: the session must leave it now, mid-transaction or not.
    Evicted,
    /// The session is at a transaction boundary and has something to decide there: the
    /// topology changed, a setting may have changed, a pinned session's recheck is due, or new
    /// transactions are held. Client bytes that arrived stay unscanned in the up pipe.
    Boundary,
}

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

/// Protocol facts the session learns from the messages passing through.
pub struct Tracker {
    pub status: TxStatus,
    /// Query, Sync and FunctionCall messages forwarded and not yet answered by ReadyForQuery.
    pub unanswered: u32,
    /// Extended-protocol messages were forwarded after the last Sync.
    pub open_extended: bool,
    pub in_flight: InFlight,
    /// The node is in a COPY started by the current request.
    pub in_copy: bool,
    /// A statement that may change a session setting ran; capture settings at the boundary.
    pub settings_dirty: bool,
    /// A statement that may create state bound to the backend connection ran (see
    /// [`Command::SessionState`]); transaction mode looks before giving the connection back.
    pub maybe_pinned: bool,
    /// The latest value of every parameter the node reported.
    pub parameters: Vec<(String, String)>,
    /// Named protocol-level prepared statements the client defined.
    pub statements: HashMap<String, Statement>,
    /// The last ErrorResponse from the node was FATAL (the node ends the connection itself).
    pub node_said_fatal: bool,
    /// The node's FATAL shutdown message, withheld from the client.
    pub node_shutting_down: Option<String>,
    request_started: Option<Instant>,
    pub(super) frontend: Framer,
    backend: Framer,
    max_message_size: usize,
    query_duration: metrics::Histogram,
    bytes_up: metrics::Counter,
    bytes_down: metrics::Counter,
    /// Bytes relayed but not yet added to the shared counters (published in batches, so the
    /// hot path does not touch a cache line every session shares).
    unpublished_up: u64,
    unpublished_down: u64,
}

impl Tracker {
    pub fn new(
        parameters: Vec<(String, String)>,
        status: TxStatus,
        max_message_size: usize,
    ) -> Self {
        Tracker {
            status,
            unanswered: 0,
            open_extended: false,
            in_flight: InFlight::default(),
            in_copy: false,
            settings_dirty: false,
            maybe_pinned: false,
            parameters,
            statements: HashMap::new(),
            node_said_fatal: false,
            node_shutting_down: None,
            request_started: None,
            frontend: Framer::default(),
            backend: Framer::default(),
            max_message_size,
            query_duration: metrics::histogram!(m::QUERY_DURATION_SECONDS),
            bytes_up: metrics::counter!(m::RELAYED_BYTES_TOTAL, "direction" => "client_to_node"),
            bytes_down: metrics::counter!(m::RELAYED_BYTES_TOTAL, "direction" => "node_to_client"),
            unpublished_up: 0,
            unpublished_down: 0,
        }
    }

    fn count_up(&mut self, n: usize) {
        self.unpublished_up += n as u64;
        if self.unpublished_up >= BYTES_BATCH {
            self.publish_bytes();
        }
    }

    fn count_down(&mut self, n: usize) {
        self.unpublished_down += n as u64;
        if self.unpublished_down >= BYTES_BATCH {
            self.publish_bytes();
        }
    }

    /// Adds the locally counted bytes to the shared counters.
    pub fn publish_bytes(&mut self) {
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

    /// Forgets what the dead backend connection was doing, after graywire answered for it.
    pub fn reset_backend_side(&mut self) {
        self.backend = Framer::default();
        self.unanswered = 0;
        self.open_extended = false;
        self.in_flight = InFlight::default();
        self.in_copy = false;
        self.node_said_fatal = false;
        self.node_shutting_down = None;
        self.request_started = None;
    }

    /// A request begins (Query, Sync or FunctionCall forwarded).
    fn request(&mut self) {
        if self.unanswered == 0 {
            self.request_started = Some(Instant::now());
        }
        self.unanswered += 1;
    }

    fn note_command(&mut self, command: Command) {
        match command {
            Command::SessionSetting => self.settings_dirty = true,
            Command::Commit => self.in_flight.commit = true,
            Command::Rollback => self.in_flight.rollback = true,
            Command::Discard => {
                self.statements.clear();
                // DISCARD ALL also resets settings.
                self.settings_dirty = true;
            }
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
        if mentions_session_advisory_lock(rest) {
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
                        this.note_command(leading_command(body));
                        if mentions_session_advisory_lock(body) {
                            this.maybe_pinned = true;
                        }
                        this.request();
                        Handling::Stream
                    }
                    b'S' => {
                        this.open_extended = false;
                        this.request();
                        Handling::Stream
                    }
                    b'F' => {
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
    fn scan_backend(&mut self, buf: &[u8]) -> Scanned {
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
            if let Some(t) = self.request_started.take() {
                self.query_duration.record(t.elapsed().as_secs_f64());
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
        set_parameter(&mut self.parameters, name, value);
    }

    /// Counts the error; a FATAL that says the node is going away (57P01 admin shutdown,
    /// 57P02 crash shutdown, 57P03 cannot connect now) is withheld: the session will go on
    /// on another backend connection.
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
        if fatal && matches!(sqlstate.as_str(), "57P01" | "57P02" | "57P03") {
            self.node_shutting_down = Some(format!("{message} ({sqlstate})"));
            return Flow::Stop;
        }
        self.node_said_fatal = fatal;
        metrics::counter!(m::CLIENT_ERRORS_TOTAL, "sqlstate" => sqlstate, "source" => "node")
            .increment(1);
        Flow::Forward
    }
}

/// Sets `name` to `value` in a parameter list, adding it if new.
pub fn set_parameter(list: &mut Vec<(String, String)>, name: &str, value: &str) {
    match list.iter_mut().find(|(k, _)| k == name) {
        Some(slot) => slot.1 = value.to_owned(),
        None => list.push((name.to_owned(), value.to_owned())),
    }
}

/// One direction's bytes: `buf[..ready]` is scanned and waits to be written; bytes after it
/// are not scanned yet.
pub struct Pipe {
    pub buf: BytesMut,
    pub ready: usize,
}

/// Both directions' bytes; they outlive a backend connection, so a session keeps what the
/// client sent while it moves.
pub struct Pipes {
    pub up: Pipe,
    pub down: Pipe,
}

impl Default for Pipes {
    fn default() -> Self {
        Pipes {
            up: Pipe::new(),
            down: Pipe::new(),
        }
    }
}

impl Pipe {
    fn new() -> Self {
        Pipe {
            buf: BytesMut::with_capacity(READ_CHUNK),
            ready: 0,
        }
    }

    pub fn make_room(&mut self) {
        if self.buf.capacity() - self.buf.len() < MIN_FREE {
            self.buf.reserve(READ_CHUNK);
        }
    }

    /// Writes as much of the ready bytes as the socket takes now, without waiting.
    fn flush_now(&mut self, w: &WriteHalf<'_>) -> io::Result<()> {
        while self.ready > 0 {
            match w.try_write(&self.buf[..self.ready]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.buf.advance(n);
                    self.ready -= n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Writes all ready bytes to a whole stream (when the backend is gone).
    pub async fn flush_all_to(&mut self, stream: &mut TcpStream) -> io::Result<()> {
        use tokio::io::AsyncWriteExt;
        stream.write_all(&self.buf[..self.ready]).await?;
        self.buf.advance(self.ready);
        self.ready = 0;
        Ok(())
    }

    /// Writes all ready bytes, waiting as needed (when the session ends or graywire writes
    /// messages of its own after them).
    pub async fn flush_all(&mut self, w: &WriteHalf<'_>) -> io::Result<()> {
        while self.ready > 0 {
            w.writable().await?;
            self.flush_now(w)?;
        }
        Ok(())
    }
}

fn lost(e: io::Error) -> RelayEnd {
    RelayEnd::BackendClosed(e.to_string())
}

/// What makes a relay stop at the next transaction boundary.
pub struct BoundaryWatch<'a> {
    /// Topology changes; a change not yet seen by this receiver stops the relay at a boundary.
    pub changes: &'a mut watch::Receiver<u64>,
    /// New transactions are held (paused): client bytes arriving at a boundary stop the relay.
    pub hold_requests: bool,
    /// Stop at the first boundary after this instant (a pinned session's recheck).
    pub recheck_at: Option<tokio::time::Instant>,
    /// Transaction mode: the connection's pool; stop at a boundary once another session
    /// wants a connection of it (the connection goes back).
    pub pool: Option<&'a Pool>,
    /// Changes when the session must leave its node at once.
    pub evictions: &'a mut watch::Receiver<u64>,
}

/// Scans client bytes waiting in the up pipe and sends what may go now. `Some` when the
/// client sent Terminate.
async fn pass_client_bytes(
    t: &mut Tracker,
    up: &mut Pipe,
    backend_wr: &WriteHalf<'_>,
) -> Result<Option<RelayEnd>, SessionError> {
    let scanned = t.scan_frontend(&up.buf)?;
    up.ready = scanned.forward;
    if scanned.stopped.is_some() {
        if let Err(e) = up.flush_all(backend_wr).await {
            return Ok(Some(lost(e)));
        }
        return Ok(Some(RelayEnd::ClientTerminated));
    }
    if let Err(e) = up.flush_now(backend_wr) {
        return Ok(Some(lost(e)));
    }
    Ok(None)
}

/// Scans node bytes waiting in the down pipe and sends what may go now. `Some` when the
/// node said it is going away.
async fn pass_node_bytes(
    t: &mut Tracker,
    down: &mut Pipe,
    client_wr: &WriteHalf<'_>,
) -> Result<Option<RelayEnd>, SessionError> {
    let scanned = t.scan_backend(&down.buf);
    down.ready = scanned.forward;
    if let Some(len) = scanned.stopped {
        // Deliver everything before the withheld FATAL, drop it and whatever follows.
        down.flush_all(client_wr)
            .await
            .map_err(SessionError::ClientGone)?;
        let _ = len;
        down.buf.clear();
        let why = t
            .node_shutting_down
            .clone()
            .unwrap_or_else(|| "the node is shutting down".into());
        return Ok(Some(RelayEnd::BackendClosed(why)));
    }
    down.flush_now(client_wr)
        .map_err(SessionError::ClientGone)?;
    Ok(None)
}

/// Polls a future once: true if it completed (its registration, e.g. a `Notified`, is made
/// either way).
async fn futures_poll_once<F: std::future::Future>(f: std::pin::Pin<&mut F>) -> bool {
    let mut f = Some(f);
    std::future::poll_fn(|cx| {
        let done = f
            .as_mut()
            .map(|f| f.as_mut().poll(cx).is_ready())
            .unwrap_or(true);
        std::task::Poll::Ready(done)
    })
    .await
}

/// Relays until one side ends, the client breaks the protocol, shutdown asks the session to
/// close at its boundary, or `watch` asks it to stop at a boundary.
pub async fn run(
    client: &mut TcpStream,
    backend: &mut TcpStream,
    t: &mut Tracker,
    pipes: &mut Pipes,
    shutdown: &Shutdown,
    watch: BoundaryWatch<'_>,
) -> Result<RelayEnd, SessionError> {
    let (mut client_rd, client_wr) = client.split();
    let (mut backend_rd, backend_wr) = backend.split();
    let Pipes { up, down } = pipes;
    // Made once: each `cancelled()` future registers with the token shared by every session,
    // so re-creating them per iteration would lock that shared list on every round trip.
    let soft = shutdown.soft.cancelled();
    let hard = shutdown.hard.cancelled();
    let far = tokio::time::Instant::now() + std::time::Duration::from_secs(86_400 * 365);
    let changes = watch.changes;
    let (hold_requests, recheck_at, pool) = (watch.hold_requests, watch.recheck_at, watch.pool);
    let recheck = tokio::time::sleep_until(recheck_at.unwrap_or(far));
    let mut changed = changes.has_changed().unwrap_or(false);
    let change = changes.changed();
    let evicted = watch.evictions.changed();
    // Enabled before the first look at `is_wanted`, so a waiter's wake-up is never missed.
    let wanted = async {
        match pool {
            Some(p) => p.wanted().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(soft, hard, recheck, change, evicted, wanted);
    // Poll once so the notification is registered.
    let mut release = futures_poll_once(wanted.as_mut()).await || pool.is_some_and(Pool::is_wanted);
    let mut recheck_due = false;
    // Asked once here; afterwards the pinned futures report it (is_cancelled takes a lock).
    let mut stopping = shutdown.soft.is_cancelled();
    let mut stop_now = shutdown.hard.is_cancelled();

    // Bytes left from before (the client's next request, or the node's after a hand-over).
    if !down.buf.is_empty() && down.ready == 0 {
        if let Some(end) = pass_node_bytes(t, down, &client_wr).await? {
            return Ok(end);
        }
    }
    let holding = |t: &Tracker, changed: bool, recheck_due: bool| {
        t.at_boundary()
            && (hold_requests
                || changed
                || recheck_due
                || t.settings_dirty
                || (pool.is_some() && t.maybe_pinned))
    };
    if !up.buf.is_empty() && up.ready == 0 && !holding(t, changed, recheck_due) {
        if let Some(end) = pass_client_bytes(t, up, &backend_wr).await? {
            return Ok(end);
        }
    }
    loop {
        if stop_now || (stopping && t.at_boundary() && up.buf.is_empty()) {
            t.publish_bytes();
            return Ok(RelayEnd::Shutdown);
        }
        if up.ready == 0
            && t.at_boundary()
            && (changed
                || recheck_due
                || t.settings_dirty
                || (pool.is_some() && t.maybe_pinned)
                || (hold_requests && !up.buf.is_empty())
                || ((release || pool.is_some_and(Pool::is_wanted))
                    && up.buf.is_empty()
                    && down.buf.is_empty()))
        {
            t.publish_bytes();
            return Ok(RelayEnd::Boundary);
        }
        up.make_room();
        down.make_room();
        tokio::select! {
            biased;
            _ = &mut hard => stop_now = true,
            _ = &mut soft, if !stopping => stopping = true,
            _ = &mut change, if !changed => changed = true,
            _ = &mut wanted, if !release && pool.is_some() => release = true,
            r = &mut evicted => {
                if r.is_ok() {
                    t.publish_bytes();
                    return Ok(RelayEnd::Evicted);
                }
            }
            _ = &mut recheck, if !recheck_due && recheck_at.is_some() => recheck_due = true,
            r = client_rd.read_buf(&mut up.buf), if up.ready == 0 => {
                let n = r.map_err(SessionError::ClientGone)?;
                if n == 0 {
                    return Ok(RelayEnd::ClientClosed);
                }
                t.count_up(n);
                if holding(t, changed, recheck_due) {
                    // Decided at the top of the loop: these bytes wait in the pipe.
                    continue;
                }
                if let Some(end) = pass_client_bytes(t, up, &backend_wr).await? {
                    return Ok(end);
                }
            }
            r = backend_rd.read_buf(&mut down.buf), if down.ready == 0 => {
                let n = match r {
                    Ok(0) => return Ok(RelayEnd::BackendClosed("the node closed the connection".into())),
                    Ok(n) => n,
                    Err(e) => return Ok(lost(e)),
                };
                t.count_down(n);
                if let Some(end) = pass_node_bytes(t, down, &client_wr).await? {
                    return Ok(end);
                }
            }
            r = backend_wr.writable(), if up.ready > 0 => {
                if let Err(e) = r.and_then(|()| up.flush_now(&backend_wr)) {
                    return Ok(lost(e));
                }
            }
            r = client_wr.writable(), if down.ready > 0 => {
                r.and_then(|()| down.flush_now(&client_wr)).map_err(SessionError::ClientGone)?;
            }
        }
    }
}
