//! Answering the client while the session has no backend connection: graywire speaks for the
//! node for exactly one request (a Query, or extended-protocol messages up to their Sync).
//!
//! Three cases need it: a request that waited for a node in vain (57P03), the rest of an
//! extended-protocol batch whose backend died (skip to Sync), and a transaction whose backend
//! died (status `E`): as PostgreSQL does, graywire refuses everything with 25P02 until the
//! client ends the transaction, and answers its ROLLBACK itself.

use std::collections::HashMap;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::{RequestError, SessionError};
use crate::protocol::frame::{check_frontend_header, read_cstr, HEADER_LEN};
use crate::protocol::message::{self, TxStatus};
use crate::protocol::sqltext::{leading_command, Command};

use super::relay::Pipe;
use super::tracker::{Statement, Tracker};

/// How to answer the one request.
#[derive(Debug)]
pub enum Answer {
    /// Refuse it with this error; the transaction status stays as it is.
    Refuse(RequestError),
    /// The failed transaction of a dead backend: only its end is accepted. With an error, the
    /// client has not been told yet: its first request other than ROLLBACK (COMMIT included)
    /// gets that error rather than 25P02.
    Aborted(Option<RequestError>),
    /// An ErrorResponse was already sent; ignore messages until Sync, then ReadyForQuery.
    SkipToSync,
}

/// How the request ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Answered through its ReadyForQuery.
    Answered,
    ClientClosed,
    ClientTerminated,
}

/// Reads the client's next request from `up` (and the socket) and answers it per `answer`.
/// Updates the tracker's status (and the statements the client defines meanwhile).
pub async fn answer_request(
    client: &mut TcpStream,
    up: &mut Pipe,
    t: &mut Tracker,
    max_message_size: usize,
    answer: Answer,
) -> Result<Outcome, SessionError> {
    let mut out = BytesMut::new();
    // Extended protocol: an error was sent and messages are ignored up to Sync.
    let mut skipping = matches!(answer, Answer::SkipToSync);
    // What unnamed/named statements and portals of this request do (for ROLLBACK).
    let mut statements: HashMap<String, Command> = HashMap::new();
    let mut portals: HashMap<String, Command> = HashMap::new();
    let mut ends_transaction = false;
    let mut answer = answer;
    loop {
        // The rest of a message the client was sending when its backend died.
        let skipped = t.frontend.skip_body(up.buf.len());
        up.buf.advance(skipped);
        let Some(msg) = next_message(client, up, max_message_size).await? else {
            return Ok(Outcome::ClientClosed);
        };
        let tag = msg[0];
        let body = &msg[HEADER_LEN..];
        match tag {
            b'X' => return Ok(Outcome::ClientTerminated),
            b'Q' => {
                match &answer {
                    Answer::Refuse(e) => e.write_response(&mut out),
                    Answer::Aborted(notice) => match (leading_command(body), notice) {
                        (Command::Rollback, _) | (Command::Commit, None) => {
                            message::command_complete(&mut out, "ROLLBACK");
                            t.status = TxStatus::Idle;
                        }
                        (Command::Commit, Some(e)) => {
                            e.write_response(&mut out);
                            t.status = TxStatus::Idle;
                        }
                        (_, Some(e)) => e.write_response(&mut out),
                        (_, None) => RequestError::InFailedTransaction.write_response(&mut out),
                    },
                    Answer::SkipToSync => {}
                }
                message::ready_for_query(&mut out, t.status);
                break;
            }
            b'S' => {
                if ends_transaction && !skipping {
                    t.status = TxStatus::Idle;
                }
                message::ready_for_query(&mut out, t.status);
                break;
            }
            b'F' => {
                if !skipping {
                    refuse(&mut answer, &mut out);
                }
                message::ready_for_query(&mut out, t.status);
                break;
            }
            _ if skipping => {}
            b'P' => {
                let (name, rest) = read_cstr(body).ok_or_else(|| malformed("Parse"))?;
                let command = leading_command(rest);
                if !name.is_empty() {
                    t.statements.insert(
                        name.to_owned(),
                        Statement {
                            parse: msg.clone().freeze(),
                            command,
                        },
                    );
                }
                if accepts(&answer, command) {
                    statements.insert(name.to_owned(), command);
                    message::parse_complete(&mut out);
                } else {
                    skipping = refuse(&mut answer, &mut out);
                }
            }
            b'B' => {
                let (portal, rest) = read_cstr(body).ok_or_else(|| malformed("Bind"))?;
                let (statement, _) = read_cstr(rest).ok_or_else(|| malformed("Bind"))?;
                let command = statements
                    .get(statement)
                    .copied()
                    .or_else(|| t.statements.get(statement).map(|s| s.command))
                    .unwrap_or(Command::Other);
                if accepts(&answer, command) {
                    portals.insert(portal.to_owned(), command);
                    message::bind_complete(&mut out);
                } else {
                    skipping = refuse(&mut answer, &mut out);
                }
            }
            b'D' => {
                let kind = body.first().copied();
                let (name, _) = read_cstr(body.get(1..).unwrap_or_default())
                    .ok_or_else(|| malformed("Describe"))?;
                let known = match kind {
                    Some(b'S') => statements.contains_key(name),
                    _ => portals.contains_key(name),
                };
                if known && !matches!(answer, Answer::Refuse(_)) {
                    if kind == Some(b'S') {
                        message::parameter_description_none(&mut out);
                    }
                    message::no_data(&mut out);
                } else {
                    skipping = refuse(&mut answer, &mut out);
                }
            }
            b'E' => {
                let (portal, _) = read_cstr(body).ok_or_else(|| malformed("Execute"))?;
                match portals.get(portal) {
                    Some(c) if accepts(&answer, *c) => {
                        message::command_complete(&mut out, "ROLLBACK");
                        ends_transaction = true;
                    }
                    _ => skipping = refuse(&mut answer, &mut out),
                }
            }
            b'C' => message::close_complete(&mut out),
            // Flush, and COPY messages outside a COPY: nothing to answer.
            _ => {}
        }
    }
    client
        .write_all(&out)
        .await
        .map_err(SessionError::ClientGone)?;
    Ok(Outcome::Answered)
}

