//! The server side of SCRAM-SHA-256 (RFC 5802 / RFC 7677, as PostgreSQL uses it), and stored
//! verifiers in PostgreSQL's `SCRAM-SHA-256$iterations:salt$StoredKey:ServerKey` form.
//!
//! Pure: no I/O. The session feeds it the client's SASL messages and sends what it returns.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use thiserror::Error;

pub const MECHANISM: &str = "SCRAM-SHA-256";
const NONCE_BYTES: usize = 18;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("client selected an invalid SASL authentication mechanism {0:?}")]
    UnsupportedMechanism(String),
    #[error("channel binding is not supported by graywire without TLS")]
    ChannelBinding,
    #[error("SCRAM proof does not match")]
    BadProof,
    #[error("invalid SCRAM verifier: {0}")]
    BadVerifier(&'static str),
}

/// What PostgreSQL stores for a SCRAM password: enough to check a proof, not the password.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl std::fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramVerifier(<redacted>)")
    }
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// `out ^= other`, byte by byte (SCRAM's proofs and PBKDF2's running sum).
fn xor_into(out: &mut [u8; 32], other: &[u8; 32]) {
    for (o, x) in out.iter_mut().zip(other.iter()) {
        *o ^= x;
    }
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// PBKDF2-HMAC-SHA-256 with one output block ("Hi" in RFC 5802).
fn salted_password(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut u = hmac(password, &[salt, &1u32.to_be_bytes()]);
    let mut out = u;
    for _ in 1..iterations {
        u = hmac(password, &[&u]);
        xor_into(&mut out, &u);
    }
    out
}

/// SASLprep the password like PostgreSQL and libpq do, falling back to the raw bytes.
fn prepare(password: &str) -> Vec<u8> {
    match stringprep::saslprep(password) {
        Ok(p) => p.into_owned().into_bytes(),
        Err(_) => password.as_bytes().to_vec(),
    }
}

fn decode_key(s: &str) -> Result<[u8; 32], ScramError> {
    let v = B64
        .decode(s)
        .map_err(|_| ScramError::BadVerifier("key is not base64"))?;
    v.try_into()
        .map_err(|_| ScramError::BadVerifier("key is not 32 bytes"))
}

impl ScramVerifier {
    /// Parses `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
    pub fn parse(s: &str) -> Result<ScramVerifier, ScramError> {
        let rest = s
            .strip_prefix("SCRAM-SHA-256$")
            .ok_or(ScramError::BadVerifier(
                "does not start with SCRAM-SHA-256$",
            ))?;
        let (iter_salt, keys) = rest
            .split_once('$')
            .ok_or(ScramError::BadVerifier("missing '$' before the keys"))?;
        let (iter, salt) = iter_salt.split_once(':').ok_or(ScramError::BadVerifier(
            "missing ':' after the iteration count",
        ))?;
        let (stored, server) = keys
            .split_once(':')
            .ok_or(ScramError::BadVerifier("missing ':' between the keys"))?;
        let iterations: u32 = iter
            .parse()
            .map_err(|_| ScramError::BadVerifier("iteration count is not a number"))?;
        if iterations == 0 {
            return Err(ScramError::BadVerifier("iteration count is zero"));
        }
        let salt = B64
            .decode(salt)
            .map_err(|_| ScramError::BadVerifier("salt is not base64"))?;
        Ok(ScramVerifier {
            iterations,
            salt,
            stored_key: decode_key(stored)?,
            server_key: decode_key(server)?,
        })
    }

    /// A verifier for `password` with a fresh random salt and PostgreSQL's default 4096 rounds.
    pub fn from_password(password: &str) -> ScramVerifier {
        let mut salt = [0u8; 16];
        rand::fill(&mut salt);
        Self::with_salt(password, &salt, 4096)
    }

    fn with_salt(password: &str, salt: &[u8], iterations: u32) -> ScramVerifier {
        let salted = salted_password(&prepare(password), salt, iterations);
        ScramVerifier {
            iterations,
            salt: salt.to_vec(),
            stored_key: sha256(&hmac(&salted, &[b"Client Key"])),
            server_key: hmac(&salted, &[b"Server Key"]),
        }
    }

    /// A verifier no password matches, the same for `user` on every attempt (its salt is
    /// derived from `secret`, which stays in the process): what an unknown user is
    /// challenged with, so that the exchange looks like a known user's, as PostgreSQL does.
    pub fn mock(user: &str, secret: &[u8; 32]) -> ScramVerifier {
        let salt = hmac(secret, &[b"salt", user.as_bytes()]);
        ScramVerifier {
            iterations: 4096,
            salt: salt[..16].to_vec(),
            // Not derived from any password: no client proof can match them.
            stored_key: hmac(secret, &[b"stored", user.as_bytes()]),
            server_key: hmac(secret, &[b"server", user.as_bytes()]),
        }
    }

    /// Checks a cleartext password against the verifier (for the `password` method).
    pub fn matches_password(&self, password: &str) -> bool {
        let other = Self::with_salt(password, &self.salt, self.iterations);
        constant_time_eq(&other.stored_key, &self.stored_key)
    }
}

/// Compares secrets without an early exit, so timing does not reveal how much matched.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// One SCRAM exchange, server side.
pub struct ScramServer<'v> {
    verifier: &'v ScramVerifier,
    state: State,
}

