//! A client's first packets: SSLRequest and GSSENCRequest (answered `N`), CancelRequest, and
//! the StartupMessage, with protocol-version negotiation.

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::error::SessionError;
use crate::protocol::message;
use crate::protocol::startup::{
    self, CancelKey, StartupPacket, StartupParams, PROTOCOL_3_MINOR_SUPPORTED,
};

/// What a new connection is for.
#[derive(Debug)]
pub enum Opening {
    Session(StartupParams),
    Cancel(CancelKey),
}

fn gone(e: std::io::Error) -> SessionError {
    SessionError::ClientGone(e)
}

/// Reads packets until a StartupMessage or CancelRequest arrives, refusing encryption (no TLS
/// yet) the way PostgreSQL does when it is not configured.
pub async fn read_opening(client: &mut TcpStream) -> Result<Opening, SessionError> {
    let mut refused_ssl = false;
    let mut refused_gss = false;
    loop {
        let len = client.read_u32().await.map_err(gone)?;
        let body_len = startup::check_length(len)?;
        let mut body = vec![0u8; body_len];
        client.read_exact(&mut body).await.map_err(gone)?;
        match startup::parse(&body)? {
            StartupPacket::SslRequest if !refused_ssl => {
                refused_ssl = true;
                client.write_all(b"N").await.map_err(gone)?;
            }
            StartupPacket::GssEncRequest if !refused_gss => {
                refused_gss = true;
                client.write_all(b"N").await.map_err(gone)?;
            }
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                return Err(SessionError::Protocol(
                    "encryption was requested twice".into(),
                ));
            }
            StartupPacket::Cancel(key) => return Ok(Opening::Cancel(key)),
            StartupPacket::Startup(params) => {
                check_params(&params)?;
                let unrecognized = params.protocol_options();
                if params.minor > PROTOCOL_3_MINOR_SUPPORTED || !unrecognized.is_empty() {
                    let mut out = BytesMut::new();
                    message::negotiate_protocol_version(
                        &mut out,
                        PROTOCOL_3_MINOR_SUPPORTED,
                        &unrecognized,
                    );
                    client.write_all(&out).await.map_err(gone)?;
                }
                return Ok(Opening::Session(params));
            }
        }
    }
}

/// Startup parameters graywire cannot serve.
fn check_params(params: &StartupParams) -> Result<(), SessionError> {
    if let Some(r) = params.get("replication") {
        let off = matches!(
            r.to_ascii_lowercase().as_str(),
            "false" | "off" | "no" | "0"
        );
        if !off {
            return Err(SessionError::Unsupported("replication connections"));
        }
    }
    Ok(())
}
