//! Backend connections: open a TCP connection to a node, send the session's startup
//! parameters, authenticate with graywire's own credentials (SCRAM-SHA-256, md5 or cleartext),
//! and collect what the node says before its first ReadyForQuery.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::SCRAM_SHA_256;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::cancel::CancelTarget;
use crate::config::{Credentials, NodeConfig};
use crate::error::BackendError;
use crate::protocol::message::{Parameters, TxStatus};
use crate::protocol::scram::{ClientKeyCache, ScramClient};
use crate::protocol::startup::CancelKey;
use crate::protocol::SqlState;
use crate::topology::NodeName;

/// An authenticated backend connection at its first transaction boundary.
pub struct BackendConn {
    pub stream: TcpStream,
    pub node: NodeName,
    /// The node's host, shared with the session's cancel target.
    pub host: Arc<str>,
    pub port: u16,
    /// The node's own key for this connection.
    pub key: CancelKey,
    /// ParameterStatus values the node reported, in order.
    pub parameters: Parameters,
    /// ParameterStatus and NoticeResponse messages to pass on to the client, as bytes.
    pub greeting: Bytes,
    pub status: TxStatus,
    /// Bytes read from the node after its first ReadyForQuery (normally none).
    pub leftover: BytesMut,
    /// `DISCARD ALL` was sent when the last session on this connection ended; its reply is
    /// still to be read (by the next session's set-up, so the reset costs nobody a wait).
    pub reset_sent: bool,
    /// ParameterStatus messages encoded for a greeting, with the stamp of the parameters they
    /// encode.
    greeting_cache: Option<(u64, Bytes)>,
}

impl BackendConn {
    /// Appends one ParameterStatus message per parameter, for the greeting of a session that
    /// takes this pooled connection. The encoding is kept with the stamp of the parameters it
    /// encodes and used again while the stamp is the same: sessions that come and go on one
    /// connection (churn) compare two numbers instead of encoding a dozen messages.
    pub fn parameter_messages(&mut self, out: &mut BytesMut) {
        if let Some((stamp, messages)) = &self.greeting_cache {
            if *stamp == self.parameters.stamp() {
                out.extend_from_slice(messages);
                return;
            }
        }
        let mut messages = BytesMut::with_capacity(32 * self.parameters.len());
        for (k, v) in self.parameters.iter() {
            crate::protocol::message::parameter_status(&mut messages, k, v);
        }
        out.extend_from_slice(&messages);
        self.greeting_cache = Some((self.parameters.stamp(), messages.freeze()));
    }

    pub fn cancel_target(&self) -> CancelTarget {
        CancelTarget {
            host: self.host.clone(),
            port: self.port,
            key: self.key,
        }
    }
}

/// [`startup_params`] as one string, `name NUL value NUL` each in order: what pools are keyed
/// by. Unambiguous, as neither can hold a NUL; one allocation, where owned pairs would take
/// two per parameter for every client connection.
pub fn startup_key(client_params: &[(String, String)], creds: &Credentials) -> Arc<[u8]> {
    let params = startup_params(client_params, creds);
    let len = params.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
    let mut key = Vec::with_capacity(len);
    for (k, v) in params {
        key.extend_from_slice(k.as_bytes());
        key.push(0);
        key.extend_from_slice(v.as_bytes());
        key.push(0);
    }
    key.into()
}

/// The length of the startup packet sent to a node whose parameters encode to `key` (see
/// [`startup_key`]): length word, protocol version, the parameters, the closing NUL.
pub fn startup_packet_len(key: &[u8]) -> usize {
    4 + 4 + key.len() + 1
}

