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
use graywire::runtime::Runtimes;
use graywire::Proxy;
use graywire_rollout::cli::RolloutArgs;

use demo::DemoOptions;

mod demo;

/// Sessions allocate and free buffers and small strings at every connection; glibc's malloc
/// spends much of a short session's CPU consolidating its bins (measured with `perf` under
/// `pgbench -C`). mimalloc keeps per-thread free lists and does not.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        /// Upgrade every node with `graywire rollout` under a little application load (onto
        /// PostgreSQL 15.20 fetched from Debian when possible, else restart only), print the
        /// report and exit: 0 only if nothing was lost and the application saw no error.
        #[arg(long)]
        rolling_upgrade: bool,
    },
    /// Run the write-continuity probe standalone against any endpoint (a node, PgBouncer,
    /// HAProxy, graywire), serving /metrics, /v1/gate and /v1/probe.
    Probe(ProbeArgs),
    /// Ask a graywire (or standalone probe) for its gate verdict; with --wait, poll until it
    /// passes. Exit 0 pass, 1 fail or timeout (reasons printed), 2 usage error.
    Gate(GateArgs),
    /// Upgrade every node one at a time, standbys first, the primary last via a switchover,
    /// each step gated on the probe's measurements. Exit 0 done, 1 stopped on a failure (the
    /// report says what and what to do), 2 refused before changing anything.
    Rollout(Box<RolloutArgs>),
}

#[derive(clap::Args)]
struct ProbeArgs {
    /// Connection string of the endpoint under test (postgres://… or key=value).
    #[arg(long)]
    target: String,
    /// Where to read ids back from (default: the target). Give the primary directly to keep
    /// the read-back off the path under test.
    #[arg(long)]
    verify: Option<String>,
    /// Address of the HTTP API (/metrics, /v1/gate, /v1/probe).
    #[arg(long, default_value = "127.0.0.1:9931")]
    listen: SocketAddr,
    /// Write interval.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    interval: std::time::Duration,
    /// retry: retry a failed id until written; skip: never retry (failures leave gaps).
    #[arg(long, default_value = "retry", value_parser = graywire_probe::Mode::parse)]
    mode: graywire_probe::Mode,
    /// Names this probe's rows (default: hostname-pid).
    #[arg(long)]
    writer: Option<String>,
    /// Bound on one write attempt.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    attempt_timeout: std::time::Duration,
    /// How often ids are read back.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    verify_interval: std::time::Duration,
    /// The bounds graywire_probe_gate_pass is evaluated against every second (the syntax of
    /// /v1/gate's query).
    #[arg(long, default_value = graywire::config::DEFAULT_GATE,
          value_parser = |s: &str| graywire_probe::gate::GateQuery::parse(s).map_err(|e| e.to_string()))]
    gate: graywire_probe::gate::GateQuery,
}

#[derive(clap::Args)]
struct GateArgs {
    /// Base URL of the admin API (http://host:port).
    #[arg(long, default_value = "http://127.0.0.1:9930")]
    admin: String,
    #[arg(long, default_value = "30s")]
    window: String,
    #[arg(long)]
    max_stall: Option<String>,
    #[arg(long)]
    max_gaps: Option<String>,
    #[arg(long)]
    max_p99: Option<String>,
    #[arg(long)]
    max_lag: Option<String>,
    /// Poll until the gate passes (or --timeout).
    #[arg(long)]
    wait: bool,
    /// With --wait: give up after this long.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    timeout: std::time::Duration,
    /// With --wait: time between polls.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    poll: std::time::Duration,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration (e.g. 500ms, 30s): {e}"))
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
            let runtimes = Runtimes::for_proxy(config.worker_threads, config.probe.is_some());
            runtime_then(runtimes, |stop, probe_runtime| async move {
                let listener = tokio::net::TcpListener::bind(config.listener.address).await?;
                let admin = tokio::net::TcpListener::bind(config.admin.address).await?;
                info!(listen = %config.listener.address, admin = %config.admin.address, "graywire is serving");
                let proxy = Arc::new(Proxy::with_probe_runtime(config, probe_runtime));
                reload_on_sighup(proxy.clone(), path)?;
                proxy.run(listener, Some(admin), stop).await;
                Ok(())
            })
        }
        Command::Probe(args) => runtime_then(Runtimes::single(0), |stop, _| async move {
            probe_standalone(args, stop).await
        }),
        Command::Gate(args) => gate_command(args),
        Command::Rollout(args) => rollout_command(*args),
        Command::Demo {
            nodes,
            port,
            admin_port,
            threads,
            rolling_upgrade,
        } => {
            let opts = DemoOptions {
                nodes: nodes as usize,
                listen: SocketAddr::from(([127, 0, 0, 1], port)),
                admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
                rolling_upgrade,
            };
            runtime_then(Runtimes::single(threads), |stop, _| async move {
                ignore_sighup()?;
                Ok(demo::run(opts, stop).await?)
            })
        }
    }
}

