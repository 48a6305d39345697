//! A throwaway real PostgreSQL cluster on this machine — one primary and streaming standbys —
//! for `graywire demo` and the end-to-end tests; this file owns the public API and teardown.
//!
//! ```text
//! <base_dir>/graywire-cluster-XXXXXX/     owned by the OS user PostgreSQL runs as
//!   sock/          every node's Unix socket (.s.PGSQL.<port>)
//!   node0/         data directory of node 0, the primary at creation (initdb)
//!   node1/ ...     standbys of node 0 (pg_basebackup -R)
//!   node0.log ...  each postmaster's stdout and stderr, appended across restarts
//! ```
//!
//! Invariants:
//! - Every postmaster we start is our direct child; we signal it by PID, never by name or
//!   group, and reap it. We daemonise nothing, so nothing outlives [`LocalCluster`]'s `Drop`
//!   unless the owning process itself is SIGKILLed.
//! - Nodes restarted outside the fixture (`pg_ctl stop` then `pg_ctl start`, as a rolling
//!   upgrade does) are adopted: whenever the fixture looks at a node it reaps a child that has
//!   exited and takes the live postmaster that `postmaster.pid` names on the node's data
//!   directory. An adopted postmaster is signalled by PID and watched until it is gone (it is
//!   not our child, so it cannot be reaped), and `Drop` stops it like any other.
//! - Every wait is bounded; every error names what failed and carries the relevant log tail.
//! - The API is blocking and needs no async runtime: call it from `spawn_blocking` or
//!   `block_in_place` inside tokio.

mod binaries;
mod config;
mod error;
mod node;
mod process;
mod provision;
mod replication;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

pub use binaries::{fetch_debian_server, PgBinaries, BINDIR_ENV};
pub use error::LocalClusterError;
pub use process::process_alive;

use node::{Host, Node};

/// The address every node listens on.
pub const HOST: &str = "127.0.0.1";

/// The superuser every node is created with.
pub const SUPERUSER: &str = "postgres";

/// Environment variable: when set to anything but `0` or empty, teardown keeps the cluster
/// directory (data and logs) instead of removing it, and logs where it is.
pub const KEEP_DIR_ENV: &str = "GRAYWIRE_KEEP_CLUSTER_DIR";

/// How long [`LocalCluster::stop`] waits for a postmaster to exit.
const STOP_LIMIT: Duration = Duration::from_secs(60);

/// What cluster to build.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// How many nodes, at least 1: node 0 is the primary, the others its standbys.
    pub nodes: usize,
    /// The password of the [`SUPERUSER`], required for every TCP connection (SCRAM).
    pub superuser_password: String,
    /// The PostgreSQL programs to run.
    pub binaries: PgBinaries,
    /// Lines appended to every node's `postgresql.conf`, after the fixture's own settings.
    pub extra_conf: Vec<String>,
    /// Where the cluster directory is made; [`std::env::temp_dir`] when `None`.
    pub base_dir: Option<PathBuf>,
}

impl ClusterSpec {
    /// `nodes` nodes with the located binaries ([`PgBinaries::locate`]), the password
    /// `graywire`, no extra settings, in the system temp dir.
    pub fn new(nodes: usize) -> Result<Self, LocalClusterError> {
        Ok(Self {
            nodes,
            superuser_password: "graywire".to_owned(),
            binaries: PgBinaries::locate()?,
            extra_conf: Vec::new(),
            base_dir: None,
        })
    }
}

/// How to stop a postmaster; see PostgreSQL's "Shutting Down the Server".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// SIGTERM: wait for clients to disconnect.
    Smart,
    /// SIGINT: end sessions, checkpoint, exit.
    Fast,
    /// SIGQUIT: exit at once; the next start does crash recovery.
    Immediate,
}

impl StopMode {
    fn signal(self) -> Signal {
        match self {
            Self::Smart => Signal::SIGTERM,
            Self::Fast => Signal::SIGINT,
            Self::Immediate => Signal::SIGQUIT,
        }
    }
}

/// A running local cluster. Dropping it stops every postmaster and removes its directory.
#[derive(Debug)]
pub struct LocalCluster {
    host: Host,
    nodes: Vec<Node>,
    password: String,
    /// `None` once torn down.
    dir: Option<tempfile::TempDir>,
}

