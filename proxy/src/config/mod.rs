//! graywire's configuration: the TOML file as read ([`RawConfig`]) and the checked, typed form
//! the proxy runs on ([`Config`]). [`Config::from_toml`] returns every problem at once, each
//! naming its key path (`nodes[1].port: 70000 is not a port`).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

mod raw;
mod users;
mod validate;

pub use raw::RawConfig;

use crate::protocol::scram::ScramVerifier;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Syntax(String),
    #[error("invalid configuration:\n  {}", .0.join("\n  "))]
    Invalid(Vec<String>),
}

/// A node's name from the config.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeName(Arc<str>);

impl NodeName {
    pub fn new(s: impl Into<Arc<str>>) -> Self {
        NodeName(s.into())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for NodeName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A password or other secret: never printed by `Debug`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

// ---------------------------------------------------------------------------------------------
// The checked configuration.

#[derive(Debug, Clone)]
pub struct Config {
    pub listener: ListenerConfig,
    pub admin: AdminConfig,
    pub backend: Credentials,
    pub backend_connect_timeout: Duration,
    pub pool_mode: PoolMode,
    /// Backend connections per node, backend user and startup parameters in transaction mode.
    pub pool_size: usize,
    /// Idle pooled backend connections are closed after this long.
    pub pool_idle_timeout: Duration,
    /// How long a request waits for a suitable node before 57P03.
    pub hold_timeout: Duration,
    pub health: HealthConfig,
    pub routing: RoutingConfig,
    /// After this long, sessions still on a draining node are handled per `drain_on_timeout`.
    pub drain_timeout: Option<Duration>,
    pub drain_on_timeout: DrainTimeoutAction,
    /// The integrated probe (`[probe]`), when configured.
    pub probe: Option<ProbeSettings>,
    pub shutdown_timeout: Duration,
    /// Threads that run sessions: 0 one per core, 1 a single-threaded runtime.
    pub worker_threads: usize,
    pub nodes: Vec<NodeConfig>,
    /// Shared, so a session keeps its user without copying its secrets.
    pub users: Vec<Arc<UserConfig>>,
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub address: SocketAddr,
    pub max_client_connections: usize,
    pub max_message_size: usize,
    pub auth_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub address: SocketAddr,
    pub token: Option<Secret>,
}

/// How graywire logs in to nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: Option<Secret>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    Session,
    Transaction,
}

#[derive(Debug, Clone)]
pub struct HealthConfig {
    pub interval: Duration,
    pub timeout: Duration,
    pub fall: u32,
    pub rise: u32,
    pub database: String,
}

/// Which sessions may read from standbys, and how far behind a standby may be.
#[derive(Debug, Clone, Default)]
pub struct RoutingConfig {
    /// A standby whose replay is this far behind in time takes no read-only sessions.
    pub max_lag: Option<Duration>,
    /// A standby this many WAL bytes behind the primary takes no read-only sessions.
    pub max_lag_bytes: Option<u64>,
    /// Read-only sessions go to the primary when no standby qualifies.
    pub read_fallback_to_primary: bool,
    /// Sessions to these databases are read-only.
    pub read_only_databases: Vec<String>,
    /// Two nodes claiming primary: the one on the highest timeline takes writes (otherwise
    /// neither does until an operator drains one).
    pub split_brain_highest_timeline: bool,
}

/// The integrated probe: it logs in to graywire's own listener as one of `[[users]]` (or to
/// `target`), so it takes the path application traffic takes.
#[derive(Debug, Clone)]
pub struct ProbeSettings {
    pub user: String,
    pub password: Option<Secret>,
    pub database: String,
    /// A libpq-style connection string to probe instead of graywire's own listener.
    pub target: Option<String>,
    pub writer: Option<String>,
    pub interval: Duration,
    pub mode: graywire_probe::Mode,
    pub attempt_timeout: Duration,
    pub verify_interval: Duration,
    pub horizon: Duration,
    /// The bounds the gate is evaluated against every second for `graywire_probe_gate_pass`
    /// (the `/v1/gate` query syntax).
    pub gate: graywire_probe::gate::GateQuery,
}

/// The gate bounds of `[probe] gate` when it is not set.
pub const DEFAULT_GATE: &str = "window=30s&max_stall=1s&max_gaps=0";

/// What happens to sessions still on a draining node at `drain.timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainTimeoutAction {
    /// Keep waiting for them.
    Wait,
    /// End their transactions with an error (40001 inside a transaction, 40003 for a
    /// statement in flight outside one) and move them; pinned sessions are closed (57P01).
    EndTransactions,
}

/// Where a session's transactions may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The primary.
    ReadWrite,
    /// A standby under the lag bound (or the primary, if fallback is on).
    ReadOnly,
}

impl Target {
    pub fn as_str(self) -> &'static str {
        match self {
            Target::ReadWrite => "read-write",
            Target::ReadOnly => "read-only",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    pub name: NodeName,
    pub host: String,
    pub port: u16,
}

/// How a client user proves who it is to graywire.
#[derive(Debug, Clone)]
pub enum ClientAuth {
    Trust,
    /// Cleartext password, checked against whichever secret is stored.
    Password(StoredSecret),
    /// md5 needs the password or its md5 hash (`md5` + md5(password + user)).
    Md5 {
        md5_hash: String,
    },
    ScramSha256(ScramVerifier),
}

/// A secret as stored in the config, for the cleartext `password` method.
#[derive(Debug, Clone)]
pub enum StoredSecret {
    Plain(Secret),
    Md5(Secret),
    Scram(ScramVerifier),
}

#[derive(Debug, Clone)]
pub struct UserConfig {
    pub name: String,
    pub auth: ClientAuth,
    /// Credentials towards nodes for this user's sessions; `None` uses `[backend]`.
    pub backend: Option<Credentials>,
    /// Where this user's sessions go unless the startup packet asks for read-only.
    pub target: Target,
    /// This user's pool mode; `None` uses `pool.mode`.
    pub pool_mode: Option<PoolMode>,
}

pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 256 << 20;
const MAX_MESSAGE_SIZE_CEILING: usize = (1 << 30) - 1;

impl Config {
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text)
    }

    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::Syntax(syntax_error(text, &e)))?;
        raw.validate()
    }

    pub fn user(&self, name: &str) -> Option<&Arc<UserConfig>> {
        self.users.iter().find(|u| u.name == name)
    }

    /// The pool mode of `user`'s sessions.
    pub fn pool_mode_of(&self, user: &UserConfig) -> PoolMode {
        user.pool_mode.unwrap_or(self.pool_mode)
    }

    /// The credentials sessions of `user` use towards nodes.
    pub fn backend_credentials<'a>(&'a self, user: &'a UserConfig) -> &'a Credentials {
        user.backend.as_ref().unwrap_or(&self.backend)
    }
}

/// A TOML syntax error as "line L, column C: what", without the offending line itself,
/// which could hold a password (check-config and SIGHUP reloads print this).
fn syntax_error(text: &str, e: &toml::de::Error) -> String {
    let what = e.message().trim_end();
    let Some(at) = e.span().map(|s| s.start.min(text.len())) else {
        return what.to_owned();
    };
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |n| n + 1) + 1;
    format!("line {line}, column {column}: {what}")
}

#[cfg(test)]
mod tests;
