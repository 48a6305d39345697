//! `graywire demo`: a real local cluster (one primary, streaming standbys), graywire in front
//! of it with the admin API, until Ctrl-C or SIGTERM — or, with `--rolling-upgrade`, until a
//! rolling upgrade of the cluster is done ([`rolling`]); then everything it started is stopped
//! and its directory removed.
#![allow(clippy::disallowed_methods)] // the demo runs on a runtime with tokio's timer.

pub mod rolling;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use graywire::config::{Config, ConfigError};
use graywire::Proxy;
use graywire_localcluster::{ClusterSpec, LocalCluster, LocalClusterError};

/// The client user the demo creates, and its password.
pub const DEMO_USER: &str = "app";
pub const DEMO_PASSWORD: &str = "app";

#[derive(Debug, Error)]
pub enum DemoError {
    #[error(transparent)]
    Cluster(#[from] LocalClusterError),
    #[error("demo configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}: {source} (choose another with --port/--admin-port, or 0 for any free port)")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the cluster task failed: {0}")]
    Task(String),
    #[error("the rolling upgrade fell short: {0}")]
    RollingUpgrade(String),
    #[error("--rolling-upgrade needs at least 2 nodes (a primary alone cannot be upgraded without an outage)")]
    TooFewNodes,
}

pub struct DemoOptions {
    pub nodes: usize,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    /// Run a rolling upgrade of the cluster, print its report and exit.
    pub rolling_upgrade: bool,
}

/// The graywire config for a local cluster. Nodes are listed in reverse, so the primary is
/// found by asking the nodes, not by its place in the list.
pub fn demo_config(cluster: &LocalCluster, listen: SocketAddr, admin: SocketAddr) -> String {
    let mut toml = format!(
        "[listener]\naddress = \"{listen}\"\n\n[admin]\naddress = \"{admin}\"\n\n\
         [backend]\nuser = \"{}\"\npassword = \"{}\"\n\n[shutdown]\ntimeout = \"5s\"\n\n\
         [[users]]\nname = \"{DEMO_USER}\"\nauth = \"scram-sha-256\"\npassword = \"{DEMO_PASSWORD}\"\n\n\
         [probe]\nuser = \"{DEMO_USER}\"\npassword = \"{DEMO_PASSWORD}\"\nwriter = \"demo\"\n",
        cluster.superuser(),
        cluster.password(),
    );
    for i in (0..cluster.len()).rev() {
        let _ = write!(
            toml,
            "\n[[nodes]]\nname = \"pg{}\"\nhost = \"{}\"\nport = {}\n",
            i + 1,
            cluster.host(),
            cluster.port(i)
        );
    }
    toml
}

/// Runs the demo until `stop` is cancelled.
pub async fn run(opts: DemoOptions, stop: CancellationToken) -> Result<(), DemoError> {
    if opts.rolling_upgrade && opts.nodes < 2 {
        return Err(DemoError::TooFewNodes);
    }
    let mut spec = ClusterSpec::new(opts.nodes)?;
    let mut password = [0u8; 12];
    rand::fill(&mut password);
    spec.superuser_password = password.iter().map(|b| format!("{b:02x}")).collect();
    println!("starting a {}-node PostgreSQL cluster ...", opts.nodes);
    let cluster = tokio::task::spawn_blocking(move || LocalCluster::start(spec))
        .await
        .map_err(|e| DemoError::Task(e.to_string()))??;

    let result = serve(&cluster, &opts, stop).await;
    println!(
        "stopping the cluster and removing {}",
        cluster.dir().display()
    );
    tokio::task::spawn_blocking(move || drop(cluster))
        .await
        .map_err(|e| DemoError::Task(e.to_string()))?;
    result
}

async fn serve(
    cluster: &LocalCluster,
    opts: &DemoOptions,
    stop: CancellationToken,
) -> Result<(), DemoError> {
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| DemoError::Bind { addr, source })
    };
    let listener = bind(opts.listen).await?;
    let admin = bind(opts.admin).await?;
    let listen = listener.local_addr().map_err(|source| DemoError::Bind {
        addr: opts.listen,
        source,
    })?;
    let admin_addr = admin.local_addr().map_err(|source| DemoError::Bind {
        addr: opts.admin,
        source,
    })?;
    let config = Config::from_toml(&demo_config(cluster, listen, admin_addr))?;

    let proxy = Proxy::new(config);
    let running = proxy.run(listener, Some(admin), stop.clone());
    tokio::pin!(running);
    tokio::select! {
        _ = &mut running => return Ok(()),
        _ = proxy.wait_for_first_checks(Duration::from_secs(10)) => {}
    }
    let mut table = String::new();
    for n in &proxy.topology().nodes {
        let _ = writeln!(
            table,
            "    {:<6} {:<22} {:<8} {}",
            n.name().as_str(),
            format!("{}:{}", n.config.host, n.config.port),
            n.role.as_str(),
            n.state_str()
        );
    }
    println!(
        "\ngraywire demo is running (cluster in {dir})\n\
         \n  connect: psql \"postgres://{DEMO_USER}:{DEMO_PASSWORD}@{listen}/postgres\"\
         \n  admin:   http://{admin_addr}/v1/nodes\
         \n  metrics: http://{admin_addr}/metrics\
         \n  gate:    http://{admin_addr}/v1/gate?window=30s&max_stall=1s&max_gaps=0\
         \n  probe:   http://{admin_addr}/v1/probe (writes ids through graywire every 100 ms)\
         \n\n  nodes:\n    {:<6} {:<22} {:<8} STATE\n{table}\n{}",
        "NAME",
        "ADDRESS",
        "ROLE",
        if opts.rolling_upgrade {
            "starting a rolling upgrade of every node"
        } else {
            "press Ctrl-C to stop"
        },
        dir = cluster.dir().display(),
    );
    if opts.rolling_upgrade {
        // `running` (the proxy itself) is polled alongside the rollout.
        let result = tokio::select! {
            r = rolling::run(cluster, listen, admin_addr) => r,
            _ = &mut running => Err(DemoError::RollingUpgrade(
                "interrupted: graywire stopped before the rollout ended".into(),
            )),
        };
        stop.cancel();
        running.await;
        return result;
    }
    running.await;
    Ok(())
}
