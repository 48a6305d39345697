//! A raw PostgreSQL v3 protocol client for tests: sees every message (ParameterStatus,
//! NoticeResponse, the ReadyForQuery status) and can send bytes no driver would.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// One backend message.
#[derive(Debug, Clone)]
pub struct Msg {
    pub tag: u8,
    pub body: Vec<u8>,
}

impl Msg {
    /// Fields of an ErrorResponse or NoticeResponse by their code letter.
    pub fn fields(&self) -> HashMap<char, String> {
        let mut out = HashMap::new();
        let mut b = &self.body[..];
        while let Some((&code, rest)) = b.split_first() {
            if code == 0 {
                break;
            }
            let end = rest.iter().position(|&c| c == 0).unwrap_or(rest.len());
            out.insert(
                code as char,
                String::from_utf8_lossy(&rest[..end]).into_owned(),
            );
            b = rest.get(end + 1..).unwrap_or(&[]);
        }
        out
    }

    pub fn sqlstate(&self) -> String {
        self.fields().get(&'C').cloned().unwrap_or_default()
    }
}

/// Builds a tagged message.
pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// Builds a v3.0 StartupMessage.
pub fn startup_packet(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut v = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    v.extend_from_slice(&body);
    v
}

/// The result of one simple-protocol query.
#[derive(Debug, Default)]
pub struct QueryResult {
    pub rows: Vec<Vec<Option<String>>>,
    pub errors: Vec<Msg>,
    pub notices: Vec<Msg>,
    pub status: u8,
    pub all: Vec<Msg>,
}

pub struct RawClient {
    pub stream: TcpStream,
    buf: BytesMut,
    /// ParameterStatus values seen so far.
    pub parameters: HashMap<String, String>,
    /// BackendKeyData (pid, secret).
    pub key: Option<(u32, u32)>,
}

impl RawClient {
    /// Opens a TCP connection without sending anything.
    pub async fn open(addr: SocketAddr) -> RawClient {
        let stream = TcpStream::connect(addr).await.expect("connect");
        RawClient {
            stream,
            buf: BytesMut::new(),
            parameters: HashMap::new(),
            key: None,
        }
    }

    /// Connects as a trust user with extra startup parameters; returns the client after the
    /// first ReadyForQuery, or the ErrorResponse that refused it.
    pub async fn connect_trust(
        addr: SocketAddr,
        user: &str,
        extra: &[(&str, &str)],
    ) -> Result<RawClient, Msg> {
        let mut c = Self::open(addr).await;
        let mut params = vec![("user", user), ("database", "postgres")];
        params.extend_from_slice(extra);
        c.send(&startup_packet(&params)).await;
        loop {
            let m = c.read().await.expect("startup answer");
            match m.tag {
                b'E' => return Err(m),
                b'Z' => return Ok(c),
                _ => {}
            }
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    /// Sends a message; a write error (the server already closed) is ignored.
    pub async fn send_lenient(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    /// Reads one message; `None` on EOF or reset. Panics if nothing comes within a minute.
    pub async fn read(&mut self) -> Option<Msg> {
        loop {
            if self.buf.len() >= 5 {
                let len = (&self.buf[1..5]).get_u32() as usize;
                if self.buf.len() > len {
                    let frame = self.buf.split_to(1 + len);
                    let m = Msg {
                        tag: frame[0],
                        body: frame[5..].to_vec(),
                    };
                    self.note(&m);
                    return Some(m);
                }
            }
            let n = tokio::time::timeout(READ_TIMEOUT, self.stream.read_buf(&mut self.buf))
                .await
                .expect("server answers within a minute");
            match n {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    fn note(&mut self, m: &Msg) {
        match m.tag {
            b'S' => {
                let parts: Vec<&[u8]> = m.body.split(|&b| b == 0).collect();
                if parts.len() >= 2 {
                    self.parameters.insert(
                        String::from_utf8_lossy(parts[0]).into_owned(),
                        String::from_utf8_lossy(parts[1]).into_owned(),
                    );
                }
            }
            b'K' if m.body.len() == 8 => {
                let mut b = &m.body[..];
                self.key = Some((b.get_u32(), b.get_u32()));
            }
            _ => {}
        }
    }

    /// Reads until ReadyForQuery (or EOF), collecting what came.
    pub async fn until_ready(&mut self) -> QueryResult {
        let mut r = QueryResult::default();
        while let Some(m) = self.read().await {
            match m.tag {
                b'D' => r.rows.push(parse_data_row(&m.body)),
                b'E' => r.errors.push(m.clone()),
                b'N' => r.notices.push(m.clone()),
                b'Z' => {
                    r.status = m.body[0];
                    r.all.push(m);
                    return r;
                }
                _ => {}
            }
            r.all.push(m);
        }
        r
    }

    /// Runs one simple-protocol query.
    pub async fn query(&mut self, sql: &str) -> QueryResult {
        let mut body = sql.as_bytes().to_vec();
        body.push(0);
        self.send(&message(b'Q', &body)).await;
        self.until_ready().await
    }
}

fn parse_data_row(body: &[u8]) -> Vec<Option<String>> {
    let mut b = body;
    let n = b.get_u16();
    let mut row = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let len = b.get_i32();
        if len < 0 {
            row.push(None);
        } else {
            let (v, rest) = b.split_at(len as usize);
            row.push(Some(String::from_utf8_lossy(v).into_owned()));
            b = rest;
        }
    }
    row
}