/// Runs `f` on `runtimes` (see [`Runtimes::block_on`]) with SIGINT/SIGTERM wired to a
/// cancellation token and the handle of the probe's runtime.
fn runtime_then<F, Fut>(runtimes: std::io::Result<Runtimes>, f: F) -> ExitCode
where
    F: FnOnce(CancellationToken, tokio::runtime::Handle) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let runtimes = match runtimes {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let probe_runtime = runtimes.probe();
    let ran = runtimes.block_on(async move {
        let stop = CancellationToken::new();
        if let Err(e) = watch_signals(stop.clone()) {
            eprintln!("cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
        match f(stop, probe_runtime).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("graywire: {e:#}");
                ExitCode::FAILURE
            }
        }
    });
    ran.unwrap_or_else(|e| {
        eprintln!("cannot start the session thread's timers: {e}");
        ExitCode::FAILURE
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

/// `graywire probe`: the probe against any endpoint, with its own HTTP API.
async fn probe_standalone(args: ProbeArgs, stop: CancellationToken) -> anyhow::Result<()> {
    let mut target: tokio_postgres::Config = args
        .target
        .parse()
        .map_err(|e| anyhow::anyhow!("--target is not a connection string: {e}"))?;
    target
        .application_name("graywire probe")
        .connect_timeout(args.attempt_timeout);
    let verify: tokio_postgres::Config = match &args.verify {
        Some(v) => v
            .parse()
            .map_err(|e| anyhow::anyhow!("--verify is not a connection string: {e}"))?,
        None => target.clone(),
    };
    let mut config = graywire_probe::ProbeConfig::new(target);
    if let Some(w) = args.writer {
        config.writer = w;
    }
    config.interval = args.interval;
    config.mode = args.mode;
    config.attempt_timeout = args.attempt_timeout;
    config.verify_interval = args.verify_interval;
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let metrics = graywire::metrics::install();
    let probe =
        graywire_probe::Probe::start(config, Arc::new(move || Some(verify.clone())), stop.clone());
    probe.watch_gate(args.gate, || None, stop.clone());
    info!(listen = %args.listen, writer = %probe.config().writer, "probe running");
    let admin = Arc::new(graywire::admin::Admin {
        ctx: None,
        probe: Some(probe),
        metrics,
        stop: stop.clone(),
    });
    graywire::admin::serve(admin, listener).await;
    Ok(())
}

/// `graywire gate`: 0 pass, 1 fail/timeout, 2 usage.
fn gate_command(args: GateArgs) -> ExitCode {
    let mut query = graywire_probe::gate::GateQuery::default();
    let flags = [
        ("window", Some(args.window.as_str())),
        ("max_stall", args.max_stall.as_deref()),
        ("max_gaps", args.max_gaps.as_deref()),
        ("max_p99", args.max_p99.as_deref()),
        ("max_lag", args.max_lag.as_deref()),
    ];
    for (key, value) in flags {
        if let Some(v) = value {
            if let Err(e) = query.set(key, v) {
                eprintln!("graywire gate: --{}: {e}", key.replace('_', "-"));
                return ExitCode::from(2);
            }
        }
    }
    let addr = match graywire_api::admin_address(&args.admin) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("graywire gate: --admin: {e}");
            return ExitCode::from(2);
        }
    };
    let path = format!("/v1/gate?{}", query.to_query());
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("graywire gate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let deadline = std::time::Instant::now() + args.timeout;
        loop {
            let last = match graywire_api::http_get(&addr, &path).await {
                Ok((200, body)) => {
                    println!("gate passed: {body}");
                    return ExitCode::SUCCESS;
                }
                Ok((503, body)) => {
                    let reasons = serde_json::from_str::<graywire_api::GateReply>(&body)
                        .map(|g| g.reasons)
                        .unwrap_or_default();
                    format!("gate failed:\n  {}", reasons.join("\n  "))
                }
                Ok((400, body)) => {
                    eprintln!("graywire gate: refused: {body}");
                    return ExitCode::from(2);
                }
                Ok((status, body)) => format!("unexpected answer {status}: {body}"),
                Err(e) => format!("cannot reach {addr}: {e}"),
            };
            if !args.wait || std::time::Instant::now() + args.poll > deadline {
                eprintln!("{last}");
                return ExitCode::from(1);
            }
            graywire::timer::sleep(args.poll).await;
        }
    })
}

/// `graywire rollout`: 0 done, 1 stopped on a failure, 2 refused before changing anything.
fn rollout_command(args: RolloutArgs) -> ExitCode {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => ExitCode::from(r.block_on(graywire_rollout::cli::run(args)).0),
        Err(e) => {
            eprintln!("graywire rollout: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
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
