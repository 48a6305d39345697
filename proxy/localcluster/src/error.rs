//! The one error type of the local-cluster fixture: every variant names what failed and carries
//! the output or log tail needed to see why.

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while creating, driving or tearing down a [`super::LocalCluster`].
#[derive(Debug, thiserror::Error)]
pub enum LocalClusterError {
    /// The PostgreSQL server programs are not installed where we looked.
    #[error(
        "PostgreSQL server binaries not found (looked in {looked_in}): install them with \
         `apt-get install -y postgresql-15`"
    )]
    BinariesNotFound {
        /// Every place searched, with what was missing there.
        looked_in: String,
    },

    /// PostgreSQL refuses to run as root, and there is no `postgres` OS user to run it as.
    #[error(
        "running as root, but there is no `postgres` OS user to run PostgreSQL as \
         (PostgreSQL refuses to run as root): install the server with \
         `apt-get install -y postgresql-15`, which creates that user, or run as a non-root user"
    )]
    NoPostgresUser,

    /// The [`super::ClusterSpec`] cannot describe a working cluster.
    #[error("invalid cluster spec: {0}")]
    InvalidSpec(String),

    /// A file-system or process-spawning operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What we were doing, with the path involved.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A PostgreSQL program ran and exited unsuccessfully.
    #[error("{what} failed ({status}); its output:\n{output}")]
    Command {
        /// The program and its purpose.
        what: String,
        /// Its exit status.
        status: String,
        /// Its stdout and stderr.
        output: String,
    },

    /// A bounded wait ran out.
    #[error("{what}: gave up after {waited:?}; {context}")]
    Timeout {
        /// What we were waiting for.
        what: String,
        /// How long we waited.
        waited: Duration,
        /// The last state seen and the relevant log tail.
        context: String,
    },

    /// A postmaster exited while we were waiting for it to accept connections.
    #[error("node {node} exited during startup ({status}); last lines of {}:\n{tail}", log.display())]
    NodeExited {
        /// The node index.
        node: usize,
        /// Its exit status.
        status: String,
        /// Its log file.
        log: PathBuf,
        /// The last lines of that log.
        tail: String,
    },

    /// A node index outside the cluster.
    #[error("no node {node}: the cluster has {len} node(s)")]
    NoSuchNode {
        /// The index asked for.
        node: usize,
        /// The number of nodes.
        len: usize,
    },

    /// The operation needs a running node.
    #[error("node {0} is not running")]
    NotRunning(usize),

    /// The operation needs a stopped node.
    #[error("node {0} is already running")]
    AlreadyRunning(usize),

    /// The operation needs a standby (a data directory with `standby.signal`).
    #[error("node {0} is not a standby (no standby.signal in its data directory)")]
    NotAStandby(usize),

    /// Sending a signal to a process failed.
    #[error("sending {signal} to pid {pid}: {source}")]
    Signal {
        /// The signal's name.
        signal: String,
        /// The target process.
        pid: u32,
        /// The errno.
        #[source]
        source: nix::errno::Errno,
    },

    /// A PostgreSQL program printed something we could not make sense of.
    #[error("unexpected output from {what}: {output:?}")]
    UnexpectedOutput {
        /// The program.
        what: String,
        /// What it printed.
        output: String,
    },
}

impl LocalClusterError {
    /// An [`LocalClusterError::Io`] saying what was being done.
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}