/// In the failed transaction only the statements that end it are accepted (COMMIT only once
/// the client knows the transaction failed).
fn accepts(answer: &Answer, command: Command) -> bool {
    match answer {
        Answer::Aborted(None) => matches!(command, Command::Rollback | Command::Commit),
        Answer::Aborted(Some(_)) => command == Command::Rollback,
        _ => false,
    }
}

/// Writes the request's error; messages up to Sync are then ignored. A pending notice is
/// given once; afterwards the failed transaction refuses with 25P02.
fn refuse(answer: &mut Answer, out: &mut BytesMut) -> bool {
    match answer {
        Answer::Refuse(e) => e.write_response(out),
        Answer::Aborted(notice) => match notice.take() {
            Some(e) => e.write_response(out),
            None => RequestError::InFailedTransaction.write_response(out),
        },
        Answer::SkipToSync => RequestError::InFailedTransaction.write_response(out),
    }
    true
}

fn malformed(what: &str) -> SessionError {
    SessionError::Protocol(format!("malformed {what} message"))
}

/// The next whole message from the client (reading as needed); `None` at EOF.
async fn next_message(
    client: &mut TcpStream,
    up: &mut Pipe,
    max_message_size: usize,
) -> Result<Option<BytesMut>, SessionError> {
    loop {
        if up.buf.len() >= HEADER_LEN {
            let tag = up.buf[0];
            let len = u32::from_be_bytes([up.buf[1], up.buf[2], up.buf[3], up.buf[4]]) as usize;
            check_frontend_header(tag, len, max_message_size)?;
            if up.buf.len() > len {
                return Ok(Some(up.buf.split_to(1 + len)));
            }
            up.buf.reserve(1 + len - up.buf.len());
        } else {
            up.buf.reserve(4096);
        }
        let n = client
            .read_buf(&mut up.buf)
            .await
            .map_err(SessionError::ClientGone)?;
        if n == 0 {
            return Ok(None);
        }
    }
}
