//! Creating a local cluster on disk: the temporary directory and its ownership, `initdb` of the
//! primary, `pg_basebackup -R` of each standby, and starting them all.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::node::{Host, Node};
use super::process::{self, run_bounded, OsIdentity};
use super::{config, ClusterSpec, LocalCluster, LocalClusterError, HOST, SUPERUSER};

/// How long `initdb` and `pg_basebackup` each get.
const PROVISION_LIMIT: Duration = Duration::from_secs(120);

/// Prefix of every cluster directory, so strays are easy to recognise.
const DIR_PREFIX: &str = "graywire-cluster-";

/// Checks the spec for values that cannot work.
pub(super) fn validate(spec: &ClusterSpec) -> Result<(), LocalClusterError> {
    if spec.nodes == 0 {
        return Err(LocalClusterError::InvalidSpec(
            "nodes must be at least 1 (the primary)".to_owned(),
        ));
    }
    if spec.superuser_password.is_empty() {
        return Err(LocalClusterError::InvalidSpec(
            "superuser_password must not be empty (TCP connections use SCRAM)".to_owned(),
        ));
    }
    if spec.superuser_password.contains(['\n', '\r', '\0']) {
        return Err(LocalClusterError::InvalidSpec(
            "superuser_password must not contain a newline or NUL".to_owned(),
        ));
    }
    if let Some(line) = spec.extra_conf.iter().find(|l| l.contains(['\n', '\r'])) {
        return Err(LocalClusterError::InvalidSpec(format!(
            "extra_conf entries are single lines; this one is not: {line:?}"
        )));
    }
    Ok(())
}

/// Makes the cluster directory (owned by whoever runs PostgreSQL) and its socket directory,
/// and returns the shared node context plus the directory guard.
pub(super) fn prepare_dir(
    spec: &ClusterSpec,
) -> Result<(Host, tempfile::TempDir), LocalClusterError> {
    let identity = OsIdentity::resolve()?;
    let base = spec.base_dir.clone().unwrap_or_else(std::env::temp_dir);
    let base = std::fs::canonicalize(&base)
        .map_err(|e| LocalClusterError::io(format!("resolving base_dir {}", base.display()), e))?;
    let tmp = tempfile::Builder::new()
        .prefix(DIR_PREFIX)
        .tempdir_in(&base)
        .map_err(|e| {
            LocalClusterError::io(format!("creating a directory in {}", base.display()), e)
        })?;
    let dir = tmp.path().to_path_buf();
    identity.chown(&dir)?;
    identity.check_can_enter(&dir)?;
    let socket_dir = dir.join("sock");
    std::fs::create_dir(&socket_dir)
        .map_err(|e| LocalClusterError::io(format!("creating {}", socket_dir.display()), e))?;
    identity.chown(&socket_dir)?;
    let host = Host {
        binaries: spec.binaries.clone(),
        identity,
        dir,
        socket_dir,
    };
    Ok((host, tmp))
}

impl LocalCluster {
    /// `initdb` node 0 with the superuser password, configure it and start it.
    pub(super) fn init_primary(&mut self, spec: &ClusterSpec) -> Result<(), LocalClusterError> {
        let mut node = Node::new(0, &self.host.dir, process::free_port()?);
        let pwfile = self.write_pwfile()?;
        let mut cmd = self
            .host
            .identity
            .command(&self.host.binaries.program("initdb"), &self.host.dir);
        cmd.arg("-D")
            .arg(&node.data_dir)
            .args([
                "-U",
                SUPERUSER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .args(["--no-sync", "--encoding=UTF8", "--locale=C"]);
        let result = run_bounded(cmd, "initdb of node0", PROVISION_LIMIT);
        if let Err(e) = std::fs::remove_file(&pwfile) {
            tracing::warn!("removing {}: {e}", pwfile.display());
        }
        result?;
        config::append_server_settings(&node.data_dir, &self.host.socket_dir, &spec.extra_conf)?;
        config::write_hba(&node.data_dir)?;
        node.start(&self.host, true)?;
        self.nodes.push(node);
        Ok(())
    }

    /// `pg_basebackup -R` node `index` from node 0, point it at node 0 and start it.
    pub(super) fn add_standby(&mut self, index: usize) -> Result<(), LocalClusterError> {
        let mut node = Node::new(index, &self.host.dir, process::free_port()?);
        let primary = self.node(0)?;
        let source = config::conninfo(&[
            ("host", HOST),
            ("port", &primary.port.to_string()),
            ("user", SUPERUSER),
            ("application_name", &node.name),
        ]);
        let mut cmd = self
            .host
            .identity
            .command(&self.host.binaries.program("pg_basebackup"), &self.host.dir);
        cmd.arg("-D")
            .arg(&node.data_dir)
            .arg("-d")
            .arg(&source)
            .args(["-X", "stream", "-c", "fast", "--no-sync", "-R"])
            .env("PGPASSWORD", &self.password)
            .env("PGCONNECT_TIMEOUT", "10");
        let what = format!("pg_basebackup of {} from node0", node.name);
        run_bounded(cmd, &what, PROVISION_LIMIT)?;
        config::set_upstream(&node.data_dir, &self.upstream_conninfo(&node.name, 0)?)?;
        node.start(&self.host, true)?;
        self.nodes.push(node);
        Ok(())
    }

    /// The superuser password in a file only PostgreSQL's OS user can read, for `initdb`.
    fn write_pwfile(&self) -> Result<PathBuf, LocalClusterError> {
        let path = self.host.dir.join("pwfile");
        write_private(&path, &format!("{}\n", self.password))?;
        self.host.identity.chown(&path)?;
        Ok(path)
    }
}

fn write_private(path: &Path, text: &str) -> Result<(), LocalClusterError> {
    std::fs::write(path, text)
        .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)))
        .map_err(|e| LocalClusterError::io(format!("writing {}", path.display()), e))
}
