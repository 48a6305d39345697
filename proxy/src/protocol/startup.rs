//! The untagged packets a client may open a connection with: StartupMessage, SSLRequest,
//! GSSENCRequest and CancelRequest, parsed from their bytes (no I/O here).

use thiserror::Error;

/// Like PostgreSQL (MAX_STARTUP_PACKET_LENGTH), refuse startup packets above this length.
pub const MAX_STARTUP_PACKET: usize = 10_000;

const CANCEL_REQUEST_CODE: u32 = 80_877_102;
const SSL_REQUEST_CODE: u32 = 80_877_103;
const GSSENC_REQUEST_CODE: u32 = 80_877_104;
const PROTOCOL_3_MAJOR: u32 = 3;

/// The newest minor version of protocol 3 graywire speaks.
pub const PROTOCOL_3_MINOR_SUPPORTED: u32 = 0;

/// A key that identifies a session for CancelRequest (BackendKeyData).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CancelKey {
    pub pid: u32,
    pub secret: u32,
}

/// A parsed StartupMessage (protocol 3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupParams {
    /// The minor version the client asked for.
    pub minor: u32,
    /// Parameters in the order the client sent them, `user` and `database` included.
    pub params: Vec<(String, String)>,
}

impl StartupParams {
    pub fn get(&self, key: &str) -> Option<&str> {
        // PostgreSQL lets a later duplicate win.
        self.params
            .iter()
            .rfind(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Protocol-extension options (`_pq_.*`) graywire does not recognise (all of them).
    pub fn protocol_options(&self) -> Vec<String> {
        self.params
            .iter()
            .filter(|(k, _)| k.starts_with("_pq_."))
            .map(|(k, _)| k.clone())
            .collect()
    }
}

/// What a client's first packet asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel(CancelKey),
    Startup(StartupParams),
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum StartupError {
    #[error("invalid length of startup packet: {0}")]
    BadLength(usize),
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.{max}", max = PROTOCOL_3_MINOR_SUPPORTED)]
    UnsupportedProtocol { major: u32, minor: u32 },
    #[error("invalid startup packet layout: {0}")]
    Malformed(&'static str),
    #[error("no PostgreSQL user name specified in startup packet")]
    NoUser,
}

/// Checks the 4-byte length that opens every untagged packet; returns the body length.
pub fn check_length(len: u32) -> Result<usize, StartupError> {
    let len = len as usize;
    if !(8..=MAX_STARTUP_PACKET).contains(&len) {
        return Err(StartupError::BadLength(len));
    }
    Ok(len - 4)
}

/// Parses a packet body (everything after the length word).
pub fn parse(body: &[u8]) -> Result<StartupPacket, StartupError> {
    if body.len() < 4 {
        return Err(StartupError::Malformed("packet too short"));
    }
    let code = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    let rest = &body[4..];
    match code {
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE if !rest.is_empty() => {
            Err(StartupError::Malformed("request code with trailing bytes"))
        }
        SSL_REQUEST_CODE => Ok(StartupPacket::SslRequest),
        GSSENC_REQUEST_CODE => Ok(StartupPacket::GssEncRequest),
        CANCEL_REQUEST_CODE => {
            if rest.len() != 8 {
                return Err(StartupError::Malformed("cancel request is not 16 bytes"));
            }
            Ok(StartupPacket::Cancel(CancelKey {
                pid: u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]),
                secret: u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]),
            }))
        }
        _ => {
            let major = code >> 16;
            let minor = code & 0xffff;
            if major != PROTOCOL_3_MAJOR {
                return Err(StartupError::UnsupportedProtocol { major, minor });
            }
            let params = parse_params(rest)?;
            let startup = StartupParams { minor, params };
            if startup.get("user").is_none_or(str::is_empty) {
                return Err(StartupError::NoUser);
            }
            Ok(StartupPacket::Startup(startup))
        }
    }
}

