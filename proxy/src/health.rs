//! Health checks: one task per node asks it `pg_is_in_recovery()`, its version and its WAL
//! position every interval (more often while no node takes writes) over a kept tokio-postgres
//! connection, and publishes what it saw to the topology.
//! Every change of health or role is one log line and one metric.

use std::sync::Arc;
use std::time::Instant;

use tokio::task::JoinHandle;
use tokio_postgres::NoTls;
use tracing::{info, warn};

use crate::config::{Credentials, HealthConfig, NodeConfig};
use crate::context::Context;
use crate::metrics as m;
use crate::router;
use crate::topology::{Health, NodeName, NodeStatus, Observation, Role, Topology, WalPosition};

/// Makes the running checkers match the config's nodes: starts one for each new or changed
/// node, stops those of removed or changed ones. Called at start and after each reload.
pub fn sync_checkers(ctx: &Arc<Context>) {
    let config = ctx.config.load_full();
    let mut running = ctx.checkers.lock().unwrap_or_else(|p| p.into_inner());
    running.retain(|name, (node, task)| {
        let keep = config.nodes.iter().any(|n| n == node);
        if !keep {
            task.abort();
            info!(node = %name, "health checks stopped (node removed or changed)");
        }
        keep
    });
    for node in &config.nodes {
        if !running.contains_key(&node.name) {
            running.insert(
                node.name.clone(),
                (node.clone(), spawn(ctx.clone(), node.clone())),
            );
        }
    }
}

/// Stops every checker.
pub fn stop_checkers(ctx: &Context) {
    let mut running = ctx.checkers.lock().unwrap_or_else(|p| p.into_inner());
    for (_, (_, task)) in running.drain() {
        task.abort();
    }
}

/// Starts the checker of one node; it stops on hard shutdown.
fn spawn(ctx: Arc<Context>, node: NodeConfig) -> JoinHandle<()> {
    m::register_node(node.name.as_str());
    if let Some(status) = ctx.topology.load().node(&node.name) {
        crate::drain::export_admin_state(&node.name, status.admin);
    }
    tokio::spawn(async move {
        let stop = ctx.shutdown.hard.clone();
        tokio::select! {
            _ = check_forever(&ctx, &node) => {}
            _ = stop.cancelled() => {}
        }
    })
}

async fn check_forever(ctx: &Context, node: &NodeConfig) {
    let mut conn: Option<Checker> = None;
    loop {
        let started = Instant::now();
        let config = ctx.config.load();
        let obs = check_once(&mut conn, node, &config.backend, &config.health).await;
        let result = if matches!(obs, Observation::Ok { .. }) {
            "ok"
        } else {
            "failed"
        };
        metrics::counter!(m::HEALTH_CHECKS_TOTAL, "node" => node.name.to_string(), "result" => result)
            .increment(1);
        let (fall, rise) = (config.health.fall, config.health.rise);
        apply(&ctx.topology, &node.name, |s| {
            s.observe(&obs, fall, rise, Instant::now())
        });
        // While no primary takes writes, requests are being held: look more often, so a
        // promotion is seen within tens of milliseconds.
        let mut interval = config.health.interval;
        if router::primary(&ctx.topology.load()).is_none() {
            interval = interval.min(NO_PRIMARY_INTERVAL);
        }
        crate::timer::sleep_until(started + interval).await;
    }
}

/// The check interval while no node takes writes.
const NO_PRIMARY_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

/// Records a failed backend connect or a backend connection that died (passive check).
pub fn passive_failure(ctx: &Context, node: &NodeName, reason: &str) {
    let fall = ctx.config.load().health.fall;
    apply(&ctx.topology, node, |s| {
        s.passive_failure(reason, fall, Instant::now())
    });
}

/// Publishes a transition and reports it once (log line, metrics).
fn apply(topology: &Topology, node: &NodeName, f: impl Fn(&NodeStatus) -> NodeStatus) {
    let Some((old, new)) = topology.update(node, f) else {
        return;
    };
    export_node(&new);
    if old.health != new.health {
        let to = if new.health == Health::Up {
            "up"
        } else {
            "down"
        };
        metrics::counter!(m::NODE_TRANSITIONS_TOTAL, "node" => node.to_string(), "to" => to)
            .increment(1);
        if new.health == Health::Up {
            info!(node = %node, role = new.role.as_str(), version = new.version.as_deref().unwrap_or(""), "node is up");
        } else {
            warn!(node = %node, reason = new.last_error.as_deref().unwrap_or(""), "node is down");
        }
    }
    if old.role != new.role {
        // One log line per change: a node coming up already named its role above.
        let logged = old.health != new.health && new.health == Health::Up;
        metrics::counter!(m::NODE_TRANSITIONS_TOTAL, "node" => node.to_string(), "to" => new.role.as_str())
            .increment(1);
        if !logged {
            info!(node = %node, from = old.role.as_str(), to = new.role.as_str(), "node changed role");
        }
    }
    let snapshot = topology.load();
    if let Some(n) = snapshot.node(node) {
        let name = node.to_string();
        match (snapshot.lag_bytes(n), n.wal.replay_delay) {
            (bytes, seconds) if n.role == Role::Standby => {
                if let Some(b) = bytes {
                    metrics::gauge!(m::REPLICATION_LAG_BYTES, "node" => name.clone()).set(b as f64);
                }
                if let Some(s) = seconds {
                    metrics::gauge!(m::REPLICATION_LAG_SECONDS, "node" => name).set(s);
                }
            }
            _ => {}
        }
    }
    let split = snapshot.split_brain();
    metrics::gauge!(m::SPLIT_BRAIN).set(if split { 1.0 } else { 0.0 });
    let known = router::primary(&snapshot).is_some();
    metrics::gauge!(m::PRIMARY_KNOWN).set(if known { 1.0 } else { 0.0 });
    if split && (old.role != new.role || old.health != new.health) {
        let names: Vec<String> = snapshot.primaries().map(|n| n.name().to_string()).collect();
        warn!(primaries = ?names, "split brain: more than one node claims to be primary; no writes go to any of them");
    }
}

