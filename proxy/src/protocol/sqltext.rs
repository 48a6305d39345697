//! The few facts graywire reads from query text: the leading command of a simple Query or a
//! Parse, enough to know a transaction is ending, a session setting may have changed, or
//! prepared statements were dropped. Only the first words are read; they usually arrive with
//! the message header, so no message is buffered for this.

/// The kind of a statement, judged by its first words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `SET` or `RESET` of a session setting (not `SET LOCAL`, `SET TRANSACTION`, …).
    SessionSetting,
    /// `COMMIT`, `END`, `COMMIT PREPARED`, `PREPARE TRANSACTION`: ends a transaction with an
    /// outcome the client must learn.
    Commit,
    /// `ROLLBACK` or `ABORT`.
    Rollback,
    /// `DISCARD` or `DEALLOCATE`: may drop protocol-level prepared statements.
    Discard,
    /// May create state bound to the backend connection: `CREATE TEMP …`, `LISTEN`,
    /// SQL-level `PREPARE`, `DECLARE` (a cursor WITH HOLD outlives its transaction).
    SessionState,
    Other,
}

/// Classifies statement text (possibly cut short) by its first words.
///
/// Runs for every Query and Parse, so the first word picks its candidates by length and first
/// letter before any word is compared: `SELECT`, `INSERT`, `UPDATE` and the like compare
/// nothing.
pub fn leading_command(text: &[u8]) -> Command {
    let mut words = Words { rest: text };
    let Some(first) = words.next() else {
        return Command::Other;
    };
    let is = |w: &[u8], kw: &str| w.eq_ignore_ascii_case(kw.as_bytes());
    match (first.len(), first[0].to_ascii_lowercase()) {
        (3, b's') if is(first, "set") => match words.next() {
            Some(w) if is(w, "local") || is(w, "transaction") || is(w, "constraints") => {
                Command::Other
            }
            _ => Command::SessionSetting,
        },
        (5, b'r') if is(first, "reset") => Command::SessionSetting,
        (6, b'c') if is(first, "commit") => Command::Commit,
        (3, b'e') if is(first, "end") => Command::Commit,
        (7, b'p') if is(first, "prepare") => match words.next() {
            Some(w) if is(w, "transaction") => Command::Commit,
            _ => Command::SessionState,
        },
        (6, b'l') if is(first, "listen") => Command::SessionState,
        (7, b'd') if is(first, "declare") => Command::SessionState,
        (6, b'c') if is(first, "create") => {
            let mut next = words.next();
            if next.is_some_and(|w| is(w, "global") || is(w, "local")) {
                next = words.next();
            }
            match next {
                Some(w) if is(w, "temp") || is(w, "temporary") => Command::SessionState,
                _ => Command::Other,
            }
        }
        (8, b'r') if is(first, "rollback") => rollback_or_not(words.next()),
        (5, b'a') if is(first, "abort") => rollback_or_not(words.next()),
        (7, b'd') if is(first, "discard") => Command::Discard,
        (10, b'd') if is(first, "deallocate") => Command::Discard,
        _ => Command::Other,
    }
}

/// `ROLLBACK`/`ABORT`, unless followed by `PREPARED`: ROLLBACK PREPARED ends another,
/// prepared transaction, so it is an ordinary statement.
fn rollback_or_not(next: Option<&[u8]>) -> Command {
    match next {
        Some(w) if w.eq_ignore_ascii_case(b"prepared") => Command::Other,
        _ => Command::Rollback,
    }
}

/// True when statement text mentions a session-level advisory lock function
/// (`pg_advisory_lock`, `pg_try_advisory_lock`, their `_shared` forms; not the `_xact_` ones,
/// which end with the transaction).
pub fn mentions_session_advisory_lock(text: &[u8]) -> bool {
    const NAME: &[u8] = b"advisory_lock";
    // Cheap on the hot path: only where a 'k' (rare in SQL) could end "advisory_lock" is
    // anything compared, and memchr finds those a word at a time.
    let ends_with =
        |end: usize, s: &[u8]| end >= s.len() && text[end - s.len()..end].eq_ignore_ascii_case(s);
    memchr::memchr2_iter(b'k', b'K', text).any(|k| {
        let end = k + 1;
        ends_with(end, NAME) && {
            let start = end - NAME.len();
            ends_with(start, b"pg_") || ends_with(start, b"pg_try_")
        }
    })
}