fn parse_params(mut rest: &[u8]) -> Result<Vec<(String, String)>, StartupError> {
    let mut params = Vec::new();
    loop {
        let Some(end) = rest.iter().position(|&b| b == 0) else {
            return Err(StartupError::Malformed("missing terminator"));
        };
        if end == 0 {
            // The empty name that ends the list; nothing may follow it.
            if rest.len() != 1 {
                return Err(StartupError::Malformed("bytes after the terminator"));
            }
            return Ok(params);
        }
        let key = std::str::from_utf8(&rest[..end])
            .map_err(|_| StartupError::Malformed("parameter name is not UTF-8"))?;
        rest = &rest[end + 1..];
        let Some(vend) = rest.iter().position(|&b| b == 0) else {
            return Err(StartupError::Malformed(
                "parameter value without terminator",
            ));
        };
        let value = std::str::from_utf8(&rest[..vend])
            .map_err(|_| StartupError::Malformed("parameter value is not UTF-8"))?;
        rest = &rest[vend + 1..];
        params.push((key.to_owned(), value.to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(code: u32, rest: &[u8]) -> Vec<u8> {
        let mut v = code.to_be_bytes().to_vec();
        v.extend_from_slice(rest);
        v
    }

    #[test]
    fn parses_a_startup_message() {
        let b = body(196_608, b"user\0app\0database\0db\0options\0-c x=1\0\0");
        let StartupPacket::Startup(s) = parse(&b).expect("parse") else {
            panic!("not startup")
        };
        assert_eq!(s.minor, 0);
        assert_eq!(s.get("user"), Some("app"));
        assert_eq!(s.get("options"), Some("-c x=1"));
        assert!(s.protocol_options().is_empty());
    }

    #[test]
    fn a_later_duplicate_wins_as_in_postgresql() {
        let b = body(196_608, b"user\0a\0database\0x\0database\0y\0\0");
        let StartupPacket::Startup(s) = parse(&b).expect("parse") else {
            panic!("not startup")
        };
        assert_eq!(s.get("database"), Some("y"));
    }

    #[test]
    fn parses_requests() {
        assert_eq!(parse(&body(80_877_103, b"")), Ok(StartupPacket::SslRequest));
        assert_eq!(
            parse(&body(80_877_104, b"")),
            Ok(StartupPacket::GssEncRequest)
        );
        let c = parse(&body(80_877_102, &[0, 0, 0, 7, 0, 0, 0, 9])).expect("cancel");
        assert_eq!(c, StartupPacket::Cancel(CancelKey { pid: 7, secret: 9 }));
    }

    #[test]
    fn refuses_bad_packets() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                body(131_072, b"user\0a\0\0"),
                "unsupported frontend protocol 2.0",
            ),
            (
                body(0x0004_0000, b"\0"),
                "unsupported frontend protocol 4.0",
            ),
            (body(196_608, b"user\0app\0"), "missing terminator"),
            (
                body(196_608, b"user\0app"),
                "parameter value without terminator",
            ),
            (body(196_608, b"user\0a\0\0junk"), "bytes after"),
            (body(196_608, b"database\0x\0\0"), "no PostgreSQL user name"),
            (body(196_608, b"user\0\xff\0\0"), "not UTF-8"),
            (body(80_877_102, &[0, 0, 0, 7]), "not 16 bytes"),
            (body(80_877_103, b"x"), "trailing"),
            (vec![0, 1], "too short"),
        ];
        for (b, want) in cases {
            let err = parse(&b).expect_err(want).to_string();
            assert!(err.contains(want), "{err:?} should contain {want:?}");
        }
    }

    #[test]
    fn length_bounds() {
        assert!(check_length(7).is_err());
        assert_eq!(check_length(8), Ok(4));
        assert!(check_length(10_001).is_err());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any bytes parse to a packet or an error, never a panic.
            #[test]
            fn arbitrary_bodies_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
                let _ = parse(&bytes);
            }

            /// Parameters round-trip through the wire format.
            #[test]
            fn parameters_round_trip(
                params in prop::collection::btree_map("[a-z_]{1,12}", "[ -~]{0,40}", 0..8)
            ) {
                let mut rest = b"user\0u\0".to_vec();
                for (k, v) in &params {
                    if k == "user" { continue; }
                    rest.extend_from_slice(k.as_bytes()); rest.push(0);
                    rest.extend_from_slice(v.as_bytes()); rest.push(0);
                }
                rest.push(0);
                let StartupPacket::Startup(s) = parse(&body(196_608, &rest)).expect("valid") else {
                    panic!("not a startup packet")
                };
                for (k, v) in &params {
                    if k != "user" { prop_assert_eq!(s.get(k), Some(v.as_str())); }
                }
            }
        }
    }
}
