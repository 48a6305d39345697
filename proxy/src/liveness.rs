//! Whether a node still takes sessions, asked when a backend connection ends under a session
//! (`session/failover.rs`): the answer tells a node going away from one backend that was ended
//! on its own. First over a kept connection per node (a round trip, no new backend on the
//! node), else with a fresh startup packet.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

use crate::config::{Credentials, NodeConfig};
use crate::topology::NodeName;

/// The kept connections, one per node, made when first needed.
#[derive(Default)]
pub(crate) struct Liveness {
    kept: Mutex<Kept>,
}

#[derive(Default)]
struct Kept {
    clients: HashMap<NodeName, Arc<tokio_postgres::Client>>,
    /// Nodes whose kept connection is being opened (one attempt at a time).
    opening: HashSet<NodeName>,
}

impl Liveness {
    fn kept(&self) -> MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `node` takes sessions, within `timeout`; `Err` says why not. A node shutting
    /// down ends the kept connection too (57P01) and then refuses the startup packet (57P03);
    /// one backend terminated by an administrator or a timeout leaves both working.
    ///
    /// `postmaster_only`: ask the postmaster with a startup packet, not the kept connection.
    /// After a FATAL 57P01 only that answer is certain: a shutdown changes the postmaster's
    /// state before it signals any backend, while the kept connection's own backend may not
    /// have been signalled yet when its round trip is answered.
    pub(crate) async fn takes_sessions(
        self: &Arc<Self>,
        node: &NodeConfig,
        creds: &Credentials,
        database: &str,
        timeout: Duration,
        postmaster_only: bool,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let kept = (!postmaster_only)
            .then(|| self.kept().clients.get(&node.name).cloned())
            .flatten();
        if let Some(client) = kept.filter(|c| !c.is_closed()) {
            match crate::timer::timeout_at(deadline, client.simple_query("")).await {
                Ok(Ok(_)) => return Ok(()),
                // Frozen: no answer in time says enough.
                Err(_) => return Err(format!("no answer within {timeout:?}")),
                // Broken (its backend was ended too): ask with a fresh connection.
                Ok(Err(_)) => {
                    self.kept().clients.remove(&node.name);
                }
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        accepts_sessions(node, &creds.user, database, left).await?;
        self.keep(node, creds, database);
        Ok(())
    }

    /// Opens the node's kept connection in the background, for the next check.
    fn keep(self: &Arc<Self>, node: &NodeConfig, creds: &Credentials, database: &str) {
        {
            let mut kept = self.kept();
            let alive = kept.clients.get(&node.name).is_some_and(|c| !c.is_closed());
            if alive || !kept.opening.insert(node.name.clone()) {
                return;
            }
        }
        let mut cfg = tokio_postgres::Config::new();
        cfg.host(&node.host)
            .port(node.port)
            .user(&creds.user)
            .dbname(database)
            .application_name("graywire session check");
        if let Some(p) = &creds.password {
            cfg.password(p.expose());
        }
        let name = node.name.clone();
        let this = self.clone();
        tokio::spawn(async move {
            let made = crate::timer::timeout(KEPT_CONNECT_TIMEOUT, cfg.connect(NoTls)).await;
            let connection = {
                let mut kept = this.kept();
                kept.opening.remove(&name);
                match made {
                    Ok(Ok((client, connection))) => {
                        kept.clients.insert(name, Arc::new(client));
                        Some(connection)
                    }
                    _ => None,
                }
            };
            if let Some(connection) = connection {
                let _ = connection.await;
            }
        });
    }

    /// Forgets nodes no longer in the config (their connections close).
    pub(crate) fn retain(&self, nodes: &[NodeConfig]) {
        self.kept()
            .clients
            .retain(|name, _| nodes.iter().any(|n| &n.name == name));
    }
}

/// Bound on opening a kept connection.
const KEPT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the check after a backend connection ended may take (see [`accepts_sessions`]):
/// short, since a session waits for it, and long enough for a loaded node to answer a
/// startup packet.
pub(crate) const SESSION_END_CHECK: Duration = Duration::from_millis(200);

/// Whether `node` still takes new sessions: a fresh connection and a startup packet, answered
/// by an authentication request (or a refusal that is not about the node's state, such as an
/// unknown database) within `timeout`. A refused or reset connection, no answer, or a FATAL
/// saying the node is shutting down, starting up or recovering (class 57) is `Err` with the
/// reason. No authentication happens: the connection is closed at the first answer.
async fn accepts_sessions(
    node: &NodeConfig,
    user: &str,
    database: &str,
    timeout: std::time::Duration,
) -> Result<(), String> {
    use bytes::{Buf, BytesMut};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use crate::protocol::SqlClass;

    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect((node.host.as_str(), node.port))
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let mut out = BytesMut::new();
        let params = [
            ("user", user),
            ("database", database),
            ("application_name", "graywire session check"),
        ];
        postgres_protocol::message::frontend::startup_message(params, &mut out)
            .map_err(|e| e.to_string())?;
        stream
            .write_all(&out)
            .await
            .map_err(|e| format!("cannot send a startup packet: {e}"))?;
        let tag = stream
            .read_u8()
            .await
            .map_err(|e| format!("no answer to a startup packet: {e}"))?;
        let len = stream
            .read_u32()
            .await
            .map_err(|e| format!("no answer to a startup packet: {e}"))?;
        let answer = match tag {
            b'R' => Ok(()),
            b'E' if (4..=8192).contains(&len) => {
                let mut body = vec![0u8; len as usize - 4];
                stream
                    .read_exact(&mut body)
                    .await
                    .map_err(|e| format!("a cut refusal: {e}"))?;
                let (code, message) = crate::backend::error_fields(&body[..]);
                if code.class() == SqlClass::OPERATOR_INTERVENTION {
                    Err(format!("{message} ({code})"))
                } else {
                    Ok(())
                }
            }
            other => Err(format!(
                "answered a startup packet with message type {:?}",
                other as char
            )),
        };
        // Politely away: Terminate, then close (the node logs nothing for this).
        let mut bye = BytesMut::new();
        postgres_protocol::message::frontend::terminate(&mut bye);
        let _ = stream.write_all(bye.chunk()).await;
        answer
    };
    match crate::timer::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer to a startup packet within {timeout:?}")),
    }
}