enum State {
    Initial,
    SentServerFirst {
        client_first_bare: String,
        server_first: String,
        nonce: String,
        gs2_header: String,
    },
    Done,
}

impl<'v> ScramServer<'v> {
    pub fn new(verifier: &'v ScramVerifier) -> Self {
        ScramServer {
            verifier,
            state: State::Initial,
        }
    }

    /// Takes SASLInitialResponse (mechanism and client-first-message); returns server-first.
    pub fn client_first(&mut self, mechanism: &str, data: &[u8]) -> Result<Vec<u8>, ScramError> {
        if mechanism != MECHANISM {
            return Err(ScramError::UnsupportedMechanism(mechanism.to_owned()));
        }
        let msg = std::str::from_utf8(data).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        // gs2-header: cbind-flag "," [authzid] ","
        let mut parts = msg.splitn(3, ',');
        let cbind = parts.next().ok_or(ScramError::Malformed("no gs2 header"))?;
        let authzid = parts.next().ok_or(ScramError::Malformed("no gs2 header"))?;
        let bare = parts
            .next()
            .ok_or(ScramError::Malformed("no client-first-message-bare"))?;
        match cbind {
            "n" | "y" => {}
            c if c.starts_with("p=") => return Err(ScramError::ChannelBinding),
            _ => return Err(ScramError::Malformed("bad channel-binding flag")),
        }
        if !authzid.is_empty() && !authzid.starts_with("a=") {
            return Err(ScramError::Malformed("bad authzid"));
        }
        let mut attrs = bare.split(',');
        // PostgreSQL ignores the SCRAM user name: the startup packet's user counts.
        let user = attrs.next().ok_or(ScramError::Malformed("no user"))?;
        if !user.starts_with("n=") {
            return Err(ScramError::Malformed("expected n= attribute"));
        }
        let client_nonce = attrs
            .next()
            .and_then(|r| r.strip_prefix("r="))
            .ok_or(ScramError::Malformed("expected r= attribute"))?;
        if client_nonce.is_empty()
            || !client_nonce
                .bytes()
                .all(|b| (0x21..=0x7e).contains(&b) && b != b',')
        {
            return Err(ScramError::Malformed("bad client nonce"));
        }
        let mut server_nonce = [0u8; NONCE_BYTES];
        rand::fill(&mut server_nonce);
        let nonce = format!("{client_nonce}{}", B64.encode(server_nonce));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&self.verifier.salt),
            self.verifier.iterations
        );
        self.state = State::SentServerFirst {
            client_first_bare: bare.to_owned(),
            server_first: server_first.clone(),
            nonce,
            gs2_header: format!("{cbind},{authzid},"),
        };
        Ok(server_first.into_bytes())
    }

    /// Takes SASLResponse (client-final-message); returns server-final on a correct proof.
    pub fn client_final(&mut self, data: &[u8]) -> Result<Vec<u8>, ScramError> {
        let State::SentServerFirst {
            client_first_bare,
            server_first,
            nonce,
            gs2_header,
        } = std::mem::replace(&mut self.state, State::Done)
        else {
            return Err(ScramError::Malformed("unexpected SASL response"));
        };
        let msg = std::str::from_utf8(data).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = msg
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("no proof"))?;
        let mut attrs = without_proof.split(',');
        let cbind = attrs
            .next()
            .and_then(|c| c.strip_prefix("c="))
            .ok_or(ScramError::Malformed("expected c= attribute"))?;
        if cbind != B64.encode(gs2_header.as_bytes()) {
            return Err(ScramError::Malformed("channel binding data does not match"));
        }
        let r = attrs
            .next()
            .and_then(|r| r.strip_prefix("r="))
            .ok_or(ScramError::Malformed("expected r= attribute"))?;
        if r != nonce {
            return Err(ScramError::Malformed("nonce does not match"));
        }
        let proof: [u8; 32] = B64
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(ScramError::Malformed("proof is not 32 base64 bytes"))?;
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let signature = hmac(&self.verifier.stored_key, &[auth_message.as_bytes()]);
        let mut client_key = proof;
        xor_into(&mut client_key, &signature);
        if !constant_time_eq(&sha256(&client_key), &self.verifier.stored_key) {
            return Err(ScramError::BadProof);
        }
        let server_signature = hmac(&self.verifier.server_key, &[auth_message.as_bytes()]);
        Ok(format!("v={}", B64.encode(server_signature)).into_bytes())
    }
}

