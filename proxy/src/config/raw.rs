//! The configuration file as written: serde structs that mirror the TOML, checked and turned
//! into [`super::Config`] by `validate.rs`.

use serde::Deserialize;

use super::Secret;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub(super) listener: RawListener,
    #[serde(default)]
    pub(super) admin: RawAdmin,
    pub(super) backend: RawBackend,
    #[serde(default)]
    pub(super) pool: RawPool,
    #[serde(default)]
    pub(super) health: RawHealth,
    #[serde(default)]
    pub(super) routing: RawRouting,
    #[serde(default)]
    pub(super) drain: RawDrain,
    pub(super) probe: Option<RawProbe>,
    #[serde(default)]
    pub(super) shutdown: RawShutdown,
    #[serde(default)]
    pub(super) runtime: RawRuntime,
    #[serde(default)]
    pub(super) nodes: Vec<RawNode>,
    #[serde(default)]
    pub(super) users: Vec<RawUser>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
    pub(super) address: String,
    pub(super) max_client_connections: Option<i64>,
    pub(super) max_message_size: Option<toml::Value>,
    pub(super) auth_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) address: Option<String>,
    pub(super) token: Option<Secret>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackend {
    pub(super) user: String,
    pub(super) password: Option<Secret>,
    pub(super) connect_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPool {
    pub(super) mode: Option<String>,
    pub(super) hold_timeout: Option<String>,
    pub(super) size: Option<i64>,
    pub(super) idle_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    pub(super) interval: Option<String>,
    pub(super) timeout: Option<String>,
    pub(super) fall: Option<i64>,
    pub(super) rise: Option<i64>,
    pub(super) database: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRouting {
    pub(super) max_lag: Option<String>,
    pub(super) max_lag_bytes: Option<toml::Value>,
    pub(super) read_fallback_to_primary: Option<bool>,
    pub(super) read_only_databases: Option<Vec<String>>,
    pub(super) split_brain: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProbe {
    pub(super) user: Option<String>,
    pub(super) password: Option<Secret>,
    pub(super) database: Option<String>,
    pub(super) target: Option<String>,
    pub(super) writer: Option<String>,
    pub(super) interval: Option<String>,
    pub(super) mode: Option<String>,
    pub(super) attempt_timeout: Option<String>,
    pub(super) verify_interval: Option<String>,
    pub(super) horizon: Option<String>,
    pub(super) gate: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDrain {
    pub(super) timeout: Option<String>,
    pub(super) on_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawShutdown {
    pub(super) timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRuntime {
    pub(super) worker_threads: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawNode {
    pub(super) name: String,
    pub(super) host: String,
    pub(super) port: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUser {
    pub(super) name: String,
    pub(super) auth: String,
    pub(super) password: Option<Secret>,
    pub(super) scram_verifier: Option<Secret>,
    pub(super) md5_hash: Option<Secret>,
    pub(super) backend_user: Option<String>,
    pub(super) backend_password: Option<Secret>,
    pub(super) target: Option<String>,
    pub(super) pool_mode: Option<String>,
}
