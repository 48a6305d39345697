//! A client's first packets: SSLRequest and GSSENCRequest (answered `N`), CancelRequest
//! (forwarded), and the StartupMessage, with protocol-version negotiation; then the client's
//! authentication (auth.rs) and its place under the connection cap.

use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::warn;

use crate::cancel::CancelOutcome;
use crate::config::{Config, UserConfig};
use crate::context::{Context, SessionSlot};
use crate::error::SessionError;
use crate::metrics as m;
use crate::protocol::message;
use crate::protocol::startup::{
    self, CancelKey, StartupPacket, StartupParams, PROTOCOL_3_MINOR_SUPPORTED,
};

use super::{auth, SessionLabel, CANCEL_TIMEOUT};

/// Opening and authentication. `None` for a CancelRequest (already handled).
pub(super) async fn open_and_authenticate<'c>(
    ctx: &Arc<Context>,
    client: &mut TcpStream,
    config: &'c Config,
    who: &mut SessionLabel,
) -> Result<Option<(StartupParams, &'c Arc<UserConfig>, SessionSlot)>, SessionError> {
    let params = match read_opening(client).await? {
        Opening::Cancel(key) => {
            let outcome = ctx.cancels.forward(key, CANCEL_TIMEOUT).await;
            let result = match &outcome {
                CancelOutcome::Forwarded => "forwarded",
                CancelOutcome::UnknownKey => "unknown_key",
                CancelOutcome::Idle => "idle",
                CancelOutcome::HeldCancelled => "held_cancelled",
                CancelOutcome::Failed(reason) => {
                    warn!(parent: &who.span(), %reason, "could not forward a cancel request");
                    "failed"
                }
            };
            metrics::counter!(m::CANCEL_REQUESTS_TOTAL, "result" => result).increment(1);
            return Ok(None);
        }
        Opening::Session(params) => params,
    };
    let user_name: &str = who
        .user
        .insert(params.get("user").unwrap_or_default().to_owned());
    let slot = ctx
        .try_open_session()
        .ok_or(SessionError::TooManyConnections)?;
    let Some(user) = config.user(user_name) else {
        return Err(auth::refuse_unknown(client, user_name, &ctx.mock_secret).await);
    };
    auth::authenticate(client, user).await?;
    Ok(Some((params, user, slot)))
}

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
async fn read_opening(client: &mut TcpStream) -> Result<Opening, SessionError> {
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