/// Skips whitespace and `--` / `/* */` comments.
fn skip_blanks(mut s: &[u8]) -> &[u8] {
    loop {
        let trimmed = s.trim_ascii_start();
        if let Some(after) = trimmed.strip_prefix(b"--") {
            match after.iter().position(|&b| b == b'\n') {
                Some(i) => s = &after[i + 1..],
                None => return &[],
            }
        } else if let Some(after) = trimmed.strip_prefix(b"/*") {
            match after.windows(2).position(|w| w == b"*/") {
                Some(i) => s = &after[i + 2..],
                None => return &[],
            }
        } else {
            return trimmed;
        }
    }
}

struct Words<'a> {
    rest: &'a [u8],
}

/// The bytes a word is made of (ASCII letters, digits, `_`), as a table: one load per byte.
const WORD_BYTE: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric() || c == b'_';
        b += 1;
    }
    table
};

impl<'a> Iterator for Words<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        // Most statements start with their first word: no blanks or comments to skip.
        let s = match self.rest.first() {
            Some(&b) if WORD_BYTE[usize::from(b)] => self.rest,
            _ => skip_blanks(self.rest),
        };
        let end = s
            .iter()
            .position(|&b| !WORD_BYTE[usize::from(b)])
            .unwrap_or(s.len());
        if end == 0 {
            return None;
        }
        self.rest = &s[end..];
        Some(&s[..end])
    }
}

