//! The backend messages graywire writes to clients itself (everything else is relayed as bytes),
//! and [`Parameters`], the node's ParameterStatus values it replays in greetings.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{BufMut, BytesMut};

use super::SqlState;

/// Transaction status byte of ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    /// `I`: not in a transaction block (a transaction boundary).
    Idle,
    /// `T`: inside a transaction block.
    InTransaction,
    /// `E`: inside a failed transaction block.
    Failed,
}

impl TxStatus {
    pub fn from_byte(b: u8) -> Option<TxStatus> {
        match b {
            b'I' => Some(TxStatus::Idle),
            b'T' => Some(TxStatus::InTransaction),
            b'E' => Some(TxStatus::Failed),
            _ => None,
        }
    }

    pub fn byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InTransaction => b'T',
            TxStatus::Failed => b'E',
        }
    }
}

/// Severity of an ErrorResponse graywire writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The statement failed; the session goes on.
    Error,
    /// The session ends after this message.
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// Writes one message: tag, length (which counts itself), body.
fn put_message(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let len_at = out.len();
    out.put_u32(0);
    body(out);
    let len = (out.len() - len_at) as u32;
    out[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(out: &mut BytesMut, s: &str) {
    // A NUL inside a value would end it early on the client's side; PostgreSQL never sends one.
    let bytes = s.as_bytes();
    if bytes.contains(&0) {
        for part in bytes.split(|&b| b == 0) {
            out.put_slice(part);
        }
    } else {
        out.put_slice(bytes);
    }
    out.put_u8(0);
}

pub fn authentication_ok(out: &mut BytesMut) {
    put_message(out, b'R', |b| b.put_u32(0));
}

pub fn authentication_cleartext_password(out: &mut BytesMut) {
    put_message(out, b'R', |b| b.put_u32(3));
}

pub fn authentication_md5_password(out: &mut BytesMut, salt: [u8; 4]) {
    put_message(out, b'R', |b| {
        b.put_u32(5);
        b.put_slice(&salt);
    });
}

pub fn authentication_sasl(out: &mut BytesMut, mechanisms: &[&str]) {
    put_message(out, b'R', |b| {
        b.put_u32(10);
        for m in mechanisms {
            put_cstr(b, m);
        }
        b.put_u8(0);
    });
}

pub fn authentication_sasl_continue(out: &mut BytesMut, data: &[u8]) {
    put_message(out, b'R', |b| {
        b.put_u32(11);
        b.put_slice(data);
    });
}

pub fn authentication_sasl_final(out: &mut BytesMut, data: &[u8]) {
    put_message(out, b'R', |b| {
        b.put_u32(12);
        b.put_slice(data);
    });
}

/// The parameters a node reported (ParameterStatus), in the order they were first reported.
///
/// Every change takes a new stamp from a process-wide counter, so two lists with the same
/// stamp hold the same values. A pooled connection's greeting is encoded once and reused while
/// the stamp is unchanged: comparing stamps replaces comparing a dozen names and values on
/// every client connection.
#[derive(Clone, Debug, Default)]
pub struct Parameters {
    list: Vec<(String, String)>,
    stamp: u64,
}

static NEXT_STAMP: AtomicU64 = AtomicU64::new(1);

impl Parameters {
    /// Sets `name` to `value`, adding it if new.
    pub fn set(&mut self, name: &str, value: &str) {
        match self.list.iter_mut().find(|(k, _)| k == name) {
            Some((_, v)) if v == value => return,
            Some((_, v)) => *v = value.to_owned(),
            None => self.list.push((name.to_owned(), value.to_owned())),
        }
        self.stamp = NEXT_STAMP.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.list
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.list.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Equal stamps mean equal parameters (see the type's documentation).
    pub fn stamp(&self) -> u64 {
        self.stamp
    }
}

pub fn parameter_status(out: &mut BytesMut, name: &str, value: &str) {
    // A greeting holds a dozen of these per client connection: the common case (no NUL) is
    // written with one reservation.
    let has_nul = |s: &str| s.bytes().any(|b| b == 0);
    if has_nul(name) || has_nul(value) {
        put_message(out, b'S', |b| {
            put_cstr(b, name);
            put_cstr(b, value);
        });
        return;
    }
    let (name, value) = (name.as_bytes(), value.as_bytes());
    let len = 4 + name.len() + 1 + value.len() + 1;
    out.reserve(1 + len);
    out.put_u8(b'S');
    out.put_u32(len as u32);
    out.put_slice(name);
    out.put_u8(0);
    out.put_slice(value);
    out.put_u8(0);
}

pub fn backend_key_data(out: &mut BytesMut, pid: u32, secret: u32) {
    put_message(out, b'K', |b| {
        b.put_u32(pid);
        b.put_u32(secret);
    });
}

pub fn ready_for_query(out: &mut BytesMut, status: TxStatus) {
    put_message(out, b'Z', |b| b.put_u8(status.byte()));
}

pub fn parse_complete(out: &mut BytesMut) {
    put_message(out, b'1', |_| {});
}

pub fn bind_complete(out: &mut BytesMut) {
    put_message(out, b'2', |_| {});
}

pub fn close_complete(out: &mut BytesMut) {
    put_message(out, b'3', |_| {});
}

pub fn no_data(out: &mut BytesMut) {
    put_message(out, b'n', |_| {});
}

/// ParameterDescription of a statement without parameters.
pub fn parameter_description_none(out: &mut BytesMut) {
    put_message(out, b't', |b| b.put_u16(0));
}

pub fn command_complete(out: &mut BytesMut, tag: &str) {
    put_message(out, b'C', |b| put_cstr(b, tag));
}

/// NegotiateProtocolVersion: the newest minor version graywire speaks and the `_pq_.` options
/// it did not recognise.
pub fn negotiate_protocol_version(out: &mut BytesMut, minor: u32, unrecognized: &[String]) {
    put_message(out, b'v', |b| {
        b.put_u32(minor);
        b.put_u32(unrecognized.len() as u32);
        for o in unrecognized {
            put_cstr(b, o);
        }
    });
}

/// An ErrorResponse with the fields drivers rely on: severity (localised and not), code, message.
pub fn error_response(
    out: &mut BytesMut,
    severity: Severity,
    code: SqlState,
    message: &str,
    detail: Option<&str>,
) {
    put_message(out, b'E', |b| {
        b.put_u8(b'S');
        put_cstr(b, severity.as_str());
        b.put_u8(b'V');
        put_cstr(b, severity.as_str());
        b.put_u8(b'C');
        put_cstr(b, code.code());
        b.put_u8(b'M');
        put_cstr(b, message);
        if let Some(d) = detail {
            b.put_u8(b'D');
            put_cstr(b, d);
        }
        b.put_u8(0);
    });
}

/// Rewrites the pid of every NotificationResponse in `messages` (whole messages) that says
/// `from` to `to`.
pub fn rewrite_notification_pids(messages: &mut [u8], from: u32, to: u32) {
    let mut at = 0;
    while let Some(header) = messages.get(at..at + 5) {
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        let tag = header[0];
        if tag == b'A' && len >= 8 {
            if let Some(pid) = messages.get_mut(at + 5..at + 9) {
                if *pid == from.to_be_bytes() {
                    pid.copy_from_slice(&to.to_be_bytes());
                }
            }
        }
        at += 1 + len.max(4);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Buf;
    use postgres_protocol::message::backend::Message;

    #[test]
    fn a_parameter_stamp_changes_with_the_values_and_only_then() {
        let mut a = Parameters::default();
        a.set("DateStyle", "ISO, MDY");
        a.set("application_name", "x");
        assert_eq!(a.len(), 2);
        assert_eq!(a.get("application_name"), Some("x"));
        assert_eq!(a.get("TimeZone"), None);
        let first = a.stamp();
        // The same value again: nothing changed, the stamp stays.
        a.set("application_name", "x");
        assert_eq!(a.stamp(), first);
        // A copy carries the stamp with the values.
        let copy = a.clone();
        assert_eq!(copy.stamp(), first);
        // A changed value or a new name: a stamp no list has had.
        a.set("application_name", "y");
        let second = a.stamp();
        assert_ne!(second, first);
        a.set("TimeZone", "UTC");
        assert!(a.stamp() != first && a.stamp() != second);
        assert_eq!(
            a.iter().collect::<Vec<_>>(),
            [
                ("DateStyle", "ISO, MDY"),
                ("application_name", "y"),
                ("TimeZone", "UTC")
            ]
        );
        // Changing the copy back to the original's values still gives a new stamp: equal
        // stamps imply equal values, not the reverse.
        let mut b = copy;
        b.set("application_name", "z");
        b.set("application_name", "x");
        assert_ne!(b.stamp(), first);
    }

    fn parse(mut buf: BytesMut) -> Message {
        match Message::parse(&mut buf) {
            Ok(Some(m)) => m,
            other => panic!("did not parse: {}", other.is_ok()),
        }
    }

    #[test]
    fn ready_for_query_round_trips() {
        let mut out = BytesMut::new();
        ready_for_query(&mut out, TxStatus::Failed);
        assert_eq!(&out[..], b"Z\0\0\0\x05E");
    }

    #[test]
    fn error_response_parses_with_its_fields() {
        let mut out = BytesMut::new();
        error_response(
            &mut out,
            Severity::Fatal,
            SqlState::PROTOCOL_VIOLATION,
            "bad",
            Some("why"),
        );
        let Message::ErrorResponse(body) = parse(out) else {
            panic!("not an ErrorResponse")
        };
        use fallible_iterator::FallibleIterator;
        let fields: Vec<(u8, String)> = body
            .fields()
            .map(|f| {
                Ok((
                    f.type_(),
                    String::from_utf8_lossy(f.value_bytes()).into_owned(),
                ))
            })
            .collect()
            .expect("fields");
        assert!(fields.contains(&(b'C', "08P01".to_string())));
        assert!(fields.contains(&(b'S', "FATAL".to_string())));
        assert!(fields.contains(&(b'M', "bad".to_string())));
        assert!(fields.contains(&(b'D', "why".to_string())));
    }

    #[test]
    fn parameter_status_and_key_data_parse() {
        let mut out = BytesMut::new();
        parameter_status(&mut out, "TimeZone", "UTC");
        let Message::ParameterStatus(ps) = parse(out) else {
            panic!("not ParameterStatus")
        };
        assert_eq!(ps.name().expect("name"), "TimeZone");
        assert_eq!(ps.value().expect("value"), "UTC");

        let mut out = BytesMut::new();
        backend_key_data(&mut out, 7, 9);
        assert_eq!(out.len(), 13);
        let mut b = &out[5..];
        assert_eq!(b.get_u32(), 7);
        assert_eq!(b.get_u32(), 9);
    }

    #[test]
    fn a_nul_inside_a_string_is_dropped_not_ending_it_early() {
        let mut out = BytesMut::new();
        parameter_status(&mut out, "app\0name", "\0a\0\0b\0");
        let Message::ParameterStatus(ps) = parse(out) else {
            panic!("not ParameterStatus")
        };
        assert_eq!(ps.name().expect("name"), "appname");
        assert_eq!(ps.value().expect("value"), "ab");
    }

    #[test]
    fn notification_pids_are_rewritten_only_where_they_match() {
        let notification = |pid: u32, channel: &str| {
            let mut m = vec![b'A'];
            let body_len = 4 + channel.len() + 1 + 1;
            m.extend_from_slice(&((body_len + 4) as u32).to_be_bytes());
            m.extend_from_slice(&pid.to_be_bytes());
            m.extend_from_slice(channel.as_bytes());
            m.extend_from_slice(&[0, 0]);
            m
        };
        let mut bytes = notification(7, "mine");
        bytes.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'I']);
        bytes.extend_from_slice(&notification(8, "other"));
        bytes.extend_from_slice(&notification(7, "again"));
        rewrite_notification_pids(&mut bytes, 7, 99);
        let mut want = notification(99, "mine");
        want.extend_from_slice(&[b'Z', 0, 0, 0, 5, b'I']);
        want.extend_from_slice(&notification(8, "other"));
        want.extend_from_slice(&notification(99, "again"));
        assert_eq!(bytes, want);
    }
}
