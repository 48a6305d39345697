//! SQLSTATE codes as a type: the ones graywire emits or acts on, by name (PostgreSQL manual,
//! Appendix A), and the ones a node reports, parsed from its ErrorResponse. No other module
//! spells a code as a string.

/// A five-character SQLSTATE code (ASCII digits and upper-case letters).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SqlState([u8; 5]);

/// The class of a SQLSTATE: its first two characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SqlClass([u8; 2]);

mod documented;

use documented::DOCUMENTED;

impl SqlState {
    /// The codes graywire itself answers with (`docs/contract.md`, "SQLSTATEs graywire
    /// sends"): their error counters exist from the start.
    pub const SENT_BY_GRAYWIRE: [SqlState; 12] = [
        SqlState::CONNECTION_FAILURE,
        SqlState::PROTOCOL_VIOLATION,
        SqlState::FEATURE_NOT_SUPPORTED,
        SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
        SqlState::INVALID_PASSWORD,
        SqlState::TOO_MANY_CONNECTIONS,
        SqlState::ADMIN_SHUTDOWN,
        SqlState::CANNOT_CONNECT_NOW,
        SqlState::SERIALIZATION_FAILURE,
        SqlState::STATEMENT_COMPLETION_UNKNOWN,
        SqlState::QUERY_CANCELED,
        SqlState::IN_FAILED_SQL_TRANSACTION,
    ];

    /// A named code; `code` must be five ASCII characters (checked at compile time for the
    /// constants below).
    const fn named(code: &'static str) -> SqlState {
        let b = code.as_bytes();
        assert!(b.len() == 5, "a SQLSTATE has five characters");
        SqlState([b[0], b[1], b[2], b[3], b[4]])
    }

    /// Parses a code a node (or a client library) reported: five ASCII digits or upper-case
    /// letters, else `None`.
    pub fn parse(code: &str) -> Option<SqlState> {
        let b: [u8; 5] = code.as_bytes().try_into().ok()?;
        b.iter()
            .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase())
            .then_some(SqlState(b))
    }

    /// The code a node reported, or [`SqlState::INTERNAL_ERROR`] when its ErrorResponse had
    /// none or one that is not a SQLSTATE (PostgreSQL always sends one).
    pub fn reported(code: &str) -> SqlState {
        SqlState::parse(code).unwrap_or(SqlState::INTERNAL_ERROR)
    }

    pub fn code(&self) -> &str {
        // Built only from ASCII (`named`, `parse`), so always UTF-8.
        std::str::from_utf8(&self.0).unwrap_or("XX000")
    }

    pub const fn class(self) -> SqlClass {
        SqlClass([self.0[0], self.0[1]])
    }

    /// The code as a metric label value, from a closed set: the code itself when PostgreSQL
    /// documents it, else its class's generic code (`P0000` for an undocumented `P0xyz`, as
    /// a client can raise with `RAISE … USING ERRCODE`) when the class is documented, else
    /// `other`. Never allocates.
    pub fn label(self) -> &'static str {
        let find = |code: &[u8]| {
            DOCUMENTED
                .binary_search_by(|c| c.as_bytes().cmp(code))
                .ok()
                .map(|i| DOCUMENTED[i])
        };
        find(&self.0)
            .or_else(|| find(&[self.0[0], self.0[1], b'0', b'0', b'0']))
            .unwrap_or("other")
    }

    /// 08006: the connection to the node failed.
    pub const CONNECTION_FAILURE: SqlState = SqlState::named("08006");
    /// 08P01: the client broke the protocol.
    pub const PROTOCOL_VIOLATION: SqlState = SqlState::named("08P01");
    /// 0A000: something PostgreSQL supports but graywire does not (yet).
    pub const FEATURE_NOT_SUPPORTED: SqlState = SqlState::named("0A000");
    /// 28000: unknown user or otherwise not allowed to connect.
    pub const INVALID_AUTHORIZATION_SPECIFICATION: SqlState = SqlState::named("28000");
    /// 28P01: wrong password.
    pub const INVALID_PASSWORD: SqlState = SqlState::named("28P01");
    /// 53300: the connection cap is reached.
    pub const TOO_MANY_CONNECTIONS: SqlState = SqlState::named("53300");
    /// 57P01: graywire (or the node) is shutting down.
    pub const ADMIN_SHUTDOWN: SqlState = SqlState::named("57P01");
    /// 57P02: the node is restarting after a crash of one of its processes.
    pub const CRASH_SHUTDOWN: SqlState = SqlState::named("57P02");
    /// 57P03: no suitable node could take the request in time (or the node cannot yet).
    pub const CANNOT_CONNECT_NOW: SqlState = SqlState::named("57P03");
    /// 40001: the transaction was rolled back because its node died; safe to retry.
    pub const SERIALIZATION_FAILURE: SqlState = SqlState::named("40001");
    /// 40003: the node died while the statement or COMMIT ran; its outcome is unknown.
    pub const STATEMENT_COMPLETION_UNKNOWN: SqlState = SqlState::named("40003");
    /// 57014: the client cancelled a request graywire was holding.
    pub const QUERY_CANCELED: SqlState = SqlState::named("57014");
    /// 25P02: the transaction failed; commands are ignored until it ends.
    pub const IN_FAILED_SQL_TRANSACTION: SqlState = SqlState::named("25P02");
    /// 25P03: the node ended a session idle in a transaction for too long.
    pub const IDLE_IN_TRANSACTION_SESSION_TIMEOUT: SqlState = SqlState::named("25P03");
    /// 40P01: deadlock detected (also a recovery conflict's FATAL on a standby).
    pub const DEADLOCK_DETECTED: SqlState = SqlState::named("40P01");
    /// 57P04: the session's database was dropped.
    pub const DATABASE_DROPPED: SqlState = SqlState::named("57P04");
    /// 57P05: the node ended a session idle for too long (`idle_session_timeout`).
    pub const IDLE_SESSION_TIMEOUT: SqlState = SqlState::named("57P05");
    /// XX000: a graywire bug, or a node error without a code.
    pub const INTERNAL_ERROR: SqlState = SqlState::named("XX000");
}