/// Startup parameters as sent to the node: the client's, with graywire's user and an explicit
/// database (PostgreSQL would otherwise default it to the user name it sees, graywire's).
pub fn startup_params<'a>(
    client_params: &'a [(String, String)],
    creds: &'a Credentials,
) -> Vec<(&'a str, &'a str)> {
    let client_user = client_params
        .iter()
        .rfind(|(k, _)| k == "user")
        .map(|(_, v)| v.as_str())
        .unwrap_or_default();
    let mut out: Vec<(&str, &str)> = vec![("user", creds.user.as_str())];
    let mut has_database = false;
    for (k, v) in client_params {
        match k.as_str() {
            "user" => {}
            k if k.starts_with("_pq_.") => {}
            "database" => {
                has_database = true;
                out.push(("database", v));
            }
            _ => out.push((k.as_str(), v.as_str())),
        }
    }
    if !has_database {
        out.push(("database", client_user));
    }
    out
}

/// Connects and authenticates, bounded by `timeout` as a whole. SCRAM keys derived from
/// graywire's password are kept in `keys` for the next connection.
pub async fn connect(
    node: &NodeConfig,
    creds: &Credentials,
    client_params: &[(String, String)],
    timeout: Duration,
    keys: &ClientKeyCache,
) -> Result<BackendConn, BackendError> {
    let name = node.name.clone();
    match crate::timer::timeout(timeout, connect_inner(node, creds, client_params, keys)).await {
        Ok(r) => r,
        Err(_) => Err(BackendError::Timeout {
            node: name,
            timeout,
        }),
    }
}