impl LocalCluster {
    /// Creates and starts the cluster; returns once every node accepts connections and every
    /// standby streams from node 0. On error, whatever was started is torn down.
    pub fn start(spec: ClusterSpec) -> Result<Self, LocalClusterError> {
        provision::validate(&spec)?;
        let started = Instant::now();
        let (host, dir) = provision::prepare_dir(&spec)?;
        // From here on, Drop cleans up whatever a failing step leaves behind.
        let mut cluster = Self {
            host,
            nodes: Vec::with_capacity(spec.nodes),
            password: spec.superuser_password.clone(),
            dir: Some(dir),
        };
        cluster.init_primary(&spec)?;
        for i in 1..spec.nodes {
            cluster.add_standby(i)?;
        }
        let standbys: Vec<usize> = (1..spec.nodes).collect();
        cluster.wait_streaming(0, &standbys)?;
        tracing::info!(
            nodes = spec.nodes,
            dir = %cluster.host.dir.display(),
            elapsed = ?started.elapsed(),
            "local cluster started"
        );
        Ok(cluster)
    }

    /// The number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always false: a cluster has at least one node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The address every node listens on, [`HOST`].
    pub fn host(&self) -> &str {
        HOST
    }

    /// Node `i`'s TCP port, the same across restarts.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn port(&self, i: usize) -> u16 {
        self.nodes[i].port
    }

    /// The superuser name, [`SUPERUSER`].
    pub fn superuser(&self) -> &str {
        SUPERUSER
    }

    /// The superuser password.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// A key=value connection string for node `i` as the superuser over TCP, usable by
    /// tokio-postgres and psql.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn dsn(&self, i: usize) -> String {
        config::conninfo(&[
            ("host", HOST),
            ("port", &self.port(i).to_string()),
            ("user", SUPERUSER),
            ("password", &self.password),
            ("dbname", "postgres"),
        ])
    }

    /// Node `i`'s data directory.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn data_dir(&self, i: usize) -> &Path {
        &self.nodes[i].data_dir
    }

    /// Node `i`'s log file (its postmaster's stdout and stderr).
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn log_file(&self, i: usize) -> PathBuf {
        self.nodes[i].log_file.clone()
    }

    /// The last lines of node `i`'s log, for assertion messages.
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn log_tail(&self, i: usize) -> String {
        self.nodes[i].tail()
    }

    /// Node `i`'s postmaster PID while it runs: our child, or a postmaster restarted outside
    /// the fixture (`pg_ctl`), which is adopted from `postmaster.pid`; `None` when none runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.nodes.get(i).and_then(Node::pid)
    }

    /// Whether node `i`'s postmaster is alive (ours or adopted, as for [`Self::pid`]).
    pub fn is_running(&self, i: usize) -> bool {
        self.nodes.get(i).is_some_and(Node::is_running)
    }

    /// The cluster directory.
    pub fn dir(&self) -> &Path {
        &self.host.dir
    }

    /// Stops node `i` with `mode`; returns once the postmaster has exited (at most 60 s) and
    /// been reaped — or, for a postmaster adopted after a restart outside the fixture, once
    /// its PID is gone — and the children it had are gone too.
    pub fn stop(&mut self, i: usize, mode: StopMode) -> Result<(), LocalClusterError> {
        self.node_mut(i)?.stop(mode.signal(), STOP_LIMIT)
    }

    /// SIGKILLs node `i`'s postmaster (ours or adopted) — a crash — and returns once it is
    /// gone and the children it had are gone, so its port is free for [`Self::start_node`].
    pub fn kill9(&mut self, i: usize) -> Result<(), LocalClusterError> {
        self.node_mut(i)?.kill9()
    }

    /// Starts stopped node `i` again on its port; returns once it accepts connections. A node
    /// whose postmaster runs — ours, or one adopted after a restart outside the fixture — is
    /// [`LocalClusterError::AlreadyRunning`].
    pub fn start_node(&mut self, i: usize) -> Result<(), LocalClusterError> {
        let len = self.nodes.len();
        let node = self
            .nodes
            .get_mut(i)
            .ok_or(LocalClusterError::NoSuchNode { node: i, len })?;
        node.start(&self.host, false)
    }

    /// Stops node `i` with `mode` and starts it again with the `postgres` program in `bindir`
    /// (another minor version of the same major: a minor upgrade or downgrade of that node);
    /// returns once it accepts connections. The node keeps that program for later restarts.
    pub fn restart_on(
        &mut self,
        i: usize,
        bindir: &Path,
        mode: StopMode,
    ) -> Result<(), LocalClusterError> {
        let postgres = bindir.join("postgres");
        if !postgres.is_file() {
            return Err(LocalClusterError::BinariesNotFound {
                looked_in: format!("{}: no postgres program", bindir.display()),
            });
        }
        self.stop(i, mode)?;
        self.node_mut(i)?.postgres = Some(postgres);
        self.start_node(i)
    }

    /// [`Self::stop`] with `mode`, then [`Self::start_node`].
    pub fn restart(&mut self, i: usize, mode: StopMode) -> Result<(), LocalClusterError> {
        self.stop(i, mode)?;
        self.start_node(i)
    }

    /// Stops every node's postmaster by its PID — ours or adopted after a restart outside the
    /// fixture — with fast shutdown, then immediate, then SIGKILL, each with a bounded wait,
    /// and removes the cluster directory (unless [`KEEP_DIR_ENV`] is set). Never panics;
    /// problems are logged. Idempotent.
    pub fn shutdown(&mut self) {
        let Some(dir) = self.dir.take() else {
            return;
        };
        if std::thread::panicking() {
            self.print_logs_for_panic();
        }
        self.stop_all();
        let keep = std::env::var_os(KEEP_DIR_ENV).is_some_and(|v| !v.is_empty() && v != "0");
        if keep {
            let path = dir.keep();
            tracing::warn!("{KEEP_DIR_ENV} is set: keeping {}", path.display());
        } else if let Err(e) = dir.close() {
            tracing::warn!("removing {}: {e}", self.host.dir.display());
        }
    }

    fn stop_all(&mut self) {
        let phases = [
            (Signal::SIGINT, Duration::from_secs(30)),
            (Signal::SIGQUIT, Duration::from_secs(10)),
            (Signal::SIGKILL, Duration::from_secs(10)),
        ];
        let mut children = Vec::new();
        for (signal, limit) in phases {
            // Refreshing reaps exited children and adopts postmasters restarted outside.
            let running: Vec<(&Node, u32)> = self
                .nodes
                .iter()
                .filter_map(|n| n.refresh().map(|pid| (n, pid)))
                .collect();
            if running.is_empty() {
                break;
            }
            for (node, pid) in &running {
                children.extend(process::children_of(*pid));
                if let Err(e) = process::signal(*pid, signal) {
                    tracing::warn!(node = node.index, "teardown: {e}");
                }
            }
            let deadline = Instant::now() + limit;
            for (node, pid) in &running {
                let left = deadline.saturating_duration_since(Instant::now());
                if !node.wait_exit(left) {
                    tracing::warn!(
                        node = node.index,
                        pid,
                        "teardown: still running after {}",
                        signal.as_str()
                    );
                }
            }
        }
        children.sort_unstable();
        children.dedup();
        if let Err(e) = process::finish_orphans(&children, "postmaster children") {
            tracing::warn!("teardown: {e}");
        }
    }

    /// Prints each node's log tail to stderr, so a failing test shows what the servers saw.
    fn print_logs_for_panic(&self) {
        let mut stderr = std::io::stderr().lock();
        for node in &self.nodes {
            let pid = node
                .refresh()
                .map_or("not running".to_owned(), |p| format!("pid {p}"));
            // Failing to write diagnostics must not turn a panic into an abort.
            let _ = writeln!(
                stderr,
                "--- last lines of {} ({pid}, {}) ---\n{}",
                node.name,
                node.log_file.display(),
                node.tail()
            );
        }
    }

    fn node(&self, i: usize) -> Result<&Node, LocalClusterError> {
        self.nodes.get(i).ok_or(LocalClusterError::NoSuchNode {
            node: i,
            len: self.nodes.len(),
        })
    }

    fn node_mut(&mut self, i: usize) -> Result<&mut Node, LocalClusterError> {
        let len = self.nodes.len();
        self.nodes
            .get_mut(i)
            .ok_or(LocalClusterError::NoSuchNode { node: i, len })
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.shutdown();
    }
}
