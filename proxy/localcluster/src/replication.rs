//! Replication between local nodes: who a standby streams from, waiting until it does,
//! promotion, and repointing a standby at a new primary.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::process::POLL_SLOW;
use super::{config, LocalCluster, LocalClusterError, HOST, SUPERUSER};

/// How long replication gets to (re)connect, and a promotion to finish.
const REPLICATION_LIMIT: Duration = Duration::from_secs(60);

impl LocalCluster {
    /// The `primary_conninfo` with which standby `name` streams from node `upstream`.
    pub(super) fn upstream_conninfo(
        &self,
        name: &str,
        upstream: usize,
    ) -> Result<String, LocalClusterError> {
        let port = self.node(upstream)?.port.to_string();
        Ok(config::conninfo(&[
            ("host", HOST),
            ("port", &port),
            ("user", SUPERUSER),
            ("password", &self.password),
            ("application_name", name),
        ]))
    }

    /// Waits until node `upstream`'s `pg_stat_replication` shows every standby in `indices`
    /// in state `streaming`.
    pub(super) fn wait_streaming(
        &self,
        upstream: usize,
        indices: &[usize],
    ) -> Result<(), LocalClusterError> {
        let source = self.node(upstream)?;
        let names = indices
            .iter()
            .map(|i| self.node(*i).map(|n| n.name.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        let sql = "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'";
        let deadline = Instant::now() + REPLICATION_LIMIT;
        loop {
            let last = match source.psql(&self.host, sql) {
                Ok(rows) if names.iter().all(|n| rows.lines().any(|r| r == n)) => return Ok(()),
                Ok(rows) => format!("streaming: {:?}", rows.lines().collect::<Vec<_>>()),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(self.replication_timeout(
                    format!("waiting for {names:?} to stream from {}", source.name),
                    &last,
                    std::iter::once(upstream).chain(indices.iter().copied()),
                ));
            }
            std::thread::sleep(POLL_SLOW);
        }
    }

    /// Promotes standby `i` with `pg_ctl promote -w` and returns once it is out of recovery.
    pub fn promote(&mut self, i: usize) -> Result<(), LocalClusterError> {
        let node = self.node(i)?;
        if !node.is_running() {
            return Err(LocalClusterError::NotRunning(i));
        }
        if !config::is_standby(&node.data_dir) {
            return Err(LocalClusterError::NotAStandby(i));
        }
        let mut cmd = self
            .host
            .identity
            .command(&self.host.binaries.program("pg_ctl"), &self.host.dir);
        cmd.arg("promote").arg("-D").arg(&node.data_dir).args([
            "-w",
            "-t",
            &REPLICATION_LIMIT.as_secs().to_string(),
        ]);
        let what = format!("pg_ctl promote of {}", node.name);
        super::process::run_bounded(cmd, &what, REPLICATION_LIMIT + Duration::from_secs(30))
            .map_err(|e| self.with_log(e, i))?;
        let deadline = Instant::now() + REPLICATION_LIMIT;
        loop {
            let last = match node.psql(&self.host, "SELECT pg_is_in_recovery()") {
                Ok(answer) if answer == "f" => return Ok(()),
                Ok(answer) => format!("pg_is_in_recovery() = {answer}"),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(self.replication_timeout(
                    format!("waiting for {} to leave recovery", node.name),
                    &last,
                    [i],
                ));
            }
            std::thread::sleep(POLL_SLOW);
        }
    }

    /// Cuts standby `i` off its upstream (an empty `primary_conninfo`, reloaded): it stays a
    /// standby but receives no more WAL, so it falls behind. Returns once its WAL receiver is
    /// gone.
    pub fn detach(&mut self, i: usize) -> Result<(), LocalClusterError> {
        let node = self.node(i)?;
        if !config::is_standby(&node.data_dir) {
            return Err(LocalClusterError::NotAStandby(i));
        }
        if !node.is_running() {
            return Err(LocalClusterError::NotRunning(i));
        }
        config::set_upstream(&node.data_dir, "")?;
        node.send(Signal::SIGHUP)?;
        let deadline = Instant::now() + REPLICATION_LIMIT;
        loop {
            let last = match node.psql(&self.host, "SELECT count(*) FROM pg_stat_wal_receiver") {
                Ok(n) if n == "0" => return Ok(()),
                Ok(n) => format!("{n} WAL receiver(s) still running"),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(self.replication_timeout(
                    format!("waiting for {}'s WAL receiver to stop", node.name),
                    &last,
                    [i],
                ));
            }
            std::thread::sleep(POLL_SLOW);
        }
    }

    /// Makes standby `i` stream from node `new_primary`: rewrites its `primary_conninfo` (with
    /// `recovery_target_timeline = 'latest'`, so it follows a promotion's new timeline) and
    /// reloads it. If `i` is running, returns once its WAL receiver streams from `new_primary`
    /// on that node's timeline; if it is stopped, the change takes effect at its next start.
    pub fn repoint(&mut self, i: usize, new_primary: usize) -> Result<(), LocalClusterError> {
        if i == new_primary {
            return Err(LocalClusterError::InvalidSpec(format!(
                "node {i} cannot stream from itself"
            )));
        }
        let upstream = self.node(new_primary)?;
        let node = self.node(i)?;
        if !config::is_standby(&node.data_dir) {
            return Err(LocalClusterError::NotAStandby(i));
        }
        config::set_upstream(
            &node.data_dir,
            &self.upstream_conninfo(&node.name, new_primary)?,
        )?;
        if !node.is_running() {
            return Ok(());
        }
        if !upstream.is_running() {
            return Err(LocalClusterError::NotRunning(new_primary));
        }
        // PostgreSQL >= 13 restarts the WAL receiver when primary_conninfo changes on reload.
        node.send(Signal::SIGHUP)?;
        let receiver = "SELECT status || ' ' || coalesce(sender_port, 0) || ' ' || received_tli \
                        FROM pg_stat_wal_receiver";
        let want_port = upstream.port.to_string();
        let deadline = Instant::now() + REPLICATION_LIMIT;
        loop {
            let last = match (
                upstream_timeline(self, new_primary),
                node.psql(&self.host, receiver),
            ) {
                (Ok(tli), Ok(row)) => {
                    let fields: Vec<&str> = row.split_whitespace().collect();
                    let streaming = fields.first() == Some(&"streaming")
                        && fields.get(1) == Some(&want_port.as_str());
                    let on_timeline = match &tli {
                        Some(t) => fields.get(2) == Some(&t.as_str()),
                        None => true,
                    };
                    if streaming && on_timeline {
                        return Ok(());
                    }
                    format!("wal receiver: {row:?}; upstream timeline {tli:?}")
                }
                (Err(e), _) | (_, Err(e)) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(self.replication_timeout(
                    format!("waiting for {} to stream from {}", node.name, upstream.name),
                    &last,
                    [new_primary, i],
                ));
            }
            std::thread::sleep(POLL_SLOW);
        }
    }

    /// A timeout error carrying the last observation and the log tails of `nodes`.
    fn replication_timeout(
        &self,
        what: String,
        last: &str,
        nodes: impl IntoIterator<Item = usize>,
    ) -> LocalClusterError {
        let mut context = format!("last seen: {last}");
        for i in nodes {
            if let Some(node) = self.nodes.get(i) {
                context.push_str(&format!(
                    "\nlast lines of {}:\n{}",
                    node.log_file.display(),
                    node.tail()
                ));
            }
        }
        LocalClusterError::Timeout {
            what,
            waited: REPLICATION_LIMIT,
            context,
        }
    }

    /// Appends node `i`'s log tail to a command failure.
    fn with_log(&self, err: LocalClusterError, i: usize) -> LocalClusterError {
        match (err, self.nodes.get(i)) {
            (
                LocalClusterError::Command {
                    what,
                    status,
                    output,
                },
                Some(node),
            ) => LocalClusterError::Command {
                what,
                status,
                output: format!(
                    "{output}\nlast lines of {}:\n{}",
                    node.log_file.display(),
                    node.tail()
                ),
            },
            (err, _) => err,
        }
    }
}

/// The timeline node `i` writes on, when it is a primary (`None` while it is in recovery).
fn upstream_timeline(
    cluster: &LocalCluster,
    i: usize,
) -> Result<Option<String>, LocalClusterError> {
    let node = cluster.node(i)?;
    let sql = "SELECT CASE WHEN pg_is_in_recovery() THEN '' ELSE \
               (('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int)::text END";
    let tli = node.psql(&cluster.host, sql)?;
    Ok((!tli.is_empty()).then_some(tli))
}
