//! Checking the file as written ([`RawConfig`]) into the typed [`Config`], collecting every
//! problem with its key path.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use graywire_probe::gate::GateQuery;

use super::raw::*;
use super::users::validate_users;
use super::*;

/// Collects problems while checking, each with its key path.
#[derive(Default)]
pub(super) struct Problems(Vec<String>);

impl Problems {
    pub(super) fn add(&mut self, key: &str, msg: impl std::fmt::Display) {
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
pub(super) fn parse_size(v: &toml::Value) -> Result<usize, String> {
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
        gate: match GateQuery::parse(raw.gate.as_deref().unwrap_or(DEFAULT_GATE)) {
            Ok(q) => q,
            Err(e) => {
                p.add(
                    "probe.gate",
                    format!("{e}; write it as /v1/gate's query, e.g. {DEFAULT_GATE:?}"),
                );
                GateQuery::default()
            }
        },
    }
}

pub(super) fn parse_pool_mode(p: &mut Problems, key: &str, raw: Option<&str>) -> Option<PoolMode> {
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
