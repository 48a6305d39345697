//! Table-driven tests of the [`Tracker`]: client and node bytes go in (real protocol messages,
//! the client's built with `postgres_protocol`, the node's by hand), the facts it learned come
//! out. No I/O: the relay's loop is replaced by [`feed`].

use bytes::{BufMut, BytesMut};
use postgres_protocol::message::frontend;
use proptest::prelude::*;

use super::*;

// ---------------------------------------------------------------------------------------------
// Messages

/// One message: tag, length (counting itself), body.
fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

/// Client messages, built by `postgres_protocol`.
mod fe {
    use super::*;

    fn build(f: impl FnOnce(&mut BytesMut)) -> Vec<u8> {
        let mut b = BytesMut::new();
        f(&mut b);
        b.to_vec()
    }

    pub fn query(sql: &str) -> Vec<u8> {
        build(|b| frontend::query(sql, b).expect("query"))
    }
    pub fn parse(name: &str, sql: &str) -> Vec<u8> {
        build(|b| frontend::parse(name, sql, std::iter::empty(), b).expect("parse"))
    }
    pub fn bind(portal: &str, statement: &str) -> Vec<u8> {
        build(|b| {
            frontend::bind(
                portal,
                statement,
                std::iter::empty::<i16>(),
                std::iter::empty::<Option<&[u8]>>(),
                |_, _| Ok(postgres_protocol::IsNull::Yes),
                std::iter::empty::<i16>(),
                b,
            )
            .map_err(|_| "bind")
            .expect("bind")
        })
    }
    pub fn execute() -> Vec<u8> {
        build(|b| frontend::execute("", 0, b).expect("execute"))
    }
    pub fn describe(variant: u8, name: &str) -> Vec<u8> {
        build(|b| frontend::describe(variant, name, b).expect("describe"))
    }
    pub fn close(variant: u8, name: &str) -> Vec<u8> {
        build(|b| frontend::close(variant, name, b).expect("close"))
    }
    pub fn sync() -> Vec<u8> {
        build(frontend::sync)
    }
    pub fn flush() -> Vec<u8> {
        build(frontend::flush)
    }
    pub fn terminate() -> Vec<u8> {
        build(frontend::terminate)
    }
    pub fn copy_done() -> Vec<u8> {
        build(frontend::copy_done)
    }
    pub fn copy_data(data: &[u8]) -> Vec<u8> {
        msg(b'd', data)
    }
    /// FunctionCall of OID 1 without arguments, text result.
    pub fn function_call() -> Vec<u8> {
        let mut body = Vec::new();
        body.put_u32(1);
        body.put_i16(0);
        body.put_i16(0);
        body.put_i16(0);
        msg(b'F', &body)
    }
}

/// Node messages, by hand.
mod be {
    use super::*;

    pub fn ready(status: u8) -> Vec<u8> {
        msg(b'Z', &[status])
    }
    pub fn complete(tag: &str) -> Vec<u8> {
        let mut body = Vec::new();
        cstr(&mut body, tag);
        msg(b'C', &body)
    }
    pub fn error(severity: &str, code: &str) -> Vec<u8> {
        let mut body = Vec::new();
        for (field, value) in [
            (b'S', severity),
            (b'V', severity),
            (b'C', code),
            (b'M', "m"),
        ] {
            body.push(field);
            cstr(&mut body, value);
        }
        body.push(0);
        msg(b'E', &body)
    }
    pub fn parameter(name: &str, value: &str) -> Vec<u8> {
        let mut body = Vec::new();
        cstr(&mut body, name);
        cstr(&mut body, value);
        msg(b'S', &body)
    }
    pub fn parse_complete() -> Vec<u8> {
        msg(b'1', &[])
    }
    pub fn bind_complete() -> Vec<u8> {
        msg(b'2', &[])
    }
    pub fn close_complete() -> Vec<u8> {
        msg(b'3', &[])
    }
    pub fn data_row(value: &str) -> Vec<u8> {
        let mut body = Vec::new();
        body.put_i16(1);
        body.put_i32(value.len() as i32);
        body.extend_from_slice(value.as_bytes());
        msg(b'D', &body)
    }
    /// CopyInResponse (`G`), CopyOutResponse (`H`) or CopyBothResponse (`W`), text, no columns.
    pub fn copy_response(tag: u8) -> Vec<u8> {
        msg(tag, &[0, 0, 0])
    }
}

fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

// ---------------------------------------------------------------------------------------------
// Driving the tracker

enum Step {
    /// Client bytes, scanned in one call.
    Client(Vec<u8>),
    /// Node bytes, scanned in one call.
    Node(Vec<u8>),
    /// The backend died and graywire answered for it.
    ResetBackend,
}
use Step::{Client, Node, ResetBackend};

fn tracker(status: TxStatus, watch_pins: bool) -> Tracker {
    let mut parameters = Parameters::default();
    parameters.set("application_name", "app");
    Tracker::new(
        parameters,
        status,
        1 << 20,
        watch_pins,
        &m::SessionMetrics::new(),
    )
}

fn feed(t: &mut Tracker, step: &Step) -> Result<Scanned, SessionError> {
    match step {
        Client(bytes) => t.scan_frontend(bytes),
        Node(bytes) => Ok(t.scan_backend(bytes)),
        ResetBackend => {
            t.reset_backend_side();
            Ok(Scanned {
                forward: 0,
                stopped: None,
            })
        }
    }
}

/// What a test looks at.
#[derive(Debug, PartialEq)]
struct State {
    status: TxStatus,
    unanswered: u32,
    open_extended: bool,
    in_flight: InFlight,
    in_copy: bool,
    settings_dirty: bool,
    maybe_pinned: bool,
    at_boundary: bool,
    between_requests: bool,
    /// Named statements, sorted.
    statements: Vec<String>,
    node_fatal: bool,
    fatal_withheld: bool,
}

fn state(t: &Tracker) -> State {
    let mut statements: Vec<String> = t.statements.keys().cloned().collect();
    statements.sort();
    State {
        status: t.status,
        unanswered: t.unanswered,
        open_extended: t.open_extended,
        in_flight: t.in_flight,
        in_copy: t.in_copy,
        settings_dirty: t.settings_dirty,
        maybe_pinned: t.maybe_pinned,
        at_boundary: t.at_boundary(),
        between_requests: t.between_requests(),
        statements,
        node_fatal: t.node_fatal.is_some(),
        fatal_withheld: t.withheld_fatal.is_some(),
    }
}

/// Idle, nothing in flight: a transaction boundary.
fn idle() -> State {
    State {
        status: TxStatus::Idle,
        unanswered: 0,
        open_extended: false,
        in_flight: InFlight::default(),
        in_copy: false,
        settings_dirty: false,
        maybe_pinned: false,
        at_boundary: true,
        between_requests: true,
        statements: Vec::new(),
        node_fatal: false,
        fatal_withheld: false,
    }
}

/// Inside a transaction, nothing in flight.
fn in_tx() -> State {
    State {
        status: TxStatus::InTransaction,
        at_boundary: false,
        ..idle()
    }
}

/// `n` simple requests in flight.
fn busy(status: TxStatus, n: u32) -> State {
    State {
        status,
        unanswered: n,
        at_boundary: false,
        between_requests: false,
        ..idle()
    }
}