async fn connect_inner(
    node: &NodeConfig,
    creds: &Credentials,
    client_params: &[(String, String)],
    keys: &ClientKeyCache,
) -> Result<BackendConn, BackendError> {
    let name = node.name.clone();
    let io_err = |source: std::io::Error| BackendError::Connect {
        node: name.clone(),
        source,
    };
    let proto = |detail: String| BackendError::Protocol {
        node: node.name.clone(),
        detail,
    };
    let mut stream = TcpStream::connect((node.host.as_str(), node.port))
        .await
        .map_err(io_err)?;
    stream.set_nodelay(true).map_err(io_err)?;

    let mut out = BytesMut::new();
    frontend::startup_message(startup_params(client_params, creds), &mut out)
        .map_err(|e| proto(format!("cannot encode startup message: {e}")))?;
    stream.write_all(&out).await.map_err(io_err)?;

    let password = creds.password.as_ref().map(|p| p.expose());
    let mut buf = BytesMut::with_capacity(8192);
    let mut greeting = BytesMut::new();
    let mut parameters = Parameters::default();
    let mut key = None;
    let mut scram: Option<ScramClient> = None;
    loop {
        let frame = read_frame(&mut stream, &mut buf).await.map_err(io_err)?;
        let raw = frame.clone();
        let msg = Message::parse(&mut BytesMut::from(&frame[..]))
            .map_err(|e| proto(format!("unparsable message: {e}")))?
            .ok_or_else(|| proto("truncated message".into()))?;
        let mut reply = BytesMut::new();
        match msg {
            Message::AuthenticationOk => {}
            Message::AuthenticationCleartextPassword => {
                let pw = password.ok_or_else(|| missing_password(node))?;
                frontend::password_message(pw.as_bytes(), &mut reply)
                    .map_err(|e| proto(e.to_string()))?;
            }
            Message::AuthenticationMd5Password(body) => {
                let pw = password.ok_or_else(|| missing_password(node))?;
                let hash = postgres_protocol::authentication::md5_hash(
                    creds.user.as_bytes(),
                    pw.as_bytes(),
                    body.salt(),
                );
                frontend::password_message(hash.as_bytes(), &mut reply)
                    .map_err(|e| proto(e.to_string()))?;
            }
            Message::AuthenticationSasl(body) => {
                password.ok_or_else(|| missing_password(node))?;
                let mut mechanisms = body.mechanisms();
                let mut found = false;
                while let Some(m) = mechanisms.next().map_err(|e| proto(e.to_string()))? {
                    found |= m == SCRAM_SHA_256;
                }
                if !found {
                    return Err(BackendError::UnsupportedAuth {
                        node: node.name.clone(),
                        method: "a SASL mechanism other than SCRAM-SHA-256".into(),
                    });
                }
                let s = ScramClient::new();
                frontend::sasl_initial_response(SCRAM_SHA_256, &s.client_first(), &mut reply)
                    .map_err(|e| proto(e.to_string()))?;
                scram = Some(s);
            }
            Message::AuthenticationSaslContinue(body) => {
                let s = scram
                    .as_mut()
                    .ok_or_else(|| proto("SASL continue without SASL".into()))?;
                let pw = password.ok_or_else(|| missing_password(node))?;
                let client_final = s
                    .server_first(body.data(), pw, keys)
                    .map_err(|e| proto(format!("SCRAM: {e}")))?;
                frontend::sasl_response(&client_final, &mut reply)
                    .map_err(|e| proto(e.to_string()))?;
            }
            Message::AuthenticationSaslFinal(body) => {
                let s = scram
                    .as_mut()
                    .ok_or_else(|| proto("SASL final without SASL".into()))?;
                s.server_final(body.data())
                    .map_err(|e| proto(format!("SCRAM server signature: {e}")))?;
            }
            Message::ParameterStatus(body) => {
                let k = body.name().map_err(|e| proto(e.to_string()))?;
                let v = body.value().map_err(|e| proto(e.to_string()))?;
                parameters.set(k, v);
                greeting.extend_from_slice(&raw);
            }
            Message::NoticeResponse(_) => greeting.extend_from_slice(&raw),
            Message::BackendKeyData(body) => {
                key = Some(CancelKey {
                    pid: body.process_id() as u32,
                    secret: body.secret_key() as u32,
                });
            }
            Message::ReadyForQuery(body) => {
                let status = TxStatus::from_byte(body.status())
                    .ok_or_else(|| proto("bad ReadyForQuery status".into()))?;
                let key =
                    key.ok_or_else(|| proto("no BackendKeyData before ReadyForQuery".into()))?;
                return Ok(BackendConn {
                    stream,
                    node: node.name.clone(),
                    host: Arc::from(node.host.as_str()),
                    port: node.port,
                    key,
                    parameters,
                    greeting: greeting.freeze(),
                    status,
                    leftover: std::mem::take(&mut buf),
                    reset_sent: false,
                    greeting_cache: None,
                });
            }
            Message::ErrorResponse(body) => {
                let mut sqlstate = SqlState::INTERNAL_ERROR;
                let mut message = String::new();
                let mut fields = body.fields();
                while let Ok(Some(f)) = fields.next() {
                    match f.type_() {
                        b'C' => {
                            sqlstate = SqlState::reported(&String::from_utf8_lossy(f.value_bytes()))
                        }
                        b'M' => message = String::from_utf8_lossy(f.value_bytes()).into_owned(),
                        _ => {}
                    }
                }
                return Err(BackendError::Refused {
                    node: node.name.clone(),
                    sqlstate,
                    message,
                    raw,
                });
            }
            Message::AuthenticationKerberosV5
            | Message::AuthenticationScmCredential
            | Message::AuthenticationGss
            | Message::AuthenticationSspi
            | Message::AuthenticationGssContinue(_) => {
                return Err(BackendError::UnsupportedAuth {
                    node: node.name.clone(),
                    method: "GSS/SSPI/Kerberos authentication".into(),
                })
            }
            _ => {
                return Err(proto(format!(
                    "unexpected message {:?} during startup",
                    raw[0] as char
                )))
            }
        }
        if !reply.is_empty() {
            stream.write_all(&reply).await.map_err(io_err)?;
        }
    }
}

fn missing_password(node: &NodeConfig) -> BackendError {
    BackendError::UnsupportedAuth {
        node: node.name.clone(),
        method: "a password, but none is configured for graywire".into(),
    }
}