impl SqlClass {
    /// Class 57: operator intervention (shutdown, crash restart, cannot connect now).
    pub const OPERATOR_INTERVENTION: SqlClass = SqlClass(*b"57");
}

impl std::fmt::Display for SqlState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

impl std::fmt::Debug for SqlState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SqlState({})", self.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_takes_five_code_characters_only() {
        let cases = [
            ("57P01", Some(SqlState::ADMIN_SHUTDOWN)),
            ("40001", Some(SqlState::SERIALIZATION_FAILURE)),
            ("P0001", SqlState::parse("P0001")),
            ("", None),
            ("5701", None),
            ("57P011", None),
            ("57p01", None),
            ("57 01", None),
            ("57P0\u{e9}", None),
        ];
        for (text, want) in cases {
            assert_eq!(SqlState::parse(text), want, "{text:?}");
        }
        assert_eq!(
            SqlState::parse("P0001").map(|s| s.to_string()),
            Some("P0001".into())
        );
        assert_eq!(SqlState::reported(""), SqlState::INTERNAL_ERROR);
    }

    #[test]
    fn named_codes_label_as_themselves() {
        let named = [
            SqlState::CONNECTION_FAILURE,
            SqlState::PROTOCOL_VIOLATION,
            SqlState::FEATURE_NOT_SUPPORTED,
            SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
            SqlState::INVALID_PASSWORD,
            SqlState::TOO_MANY_CONNECTIONS,
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
            SqlState::SERIALIZATION_FAILURE,
            SqlState::STATEMENT_COMPLETION_UNKNOWN,
            SqlState::QUERY_CANCELED,
            SqlState::IN_FAILED_SQL_TRANSACTION,
            SqlState::INTERNAL_ERROR,
            SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT,
            SqlState::DEADLOCK_DETECTED,
            SqlState::DATABASE_DROPPED,
            SqlState::IDLE_SESSION_TIMEOUT,
        ];
        for code in named {
            assert_eq!(code.label(), code.code());
            assert_eq!(SqlState::parse(code.code()), Some(code));
        }
    }

    #[test]
    fn labels_form_a_closed_set() {
        let cases = [
            ("P0001", "P0001"), // raise_exception: documented
            ("23505", "23505"),
            ("P0999", "P0000"), // undocumented code of a documented class
            ("22ZZZ", "22000"),
            ("ZZ123", "other"), // undocumented class
            ("00000", "00000"),
        ];
        for (code, label) in cases {
            assert_eq!(SqlState::reported(code).label(), label, "{code}");
        }
        assert!(
            documented::DOCUMENTED.windows(2).all(|w| w[0] < w[1]),
            "sorted"
        );
        // Every code a client could invent maps into the documented codes or "other".
        let mut labels = std::collections::BTreeSet::new();
        for a in ["0", "2", "4", "5", "P", "Z", "H"] {
            for b in ["0", "1", "A", "P", "V", "Z"] {
                for rest in ["000", "001", "P01", "ZZZ", "123"] {
                    let code = format!("{a}{b}{rest}");
                    labels.insert(SqlState::reported(&code).label());
                }
            }
        }
        assert!(labels
            .iter()
            .all(|l| *l == "other" || documented::DOCUMENTED.contains(l)));
    }

    #[test]
    fn class_is_the_first_two_characters() {
        for (code, class57) in [
            ("57P01", true),
            ("57014", true),
            ("58000", false),
            ("08006", false),
        ] {
            let s = SqlState::reported(code);
            assert_eq!(
                s.class() == SqlClass::OPERATOR_INTERVENTION,
                class57,
                "{code}"
            );
        }
    }
}
