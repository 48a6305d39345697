//! The `graywire` command line: parse arguments, set up logging, load the config, call the
//! library. Exit codes: 0 ok, 1 runtime failure, 64 bad config or usage.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use graywire::config::Config;
use graywire::demo::{self, DemoOptions};
use graywire::Proxy;

const EXIT_BAD_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "graywire",
    version,
    about = "High-availability proxy for the PostgreSQL wire protocol"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy with a config file.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and exit (0 valid, 64 invalid, with every problem listed).
    CheckConfig { file: PathBuf },
    /// Start a local PostgreSQL cluster with graywire in front of it, until Ctrl-C.
    Demo {
        /// Nodes in the local cluster (one primary, the rest streaming standbys).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=9))]
        nodes: u8,
        /// Client port of graywire (0: any free port).
        #[arg(long, default_value_t = 6432)]
        port: u16,
        /// Port of the admin API and /metrics (0: any free port).
        #[arg(long, default_value_t = 9930)]
        admin_port: u16,
        /// Worker threads (0: one per core, 1: single-threaded), as runtime.worker_threads.
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::CheckConfig { file } => match Config::from_file(&file) {
            Ok(c) => {
                println!(
                    "{}: valid ({} nodes, {} users)",
                    file.display(),
                    c.nodes.len(),
                    c.users.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", file.display());
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        },
        Command::Run { config } => {
            let config_path = config.clone();
            let config = match Config::from_file(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{}: {e}", config.display());
                    return ExitCode::from(EXIT_BAD_CONFIG);
                }
            };
            let path = config_path;
            runtime_then(config.worker_threads, |stop| async move {
                let listener = tokio::net::TcpListener::bind(config.listener.address).await?;
                let admin = tokio::net::TcpListener::bind(config.admin.address).await?;
                info!(listen = %config.listener.address, admin = %config.admin.address, "graywire is serving");
                let proxy = Arc::new(Proxy::new(config));
                reload_on_sighup(proxy.clone(), path)?;
                proxy.run(listener, Some(admin), stop).await;
                Ok(())
            })
        }
        Command::Demo {
            nodes,
            port,
            admin_port,
            threads,
        } => {
            let opts = DemoOptions {
                nodes: nodes as usize,
                listen: SocketAddr::from(([127, 0, 0, 1], port)),
                admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            };
            runtime_then(threads, |stop| async move {
                ignore_sighup()?;
                Ok(demo::run(opts, stop).await?)
            })
        }
    }
}

/// Builds the runtime (`threads`: 0 one worker per core, 1 single-threaded), wires
/// SIGINT/SIGTERM to a cancellation token, runs `f`.
fn runtime_then<F, Fut>(threads: usize, f: F) -> ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let built = match threads {
        0 => tokio::runtime::Runtime::new(),
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    };
    let runtime = match built {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let stop = CancellationToken::new();
        if let Err(e) = watch_signals(stop.clone()) {
            eprintln!("cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
        match f(stop).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("graywire: {e:#}");
                ExitCode::FAILURE
            }
        }
    })
}

fn watch_signals(stop: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: shutting down"),
            _ = int.recv() => info!("SIGINT: shutting down"),
        }
        stop.cancel();
    });
    Ok(())
}

/// SIGHUP: read the config file again; apply it if valid, otherwise keep the running config
/// and log why.
fn reload_on_sighup(proxy: Arc<Proxy>, path: PathBuf) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match Config::from_file(&path) {
                Ok(c) => {
                    info!(file = %path.display(), "SIGHUP: reloading the configuration");
                    proxy.reload(c);
                }
                Err(e) => error!(
                    file = %path.display(),
                    reason = %e,
                    "SIGHUP: the new configuration is invalid; keeping the running one"
                ),
            }
        }
    });
    Ok(())
}

/// The demo has no config file: SIGHUP is logged and otherwise ignored (it would end the
/// process by default).
fn ignore_sighup() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            warn!("SIGHUP: the demo has no configuration file to reload");
        }
    });
    Ok(())
}