/// The keys derived from a password, a salt and an iteration count: the expensive part of
/// SCRAM (PBKDF2), which graywire computes once per node role and reuses.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientKeys {
    client_key: [u8; 32],
    server_key: [u8; 32],
}

impl ClientKeys {
    pub fn derive(password: &str, salt: &[u8], iterations: u32) -> ClientKeys {
        let salted = salted_password(&prepare(password), salt, iterations);
        ClientKeys {
            client_key: hmac(&salted, &[b"Client Key"]),
            server_key: hmac(&salted, &[b"Server Key"]),
        }
    }
}

/// Remembers [`ClientKeys`] by (password digest, salt, iterations), so a new backend
/// connection costs a few HMACs instead of 4096 rounds of PBKDF2. PostgreSQL keeps a role's
/// salt until its password changes; a changed password or salt simply misses the cache.
#[derive(Default)]
pub struct ClientKeyCache {
    keys: dashmap::DashMap<([u8; 32], Vec<u8>, u32), ClientKeys>,
}

impl ClientKeyCache {
    /// The cache keeps at most this many entries (one per node role in practice).
    const LIMIT: usize = 1024;

    pub fn get(&self, password: &str, salt: &[u8], iterations: u32) -> ClientKeys {
        let key = (sha256(password.as_bytes()), salt.to_vec(), iterations);
        if let Some(k) = self.keys.get(&key) {
            return k.clone();
        }
        let derived = ClientKeys::derive(password, salt, iterations);
        if self.keys.len() >= Self::LIMIT {
            self.keys.clear();
        }
        self.keys.insert(key, derived.clone());
        derived
    }
}

/// One SCRAM-SHA-256 exchange, client side (graywire logging in to a node), without channel
/// binding (graywire talks to nodes without TLS).
pub struct ScramClient {
    nonce: String,
    state: ClientState,
}

enum ClientState {
    Initial,
    SentFinal {
        server_key: [u8; 32],
        auth_message: String,
    },
    Done,
}

impl Default for ScramClient {
    fn default() -> Self {
        Self::new()
    }
}