/// Quotes `s` as an SQL string literal that reads the same whatever
/// `standard_conforming_strings` says.
pub fn quote_literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 3);
    if s.contains('\\') {
        out.push('E');
    }
    out.push('\'');
    for c in s.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_commands() {
        let cases: &[(&str, Command)] = &[
            ("SET search_path = a", Command::SessionSetting),
            ("  set application_name to 'x'", Command::SessionSetting),
            ("RESET ALL", Command::SessionSetting),
            ("SET SESSION work_mem = '8MB'", Command::SessionSetting),
            ("SET LOCAL work_mem = '8MB'", Command::Other),
            (
                "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
                Command::Other,
            ),
            ("-- a comment\nCOMMIT", Command::Commit),
            ("/* x */ end", Command::Commit),
            ("PREPARE TRANSACTION 'a'", Command::Commit),
            ("PREPARE q AS SELECT 1", Command::SessionState),
            ("create temp table t (x int)", Command::SessionState),
            (
                "CREATE LOCAL TEMPORARY TABLE t (x int)",
                Command::SessionState,
            ),
            ("CREATE TABLE t (x int)", Command::Other),
            ("LISTEN ch", Command::SessionState),
            (
                "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
                Command::SessionState,
            ),
            ("rollback", Command::Rollback),
            ("ROLLBACK PREPARED 'a'", Command::Other),
            ("ABORT", Command::Rollback),
            ("DISCARD ALL", Command::Discard),
            ("deallocate all", Command::Discard),
            ("SELECT 1", Command::Other),
            ("settle", Command::Other),
            ("", Command::Other),
            ("/* unterminated", Command::Other),
        ];
        for (text, want) in cases {
            assert_eq!(leading_command(text.as_bytes()), *want, "{text:?}");
        }
    }

    #[test]
    fn session_advisory_locks_are_noticed() {
        assert!(mentions_session_advisory_lock(
            b"SELECT pg_advisory_lock(1)"
        ));
        assert!(mentions_session_advisory_lock(
            b"select PG_TRY_ADVISORY_LOCK_SHARED(1)"
        ));
        assert!(!mentions_session_advisory_lock(
            b"SELECT pg_advisory_xact_lock(1)"
        ));
        assert!(!mentions_session_advisory_lock(b"SELECT 1"));
        assert!(!mentions_session_advisory_lock(b"k"));
        assert!(!mentions_session_advisory_lock(b"advisory_lock(1)"));
        assert!(!mentions_session_advisory_lock(b"SELECT pg_advisory_loc"));
        assert!(mentions_session_advisory_lock(b"pg_advisory_lock"));
    }

    /// The classification spelled out keyword by keyword, as the reference for the dispatching
    /// one.
    fn leading_command_by_definition(text: &[u8]) -> Command {
        let mut words = Words { rest: text };
        let Some(first) = words.next() else {
            return Command::Other;
        };
        let is = |w: &[u8], kw: &str| w.eq_ignore_ascii_case(kw.as_bytes());
        if is(first, "set") {
            match words.next() {
                Some(w) if is(w, "local") || is(w, "transaction") || is(w, "constraints") => {
                    Command::Other
                }
                _ => Command::SessionSetting,
            }
        } else if is(first, "reset") {
            Command::SessionSetting
        } else if is(first, "commit") || is(first, "end") {
            Command::Commit
        } else if is(first, "prepare") {
            match words.next() {
                Some(w) if is(w, "transaction") => Command::Commit,
                _ => Command::SessionState,
            }
        } else if is(first, "listen") || is(first, "declare") {
            Command::SessionState
        } else if is(first, "create") {
            let mut next = words.next();
            if next.is_some_and(|w| is(w, "global") || is(w, "local")) {
                next = words.next();
            }
            match next {
                Some(w) if is(w, "temp") || is(w, "temporary") => Command::SessionState,
                _ => Command::Other,
            }
        } else if is(first, "rollback") || is(first, "abort") {
            match words.next() {
                Some(w) if is(w, "prepared") => Command::Other,
                _ => Command::Rollback,
            }
        } else if is(first, "discard") || is(first, "deallocate") {
            Command::Discard
        } else {
            Command::Other
        }
    }

    proptest::proptest! {
        /// The dispatch on length and first letter classifies as the keyword chain does.
        #[test]
        fn leading_command_matches_its_definition(
            parts in proptest::collection::vec(
                proptest::sample::select(vec![
                    "set", "SET", "reset", "commit", "end", "End", "prepare", "transaction",
                    "listen", "declare", "create", "global", "local", "temp", "TEMPORARY",
                    "rollback", "abort", "prepared", "discard", "deallocate", "select", "s",
                    "e", "d", "settle", "ends", "commits", "x", " ", "  ", "\n", "-- c\n",
                    "/* c */", ";", "(", "_", "1",
                ]),
                0..6,
            )
        ) {
            let text = parts.concat();
            proptest::prop_assert_eq!(
                leading_command(text.as_bytes()),
                leading_command_by_definition(text.as_bytes()),
                "{:?}", text
            );
        }
    }

    proptest::proptest! {
        /// The scan agrees with the plain definition: the lower-cased text contains
        /// `pg_advisory_lock` or `pg_try_advisory_lock`.
        #[test]
        fn advisory_scan_matches_its_definition(
            parts in proptest::collection::vec(
                proptest::sample::select(vec![
                    "pg_", "PG_", "try_", "advisory", "ADVISORY", "_lock", "_LOCK", "_xact",
                    "(1)", " ", "k", "K", "select ", "lock", "_", "a",
                ]),
                0..12,
            )
        ) {
            let text = parts.concat();
            let lower = text.to_ascii_lowercase();
            let want = lower.contains("pg_advisory_lock") || lower.contains("pg_try_advisory_lock");
            proptest::prop_assert_eq!(mentions_session_advisory_lock(text.as_bytes()), want, "{}", text);
        }
    }

    #[test]
    fn literals_are_quoted_safely() {
        assert_eq!(quote_literal("a'b"), "'a''b'");
        assert_eq!(quote_literal(r"c:\x"), r"E'c:\\x'");
        assert_eq!(quote_literal("\"$user\", public"), "'\"$user\", public'");
    }
}
