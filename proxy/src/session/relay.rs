//! The message pump between a client and its backend connection.
//!
//! Bytes move in large batches: one read fills a buffer with as many messages as have arrived,
//! the [`Framer`] finds their boundaries (and shows graywire the few it must see), and the
//! whole scanned run goes out in one write. Each direction has its own buffer and waits only on
//! its own sockets, so a slow reader on one side never stalls the other direction.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::AsyncWrite;
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use super::signals::{self, BoundaryWatch, Gate, Signal, SignalSet};
use super::tap::Tap;
use super::tracker::Tracker;
use crate::error::SessionError;
use crate::shutdown::Shutdown;
use tokio_util::io::poll_read_buf;

/// A pipe starts with room for this much: plenty for the requests and replies of most
/// sessions, and cheap to set up for the short ones (connection churn).
const FIRST_CHUNK: usize = 8 * 1024;
/// Once a read fills all the room it had, the pipe grows by this much at a time, so bulk
/// transfers (COPY, large results) move in large reads.
const LARGE_CHUNK: usize = 64 * 1024;

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

/// One direction's bytes: `buf[..ready]` is scanned and waits to be written; bytes after it
/// are not scanned yet.
pub struct Pipe {
    pub buf: BytesMut,
    pub ready: usize,
    /// How much room a read should have: [`FIRST_CHUNK`], or [`LARGE_CHUNK`] once the traffic
    /// has shown it is bulk.
    chunk: usize,
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
            buf: BytesMut::with_capacity(FIRST_CHUNK),
            ready: 0,
            chunk: FIRST_CHUNK,
        }
    }

    /// Makes sure the next read has room: reclaims the consumed front of the buffer if it
    /// can, allocates otherwise.
    pub fn make_room(&mut self) {
        if self.buf.capacity() - self.buf.len() < self.chunk / 8 {
            self.buf.reserve(self.chunk);
        }
    }

    /// Called after a read: a read that filled all the room means more was waiting, so
    /// later reads get large chunks.
    fn after_read(&mut self) {
        if self.buf.len() == self.buf.capacity() {
            self.chunk = LARGE_CHUNK;
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

    /// Writes ready bytes that are waiting for room in the socket. `Pending` while some
    /// still wait; `Ready(Ok)` once they are all written.
    fn poll_flush(&mut self, cx: &mut Context<'_>, w: &mut WriteHalf<'_>) -> Poll<io::Result<()>> {
        while self.ready > 0 {
            match Pin::new(&mut *w).poll_write(cx, &self.buf[..self.ready]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.buf.advance(n);
                    self.ready -= n;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
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

/// Why passing bytes on stopped the relay; [`Stop::finish`] ends it.
enum Stop {
    /// The client sent Terminate: the bytes before it still go to the node.
    ClientTerminated,
    /// The node said it is going away (FATAL withheld): the bytes before it still go to the
    /// client.
    NodeLeaving,
    /// Writing to the node failed.
    NodeLost(io::Error),
}

impl Stop {
    async fn finish(
        self,
        t: &Tracker,
        up: &mut Pipe,
        down: &mut Pipe,
        client_wr: &WriteHalf<'_>,
        backend_wr: &WriteHalf<'_>,
    ) -> Result<RelayEnd, SessionError> {
        match self {
            Stop::ClientTerminated => Ok(match up.flush_all(backend_wr).await {
                Ok(()) => RelayEnd::ClientTerminated,
                Err(e) => lost(e),
            }),
            Stop::NodeLeaving => {
                // Deliver everything before the withheld FATAL, drop it and whatever follows.
                down.flush_all(client_wr)
                    .await
                    .map_err(SessionError::ClientGone)?;
                down.buf.clear();
                let why = t
                    .withheld_fatal
                    .as_ref()
                    .map(|f| f.reason())
                    .unwrap_or_else(|| "the node is shutting down".into());
                Ok(RelayEnd::BackendClosed(why))
            }
            Stop::NodeLost(e) => Ok(lost(e)),
        }
    }
}

/// Scans client bytes waiting in the up pipe and sends what the socket takes now, without
/// waiting (the relay's poll writes the rest). Not async: it runs on every request.
fn pass_client_bytes(
    t: &mut Tracker,
    up: &mut Pipe,
    backend_wr: &WriteHalf<'_>,
) -> Result<Option<Stop>, SessionError> {
    let scanned = t.scan_frontend(&up.buf)?;
    up.ready = scanned.forward;
    if scanned.stopped.is_some() {
        return Ok(Some(Stop::ClientTerminated));
    }
    Ok(up.flush_now(backend_wr).err().map(Stop::NodeLost))
}

/// Scans node bytes waiting in the down pipe and sends what the socket takes now, without
/// waiting. Not async: it runs on every reply.
fn pass_node_bytes(
    t: &mut Tracker,
    down: &mut Pipe,
    client_wr: &WriteHalf<'_>,
) -> Result<Option<Stop>, SessionError> {
    let scanned = t.scan_backend(&down.buf);
    down.ready = scanned.forward;
    if let Some((_, advertised)) = t.pid_rewrite {
        for at in t.pid_patches.drain(..) {
            down.buf[at..at + 4].copy_from_slice(&advertised.to_be_bytes());
        }
    }
    if scanned.stopped.is_some() {
        return Ok(Some(Stop::NodeLeaving));
    }
    down.flush_now(client_wr)
        .map_err(SessionError::ClientGone)?;
    Ok(None)
}

/// What the relay's wait ended on.
enum Woke {
    /// A signal ran: what it raised is in the relay's [`SignalSet`].
    Signal,
    /// Ready bytes that had to wait for room in a socket are all written now.
    Flushed,
    ClientRead(io::Result<usize>),
    NodeRead(io::Result<usize>),
    NodeWriteFailed(io::Error),
    ClientWriteFailed(io::Error),
}

/// One [`Tap`] per socket direction the relay waits on.
#[derive(Default)]
struct Taps {
    client_read: Tap,
    node_read: Tap,
    client_write: Tap,
    node_write: Tap,
}

/// Waits for the relay's next event: signals first, then writes of bytes that waited for room,
/// then reads into a pipe that has nothing waiting. Each source is polled only when the relay
/// can act on it now and its tap says it has something (see [`Tap`]): the relay runs twice per
/// round trip, and polling the sources that did not wake it was most of its work.
fn poll_next<F: std::future::Future>(
    cx: &mut Context<'_>,
    gate: &mut Gate<'_, F>,
    taps: &mut Taps,
    [client_rd, backend_rd]: [&mut ReadHalf<'_>; 2],
    [backend_wr, client_wr]: [&mut WriteHalf<'_>; 2],
    up: &mut Pipe,
    down: &mut Pipe,
) -> Poll<Woke> {
    if gate.poll_woken(cx).is_ready() {
        return Poll::Ready(Woke::Signal);
    }
    if up.ready > 0 {
        if let Poll::Ready(r) = taps.node_write.poll(cx, |cx| up.poll_flush(cx, backend_wr)) {
            return Poll::Ready(r.map_or_else(Woke::NodeWriteFailed, |()| Woke::Flushed));
        }
    }
    if down.ready > 0 {
        if let Poll::Ready(r) = taps
            .client_write
            .poll(cx, |cx| down.poll_flush(cx, client_wr))
        {
            return Poll::Ready(r.map_or_else(Woke::ClientWriteFailed, |()| Woke::Flushed));
        }
    }
    if up.ready == 0 {
        let read = |cx: &mut Context<'_>| poll_read_buf(Pin::new(&mut *client_rd), cx, &mut up.buf);
        if let Poll::Ready(r) = taps.client_read.poll(cx, read) {
            return Poll::Ready(Woke::ClientRead(r));
        }
    }
    if down.ready == 0 {
        let read =
            |cx: &mut Context<'_>| poll_read_buf(Pin::new(&mut *backend_rd), cx, &mut down.buf);
        if let Poll::Ready(r) = taps.node_read.poll(cx, read) {
            return Poll::Ready(Woke::NodeRead(r));
        }
    }
    Poll::Pending
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
    let (mut client_rd, mut client_wr) = client.split();
    let (mut backend_rd, mut backend_wr) = backend.split();
    let Pipes { up, down } = pipes;
    let hold_requests = watch.hold_requests;
    let pooled = watch.pool.is_some();
    let set = SignalSet::default();
    let signals = signals::watch(shutdown, watch, &set);
    tokio::pin!(signals);
    let mut gate = Gate::new(signals.as_mut());
    let mut taps = Taps::default();
    // Registers with every source and raises what has already happened.
    gate.poll_now().await;

    // A boundary at which the session has something to decide before the next request.
    let must_decide = |t: &Tracker| {
        t.at_boundary()
            && (set.has(Signal::TopologyChanged)
                || set.has(Signal::RecheckDue)
                || t.settings_dirty
                || (pooled && t.maybe_pinned))
    };
    let holding = |t: &Tracker| must_decide(t) || (hold_requests && t.at_boundary());

    // Bytes left from before (the client's next request, or the node's after a hand-over).
    if !down.buf.is_empty() && down.ready == 0 {
        if let Some(stop) = pass_node_bytes(t, down, &client_wr)? {
            return stop.finish(t, up, down, &client_wr, &backend_wr).await;
        }
    }
    if !up.buf.is_empty() && up.ready == 0 && !holding(t) {
        if let Some(stop) = pass_client_bytes(t, up, &backend_wr)? {
            return stop.finish(t, up, down, &client_wr, &backend_wr).await;
        }
    }
    loop {
        if set.has(Signal::Evicted) {
            t.publish();
            return Ok(RelayEnd::Evicted);
        }
        if set.has(Signal::HardStop)
            || (set.has(Signal::SoftStop) && t.at_boundary() && up.buf.is_empty())
        {
            t.publish();
            return Ok(RelayEnd::Shutdown);
        }
        if up.ready == 0
            && (must_decide(t)
                || (t.at_boundary() && hold_requests && !up.buf.is_empty())
                || (t.at_boundary()
                    && set.has(Signal::Wanted)
                    && up.buf.is_empty()
                    && down.buf.is_empty()))
        {
            t.publish();
            return Ok(RelayEnd::Boundary);
        }
        up.make_room();
        down.make_room();
        let woke = std::future::poll_fn(|cx| {
            poll_next(
                cx,
                &mut gate,
                &mut taps,
                [&mut client_rd, &mut backend_rd],
                [&mut backend_wr, &mut client_wr],
                up,
                down,
            )
        })
        .await;
        match woke {
            // A signal ran, or a stalled write finished: the checks above decide.
            Woke::Signal | Woke::Flushed => {}
            Woke::NodeWriteFailed(e) => return Ok(lost(e)),
            Woke::ClientWriteFailed(e) => return Err(SessionError::ClientGone(e)),
            Woke::ClientRead(r) => {
                let n = r.map_err(SessionError::ClientGone)?;
                if n == 0 {
                    return Ok(RelayEnd::ClientClosed);
                }
                t.count_up(n);
                up.after_read();
                if holding(t) {
                    // Decided at the top of the loop: these bytes wait in the pipe.
                    continue;
                }
                if let Some(stop) = pass_client_bytes(t, up, &backend_wr)? {
                    return stop.finish(t, up, down, &client_wr, &backend_wr).await;
                }
            }
            Woke::NodeRead(r) => {
                let n = match r {
                    Ok(0) => {
                        return Ok(RelayEnd::BackendClosed(
                            "the node closed the connection".into(),
                        ))
                    }
                    Ok(n) => n,
                    Err(e) => return Ok(lost(e)),
                };
                t.count_down(n);
                down.after_read();
                if let Some(stop) = pass_node_bytes(t, down, &client_wr)? {
                    return stop.finish(t, up, down, &client_wr, &backend_wr).await;
                }
            }
        }
    }
}