impl ScramClient {
    pub fn new() -> Self {
        let mut raw = [0u8; NONCE_BYTES];
        rand::fill(&mut raw);
        ScramClient {
            nonce: B64.encode(raw),
            state: ClientState::Initial,
        }
    }

    /// The client-first-message for SASLInitialResponse.
    pub fn client_first(&self) -> Vec<u8> {
        format!("n,,n=,r={}", self.nonce).into_bytes()
    }

    /// Takes server-first (AuthenticationSASLContinue); returns client-final.
    pub fn server_first(
        &mut self,
        data: &[u8],
        password: &str,
        cache: &ClientKeyCache,
    ) -> Result<Vec<u8>, ScramError> {
        if !matches!(self.state, ClientState::Initial) {
            return Err(ScramError::Malformed("unexpected server-first-message"));
        }
        let msg = std::str::from_utf8(data).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let mut attrs = msg.split(',');
        let nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or(ScramError::Malformed("expected r= attribute"))?;
        if !nonce.starts_with(&self.nonce) || nonce.len() == self.nonce.len() {
            return Err(ScramError::Malformed("server nonce does not extend ours"));
        }
        let salt = attrs
            .next()
            .and_then(|a| a.strip_prefix("s="))
            .and_then(|s| B64.decode(s).ok())
            .ok_or(ScramError::Malformed("expected s= attribute"))?;
        let iterations: u32 = attrs
            .next()
            .and_then(|a| a.strip_prefix("i="))
            .and_then(|i| i.parse().ok())
            .filter(|i| *i > 0)
            .ok_or(ScramError::Malformed("expected i= attribute"))?;
        let keys = cache.get(password, &salt, iterations);
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("n=,r={},{msg},{without_proof}", self.nonce);
        let signature = hmac(&sha256(&keys.client_key), &[auth_message.as_bytes()]);
        let mut proof = keys.client_key;
        xor_into(&mut proof, &signature);
        self.state = ClientState::SentFinal {
            server_key: keys.server_key,
            auth_message,
        };
        Ok(format!("{without_proof},p={}", B64.encode(proof)).into_bytes())
    }