/// Reads one whole message (tag, length, body) during startup.
async fn read_frame(stream: &mut TcpStream, buf: &mut BytesMut) -> std::io::Result<Bytes> {
    const MAX_STARTUP_MESSAGE: usize = 1 << 20;
    loop {
        if buf.len() >= 5 {
            let len = (&buf[1..5]).get_u32() as usize;
            if !(4..=MAX_STARTUP_MESSAGE).contains(&len) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("message length {len} during startup"),
                ));
            }
            if buf.len() > len {
                return Ok(buf.split_to(1 + len).freeze());
            }
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// What a node answered to requests graywire sent on its own behalf (never seen by a client).
#[derive(Debug, Default)]
pub struct Exchange {
    /// DataRow values as text, in order.
    pub rows: Vec<Vec<Option<String>>>,
    /// ErrorResponses: (SQLSTATE, message).
    pub errors: Vec<(SqlState, String)>,
    /// ParameterStatus values the node reported meanwhile.
    pub parameters: Vec<(String, String)>,
    /// NotificationResponse messages that arrived meanwhile, to pass on to the client.
    pub notifications: BytesMut,
}

/// Sends `request` (whole messages, ending in `ready_count` Syncs or Queries) and reads until
/// that many ReadyForQuery. `buf` holds bytes already read from the node and keeps any that
/// follow the last ReadyForQuery.
pub async fn exchange(
    node: &NodeName,
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    request: &[u8],
    ready_count: usize,
    timeout: Duration,
) -> Result<Exchange, BackendError> {
    let io_err = |source: std::io::Error| BackendError::Connect {
        node: node.clone(),
        source,
    };
    let work = async {
        stream.write_all(request).await.map_err(io_err)?;
        let mut out = Exchange::default();
        let mut ready = 0;
        while ready < ready_count {
            let frame = read_frame(stream, buf).await.map_err(io_err)?;
            let body = &frame[5..];
            match frame[0] {
                b'Z' => ready += 1,
                b'D' => out
                    .rows
                    .push(data_row(body).ok_or_else(|| BackendError::Protocol {
                        node: node.clone(),
                        detail: "malformed DataRow".into(),
                    })?),
                b'E' => out.errors.push(error_fields(body)),
                b'S' => {
                    if let Some((k, rest)) = crate::protocol::frame::read_cstr(body) {
                        if let Some((v, _)) = crate::protocol::frame::read_cstr(rest) {
                            out.parameters.push((k.to_owned(), v.to_owned()));
                        }
                    }
                }
                b'A' => out.notifications.extend_from_slice(&frame),
                _ => {}
            }
        }
        Ok(out)
    };
    match crate::timer::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(BackendError::Timeout {
            node: node.clone(),
            timeout,
        }),
    }
}

fn data_row(mut body: &[u8]) -> Option<Vec<Option<String>>> {
    if body.len() < 2 {
        return None;
    }
    let n = body.get_u16();
    let mut row = Vec::with_capacity(n as usize);
    for _ in 0..n {
        if body.len() < 4 {
            return None;
        }
        let len = body.get_i32();
        if len < 0 {
            row.push(None);
            continue;
        }
        let len = len as usize;
        if body.len() < len {
            return None;
        }
        row.push(Some(String::from_utf8_lossy(&body[..len]).into_owned()));
        body.advance(len);
    }
    Some(row)
}

/// (SQLSTATE, message) of an ErrorResponse body.
pub fn error_fields(mut body: &[u8]) -> (SqlState, String) {
    let (mut code, mut message) = (SqlState::INTERNAL_ERROR, String::new());
    while let Some((&field, rest)) = body.split_first() {
        if field == 0 {
            break;
        }
        let Some((value, rest)) = crate::protocol::frame::read_cstr(rest) else {
            break;
        };
        match field {
            b'C' => code = SqlState::reported(value),
            b'M' => message = value.to_owned(),
            _ => {}
        }
        body = rest;
    }
    (code, message)
}

