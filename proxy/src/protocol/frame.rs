//! Walking a byte stream of tagged protocol messages without copying it.
//!
//! The relay forwards whole read buffers; a [`Framer`] only finds where each message starts,
//! checks its header, and hands the few messages graywire must look at (ReadyForQuery,
//! ParameterStatus, Terminate, …) to a callback whole. Large bodies (COPY data, big Bind or
//! DataRow messages) stream through in pieces and are never buffered.

use thiserror::Error;

/// Tag byte plus the 4-byte length.
pub const HEADER_LEN: usize = 5;

/// Frontend control messages are small; like PostgreSQL, refuse them above this length.
pub const SMALL_MESSAGE_LIMIT: usize = 10_000;

/// A message header that cannot be right.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("invalid frontend message type {tag} ({tag_char:?})")]
    UnknownTag { tag: u8, tag_char: char },
    #[error("invalid message length {len} for message type {tag_char:?}")]
    BadLength { tag_char: char, len: u32 },
    #[error("message of type {tag_char:?} is {len} bytes, over the limit of {limit}")]
    TooLarge {
        tag_char: char,
        len: usize,
        limit: usize,
    },
}

/// What the scanner should do with a message once its header is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handling {
    /// Forward it without looking at the body (may be split across reads).
    Stream,
    /// Collect it whole and show it to the callback before forwarding.
    Inspect,
    /// Too little of the body has arrived to classify the message: leave it, header
    /// included, for the next scan (which classifies it again).
    Wait,
}

/// What the callback decides about an inspected message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Forward it and go on.
    Forward,
    /// Stop scanning here: this message is consumed, not forwarded, and nothing after it is
    /// scanned yet.
    Stop,
}

/// The result of one [`Framer::scan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scanned {
    /// This many leading bytes may be forwarded now.
    pub forward: usize,
    /// When the callback said [`Flow::Stop`]: the length of the stopping message, which follows
    /// the forwardable bytes and must be dropped by the caller.
    pub stopped: Option<usize>,
}

/// Position in a message stream between reads: how much of the current message body is still
/// to pass through.
#[derive(Debug, Default, Clone)]
pub struct Framer {
    body_left: usize,
}

impl Framer {
    /// True when the stream stands exactly between two messages.
    pub fn at_message_start(&self) -> bool {
        self.body_left == 0
    }

    /// Consumes up to `available` bytes of a message body still passing through; returns how
    /// many (for dropping the rest of a message that can no longer be delivered).
    pub fn skip_body(&mut self, available: usize) -> usize {
        let n = self.body_left.min(available);
        self.body_left -= n;
        n
    }

    /// Scans `buf` (the bytes not yet forwarded). `classify(tag, length, body_start)` validates
    /// each header and chooses its [`Handling`] (`body_start` is as much of the body as has
    /// arrived, enough to peek at the first words of a query); `on_message(tag, whole_message)` sees inspected
    /// messages. Bytes of an incomplete header or of an incomplete inspected message stay
    /// unforwarded for the next call.
    pub fn scan<E>(
        &mut self,
        buf: &[u8],
        mut classify: impl FnMut(u8, usize, &[u8]) -> Result<Handling, E>,
        mut on_message: impl FnMut(u8, &[u8]) -> Result<Flow, E>,
    ) -> Result<Scanned, E> {
        let mut pos = 0;
        loop {
            if self.body_left > 0 {
                let n = self.body_left.min(buf.len() - pos);
                pos += n;
                self.body_left -= n;
                if self.body_left > 0 {
                    break;
                }
            }
            let rest = &buf[pos..];
            if rest.len() < HEADER_LEN {
                break;
            }
            let tag = rest[0];
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            let body_end = rest.len().min((1 + len).max(HEADER_LEN));
            match classify(tag, len, &rest[HEADER_LEN..body_end])? {
                Handling::Stream => {
                    pos += HEADER_LEN;
                    self.body_left = len - 4;
                }
                Handling::Inspect => {
                    let total = 1 + len;
                    if rest.len() < total {
                        break;
                    }
                    if on_message(tag, &rest[..total])? == Flow::Stop {
                        return Ok(Scanned {
                            forward: pos,
                            stopped: Some(total),
                        });
                    }
                    pos += total;
                }
                Handling::Wait => break,
            }
        }
        Ok(Scanned {
            forward: pos,
            stopped: None,
        })
    }
}

