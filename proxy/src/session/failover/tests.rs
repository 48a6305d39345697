//! Table-driven tests of [`answer_in_flight`]: a tracker is brought into a state by real
//! client (and node) messages, the answer's bytes are decoded and compared.

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;

use super::*;
use crate::metrics::SessionMetrics;
use crate::protocol::message::Parameters;

fn query(sql: &str) -> Vec<u8> {
    let mut b = BytesMut::new();
    frontend::query(sql, &mut b).expect("query");
    b.to_vec()
}

/// Parse (unnamed) and Bind and Execute of `sql`, without Sync.
fn extended(sql: &str) -> Vec<u8> {
    let mut b = BytesMut::new();
    frontend::parse("", sql, std::iter::empty(), &mut b).expect("parse");
    frontend::bind(
        "",
        "",
        std::iter::empty::<i16>(),
        std::iter::empty::<Option<&[u8]>>(),
        |_, _| Ok(postgres_protocol::IsNull::Yes),
        std::iter::empty::<i16>(),
        &mut b,
    )
    .map_err(|_| "bind")
    .expect("bind");
    frontend::execute("", 0, &mut b).expect("execute");
    b.to_vec()
}

fn sync() -> Vec<u8> {
    let mut b = BytesMut::new();
    frontend::sync(&mut b);
    b.to_vec()
}

/// CommandComplete and ReadyForQuery from the node.
fn answered(tag: &str, status: TxStatus) -> Vec<u8> {
    let mut b = BytesMut::new();
    message::command_complete(&mut b, tag);
    message::ready_for_query(&mut b, status);
    b.to_vec()
}

/// A tracker that starts in `status`, after the client sent `client` and the node answered
/// with `node`.
fn tracker(status: TxStatus, client: &[Vec<u8>], node: &[u8]) -> Tracker {
    let mut t = Tracker::new(
        Parameters::default(),
        status,
        1 << 20,
        false,
        &SessionMetrics::new(),
    );
    let bytes = client.concat();
    let scanned = t.scan_frontend(&bytes).expect("client bytes");
    assert_eq!(scanned.forward, bytes.len());
    let scanned = t.scan_backend(node);
    assert_eq!(scanned.forward, node.len());
    t
}

/// One decoded message of the answer.
#[derive(Debug, PartialEq)]
enum Reply {
    Error(String),
    Ready(u8),
    Complete(String),
}

fn decode(bytes: &BytesMut) -> Vec<Reply> {
    let mut buf = bytes.clone();
    let mut out = Vec::new();
    while let Some(m) = Message::parse(&mut buf).expect("well-formed") {
        out.push(match m {
            Message::ErrorResponse(body) => {
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
                let field = |t: u8| {
                    fields
                        .iter()
                        .find(|(k, _)| *k == t)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default()
                };
                assert_eq!(field(b'S'), "ERROR");
                let text = field(b'M');
                assert!(text.contains("pg1") && text.contains("eof"), "{text}");
                Reply::Error(field(b'C'))
            }
            Message::ReadyForQuery(body) => Reply::Ready(body.status()),
            Message::CommandComplete(body) => Reply::Complete(body.tag().expect("tag").to_owned()),
            _ => panic!("unexpected message"),
        });
    }
    assert!(buf.is_empty(), "trailing bytes");
    out
}

fn err(code: &str) -> Reply {
    Reply::Error(code.to_owned())
}
fn rollback() -> Reply {
    Reply::Complete("ROLLBACK".to_owned())
}
use Reply::Ready;

struct Case {
    name: &'static str,
    start: TxStatus,
    client: Vec<Vec<u8>>,
    node: Vec<u8>,
    sqlstate: &'static str,
    replies: Vec<Reply>,
    status: TxStatus,
    requests: u32,
}

