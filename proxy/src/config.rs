//! graywire's configuration: the TOML file as read ([`RawConfig`]) and the checked, typed form
//! the proxy runs on ([`Config`]). [`Config::from_toml`] returns every problem at once, each
//! naming its key path (`nodes[1].port: 70000 is not a port`).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

use crate::protocol::scram::ScramVerifier;
use crate::topology::NodeName;

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
// The file as written.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    listener: RawListener,
    #[serde(default)]
    admin: RawAdmin,
    backend: RawBackend,
    #[serde(default)]
    pool: RawPool,
    #[serde(default)]
    health: RawHealth,
    #[serde(default)]
    routing: RawRouting,
    #[serde(default)]
    drain: RawDrain,
    probe: Option<RawProbe>,
    #[serde(default)]
    shutdown: RawShutdown,
    #[serde(default)]
    runtime: RawRuntime,
    #[serde(default)]
    nodes: Vec<RawNode>,
    #[serde(default)]
    users: Vec<RawUser>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    address: String,
    max_client_connections: Option<i64>,
    max_message_size: Option<toml::Value>,
    auth_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    address: Option<String>,
    token: Option<Secret>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    user: String,
    password: Option<Secret>,
    connect_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    mode: Option<String>,
    hold_timeout: Option<String>,
    size: Option<i64>,
    idle_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    interval: Option<String>,
    timeout: Option<String>,
    fall: Option<i64>,
    rise: Option<i64>,
    database: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouting {
    max_lag: Option<String>,
    max_lag_bytes: Option<toml::Value>,
    read_fallback_to_primary: Option<bool>,
    read_only_databases: Option<Vec<String>>,
    split_brain: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProbe {
    user: Option<String>,
    password: Option<Secret>,
    database: Option<String>,
    target: Option<String>,
    writer: Option<String>,
    interval: Option<String>,
    mode: Option<String>,
    attempt_timeout: Option<String>,
    verify_interval: Option<String>,
    horizon: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDrain {
    timeout: Option<String>,
    on_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShutdown {
    timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    worker_threads: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: String,
    host: String,
    port: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    name: String,
    auth: String,
    password: Option<Secret>,
    scram_verifier: Option<Secret>,
    md5_hash: Option<Secret>,
    backend_user: Option<String>,
    backend_password: Option<Secret>,
    target: Option<String>,
    pool_mode: Option<String>,
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
}

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
            toml::from_str(text).map_err(|e| ConfigError::Syntax(e.to_string()))?;
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

/// Collects problems while checking, each with its key path.
#[derive(Default)]
struct Problems(Vec<String>);

impl Problems {
    fn add(&mut self, key: &str, msg: impl std::fmt::Display) {
        self.0.push(format!("{key}: {msg}"));
    }

    fn duration(&mut self, key: &str, raw: Option<&str>, default: Duration) -> Duration {
        let Some(s) = raw else { return default };
        match humantime::parse_duration(s) {
            Ok(d) if d.is_zero() => {
                self.add(key, format!("{s:?} must be longer than zero"));
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.add(
                    key,
                    format!("{s:?} is not a duration ({e}); write e.g. \"250ms\" or \"5s\""),
                );
                default
            }
        }
    }

    fn count(&mut self, key: &str, raw: Option<i64>, min: i64, max: i64, default: i64) -> i64 {
        let v = raw.unwrap_or(default);
        if v < min || v > max {
            self.add(key, format!("{v} is out of range ({min} to {max})"));
            return default;
        }
        v
    }

    fn socket_addr(&mut self, key: &str, s: &str) -> Option<SocketAddr> {
        match s.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.add(
                    key,
                    format!("{s:?} is not an address:port such as \"127.0.0.1:6432\""),
                );
                None
            }
        }
    }
}

/// Parses a size: a plain number of bytes or a string with a unit ("64MiB", "512kB", "1GB").
fn parse_size(v: &toml::Value) -> Result<usize, String> {
    match v {
        toml::Value::Integer(n) if *n > 0 => Ok(*n as usize),
        toml::Value::String(s) => {
            let s = s.trim();
            let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
            let (num, unit) = s.split_at(split);
            let n: usize = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
            let mult = match unit.trim() {
                "" | "B" => 1,
                "kB" | "KB" | "KiB" => 1 << 10,
                "MB" | "MiB" => 1 << 20,
                "GB" | "GiB" => 1 << 30,
                u => {
                    return Err(format!(
                        "{s:?} has an unknown unit {u:?} (use B, kB, MB, GB)"
                    ))
                }
            };
            n.checked_mul(mult)
                .ok_or_else(|| format!("{s:?} is too large"))
        }
        other => Err(format!("{other} is not a size")),
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

impl RawConfig {
    pub fn validate(self) -> Result<Config, ConfigError> {
        let mut p = Problems::default();

        let address = p.socket_addr("listener.address", &self.listener.address);
        let max_client_connections = p.count(
            "listener.max_client_connections",
            self.listener.max_client_connections,
            1,
            1_000_000,
            1000,
        ) as usize;
        let max_message_size = match &self.listener.max_message_size {
            None => DEFAULT_MAX_MESSAGE_SIZE,
            Some(v) => match parse_size(v) {
                Ok(n) if (1024..=MAX_MESSAGE_SIZE_CEILING).contains(&n) => n,
                Ok(n) => {
                    p.add(
                        "listener.max_message_size",
                        format!("{n} bytes is out of range (1kB to 1GB)"),
                    );
                    DEFAULT_MAX_MESSAGE_SIZE
                }
                Err(e) => {
                    p.add("listener.max_message_size", e);
                    DEFAULT_MAX_MESSAGE_SIZE
                }
            },
        };
        let auth_timeout = p.duration(
            "listener.auth_timeout",
            self.listener.auth_timeout.as_deref(),
            Duration::from_secs(60),
        );

        let admin_address = p.socket_addr(
            "admin.address",
            self.admin.address.as_deref().unwrap_or("127.0.0.1:9930"),
        );
        if let Some(a) = admin_address {
            if !a.ip().is_loopback() && self.admin.token.is_none() {
                p.add(
                    "admin.address",
                    format!(
                        "{a} is not a loopback address: set admin.token to expose the admin API"
                    ),
                );
            }
        }
        if let Some(t) = &self.admin.token {
            if t.expose().len() < 16 {
                p.add("admin.token", "must be at least 16 characters");
            }
        }

        if self.backend.user.is_empty() {
            p.add("backend.user", "must not be empty");
        }
        let backend_connect_timeout = p.duration(
            "backend.connect_timeout",
            self.backend.connect_timeout.as_deref(),
            Duration::from_secs(5),
        );

        let pool_mode = parse_pool_mode(&mut p, "pool.mode", self.pool.mode.as_deref())
            .unwrap_or(PoolMode::Session);
        let pool_size = p.count("pool.size", self.pool.size, 1, 10_000, 20) as usize;
        let pool_idle_timeout = p.duration(
            "pool.idle_timeout",
            self.pool.idle_timeout.as_deref(),
            Duration::from_secs(600),
        );

        let hold_timeout = p.duration(
            "pool.hold_timeout",
            self.pool.hold_timeout.as_deref(),
            Duration::from_secs(30),
        );
        let health = HealthConfig {
            interval: p.duration(
                "health.interval",
                self.health.interval.as_deref(),
                Duration::from_millis(250),
            ),
            timeout: p.duration(
                "health.timeout",
                self.health.timeout.as_deref(),
                Duration::from_secs(1),
            ),
            fall: p.count("health.fall", self.health.fall, 1, 100, 3) as u32,
            rise: p.count("health.rise", self.health.rise, 1, 100, 2) as u32,
            database: self
                .health
                .database
                .unwrap_or_else(|| "postgres".to_owned()),
        };
        let routing = RoutingConfig {
            max_lag: self
                .routing
                .max_lag
                .as_deref()
                .map(|v| p.duration("routing.max_lag", Some(v), Duration::ZERO)),
            max_lag_bytes: match &self.routing.max_lag_bytes {
                None => None,
                Some(v) => match parse_size(v) {
                    Ok(n) => Some(n as u64),
                    Err(e) => {
                        p.add("routing.max_lag_bytes", e);
                        None
                    }
                },
            },
            read_fallback_to_primary: self.routing.read_fallback_to_primary.unwrap_or(true),
            read_only_databases: self.routing.read_only_databases.unwrap_or_default(),
            split_brain_highest_timeline: match self.routing.split_brain.as_deref() {
                None | Some("wait") => false,
                Some("highest_timeline") => true,
                Some(other) => {
                    p.add(
                        "routing.split_brain",
                        format!("{other:?} is not a policy (\"wait\" or \"highest_timeline\")"),
                    );
                    false
                }
            },
        };
        let drain_timeout = self
            .drain
            .timeout
            .as_deref()
            .map(|v| p.duration("drain.timeout", Some(v), Duration::from_secs(60)));
        let drain_on_timeout = match self.drain.on_timeout.as_deref() {
            None | Some("wait") => DrainTimeoutAction::Wait,
            Some("end_transactions") => DrainTimeoutAction::EndTransactions,
            Some(other) => {
                p.add(
                    "drain.on_timeout",
                    format!("{other:?} is not an action (\"wait\" or \"end_transactions\")"),
                );
                DrainTimeoutAction::Wait
            }
        };
        if drain_on_timeout == DrainTimeoutAction::EndTransactions && drain_timeout.is_none() {
            p.add(
                "drain.on_timeout",
                "\"end_transactions\" needs drain.timeout",
            );
        }
        let probe = self
            .probe
            .map(|raw| validate_probe(&mut p, raw, &self.users));
        let shutdown_timeout = p.duration(
            "shutdown.timeout",
            self.shutdown.timeout.as_deref(),
            Duration::from_secs(30),
        );

        let worker_threads = p.count(
            "runtime.worker_threads",
            self.runtime.worker_threads,
            0,
            1024,
            0,
        ) as usize;
        let nodes = validate_nodes(&mut p, self.nodes);
        let users = validate_users(&mut p, self.users);

        if !p.0.is_empty() {
            return Err(ConfigError::Invalid(p.0));
        }
        let (Some(address), Some(admin_address)) = (address, admin_address) else {
            return Err(ConfigError::Invalid(vec![
                "listener.address: invalid".into()
            ]));
        };
        Ok(Config {
            listener: ListenerConfig {
                address,
                max_client_connections,
                max_message_size,
                auth_timeout,
            },
            admin: AdminConfig {
                address: admin_address,
                token: self.admin.token,
            },
            backend: Credentials {
                user: self.backend.user,
                password: self.backend.password,
            },
            backend_connect_timeout,
            pool_mode,
            pool_size,
            pool_idle_timeout,
            hold_timeout,
            health,
            routing,
            drain_timeout,
            drain_on_timeout,
            probe,
            shutdown_timeout,
            worker_threads,
            nodes,
            users,
        })
    }
}

fn validate_probe(p: &mut Problems, raw: RawProbe, users: &[RawUser]) -> ProbeSettings {
    let user = match raw.user {
        Some(u) if !u.is_empty() => {
            if raw.target.is_none() && !users.iter().any(|x| x.name == u) {
                p.add(
                    "probe.user",
                    format!("{u:?} is not one of [[users]] (the probe logs in to graywire)"),
                );
            }
            u
        }
        _ => {
            p.add("probe.user", "required: the user the probe logs in as");
            String::new()
        }
    };
    if let Some(t) = &raw.target {
        if let Err(e) = t.parse::<tokio_postgres::Config>() {
            p.add("probe.target", format!("not a connection string: {e}"));
        }
    }
    if raw.writer.as_deref().is_some_and(str::is_empty) {
        p.add("probe.writer", "must not be empty");
    }
    let interval = p.duration(
        "probe.interval",
        raw.interval.as_deref(),
        Duration::from_millis(100),
    );
    let mode = match graywire_probe::Mode::parse(raw.mode.as_deref().unwrap_or("retry")) {
        Ok(m) => m,
        Err(e) => {
            p.add("probe.mode", e);
            graywire_probe::Mode::Retry
        }
    };
    ProbeSettings {
        user,
        password: raw.password,
        database: raw.database.unwrap_or_else(|| "postgres".to_owned()),
        target: raw.target,
        writer: raw.writer,
        interval,
        mode,
        attempt_timeout: p.duration(
            "probe.attempt_timeout",
            raw.attempt_timeout.as_deref(),
            Duration::from_secs(2),
        ),
        verify_interval: p.duration(
            "probe.verify_interval",
            raw.verify_interval.as_deref(),
            Duration::from_secs(1),
        ),
        horizon: p.duration(
            "probe.horizon",
            raw.horizon.as_deref(),
            Duration::from_secs(3600),
        ),
    }
}

fn parse_pool_mode(p: &mut Problems, key: &str, raw: Option<&str>) -> Option<PoolMode> {
    match raw {
        None => None,
        Some("session") => Some(PoolMode::Session),
        Some("transaction") => Some(PoolMode::Transaction),
        Some(m) => {
            p.add(
                key,
                format!("{m:?} is not a pool mode (\"session\" or \"transaction\")"),
            );
            None
        }
    }
}

fn validate_nodes(p: &mut Problems, raw: Vec<RawNode>) -> Vec<NodeConfig> {
    if raw.is_empty() {
        p.add("nodes", "at least one [[nodes]] entry is required");
    }
    let mut seen = HashSet::new();
    let mut seen_addr = HashSet::new();
    let mut nodes = Vec::new();
    for (i, n) in raw.into_iter().enumerate() {
        let key = |f: &str| format!("nodes[{i}].{f}");
        if !valid_name(&n.name) {
            p.add(
                &key("name"),
                format!(
                    "{:?} is not a valid name (letters, digits, '_', '-', '.'; at most 63)",
                    n.name
                ),
            );
        } else if !seen.insert(n.name.clone()) {
            p.add(
                &key("name"),
                format!("{:?} is used by another node", n.name),
            );
        }
        if n.host.trim().is_empty() {
            p.add(&key("host"), "must not be empty");
        }
        let port = match u16::try_from(n.port) {
            Ok(port) if port > 0 => port,
            _ => {
                p.add(&key("port"), format!("{} is not a port", n.port));
                0
            }
        };
        if !seen_addr.insert((n.host.clone(), port)) {
            p.add(
                &key("port"),
                format!("{}:{} is the address of another node", n.host, port),
            );
        }
        nodes.push(NodeConfig {
            name: NodeName::new(n.name),
            host: n.host,
            port,
        });
    }
    nodes
}

fn validate_users(p: &mut Problems, raw: Vec<RawUser>) -> Vec<Arc<UserConfig>> {
    if raw.is_empty() {
        p.add(
            "users",
            "at least one [[users]] entry is required (nobody could connect)",
        );
    }
    let mut seen = HashSet::new();
    let mut users = Vec::new();
    for (i, u) in raw.into_iter().enumerate() {
        let key = |f: &str| format!("users[{i}].{f}");
        if u.name.is_empty() || u.name.contains('\0') {
            p.add(
                &key("name"),
                format!("{:?} is not a valid user name", u.name),
            );
        } else if !seen.insert(u.name.clone()) {
            p.add(&key("name"), format!("{:?} is listed twice", u.name));
        }
        let verifier = match &u.scram_verifier {
            None => None,
            Some(v) => match ScramVerifier::parse(v.expose()) {
                Ok(v) => Some(v),
                Err(e) => {
                    p.add(&key("scram_verifier"), e);
                    None
                }
            },
        };
        if let Some(h) = &u.md5_hash {
            let hex = h.expose().strip_prefix("md5").unwrap_or("");
            if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                p.add(
                    &key("md5_hash"),
                    "must be \"md5\" followed by 32 hex digits",
                );
            }
        }
        let secrets = [
            u.password.is_some(),
            u.scram_verifier.is_some(),
            u.md5_hash.is_some(),
        ]
        .iter()
        .filter(|x| **x)
        .count();
        if secrets > 1 {
            p.add(
                &key("password"),
                "give only one of password, scram_verifier, md5_hash",
            );
        }
        let auth = match u.auth.as_str() {
            "trust" => {
                if secrets > 0 {
                    p.add(
                        &key("auth"),
                        "\"trust\" takes no password; remove it or choose another method",
                    );
                }
                Some(ClientAuth::Trust)
            }
            "password" => match (&u.password, &verifier, &u.md5_hash) {
                (Some(pw), _, _) => Some(ClientAuth::Password(StoredSecret::Plain(pw.clone()))),
                (_, Some(v), _) => Some(ClientAuth::Password(StoredSecret::Scram(v.clone()))),
                (_, _, Some(h)) => Some(ClientAuth::Password(StoredSecret::Md5(h.clone()))),
                _ => None,
            },
            "md5" => {
                match (&u.password, &u.md5_hash) {
                    (Some(pw), _) => Some(ClientAuth::Md5 {
                        md5_hash: postgres_protocol::password::md5(pw.expose().as_bytes(), &u.name),
                    }),
                    (_, Some(h)) => Some(ClientAuth::Md5 {
                        md5_hash: h.expose().to_owned(),
                    }),
                    _ => {
                        p.add(&key("auth"), "\"md5\" needs password or md5_hash (a SCRAM verifier cannot check md5)");
                        continue;
                    }
                }
            }
            "scram-sha-256" => match (&u.password, verifier) {
                (Some(pw), _) => Some(ClientAuth::ScramSha256(ScramVerifier::from_password(
                    pw.expose(),
                ))),
                (_, Some(v)) => Some(ClientAuth::ScramSha256(v)),
                _ => {
                    p.add(
                        &key("auth"),
                        "\"scram-sha-256\" needs password or scram_verifier",
                    );
                    continue;
                }
            },
            other => {
                p.add(
                    &key("auth"),
                    format!(
                        "{other:?} is not an auth method (trust, password, md5, scram-sha-256)"
                    ),
                );
                continue;
            }
        };
        let Some(auth) = auth else {
            p.add(
                &key("auth"),
                "\"password\" needs password, scram_verifier or md5_hash",
            );
            continue;
        };
        let backend = match (u.backend_user, u.backend_password) {
            (Some(user), password) if !user.is_empty() => Some(Credentials { user, password }),
            (Some(_), _) => {
                p.add(&key("backend_user"), "must not be empty");
                None
            }
            (None, Some(_)) => {
                p.add(&key("backend_password"), "needs backend_user");
                None
            }
            (None, None) => None,
        };
        let target = match u.target.as_deref() {
            None | Some("read-write") => Target::ReadWrite,
            Some("read-only") => Target::ReadOnly,
            Some(other) => {
                p.add(
                    &key("target"),
                    format!("{other:?} is not a target (\"read-write\" or \"read-only\")"),
                );
                Target::ReadWrite
            }
        };
        let pool_mode = parse_pool_mode(p, &key("pool_mode"), u.pool_mode.as_deref());
        users.push(Arc::new(UserConfig {
            name: u.name,
            auth,
            backend,
            target,
            pool_mode,
        }));
    }
    users
}

#[cfg(test)]
mod tests;