/// Extended-protocol messages sent without their Sync yet.
fn open_extended(status: TxStatus) -> State {
    State {
        status,
        open_extended: true,
        in_flight: InFlight {
            extended: true,
            ..InFlight::default()
        },
        at_boundary: false,
        between_requests: false,
        ..idle()
    }
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

const COMMIT: InFlight = InFlight {
    commit: true,
    rollback: false,
    extended: false,
};
const ROLLBACK: InFlight = InFlight {
    commit: false,
    rollback: true,
    extended: false,
};

struct Case {
    name: &'static str,
    start: TxStatus,
    /// Transaction mode: statement text is searched for session advisory locks.
    watch_pins: bool,
    steps: Vec<Step>,
    want: State,
}

fn case(name: &'static str, start: TxStatus, steps: Vec<Step>, want: State) -> Case {
    Case {
        name,
        start,
        watch_pins: false,
        steps,
        want,
    }
}

// ---------------------------------------------------------------------------------------------
// Tables

#[test]
fn the_tracker_learns_from_the_messages_passing_through() {
    use TxStatus::{Failed, Idle, InTransaction};
    let answered = |status: u8| Node(cat(&[be::complete("SELECT 1"), be::ready(status)]));
    let cases = vec![
        case("nothing happened", Idle, vec![], idle()),
        case(
            "a simple query in flight",
            Idle,
            vec![Client(fe::query("SELECT 1"))],
            busy(Idle, 1),
        ),
        case(
            "a simple query answered",
            Idle,
            vec![
                Client(fe::query("SELECT 1")),
                Node(cat(&[
                    be::data_row("1"),
                    be::complete("SELECT 1"),
                    be::ready(b'I'),
                ])),
            ],
            idle(),
        ),
        case(
            "BEGIN: the status comes from ReadyForQuery T",
            Idle,
            vec![
                Client(fe::query("BEGIN")),
                Node(cat(&[be::complete("BEGIN"), be::ready(b'T')])),
            ],
            in_tx(),
        ),
        case(
            "an error in a transaction: ReadyForQuery E",
            InTransaction,
            vec![
                Client(fe::query("SELECT nope")),
                Node(cat(&[be::error("ERROR", "42703"), be::ready(b'E')])),
            ],
            State {
                status: Failed,
                ..in_tx()
            },
        ),
        case(
            "ReadyForQuery with an unknown status byte keeps the status",
            InTransaction,
            vec![Client(fe::query("SELECT 1")), answered(b'?')],
            in_tx(),
        ),
        case(
            "ReadyForQuery nobody asked for counts nothing below zero",
            Idle,
            vec![Node(be::ready(b'I'))],
            idle(),
        ),
        case(
            "two pipelined queries, none answered",
            Idle,
            vec![Client(cat(&[fe::query("SELECT 1"), fe::query("SELECT 2")]))],
            busy(Idle, 2),
        ),
        case(
            "two pipelined queries, one answered",
            Idle,
            vec![
                Client(cat(&[fe::query("SELECT 1"), fe::query("SELECT 2")])),
                answered(b'I'),
            ],
            busy(Idle, 1),
        ),
        case(
            "COMMIT in flight",
            InTransaction,
            vec![Client(fe::query("COMMIT"))],
            State {
                in_flight: COMMIT,
                ..busy(InTransaction, 1)
            },
        ),
        case(
            "END is a COMMIT",
            InTransaction,
            vec![Client(fe::query("end;"))],
            State {
                in_flight: COMMIT,
                ..busy(InTransaction, 1)
            },
        ),
        case(
            "PREPARE TRANSACTION is a COMMIT",
            InTransaction,
            vec![Client(fe::query("PREPARE TRANSACTION 'x'"))],
            State {
                in_flight: COMMIT,
                ..busy(InTransaction, 1)
            },
        ),
        case(
            "a COMMIT after a comment, in lower case",
            InTransaction,
            vec![Client(fe::query("/* app */ -- c\n commit"))],
            State {
                in_flight: COMMIT,
                ..busy(InTransaction, 1)
            },
        ),
        case(
            "COMMIT answered: a boundary, in_flight forgotten",
            InTransaction,
            vec![
                Client(fe::query("COMMIT")),
                Node(cat(&[be::complete("COMMIT"), be::ready(b'I')])),
            ],
            idle(),
        ),
        case(
            "ROLLBACK in flight",
            Failed,
            vec![Client(fe::query("ROLLBACK"))],
            State {
                in_flight: ROLLBACK,
                ..busy(Failed, 1)
            },
        ),
        case(
            "ABORT is a ROLLBACK",
            InTransaction,
            vec![Client(fe::query("ABORT"))],
            State {
                in_flight: ROLLBACK,
                ..busy(InTransaction, 1)
            },
        ),
        case(
            "ROLLBACK PREPARED is an ordinary statement",
            Idle,
            vec![Client(fe::query("ROLLBACK PREPARED 'x'"))],
            busy(Idle, 1),
        ),
        case(
            "in_flight stays while a pipelined request is unanswered",
            InTransaction,
            vec![
                Client(cat(&[fe::query("COMMIT"), fe::query("SELECT 1")])),
                Node(cat(&[be::complete("COMMIT"), be::ready(b'I')])),
            ],
            State {
                in_flight: COMMIT,
                ..busy(Idle, 1)
            },
        ),
        case(
            "SET makes the settings dirty",
            Idle,
            vec![Client(fe::query("SET search_path = a")), answered(b'I')],
            State {
                settings_dirty: true,
                ..idle()
            },
        ),
        case(
            "RESET makes the settings dirty",
            Idle,
            vec![Client(fe::query("RESET ALL")), answered(b'I')],
            State {
                settings_dirty: true,
                ..idle()
            },
        ),
        case(
            "SET LOCAL does not",
            InTransaction,
            vec![
                Client(fe::query("SET LOCAL work_mem = '1MB'")),
                answered(b'T'),
            ],
            in_tx(),
        ),
        case(
            "SET TRANSACTION does not",
            InTransaction,
            vec![
                Client(fe::query("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")),
                answered(b'T'),
            ],
            in_tx(),
        ),
        case(
            "CREATE TEMP TABLE may pin",
            Idle,
            vec![
                Client(fe::query("CREATE TEMP TABLE t (x int)")),
                answered(b'I'),
            ],
            State {
                maybe_pinned: true,
                ..idle()
            },
        ),
        case(
            "CREATE TABLE does not",
            Idle,
            vec![Client(fe::query("CREATE TABLE t (x int)")), answered(b'I')],
            idle(),
        ),
        case(
            "LISTEN may pin",
            Idle,
            vec![Client(fe::query("LISTEN ch")), answered(b'I')],
            State {
                maybe_pinned: true,
                ..idle()
            },
        ),
        case(
            "SQL-level PREPARE may pin",
            Idle,
            vec![Client(fe::query("PREPARE p AS SELECT 1")), answered(b'I')],
            State {
                maybe_pinned: true,
                ..idle()
            },
        ),
        case(
            "a session advisory lock is not looked for in session mode",
            Idle,
            vec![
                Client(fe::query("SELECT pg_advisory_lock(1)")),
                answered(b'I'),
            ],
            idle(),
        ),
        Case {
            watch_pins: true,
            ..case(
                "a session advisory lock may pin in transaction mode",
                Idle,
                vec![
                    Client(fe::query("SELECT pg_advisory_lock(1)")),
                    answered(b'I'),
                ],
                State {
                    maybe_pinned: true,
                    ..idle()
                },
            )
        },
        Case {
            watch_pins: true,
            ..case(
                "pg_try_advisory_lock_shared may pin in transaction mode",
                Idle,
                vec![
                    Client(fe::query("select PG_TRY_ADVISORY_LOCK_SHARED(1)")),
                    answered(b'I'),
                ],
                State {
                    maybe_pinned: true,
                    ..idle()
                },
            )
        },
        Case {
            watch_pins: true,
            ..case(
                "a transaction-level advisory lock does not pin",
                InTransaction,
                vec![
                    Client(fe::query("SELECT pg_advisory_xact_lock(1)")),
                    answered(b'T'),
                ],
                in_tx(),
            )
        },
        Case {
            watch_pins: true,
            ..case(
                "a session advisory lock in a Parse may pin in transaction mode",
                Idle,
                vec![Client(cat(&[
                    fe::parse("", "SELECT pg_advisory_lock($1)"),
                    fe::sync(),
                ]))],
                State {
                    maybe_pinned: true,
                    in_flight: InFlight {
                        extended: true,
                        ..InFlight::default()
                    },
                    ..busy(Idle, 1)
                },
            )
        },
        case(
            "Parse, Bind, Execute without Sync: open extended, nothing to answer yet",
            Idle,
            vec![Client(cat(&[
                fe::parse("", "SELECT 1"),
                fe::bind("", ""),
                fe::execute(),
            ]))],
            open_extended(Idle),
        ),
        case(
            "Describe alone opens the extended protocol",
            Idle,
            vec![Client(fe::describe(b'S', "s1"))],
            open_extended(Idle),
        ),
        case(
            "Flush after Execute keeps it open",
            Idle,
            vec![Client(cat(&[fe::bind("", ""), fe::execute(), fe::flush()]))],
            open_extended(Idle),
        ),
        case(
            "Sync closes it and counts one request",
            Idle,
            vec![Client(cat(&[
                fe::parse("", "SELECT 1"),
                fe::bind("", ""),
                fe::execute(),
                fe::sync(),
            ]))],
            State {
                in_flight: InFlight {
                    extended: true,
                    ..InFlight::default()
                },
                ..busy(Idle, 1)
            },
        ),
        case(
            "an extended request answered",
            Idle,
            vec![
                Client(cat(&[
                    fe::parse("", "SELECT 1"),
                    fe::bind("", ""),
                    fe::execute(),
                    fe::sync(),
                ])),
                Node(cat(&[
                    be::parse_complete(),
                    be::bind_complete(),
                    be::data_row("1"),
                    be::complete("SELECT 1"),
                    be::ready(b'I'),
                ])),
            ],
            idle(),
        ),
        case(
            "extended messages after the last Sync keep it open",
            Idle,
            vec![Client(cat(&[
                fe::bind("", ""),
                fe::execute(),
                fe::sync(),
                fe::bind("", ""),
            ]))],
            State {
                unanswered: 1,
                ..open_extended(Idle)
            },
        ),
        case(
            "a named Parse is kept",
            Idle,
            vec![
                Client(cat(&[fe::parse("s1", "SELECT 1"), fe::sync()])),
                Node(cat(&[be::parse_complete(), be::ready(b'I')])),
            ],
            State {
                statements: names(&["s1"]),
                ..idle()
            },
        ),
        case(
            "an unnamed Parse is not",
            Idle,
            vec![
                Client(cat(&[fe::parse("", "SELECT 1"), fe::sync()])),
                Node(cat(&[be::parse_complete(), be::ready(b'I')])),
            ],
            idle(),
        ),
        case(
            "Close of a statement forgets it, of a portal does not",
            Idle,
            vec![
                Client(cat(&[
                    fe::parse("s1", "SELECT 1"),
                    fe::parse("s2", "SELECT 2"),
                    fe::close(b'S', "s1"),
                    fe::close(b'P', "s2"),
                    fe::sync(),
                ])),
                Node(cat(&[
                    be::parse_complete(),
                    be::parse_complete(),
                    be::close_complete(),
                    be::close_complete(),
                    be::ready(b'I'),
                ])),
            ],
            State {
                statements: names(&["s2"]),
                ..idle()
            },
        ),
        case(
            "Bind of a named COMMIT statement is a COMMIT",
            InTransaction,
            vec![
                Client(cat(&[fe::parse("c", "COMMIT"), fe::sync()])),
                Node(cat(&[be::parse_complete(), be::ready(b'T')])),
                Client(cat(&[fe::bind("", "c"), fe::execute(), fe::sync()])),
            ],
            State {
                in_flight: InFlight {
                    commit: true,
                    rollback: false,
                    extended: true,
                },
                statements: names(&["c"]),
                ..busy(InTransaction, 1)
            },
        ),
        case(
            "Bind of an unknown statement marks nothing but the extended protocol",
            InTransaction,
            vec![Client(cat(&[
                fe::bind("", "nope"),
                fe::execute(),
                fe::sync(),
            ]))],
            State {
                in_flight: InFlight {
                    extended: true,
                    ..InFlight::default()
                },
                ..busy(InTransaction, 1)
            },
        ),
        case(
            "a Parse of SET makes the settings dirty",
            Idle,
            vec![
                Client(cat(&[fe::parse("", "SET TimeZone = 'UTC'"), fe::sync()])),
                Node(cat(&[be::parse_complete(), be::ready(b'I')])),
            ],
            State {
                settings_dirty: true,
                ..idle()
            },
        ),
        case(
            "DISCARD ALL dirties the settings; the capture at the boundary reads which statements are left",
            Idle,
            vec![
                Client(cat(&[fe::parse("s1", "SELECT 1"), fe::sync()])),
                Node(cat(&[be::parse_complete(), be::ready(b'I')])),
                Client(fe::query("DISCARD ALL")),
                Node(cat(&[be::complete("DISCARD ALL"), be::ready(b'I')])),
            ],
            State {
                settings_dirty: true,
                statements: names(&["s1"]),
                ..idle()
            },
        ),
        case(
            "a FunctionCall is a request",
            Idle,
            vec![Client(fe::function_call())],
            busy(Idle, 1),
        ),
        case(
            "COPY FROM STDIN: in COPY from CopyInResponse",
            Idle,
            vec![
                Client(fe::query("COPY t FROM STDIN")),
                Node(be::copy_response(b'G')),
                Client(fe::copy_data(b"1\n")),
            ],
            State {
                in_copy: true,
                ..busy(Idle, 1)
            },
        ),
        case(
            "COPY FROM STDIN done: out of COPY at ReadyForQuery",
            Idle,
            vec![
                Client(fe::query("COPY t FROM STDIN")),
                Node(be::copy_response(b'G')),
                Client(cat(&[fe::copy_data(b"1\n"), fe::copy_done()])),
                Node(cat(&[be::complete("COPY 1"), be::ready(b'I')])),
            ],
            idle(),
        ),
        case(
            "COPY TO STDOUT: CopyOutResponse",
            Idle,
            vec![
                Client(fe::query("COPY t TO STDOUT")),
                Node(be::copy_response(b'H')),
            ],
            State {
                in_copy: true,
                ..busy(Idle, 1)
            },
        ),
        case(
            "replication COPY: CopyBothResponse",
            Idle,
            vec![
                Client(fe::query("START_REPLICATION")),
                Node(be::copy_response(b'W')),
            ],
            State {
                in_copy: true,
                ..busy(Idle, 1)
            },
        ),
        case(
            "a FATAL error: the node ends the connection itself",
            Idle,
            vec![
                Client(fe::query("SELECT 1")),
                Node(be::error("FATAL", "28000")),
            ],
            State {
                node_fatal: true,
                ..busy(Idle, 1)
            },
        ),
        case(
            "a PANIC counts as FATAL",
            Idle,
            vec![
                Client(fe::query("SELECT 1")),
                Node(be::error("PANIC", "XX000")),
            ],
            State {
                node_fatal: true,
                ..busy(Idle, 1)
            },
        ),
        case(
            "an ERROR is not FATAL",
            Idle,
            vec![
                Client(fe::query("SELECT 1")),
                Node(be::error("ERROR", "22012")),
            ],
            busy(Idle, 1),
        ),
        case(
            "FATAL 57P01: the node is shutting down",
            Idle,
            vec![
                Client(fe::query("SELECT 1")),
                Node(be::error("FATAL", "57P01")),
            ],
            State {
                fatal_withheld: true,
                ..busy(Idle, 1)
            },
        ),
        case(
            "FATAL 57P02: crash shutdown",
            InTransaction,
            vec![Node(be::error("FATAL", "57P02"))],
            State {
                fatal_withheld: true,
                ..in_tx()
            },
        ),
        case(
            "FATAL 57P03: cannot connect now",
            Idle,
            vec![Node(be::error("FATAL", "57P03"))],
            State {
                fatal_withheld: true,
                ..idle()
            },
        ),
        case(
            "ERROR 57P01 is not a shutdown",
            Idle,
            vec![Node(be::error("ERROR", "57P01"))],
            idle(),
        ),
        case(
            "half a node message: between no requests",
            Idle,
            vec![
                Client(fe::query("SELECT 1")),
                Node(cat(&[be::complete("SELECT 1"), be::ready(b'I')])),
                Node(be::data_row("12345")[..8].to_vec()),
            ],
            State {
                at_boundary: false,
                between_requests: false,
                ..idle()
            },
        ),
        case(
            "half a client message: between no requests",
            Idle,
            vec![Client(fe::copy_data(b"12345")[..7].to_vec())],
            State {
                at_boundary: false,
                between_requests: false,
                ..idle()
            },
        ),
        case(
            "the rest of a client message arrives",
            Idle,
            vec![
                Client(fe::copy_data(b"12345")[..7].to_vec()),
                Client(fe::copy_data(b"12345")[7..].to_vec()),
            ],
            idle(),
        ),
        case(
            "the backend died: its side is forgotten, the statements and status stay",
            InTransaction,
            vec![
                Client(cat(&[fe::parse("s1", "COMMIT"), fe::sync()])),
                Node(cat(&[be::parse_complete(), be::ready(b'T')])),
                Client(cat(&[fe::query("COMMIT"), fe::bind("", "s1")])),
                Node(cat(&[be::copy_response(b'G'), be::error("FATAL", "28000")])),
                ResetBackend,
            ],
            State {
                statements: names(&["s1"]),
                ..in_tx()
            },
        ),
    ];
    let count = cases.len();
    for c in cases {
        let mut t = tracker(c.start, c.watch_pins);
        for (i, step) in c.steps.iter().enumerate() {
            if let Err(e) = feed(&mut t, step) {
                panic!("{}: step {i} refused: {e}", c.name);
            }
        }
        assert_eq!(state(&t), c.want, "{}", c.name);
    }
    assert!(count >= 50, "{count}");
}

#[test]
fn parameters_follow_parameter_status() {
    /// Parameter names and their expected values (None: never reported).
    type Values = &'static [(&'static str, Option<&'static str>)];
    // (case, node messages, expected values)
    let cases: &[(&str, Vec<Vec<u8>>, Values)] = &[
        (
            "a new parameter is added",
            vec![be::parameter("TimeZone", "UTC")],
            &[("TimeZone", Some("UTC")), ("application_name", Some("app"))],
        ),
        (
            "a reported one is replaced",
            vec![be::parameter("application_name", "other")],
            &[("application_name", Some("other"))],
        ),
        (
            "the latest value wins",
            vec![
                be::parameter("DateStyle", "ISO, MDY"),
                be::parameter("DateStyle", "German"),
            ],
            &[("DateStyle", Some("German"))],
        ),
        (
            "between other replies (SET's CommandComplete and ReadyForQuery)",
            vec![
                be::parameter("search_path", "a, b"),
                be::complete("SET"),
                be::ready(b'I'),
            ],
            &[("search_path", Some("a, b"))],
        ),
        (
            "a malformed ParameterStatus (no value) changes nothing",
            vec![msg(b'S', b"TimeZone\0")],
            &[("TimeZone", None), ("application_name", Some("app"))],
        ),
    ];
    for (name, messages, want) in cases {
        let mut t = tracker(TxStatus::Idle, false);
        let scanned = t.scan_backend(&cat(messages));
        assert_eq!(scanned.forward, cat(messages).len(), "{name}");
        for (k, v) in *want {
            assert_eq!(t.parameters.get(k), *v, "{name}: {k}");
        }
    }
}

/// What one scan returns: bytes to forward and a stop, or a refusal.
#[derive(Debug, PartialEq)]
enum Scan {
    Forward(usize, Option<usize>),
    Refused,
}

#[test]
fn scans_forward_what_is_whole_and_stop_where_they_must() {
    let q = fe::query("SELECT 1");
    let parse = fe::parse("s1", "SELECT 1");
    let rfq = be::ready(b'I');
    let fatal = be::error("FATAL", "57P01");
    let long_query = fe::query(&format!("SELECT '{}'", "x".repeat(4000)));
    let cases: Vec<(&str, Step, Scan)> = vec![
        (
            "whole client messages are forwarded",
            Client(cat(&[q.clone(), fe::sync()])),
            Scan::Forward(q.len() + 5, None),
        ),
        (
            "an incomplete header waits",
            Client(q[..3].to_vec()),
            Scan::Forward(0, None),
        ),
        (
            "a query waits for its first words before it is classified",
            Client(q[..7].to_vec()),
            Scan::Forward(0, None),
        ),
        (
            "a long query is forwarded as it comes once its first KiB is here",
            Client(long_query[..1100].to_vec()),
            Scan::Forward(1100, None),
        ),
        (
            "an inspected message (Parse) waits until whole",
            Client(cat(&[q.clone(), parse[..parse.len() - 1].to_vec()])),
            Scan::Forward(q.len(), None),
        ),
        (
            "Terminate stops the scan and is not forwarded",
            Client(cat(&[q.clone(), fe::terminate(), q.clone()])),
            Scan::Forward(q.len(), Some(5)),
        ),
        (
            "an unknown client tag is refused",
            Client(msg(b'Y', b"")),
            Scan::Refused,
        ),
        (
            "a Sync with a body is refused",
            Client(msg(b'S', b"x")),
            Scan::Refused,
        ),
        (
            "a control message over the small limit is refused",
            Client(msg(b'D', &[b'S'; 10_000])),
            Scan::Refused,
        ),
        (
            "a Parse without its NUL is refused",
            Client(msg(b'P', b"s1")),
            Scan::Refused,
        ),
        (
            "a Close without a name is refused",
            Client(msg(b'C', b"")),
            Scan::Refused,
        ),
        (
            "an incomplete ReadyForQuery waits",
            Node(cat(&[be::complete("SELECT 1"), rfq[..5].to_vec()])),
            Scan::Forward(be::complete("SELECT 1").len(), None),
        ),
        (
            "the node's shutdown FATAL stops the scan, withheld",
            Node(cat(&[be::complete("SELECT 1"), fatal.clone(), rfq.clone()])),
            Scan::Forward(be::complete("SELECT 1").len(), Some(fatal.len())),
        ),
        (
            "a node length under 4 forwards everything as it is",
            Node(vec![b'D', 0, 0, 0, 1, 9, 9]),
            Scan::Forward(7, None),
        ),
    ];
    for (name, step, want) in cases {
        let mut t = tracker(TxStatus::Idle, false);
        let got = match feed(&mut t, &step) {
            Ok(s) => Scan::Forward(s.forward, s.stopped),
            Err(_) => Scan::Refused,
        };
        assert_eq!(got, want, "{name}");
    }
}

// ---------------------------------------------------------------------------------------------
// Properties

/// Feeds `chunks` as the relay does: what a scan does not forward stays in front of the next
/// chunk.
fn feed_in_chunks(t: &mut Tracker, stream: &[u8], cuts: &[usize]) {
    let mut pending: Vec<u8> = Vec::new();
    let mut at = 0;
    let mut ends: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
    ends.push(stream.len());
    ends.sort_unstable();
    for end in ends {
        pending.extend_from_slice(&stream[at..end.max(at)]);
        at = end.max(at);
        let s = t.scan_backend(&pending);
        pending.drain(..s.forward + s.stopped.unwrap_or(0));
    }
}

fn node_message() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::sample::select(vec![b'I', b'T', b'E']).prop_map(be::ready),
        "[a-z]{1,8}".prop_map(|v| be::complete(&v)),
        ("[a-z_]{1,8}", "[a-zA-Z0-9 ,]{0,12}").prop_map(|(k, v)| be::parameter(&k, &v)),
        "[a-z0-9]{0,40}".prop_map(|v| be::data_row(&v)),
        prop::sample::select(vec!["42P01", "22012", "28000"]).prop_map(|c| be::error("ERROR", c)),
        prop::sample::select(vec![b'G', b'H']).prop_map(be::copy_response),
    ]
}