#[test]
fn requests_in_flight_are_answered_by_what_could_have_happened() {
    use TxStatus::{Failed, Idle, InTransaction};
    let cases = vec![
        Case {
            name: "nothing in flight: nothing to answer",
            start: Idle,
            client: vec![],
            node: vec![],
            sqlstate: "40003",
            replies: vec![],
            status: Idle,
            requests: 0,
        },
        Case {
            name: "autocommit statement: outcome unknown",
            start: Idle,
            client: vec![query("INSERT INTO t VALUES (1)")],
            node: vec![],
            sqlstate: "40003",
            replies: vec![err("40003"), Ready(b'I')],
            status: Idle,
            requests: 1,
        },
        Case {
            name: "statement in a transaction: rolled back, safe to retry",
            start: InTransaction,
            client: vec![query("INSERT INTO t VALUES (1)")],
            node: vec![],
            sqlstate: "40001",
            replies: vec![err("40001"), Ready(b'E')],
            status: Failed,
            requests: 1,
        },
        Case {
            name: "statement in a failed transaction: rolled back",
            start: Failed,
            client: vec![query("SELECT 1")],
            node: vec![],
            sqlstate: "40001",
            replies: vec![err("40001"), Ready(b'E')],
            status: Failed,
            requests: 1,
        },
        Case {
            name: "COMMIT in a transaction: outcome unknown",
            start: InTransaction,
            client: vec![query("COMMIT")],
            node: vec![],
            sqlstate: "40003",
            replies: vec![err("40003"), Ready(b'I')],
            status: Idle,
            requests: 1,
        },
        Case {
            name: "COMMIT outside a transaction: outcome unknown",
            start: Idle,
            client: vec![query("COMMIT")],
            node: vec![],
            sqlstate: "40003",
            replies: vec![err("40003"), Ready(b'I')],
            status: Idle,
            requests: 1,
        },
        Case {
            name: "COMMIT of a failed transaction: outcome unknown",
            start: Failed,
            client: vec![query("END")],
            node: vec![],
            sqlstate: "40003",
            replies: vec![err("40003"), Ready(b'I')],
            status: Idle,
            requests: 1,
        },
        Case {
            name: "ROLLBACK in a transaction: it happened",
            start: InTransaction,
            client: vec![query("ROLLBACK")],
            node: vec![],
            sqlstate: "",
            replies: vec![rollback(), Ready(b'I')],
            status: Idle,
            requests: 0,
        },
        Case {
            name: "ROLLBACK of a failed transaction: it happened",
            start: Failed,
            client: vec![query("ABORT")],
            node: vec![],
            sqlstate: "",
            replies: vec![rollback(), Ready(b'I')],
            status: Idle,
            requests: 0,
        },
        Case {
            name: "ROLLBACK outside a transaction: like any autocommit statement",
            start: Idle,
            client: vec![query("ROLLBACK")],
            node: vec![],
            sqlstate: "40003",
            replies: vec![err("40003"), Ready(b'I')],
            status: Idle,
            requests: 1,
        },
        Case {
            name: "two ROLLBACKs in a transaction: both happened",
            start: InTransaction,
            client: vec![query("ROLLBACK"), query("ROLLBACK")],
            node: vec![],
            sqlstate: "",
            replies: vec![rollback(), Ready(b'I'), rollback(), Ready(b'I')],
            status: Idle,
            requests: 0,
        },
        Case {
            name: "ROLLBACK and COMMIT in flight: COMMIT's outcome is unknown",
            start: InTransaction,
            client: vec![query("ROLLBACK"), query("COMMIT")],
            node: vec![],
            sqlstate: "40003",
            replies: vec![err("40003"), Ready(b'I'), err("40003"), Ready(b'I')],
            status: Idle,
            requests: 2,
        },
        Case {
            name: "extended statement in a transaction: rolled back",
            start: InTransaction,
            client: vec![extended("UPDATE t SET x = 1"), sync()],
            node: vec![],
            sqlstate: "40001",
            replies: vec![err("40001"), Ready(b'E')],
            status: Failed,
            requests: 1,
        },
        Case {
            name: "extended ROLLBACK in a transaction: answered as an error",
            start: InTransaction,
            client: vec![extended("ROLLBACK"), sync()],
            node: vec![],
            sqlstate: "40001",
            replies: vec![err("40001"), Ready(b'E')],
            status: Failed,
            requests: 1,
        },
        Case {
            name: "extended COMMIT in a transaction: outcome unknown",
            start: InTransaction,
            client: vec![extended("COMMIT"), sync()],
            node: vec![],
            sqlstate: "40003",
            replies: vec![err("40003"), Ready(b'I')],
            status: Idle,
            requests: 1,
        },
        Case {
            name: "extended autocommit statement: outcome unknown",
            start: Idle,
            client: vec![extended("INSERT INTO t VALUES (1)"), sync()],
            node: vec![],
            sqlstate: "40003",
            replies: vec![err("40003"), Ready(b'I')],
            status: Idle,
            requests: 1,
        },
        Case {
            name: "open extended without Sync in a transaction: the error, no ReadyForQuery",
            start: InTransaction,
            client: vec![extended("UPDATE t SET x = 1")],
            node: vec![],
            sqlstate: "40001",
            replies: vec![err("40001")],
            status: Failed,
            requests: 1,
        },
        Case {
            name: "open extended without Sync outside a transaction",
            start: Idle,
            client: vec![extended("INSERT INTO t VALUES (1)")],
            node: vec![],
            sqlstate: "40003",
            replies: vec![err("40003")],
            status: Idle,
            requests: 1,
        },
        Case {
            name: "open ROLLBACK without Sync: an error like any extended request",
            start: InTransaction,
            client: vec![extended("ROLLBACK")],
            node: vec![],
            sqlstate: "40001",
            replies: vec![err("40001")],
            status: Failed,
            requests: 1,
        },
        Case {
            name: "a synced request and an open one after it",
            start: InTransaction,
            client: vec![extended("SELECT 1"), sync(), extended("SELECT 2")],
            node: vec![],
            sqlstate: "40001",
            replies: vec![err("40001"), Ready(b'E'), err("40001")],
            status: Failed,
            requests: 2,
        },
        Case {
            name: "three pipelined statements in a transaction",
            start: InTransaction,
            client: vec![query("SELECT 1"), query("SELECT 2"), query("SELECT 3")],
            node: vec![],
            sqlstate: "40001",
            replies: vec![
                err("40001"),
                Ready(b'E'),
                err("40001"),
                Ready(b'E'),
                err("40001"),
                Ready(b'E'),
            ],
            status: Failed,
            requests: 3,
        },
        Case {
            name: "two pipelined autocommit statements",
            start: Idle,
            client: vec![query("SELECT 1"), query("SELECT 2")],
            node: vec![],
            sqlstate: "40003",
            replies: vec![err("40003"), Ready(b'I'), err("40003"), Ready(b'I')],
            status: Idle,
            requests: 2,
        },
        Case {
            name: "COMMIT then a statement: outcome unknown for both",
            start: InTransaction,
            client: vec![query("COMMIT"), query("SELECT 1")],
            node: vec![],
            sqlstate: "40003",
            replies: vec![err("40003"), Ready(b'I'), err("40003"), Ready(b'I')],
            status: Idle,
            requests: 2,
        },
        Case {
            name: "the answered request is not answered again",
            start: InTransaction,
            client: vec![query("SELECT 1"), query("SELECT 2")],
            node: answered("SELECT 1", InTransaction),
            sqlstate: "40001",
            replies: vec![err("40001"), Ready(b'E')],
            status: Failed,
            requests: 1,
        },
        Case {
            name: "BEGIN answered, the next statement in flight: in the transaction",
            start: Idle,
            client: vec![query("BEGIN"), query("SELECT 1")],
            node: answered("BEGIN", InTransaction),
            sqlstate: "40001",
            replies: vec![err("40001"), Ready(b'E')],
            status: Failed,
            requests: 1,
        },
        Case {
            name: "COMMIT answered, the next statement in flight: outcome unknown",
            start: InTransaction,
            client: vec![query("COMMIT"), query("INSERT INTO t VALUES (1)")],
            node: answered("COMMIT", Idle),
            sqlstate: "40003",
            replies: vec![err("40003"), Ready(b'I')],
            status: Idle,
            requests: 1,
        },
    ];
    let node = NodeName::new("pg1");
    for c in cases {
        let t = tracker(c.start, &c.client, &c.node);
        let a = answer_in_flight(&t, &node, "eof");
        assert_eq!(
            a.sqlstate.map(|s| s.to_string()).unwrap_or_default(),
            c.sqlstate,
            "{}: sqlstate",
            c.name
        );
        assert_eq!(decode(&a.bytes), c.replies, "{}: replies", c.name);
        assert_eq!(a.status, c.status, "{}: status", c.name);
        assert_eq!(a.requests, c.requests, "{}: requests", c.name);
    }
}

