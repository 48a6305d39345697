//! The message pump between a client and its backend connection.
//!
//! Bytes move in large batches: one read fills a buffer with as many messages as have arrived,
//! the [`Framer`] finds their boundaries (and shows graywire the few it must see), and the
//! whole scanned run goes out in one write. Each direction has its own buffer and waits only on
//! its own sockets, so a slow reader on one side never stalls the other direction.

use std::io;
use std::time::Instant;

use bytes::{Buf, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::net::tcp::WriteHalf;
use tokio::net::TcpStream;

use crate::error::SessionError;
use crate::metrics as m;
use crate::protocol::frame::{check_frontend_header, read_cstr, Flow, Framer, Handling, Scanned};
use crate::protocol::message::TxStatus;
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
    /// The backend connection ended or failed.
    BackendClosed(String),
    /// graywire is shutting down and the session is at a boundary (or the hard deadline hit).
    Shutdown,
}

/// Protocol facts the session learns from the messages passing through.
pub struct Tracker {
    pub status: TxStatus,
    /// Query, Sync and FunctionCall messages forwarded and not yet answered by ReadyForQuery.
    pub unanswered: u32,
    /// The latest value of every parameter the node reported.
    pub parameters: Vec<(String, String)>,
    /// The last ErrorResponse from the node was FATAL (the node ends the connection itself).
    pub node_said_fatal: bool,
    request_started: Option<Instant>,
    frontend: Framer,
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
            parameters,
            node_said_fatal: false,
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
        self.status == TxStatus::Idle
            && self.unanswered == 0
            && self.frontend.at_message_start()
            && self.backend.at_message_start()
    }

    /// Scans client bytes: validates every header, counts requests, stops at Terminate.
    fn scan_frontend(&mut self, buf: &[u8]) -> Result<Scanned, SessionError> {
        let max = self.max_message_size;
        let unanswered = &mut self.unanswered;
        let started = &mut self.request_started;
        self.frontend.scan(
            buf,
            |tag, len| {
                check_frontend_header(tag, len, max)?;
                Ok(match tag {
                    b'X' => Handling::Inspect,
                    b'Q' | b'S' | b'F' => {
                        // Counted here, once: streamed headers are classified exactly once.
                        if *unanswered == 0 {
                            *started = Some(Instant::now());
                        }
                        *unanswered += 1;
                        Handling::Stream
                    }
                    _ => Handling::Stream,
                })
            },
            |_tag, _msg| Ok::<_, SessionError>(Flow::Stop),
        )
    }

    /// Scans node bytes: transaction status, parameter changes, errors.
    fn scan_backend(&mut self, buf: &[u8]) -> Scanned {
        let mut framer = std::mem::take(&mut self.backend);
        let result = framer.scan(
            buf,
            |tag, len| {
                if len < 4 {
                    return Err(());
                }
                Ok(match tag {
                    b'Z' | b'S' | b'E' => Handling::Inspect,
                    _ => Handling::Stream,
                })
            },
            |tag, msg| {
                let body = &msg[5..];
                match tag {
                    b'Z' => self.on_ready_for_query(body),
                    b'S' => self.on_parameter_status(body),
                    b'E' => self.on_error(body),
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
        self.unanswered = self.unanswered.saturating_sub(1);
        if self.unanswered == 0 {
            if let Some(t) = self.request_started.take() {
                self.query_duration.record(t.elapsed().as_secs_f64());
            }
        }
    }

    fn on_parameter_status(&mut self, body: &[u8]) {
        let Some((name, rest)) = read_cstr(body) else {
            return;
        };
        let Some((value, _)) = read_cstr(rest) else {
            return;
        };
        match self.parameters.iter_mut().find(|(k, _)| k == name) {
            Some(slot) => slot.1 = value.to_owned(),
            None => self.parameters.push((name.to_owned(), value.to_owned())),
        }
    }

    fn on_error(&mut self, mut body: &[u8]) {
        let mut sqlstate = "";
        let mut fatal = false;
        while let Some((&field, rest)) = body.split_first() {
            if field == 0 {
                break;
            }
            let Some((value, rest)) = read_cstr(rest) else {
                break;
            };
            match field {
                b'C' => sqlstate = value,
                b'V' => fatal = value == "FATAL" || value == "PANIC",
                _ => {}
            }
            body = rest;
        }
        self.node_said_fatal = fatal;
        metrics::counter!(m::CLIENT_ERRORS_TOTAL, "sqlstate" => sqlstate.to_owned(), "source" => "node")
            .increment(1);
    }
}

/// One direction's bytes: `buf[..ready]` is scanned and waits to be written.
struct Pipe {
    buf: BytesMut,
    ready: usize,
}

impl Pipe {
    fn new() -> Self {
        Pipe {
            buf: BytesMut::with_capacity(READ_CHUNK),
            ready: 0,
        }
    }

    fn make_room(&mut self) {
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

    /// Writes all ready bytes, waiting as needed (used only when the session ends).
    async fn flush_all(&mut self, w: &WriteHalf<'_>) -> io::Result<()> {
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

/// Relays until one side ends, the client breaks the protocol, or shutdown asks the session
/// to close at its boundary.
pub async fn run(
    client: &mut TcpStream,
    backend: &mut TcpStream,
    t: &mut Tracker,
    shutdown: &Shutdown,
) -> Result<RelayEnd, SessionError> {
    let (mut client_rd, client_wr) = client.split();
    let (mut backend_rd, backend_wr) = backend.split();
    let mut up = Pipe::new();
    let mut down = Pipe::new();
    // Made once: each `cancelled()` future registers with the token shared by every session,
    // so re-creating them per iteration would lock that shared list on every round trip.
    let soft = shutdown.soft.cancelled();
    let hard = shutdown.hard.cancelled();
    tokio::pin!(soft, hard);
    // Asked once here; afterwards the pinned futures report it (is_cancelled takes a lock).
    let mut stopping = shutdown.soft.is_cancelled();
    let mut stop_now = shutdown.hard.is_cancelled();
    loop {
        if stop_now || (stopping && t.at_boundary() && up.buf.is_empty()) {
            t.publish_bytes();
            return Ok(RelayEnd::Shutdown);
        }
        up.make_room();
        down.make_room();
        tokio::select! {
            biased;
            _ = &mut hard => stop_now = true,
            _ = &mut soft, if !stopping => stopping = true,
            r = client_rd.read_buf(&mut up.buf), if up.ready == 0 => {
                let n = r.map_err(SessionError::ClientGone)?;
                if n == 0 {
                    return Ok(RelayEnd::ClientClosed);
                }
                t.count_up(n);
                let scanned = t.scan_frontend(&up.buf)?;
                up.ready = scanned.forward;
                if scanned.stopped.is_some() {
                    if let Err(e) = up.flush_all(&backend_wr).await {
                        return Ok(lost(e));
                    }
                    return Ok(RelayEnd::ClientTerminated);
                }
                if let Err(e) = up.flush_now(&backend_wr) {
                    return Ok(lost(e));
                }
            }
            r = backend_rd.read_buf(&mut down.buf), if down.ready == 0 => {
                let n = match r {
                    Ok(0) => return Ok(RelayEnd::BackendClosed("the node closed the connection".into())),
                    Ok(n) => n,
                    Err(e) => return Ok(lost(e)),
                };
                t.count_down(n);
                down.ready = t.scan_backend(&down.buf).forward;
                down.flush_now(&client_wr).map_err(SessionError::ClientGone)?;
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
