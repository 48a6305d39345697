//! Client authentication: graywire checks the client itself (trust, cleartext password, md5,
//! SCRAM-SHA-256) against its configured users, before any node is involved.

use bytes::BytesMut;
use md5::{Digest, Md5};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{ClientAuth, StoredSecret, UserConfig};
use crate::error::SessionError;
use crate::protocol::frame::{read_cstr, SMALL_MESSAGE_LIMIT};
use crate::protocol::message;
use crate::protocol::scram::{self, constant_time_eq, ScramError, ScramServer, ScramVerifier};

fn gone(e: std::io::Error) -> SessionError {
    SessionError::ClientGone(e)
}

/// Refuses a user graywire does not know the way it refuses a wrong password: a SCRAM
/// exchange against a verifier no password matches, then 28P01, so a client cannot tell an
/// unknown user from a known one.
pub async fn refuse_unknown(client: &mut TcpStream, name: &str, secret: &[u8; 32]) -> SessionError {
    let verifier = ScramVerifier::mock(name, secret);
    match scram_exchange(client, &verifier, name).await {
        Ok(()) => SessionError::BadPassword(name.to_owned()),
        Err(e) => e,
    }
}

/// Runs the exchange for `user`'s method. On success the caller sends AuthenticationOk.
pub async fn authenticate(client: &mut TcpStream, user: &UserConfig) -> Result<(), SessionError> {
    let bad_password = || SessionError::BadPassword(user.name.clone());
    let mut out = BytesMut::new();
    match &user.auth {
        ClientAuth::Trust => Ok(()),
        ClientAuth::Password(stored) => {
            message::authentication_cleartext_password(&mut out);
            client.write_all(&out).await.map_err(gone)?;
            let body = read_password_message(client).await?;
            let (given, _) = read_cstr(&body)
                .ok_or_else(|| SessionError::Protocol("malformed password packet".into()))?;
            // Like PostgreSQL: an empty password is never accepted.
            if given.is_empty() {
                return Err(bad_password());
            }
            let ok = match stored {
                StoredSecret::Plain(p) => constant_time_eq(p.expose().as_bytes(), given.as_bytes()),
                StoredSecret::Md5(h) => {
                    let computed = postgres_protocol::password::md5(given.as_bytes(), &user.name);
                    constant_time_eq(computed.as_bytes(), h.expose().as_bytes())
                }
                StoredSecret::Scram(v) => v.matches_password(given),
            };
            ok.then_some(()).ok_or_else(bad_password)
        }
        ClientAuth::Md5 { md5_hash } => {
            let salt: [u8; 4] = rand::random();
            message::authentication_md5_password(&mut out, salt);
            client.write_all(&out).await.map_err(gone)?;
            let body = read_password_message(client).await?;
            let (given, _) = read_cstr(&body)
                .ok_or_else(|| SessionError::Protocol("malformed password packet".into()))?;
            let expected = md5_salted(md5_hash, salt);
            constant_time_eq(expected.as_bytes(), given.as_bytes())
                .then_some(())
                .ok_or_else(bad_password)
        }
        ClientAuth::ScramSha256(verifier) => scram_exchange(client, verifier, &user.name).await,
    }
}

/// The SCRAM-SHA-256 exchange against `verifier`; a wrong proof is a wrong password of
/// `name`.
async fn scram_exchange(
    client: &mut TcpStream,
    verifier: &ScramVerifier,
    name: &str,
) -> Result<(), SessionError> {
    let mut out = BytesMut::new();
    message::authentication_sasl(&mut out, &[scram::MECHANISM]);
    client.write_all(&out).await.map_err(gone)?;
    let mut server = ScramServer::new(verifier);

    let body = read_password_message(client).await?;
    let (mechanism, rest) = read_cstr(&body)
        .ok_or_else(|| SessionError::Protocol("malformed SASLInitialResponse".into()))?;
    if rest.len() < 4 {
        return Err(SessionError::Protocol(
            "malformed SASLInitialResponse".into(),
        ));
    }
    let n = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
    let data = &rest[4..];
    if n < 0 || n as usize != data.len() {
        return Err(SessionError::Protocol(
            "SASLInitialResponse length mismatch".into(),
        ));
    }
    let server_first = server.client_first(mechanism, data)?;
    out.clear();
    message::authentication_sasl_continue(&mut out, &server_first);
    client.write_all(&out).await.map_err(gone)?;

    let body = read_password_message(client).await?;
    let server_final = server.client_final(&body).map_err(|e| match e {
        ScramError::BadProof => SessionError::BadPassword(name.to_owned()),
        other => other.into(),
    })?;
    out.clear();
    message::authentication_sasl_final(&mut out, &server_final);
    client.write_all(&out).await.map_err(gone)
}

/// `md5` + md5(stored_hash_hex + salt), what a client sends for the md5 method.
fn md5_salted(stored: &str, salt: [u8; 4]) -> String {
    let hex_part = stored.strip_prefix("md5").unwrap_or(stored);
    let mut h = Md5::new();
    h.update(hex_part.as_bytes());
    h.update(salt);
    let digest = h.finalize();
    let mut s = String::with_capacity(35);
    s.push_str("md5");
    for b in digest.iter() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Reads one PasswordMessage/SASL message ('p') and returns its body.
async fn read_password_message(client: &mut TcpStream) -> Result<Vec<u8>, SessionError> {
    let tag = client.read_u8().await.map_err(gone)?;
    if tag != b'p' {
        return Err(SessionError::Protocol(format!(
            "expected password response, got message type {:?}",
            tag as char
        )));
    }
    let len = client.read_u32().await.map_err(gone)? as usize;
    if !(4..=SMALL_MESSAGE_LIMIT).contains(&len) {
        return Err(SessionError::Protocol(format!(
            "invalid password packet length {len}"
        )));
    }
    let mut body = vec![0u8; len - 4];
    client.read_exact(&mut body).await.map_err(gone)?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_salted_matches_what_libpq_computes() {
        // libpq: "md5" + md5(md5(password + user) + salt); postgres-protocol does the same.
        let salt = [1, 2, 3, 4];
        let stored = postgres_protocol::password::md5(b"secret", "app");
        let client_side = postgres_protocol::authentication::md5_hash(b"app", b"secret", salt);
        assert_eq!(md5_salted(&stored, salt), client_side);
    }
}