/// A COMMIT whose Query message reaches graywire in two reads (header first, text after) is
/// still a COMMIT: if the node dies, the client is told 40003 (outcome unknown), never 40001
/// ("rolled back, safe to retry"), which could make it apply the transaction twice.
#[test]
fn a_commit_split_across_reads_is_still_a_commit() {
    let q = query("COMMIT");
    let mut missed = Vec::new();
    for cut in 1..q.len() {
        let mut t = Tracker::new(
            Parameters::default(),
            TxStatus::InTransaction,
            1 << 20,
            false,
            &SessionMetrics::new(),
        );
        let first = t.scan_frontend(&q[..cut]).expect("first read");
        t.scan_frontend(&q[first.forward..]).expect("second read");
        let a = answer_in_flight(&t, &NodeName::new("pg1"), "eof");
        let code = a.sqlstate.map(|s| s.to_string()).unwrap_or_default();
        if code != "40003" {
            missed.push((cut, code));
        }
    }
    assert_eq!(missed, vec![], "(cut after byte, SQLSTATE answered)");
}

/// A statement pipelined before a ROLLBACK inside a transaction gets 40001 (and `E`); the
/// ROLLBACK completes.
#[test]
fn a_statement_before_a_pipelined_rollback_is_not_answered_rollback() {
    let t = tracker(
        TxStatus::InTransaction,
        &[query("SELECT 1"), query("ROLLBACK")],
        &[],
    );
    let a = answer_in_flight(&t, &NodeName::new("pg1"), "eof");
    assert_eq!(
        decode(&a.bytes),
        vec![err("40001"), Ready(b'E'), rollback(), Ready(b'I')]
    );
    assert_eq!(a.status, TxStatus::Idle);
    assert_eq!(a.requests, 1);
}

/// `DEALLOCATE s1` (or `DISCARD TEMP`, `DISCARD PLANS`, `DISCARD SEQUENCES`) does not make the
/// tracker forget s2: the statements that survive are read from the backend at the boundary.
#[test]
fn dropping_one_statement_keeps_the_others() {
    let parse_named = |name: &str| {
        let mut b = BytesMut::new();
        frontend::parse(name, "SELECT 1", std::iter::empty(), &mut b).expect("parse");
        b.to_vec()
    };
    for sql in [
        "DEALLOCATE s1",
        "DISCARD TEMP",
        "DISCARD PLANS",
        "DISCARD SEQUENCES",
    ] {
        let t = tracker(
            TxStatus::Idle,
            &[parse_named("s1"), parse_named("s2"), sync(), query(sql)],
            &[],
        );
        assert!(t.statements.contains_key("s2"), "{sql} forgot s2");
        assert!(
            t.settings_dirty,
            "{sql}: the boundary captures what is left"
        );
    }
}