    /// Takes server-final (AuthenticationSASLFinal) and checks the server's signature, so a
    /// node that does not know the password cannot pretend it does.
    pub fn server_final(&mut self, data: &[u8]) -> Result<(), ScramError> {
        let ClientState::SentFinal {
            server_key,
            auth_message,
        } = std::mem::replace(&mut self.state, ClientState::Done)
        else {
            return Err(ScramError::Malformed("unexpected server-final-message"));
        };
        let msg = std::str::from_utf8(data).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        if msg.starts_with("e=") {
            return Err(ScramError::BadProof);
        }
        let given = msg
            .strip_prefix("v=")
            .and_then(|v| B64.decode(v.split(',').next().unwrap_or(v)).ok())
            .ok_or(ScramError::Malformed("expected v= attribute"))?;
        let expected = hmac(&server_key, &[auth_message.as_bytes()]);
        if !constant_time_eq(&given, &expected) {
            return Err(ScramError::BadProof);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    /// Runs a whole exchange against the rust-postgres client implementation.
    fn exchange(stored: &ScramVerifier, client_password: &str) -> Result<(), ScramError> {
        let mut client =
            ScramSha256::new(client_password.as_bytes(), ChannelBinding::unsupported());
        let mut server = ScramServer::new(stored);
        let server_first = server.client_first(MECHANISM, client.message())?;
        client
            .update(&server_first)
            .map_err(|_| ScramError::Malformed("client refused server-first"))?;
        let server_final = server.client_final(client.message())?;
        client
            .finish(&server_final)
            .map_err(|_| ScramError::Malformed("client refused server signature"))
    }

    #[test]
    fn a_real_client_authenticates_with_the_right_password_only() {
        let v = ScramVerifier::from_password("s3cret");
        assert_eq!(exchange(&v, "s3cret"), Ok(()));
        assert_eq!(exchange(&v, "wrong"), Err(ScramError::BadProof));
    }

    #[test]
    fn verifiers_from_postgres_protocol_parse_and_match() {
        let text = postgres_protocol::password::scram_sha_256(b"pw");
        let v = ScramVerifier::parse(&text).expect("parse");
        assert!(v.matches_password("pw"));
        assert!(!v.matches_password("pW"));
        assert_eq!(exchange(&v, "pw"), Ok(()));
    }

    #[test]
    fn bad_verifiers_are_refused_with_a_reason() {
        for bad in [
            "md5abc",
            "SCRAM-SHA-256$4096:c2FsdA==",
            "SCRAM-SHA-256$x:c2FsdA==$a:b",
            "SCRAM-SHA-256$0:c2FsdA==$a:b",
            "SCRAM-SHA-256$4096:c2FsdA==$!!:b",
            "SCRAM-SHA-256$4096:c2FsdA==$c2FsdA==:c2FsdA==",
        ] {
            assert!(ScramVerifier::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn malformed_client_messages_are_refused() {
        let v = ScramVerifier::from_password("pw");
        let mut s = ScramServer::new(&v);
        assert!(matches!(
            s.client_first("SCRAM-SHA-256-PLUS", b"p=tls-server-end-point,,n=,r=abc"),
            Err(ScramError::UnsupportedMechanism(_))
        ));
        assert_eq!(
            s.client_first(MECHANISM, b"p=tls-server-end-point,,n=,r=abc"),
            Err(ScramError::ChannelBinding)
        );
        for bad in [
            &b"x,,n=,r=abc"[..],
            b"n,,r=abc",
            b"n,,n=,x=abc",
            b"n,",
            b"\xff",
        ] {
            assert!(s.client_first(MECHANISM, bad).is_err());
        }
        let mut s = ScramServer::new(&v);
        s.client_first(MECHANISM, b"n,,n=,r=abc").expect("first");
        assert!(s.client_final(b"c=biws,r=wrongnonce,p=AAAA").is_err());
        // The exchange is over after one final message, right or wrong.
        assert!(s.client_final(b"c=biws,r=abc,p=AAAA").is_err());
    }

    #[test]
    fn client_and_server_agree_and_the_cache_gives_the_same_keys() {
        let verifier = ScramVerifier::from_password("n0de-pw");
        let cache = ClientKeyCache::default();
        for _ in 0..3 {
            let mut client = ScramClient::new();
            let mut server = ScramServer::new(&verifier);
            let first = server
                .client_first(MECHANISM, &client.client_first())
                .expect("first");
            let fin = client
                .server_first(&first, "n0de-pw", &cache)
                .expect("final");
            let server_final = server.client_final(&fin).expect("proof accepted");
            client
                .server_final(&server_final)
                .expect("server signature accepted");
        }
        assert_eq!(cache.keys.len(), 1, "one derivation for three logins");

        let mut client = ScramClient::new();
        let mut server = ScramServer::new(&verifier);
        let first = server
            .client_first(MECHANISM, &client.client_first())
            .expect("first");
        let fin = client.server_first(&first, "wrong", &cache).expect("final");
        assert_eq!(server.client_final(&fin), Err(ScramError::BadProof));
    }

    #[test]
    fn the_client_refuses_a_server_that_does_not_know_the_password() {
        let cache = ClientKeyCache::default();
        let mut client = ScramClient::new();
        let nonce = format!("r={}srv,s=c2FsdHNhbHQ=,i=4096", client.nonce);
        client
            .server_first(nonce.as_bytes(), "pw", &cache)
            .expect("final");
        assert_eq!(
            client.server_final(b"v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
            Err(ScramError::BadProof)
        );
        let mut client = ScramClient::new();
        assert!(client
            .server_first(b"r=othernonce,s=c2FsdA==,i=1", "pw", &cache)
            .is_err());
        let mut client = ScramClient::new();
        let no_iter = format!("r={}x,s=c2FsdA==,i=0", client.nonce);
        assert!(client
            .server_first(no_iter.as_bytes(), "pw", &cache)
            .is_err());
    }
}