/// Checks a frontend (client → graywire) message header after startup: known tag, sane length,
/// under the limit for its kind. Returns the body length.
pub fn check_frontend_header(
    tag: u8,
    len: usize,
    max_message_size: usize,
) -> Result<(), FrameError> {
    let tag_char = tag as char;
    let limit = match tag {
        // Messages that carry user data: query text, statements, parameters, COPY data.
        b'Q' | b'P' | b'B' | b'd' | b'F' => max_message_size,
        // Control messages.
        b'E' | b'D' | b'C' | b'S' | b'H' | b'c' | b'f' | b'X' => SMALL_MESSAGE_LIMIT,
        _ => return Err(FrameError::UnknownTag { tag, tag_char }),
    };
    if len < 4 {
        return Err(FrameError::BadLength {
            tag_char,
            len: len as u32,
        });
    }
    let fixed_len = match tag {
        b'S' | b'H' | b'c' | b'X' => Some(4),
        _ => None,
    };
    if let Some(expected) = fixed_len {
        if len != expected {
            return Err(FrameError::BadLength {
                tag_char,
                len: len as u32,
            });
        }
    }
    if len > limit {
        return Err(FrameError::TooLarge {
            tag_char,
            len,
            limit,
        });
    }
    Ok(())
}

/// Splits a NUL-terminated string off the front of `body`.
pub fn read_cstr(body: &[u8]) -> Option<(&str, &[u8])> {
    let end = body.iter().position(|&b| b == 0)?;
    let s = std::str::from_utf8(&body[..end]).ok()?;
    Some((s, &body[end + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    /// Feeds `stream` to a framer in chunks of `chunk` bytes, the way reads would, and collects
    /// forwarded bytes and inspected tags.
    fn run(stream: &[u8], chunk: usize) -> (Vec<u8>, Vec<u8>) {
        let mut framer = Framer::default();
        let mut pending: Vec<u8> = Vec::new();
        let mut forwarded = Vec::new();
        let mut seen = Vec::new();
        for piece in stream.chunks(chunk) {
            pending.extend_from_slice(piece);
            let s = framer
                .scan(
                    &pending,
                    |tag, _, _| {
                        Ok::<_, ()>(if tag == b'Z' {
                            Handling::Inspect
                        } else {
                            Handling::Stream
                        })
                    },
                    |tag, m| {
                        assert_eq!(m[0], tag);
                        seen.push(tag);
                        Ok(Flow::Forward)
                    },
                )
                .expect("scan");
            forwarded.extend_from_slice(&pending[..s.forward]);
            pending.drain(..s.forward);
        }
        assert!(pending.is_empty(), "all bytes forwarded at the end");
        (forwarded, seen)
    }

    #[test]
    fn any_chunking_forwards_everything_and_sees_every_inspected_message() {
        let mut stream = Vec::new();
        stream.extend(msg(b'T', &[1; 30]));
        stream.extend(msg(b'D', &[2; 1000]));
        stream.extend(msg(b'Z', b"I"));
        stream.extend(msg(b'C', b"SELECT 1\0"));
        stream.extend(msg(b'Z', b"T"));
        for chunk in [1, 2, 3, 5, 7, 64, 4096] {
            let (fwd, seen) = run(&stream, chunk);
            assert_eq!(fwd, stream, "chunk {chunk}");
            assert_eq!(seen, b"ZZ", "chunk {chunk}");
        }
    }

    #[test]
    fn stop_consumes_the_message_and_forwards_what_came_before() {
        let mut stream = msg(b'Q', b"select 1\0");
        let q_len = stream.len();
        stream.extend(msg(b'X', b""));
        stream.extend(msg(b'Q', b"never\0"));
        let mut framer = Framer::default();
        let s = framer
            .scan(
                &stream,
                |_, _, _| Ok::<_, ()>(Handling::Inspect),
                |tag, _| {
                    Ok(if tag == b'X' {
                        Flow::Stop
                    } else {
                        Flow::Forward
                    })
                },
            )
            .expect("scan");
        assert_eq!(s.forward, q_len);
        assert_eq!(s.stopped, Some(5));
    }

    #[test]
    fn classify_errors_propagate() {
        let stream = msg(b'!', b"x");
        let mut framer = Framer::default();
        let r = framer.scan(
            &stream,
            |tag, len, _| check_frontend_header(tag, len, 1024).map(|_| Handling::Stream),
            |_, _| Ok(Flow::Forward),
        );
        assert!(matches!(r, Err(FrameError::UnknownTag { tag: b'!', .. })));
    }

    #[test]
    fn frontend_headers_are_checked() {
        assert!(check_frontend_header(b'Q', 100, 1024).is_ok());
        assert!(matches!(
            check_frontend_header(b'Q', 2048, 1024),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(matches!(
            check_frontend_header(b'Q', 3, 1024),
            Err(FrameError::BadLength { .. })
        ));
        assert!(matches!(
            check_frontend_header(b'S', 8, 1024),
            Err(FrameError::BadLength { .. })
        ));
        assert!(matches!(
            check_frontend_header(b'E', 20_000, 1 << 30),
            Err(FrameError::TooLarge { .. })
        ));
        assert!(matches!(
            check_frontend_header(b'Z', 5, 1024),
            Err(FrameError::UnknownTag { .. })
        ));
    }

    #[test]
    fn read_cstr_splits() {
        assert_eq!(read_cstr(b"ab\0cd"), Some(("ab", &b"cd"[..])));
        assert_eq!(read_cstr(b"ab"), None);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// A valid client stream, a read size, and how many Sync/Terminate messages it holds.
        fn arb_stream() -> impl Strategy<Value = (Vec<u8>, usize, usize)> {
            let tags =
                prop::sample::select(vec![b'Q', b'P', b'B', b'E', b'D', b'C', b'S', b'd', b'X']);
            let msgs =
                prop::collection::vec((tags, prop::collection::vec(any::<u8>(), 0..300)), 0..20);
            (msgs, 1usize..600).prop_map(|(msgs, chunk)| {
                let mut stream = Vec::new();
                let mut fixed = 0;
                for (tag, body) in msgs {
                    let body = if matches!(tag, b'S' | b'X') {
                        fixed += 1;
                        Vec::new()
                    } else {
                        body
                    };
                    stream.extend(msg(tag, &body));
                }
                (stream, chunk, fixed)
            })
        }

        proptest! {
            /// Any valid stream, cut into reads of any size, is forwarded byte for byte and
            /// every inspected message is seen once, whole.
            #[test]
            fn valid_streams_pass_whole((stream, chunk, fixed) in arb_stream()) {
                let mut framer = Framer::default();
                let mut pending = Vec::new();
                let mut forwarded = Vec::new();
                let mut inspected = 0usize;
                for piece in stream.chunks(chunk) {
                    pending.extend_from_slice(piece);
                    let s = framer.scan(
                        &pending,
                        |tag, len, _| {
                            check_frontend_header(tag, len, 1 << 20)?;
                            Ok(if tag == b'X' || tag == b'S' { Handling::Inspect } else { Handling::Stream })
                        },
                        |tag, m| {
                            assert!(tag == b'S' || tag == b'X');
                            assert_eq!(m.len(), 5, "inspected messages are seen whole");
                            inspected += 1;
                            Ok::<_, FrameError>(Flow::Forward)
                        },
                    ).expect("valid stream");
                    forwarded.extend_from_slice(&pending[..s.forward]);
                    pending.drain(..s.forward);
                }
                prop_assert!(pending.is_empty());
                prop_assert_eq!(forwarded, stream);
                prop_assert_eq!(inspected, fixed);
            }

            /// Arbitrary bytes never panic the framer and never make it forward more than it got.
            #[test]
            fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..2000), chunk in 1usize..300) {
                let mut framer = Framer::default();
                let mut pending = Vec::new();
                for piece in bytes.chunks(chunk) {
                    pending.extend_from_slice(piece);
                    match framer.scan(
                        &pending,
                        |tag, len, _| check_frontend_header(tag, len, 4096).map(|_| Handling::Stream),
                        |_, _| Ok(Flow::Forward),
                    ) {
                        Ok(s) => {
                            prop_assert!(s.forward <= pending.len());
                            pending.drain(..s.forward);
                        }
                        Err(_) => break,
                    }
                }
            }
        }
    }
}