/// Sets the per-node gauges from a status.
pub fn export_node(s: &NodeStatus) {
    let node = s.name().to_string();
    metrics::gauge!(m::NODE_UP, "node" => node.clone()).set(if s.health == Health::Up {
        1.0
    } else {
        0.0
    });
    for role in Role::ALL {
        let v = if role == s.role { 1.0 } else { 0.0 };
        metrics::gauge!(m::NODE_ROLE, "node" => node.clone(), "role" => role.as_str()).set(v);
    }
}

/// A kept connection for health checks; its driver task ends with it.
struct Checker {
    client: tokio_postgres::Client,
    driver: JoinHandle<()>,
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Role, version, WAL position (current on a primary, replayed on a standby), on a standby how
/// long replay has been behind (0 once it has replayed all it received), and on a primary the
/// timeline it writes (the first 8 hex digits of its current WAL file name); and when its postmaster
/// started, which tells a restart apart from a node that never went away.
const CHECK_QUERY: &str = "SELECT pg_is_in_recovery(), current_setting('server_version'), \
     ((CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END) \
       - '0/0'::pg_lsn)::bigint, \
     CASE WHEN NOT pg_is_in_recovery() THEN NULL \
          WHEN pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn() THEN 0::float8 \
          ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 END, \
     CASE WHEN pg_is_in_recovery() THEN NULL \
          ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END, \
     extract(epoch FROM pg_postmaster_start_time())::float8";

async fn check_once(
    conn: &mut Option<Checker>,
    node: &NodeConfig,
    creds: &Credentials,
    health: &HealthConfig,
) -> Observation {
    let attempt = async {
        if conn.as_ref().is_none_or(|c| c.client.is_closed()) {
            *conn = Some(connect(node, creds, health).await?);
        }
        let Some(c) = conn.as_ref() else {
            return Err("no connection".to_owned());
        };
        let row = c
            .client
            .query_one(CHECK_QUERY, &[])
            .await
            .map_err(|e| e.to_string())?;
        let in_recovery: bool = row.try_get(0).map_err(|e| e.to_string())?;
        let version: String = row.try_get(1).map_err(|e| e.to_string())?;
        let lsn: Option<i64> = row.try_get(2).map_err(|e| e.to_string())?;
        let replay_delay: Option<f64> = row.try_get(3).map_err(|e| e.to_string())?;
        let timeline: Option<i32> = row.try_get(4).map_err(|e| e.to_string())?;
        let started_at: Option<f64> = row.try_get(5).map_err(|e| e.to_string())?;
        Ok(Observation::Ok {
            role: if in_recovery {
                Role::Standby
            } else {
                Role::Primary
            },
            version,
            wal: WalPosition {
                lsn: lsn.and_then(|l| u64::try_from(l).ok()),
                replay_delay: replay_delay.map(|d| d.max(0.0)),
                timeline: timeline.and_then(|t| u32::try_from(t).ok()),
            },
            started_at,
        })
    };
    match crate::timer::timeout(health.timeout, attempt).await {
        Ok(Ok(obs)) => obs,
        Ok(Err(reason)) => {
            *conn = None;
            Observation::Failed { reason }
        }
        Err(_) => {
            *conn = None;
            Observation::Failed {
                reason: format!("no answer within {:?}", health.timeout),
            }
        }
    }
}

async fn connect(
    node: &NodeConfig,
    creds: &Credentials,
    health: &HealthConfig,
) -> Result<Checker, String> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(&node.host)
        .port(node.port)
        .user(&creds.user)
        .dbname(&health.database)
        .application_name("graywire health check");
    if let Some(p) = &creds.password {
        cfg.password(p.expose());
    }
    let (client, connection) = cfg.connect(NoTls).await.map_err(|e| e.to_string())?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(Checker { client, driver })
}