/// Ends a backend connection politely: Terminate, then close.
pub async fn terminate(mut stream: TcpStream) {
    let mut out = BytesMut::new();
    frontend::terminate(&mut out);
    let _ = crate::timer::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(&out).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::Secret;

    /// A connection to a loopback listener, with the given parameters.
    async fn conn_with(parameters: &[(&str, &str)]) -> (BackendConn, tokio::net::TcpListener) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let conn = BackendConn {
            stream,
            node: NodeName::new("pg0"),
            host: "127.0.0.1".into(),
            port: 5432,
            key: CancelKey { pid: 1, secret: 2 },
            parameters: {
                let mut p = Parameters::default();
                for (k, v) in parameters {
                    p.set(k, v);
                }
                p
            },
            greeting: Bytes::new(),
            status: TxStatus::Idle,
            leftover: BytesMut::new(),
            reset_sent: false,
            greeting_cache: None,
        };
        (conn, listener)
    }

    fn encoded(parameters: &[(&str, &str)]) -> BytesMut {
        let mut out = BytesMut::new();
        for (k, v) in parameters {
            crate::protocol::message::parameter_status(&mut out, k, v);
        }
        out
    }

    #[tokio::test]
    async fn greeting_messages_follow_every_change_of_the_parameters() {
        let first = [("application_name", "a"), ("DateStyle", "ISO, MDY")];
        let (mut conn, _listener) = conn_with(&first).await;
        for _ in 0..2 {
            let mut out = BytesMut::from(&b"R"[..]);
            conn.parameter_messages(&mut out);
            assert_eq!(&out[1..], &encoded(&first)[..]);
            assert_eq!(out[0], b'R', "appended, not replaced");
        }
        // A session changed a value (same length), then another added one.
        conn.parameters.set("application_name", "b");
        let mut out = BytesMut::new();
        conn.parameter_messages(&mut out);
        assert_eq!(
            out,
            encoded(&[("application_name", "b"), ("DateStyle", "ISO, MDY")])
        );
        conn.parameters.set("TimeZone", "UTC");
        let mut out = BytesMut::new();
        conn.parameter_messages(&mut out);
        assert_eq!(
            out,
            encoded(&[
                ("application_name", "b"),
                ("DateStyle", "ISO, MDY"),
                ("TimeZone", "UTC")
            ])
        );
    }

    #[test]
    fn startup_params_use_graywire_user_and_keep_the_rest() {
        let creds = Credentials {
            user: "graywire".into(),
            password: Some(Secret::new("x")),
        };
        let client = vec![
            ("user".to_string(), "app".to_string()),
            ("options".to_string(), "-c work_mem=8MB".to_string()),
            ("_pq_.thing".to_string(), "1".to_string()),
        ];
        let p = startup_params(&client, &creds);
        assert_eq!(
            p,
            vec![
                ("user", "graywire"),
                ("options", "-c work_mem=8MB"),
                ("database", "app")
            ]
        );
        let mut with_db = client.clone();
        with_db.push(("database".into(), "shop".into()));
        let p = startup_params(&with_db, &creds);
        assert!(p.contains(&("database", "shop")));
        assert!(!p.contains(&("database", "app")));
    }

    #[test]
    fn the_pool_key_is_the_node_parameters_in_order_and_tells_every_split_apart() {
        let creds = Credentials {
            user: "graywire".into(),
            password: None,
        };
        let pairs = |list: &[(&str, &str)]| -> Vec<(String, String)> {
            list.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let client = pairs(&[("user", "app"), ("application_name", "ab")]);
        assert_eq!(
            &*startup_key(&client, &creds),
            b"user\0graywire\0application_name\0ab\0database\0app\0".as_slice()
        );
        // The same parameters give the same key; a value split differently does not.
        assert_eq!(
            startup_key(&client, &creds),
            startup_key(&client.clone(), &creds)
        );
        let shifted = pairs(&[("user", "app"), ("application_namea", "b")]);
        assert_ne!(startup_key(&client, &creds), startup_key(&shifted, &creds));
        let reordered = pairs(&[("application_name", "ab"), ("user", "app")]);
        assert_eq!(
            startup_key(&reordered, &creds),
            startup_key(&client, &creds),
            "the client's user is replaced wherever it came"
        );
    }
}
