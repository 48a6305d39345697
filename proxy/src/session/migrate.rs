//! Moving a session to another backend connection at a transaction boundary.
//!
//! Before leaving a backend connection that still works, graywire asks it for the session's
//! state in one query ([`capture`]): the settings changed by SET (`pg_settings.source =
//! 'session'`), the protocol-level prepared statements that exist, and any state that cannot
//! move (temporary tables, LISTEN, session advisory locks, SQL-level PREPARE, WITH HOLD
//! cursors). A session with such state is *pinned* and stays. Otherwise the new backend
//! connection, opened with the client's startup parameters, gets the settings and statements
//! replayed in one round trip ([`replay_request`]) before the client's next request reaches it.

use std::collections::HashSet;

use bytes::{BufMut, BytesMut};
use postgres_protocol::message::frontend;

use crate::protocol::sqltext::quote_literal;

use super::tracker::Statements;

/// State that cannot move, as reported by the capture query.
pub const PIN_STATES: [&str; 5] = [
    "temporary_tables",
    "listen",
    "advisory_locks",
    "sql_prepare",
    "hold_cursors",
];

/// One round trip: settings (`s`), existing protocol-level statements (`q`) and unmovable
/// state (`p`). At a transaction boundary transaction-level advisory locks are gone, so any
/// advisory lock left is a session lock.
pub const CAPTURE_SQL: &str = "\
SELECT 's', name, current_setting(name) FROM pg_settings WHERE source = 'session' \
UNION ALL SELECT 'q', name, NULL FROM pg_prepared_statements WHERE NOT from_sql \
UNION ALL SELECT 'p', 'temporary_tables', count(*)::text FROM pg_class \
  WHERE relnamespace = pg_my_temp_schema() HAVING count(*) > 0 \
UNION ALL SELECT 'p', 'listen', count(*)::text FROM pg_listening_channels() HAVING count(*) > 0 \
UNION ALL SELECT 'p', 'advisory_locks', count(*)::text FROM pg_locks \
  WHERE locktype = 'advisory' AND pid = pg_backend_pid() HAVING count(*) > 0 \
UNION ALL SELECT 'p', 'sql_prepare', count(*)::text FROM pg_prepared_statements \
  WHERE from_sql HAVING count(*) > 0 \
UNION ALL SELECT 'p', 'hold_cursors', count(*)::text FROM pg_cursors \
  WHERE is_holdable HAVING count(*) > 0";

/// Settings that are not the session's to replay (they follow from the connection itself).
const NOT_REPLAYED: [&str; 2] = ["session_authorization", "transaction_isolation"];

/// What a capture found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Captured {
    /// Settings changed by the session, in the node's order: (name, value).
    pub settings: Vec<(String, String)>,
    /// Names of protocol-level prepared statements that exist on the backend.
    pub statements: HashSet<String>,
    /// Kinds of state that cannot move (empty: the session may move).
    pub pins: Vec<String>,
}

impl Captured {
    /// Reads the rows of [`CAPTURE_SQL`].
    pub fn from_rows(rows: &[Vec<Option<String>>]) -> Captured {
        let mut c = Captured::default();
        for row in rows {
            let field = |i: usize| row.get(i).and_then(|v| v.as_deref());
            match (field(0), field(1)) {
                (Some("s"), Some(name)) if !NOT_REPLAYED.contains(&name) => {
                    let value = field(2).unwrap_or_default();
                    c.settings.push((name.to_owned(), value.to_owned()));
                }
                (Some("q"), Some(name)) => {
                    c.statements.insert(name.to_owned());
                }
                (Some("p"), Some(kind)) => c.pins.push(kind.to_owned()),
                _ => {}
            }
        }
        c
    }
}

/// The messages that rebuild a session on a fresh backend connection, and how many
/// ReadyForQuery answer them: one `set_config` query for all settings, then each statement's
/// Parse with its own Sync, so one that no longer parses does not stop the others.
pub fn replay_request(settings: &[(String, String)], statements: &Statements) -> (BytesMut, usize) {
    let mut out = BytesMut::new();
    let mut ready = 0;
    if !settings.is_empty() {
        let calls: Vec<String> = settings
            .iter()
            .map(|(k, v)| {
                format!(
                    "set_config({}, {}, false)",
                    quote_literal(k),
                    quote_literal(v)
                )
            })
            .collect();
        let sql = format!("SELECT {}", calls.join(", "));
        // A setting name or value with a NUL cannot come from PostgreSQL.
        if frontend::query(&sql, &mut out).is_ok() {
            ready += 1;
        }
    }
    for s in statements.values() {
        out.put_slice(&s.parse);
        frontend::sync(&mut out);
        ready += 1;
    }
    (out, ready)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::sqltext::Command;
    use bytes::Bytes;

    fn row(a: &str, b: &str, c: Option<&str>) -> Vec<Option<String>> {
        vec![Some(a.into()), Some(b.into()), c.map(String::from)]
    }

    #[test]
    fn capture_rows_are_sorted_out() {
        let c = Captured::from_rows(&[
            row("s", "search_path", Some("app, public")),
            row("s", "session_authorization", Some("x")),
            row("q", "s0", None),
            row("p", "temporary_tables", Some("2")),
        ]);
        assert_eq!(
            c.settings,
            vec![("search_path".to_owned(), "app, public".to_owned())]
        );
        assert!(c.statements.contains("s0"));
        assert_eq!(c.pins, vec!["temporary_tables".to_owned()]);
    }

    #[test]
    fn replay_sets_everything_in_one_round_trip() {
        let mut statements = Statements::default();
        let mut parse = BytesMut::new();
        frontend::parse("s0", "SELECT 1", [], &mut parse).expect("parse");
        statements.insert(
            "s0".to_owned(),
            crate::session::tracker::Statement {
                parse: Bytes::from(parse.to_vec()),
                command: Command::Other,
            },
        );
        let settings = vec![("application_name".to_owned(), "it's".to_owned())];
        let (out, ready) = replay_request(&settings, &statements);
        assert_eq!(ready, 2);
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.contains("set_config('application_name', 'it''s', false)"),
            "{text}"
        );
        assert_eq!(out[0], b'Q');
        assert!(text.contains("SELECT 1"));
        assert_eq!(&out[out.len() - 5..], b"S\0\0\0\x04");
        assert_eq!(replay_request(&[], &Statements::default()).1, 0);
    }
}