proptest! {
    /// However the node's bytes are cut into reads, the tracker ends up knowing the same.
    #[test]
    fn node_bytes_cut_anywhere_teach_the_same(
        messages in prop::collection::vec(node_message(), 0..20),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
        requests in 0u32..4,
    ) {
        let stream = messages.concat();
        let whole = {
            let mut t = tracker(TxStatus::Idle, false);
            t.unanswered = requests;
            t.scan_backend(&stream);
            t
        };
        let mut cut = tracker(TxStatus::Idle, false);
        cut.unanswered = requests;
        feed_in_chunks(&mut cut, &stream, &cuts);
        prop_assert_eq!(state(&cut), state(&whole));
        let params = |t: &Tracker| {
            t.parameters.iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect::<Vec<_>>()
        };
        prop_assert_eq!(params(&cut), params(&whole));
    }
}

#[test]
fn notifications_from_the_backend_itself_are_marked_for_the_advertised_pid() {
    let notification = |pid: u32, channel: &str| {
        let mut body = pid.to_be_bytes().to_vec();
        cstr(&mut body, channel);
        cstr(&mut body, "");
        msg(b'A', &body)
    };
    let ready = msg(b'Z', b"I");
    let own = notification(7, "mine");
    let other = notification(8, "theirs");
    let stream = cat(&[own.clone(), other.clone(), ready.clone(), own.clone()]);
    // (rewrite, the offsets of the pids to patch)
    type Rewrite = Option<(u32, u32)>;
    let own_at = [5, own.len() + other.len() + ready.len() + 5];
    let cases: [(Rewrite, Vec<usize>); 3] = [
        (None, vec![]),
        (Some((7, 99)), own_at.to_vec()),
        (Some((9, 99)), vec![]),
    ];
    for (rewrite, want) in cases {
        let mut t = tracker(TxStatus::Idle, false);
        t.pid_rewrite = rewrite;
        let scanned = t.scan_backend(&stream);
        assert_eq!(scanned.forward, stream.len(), "{rewrite:?}");
        assert_eq!(t.pid_patches, want, "{rewrite:?}");
    }
}
