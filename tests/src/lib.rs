//! The end-to-end test fixture: a real PostgreSQL cluster ([`graywire_localcluster`]),
//! graywire running in-process in front of it on port 0 (on a thread of its own, with the
//! runtimes `graywire run` builds), and a small raw-protocol client for what drivers hide
//! (transaction status, ParameterStatus, malformed messages).
//! See `tests/README.md`.
#![allow(clippy::unwrap_used)]

pub mod eventually;
pub mod load;
pub mod pgbench;
pub mod raw;

pub use eventually::{eventually, eventually_ok, try_eventually};

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use graywire::config::Config;
use graywire::runtime::Runtimes;
use graywire::Proxy;
use graywire_localcluster::{ClusterSpec, LocalCluster};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

pub use graywire_localcluster::StopMode;

/// Users every harness config defines: (name, auth method, password).
pub const USERS: &[(&str, &str, &str)] = &[
    ("app", "scram-sha-256", "app-pw"),
    ("md5user", "md5", "md5-pw"),
    ("plainuser", "password", "plain-pw"),
    ("trusted", "trust", ""),
];

/// Starts a real cluster of `nodes` nodes (node 0 primary) off the async runtime's threads.
pub async fn start_cluster(nodes: usize) -> LocalCluster {
    tokio::task::spawn_blocking(move || {
        let spec = ClusterSpec::new(nodes).expect("PostgreSQL binaries");
        LocalCluster::start(spec).expect("cluster starts")
    })
    .await
    .expect("cluster task")
}

/// The other PostgreSQL 15 build (the Debian package version, and the version it reports):
/// 15.20 where 15.18 is installed, 15.18 where 15.20 is.
pub fn other_build(installed: &str) -> (&'static str, &'static str) {
    if installed.starts_with("15.20") {
        ("15.18-0+deb12u1", "15.18")
    } else {
        ("15.20-0+deb12u1", "15.20")
    }
}

/// Fetches [`other_build`] from Debian's archive into `$TMPDIR/graywire-pg-cache` (once) and
/// returns its `bin` directory and version; a failed download fails the test loudly.
pub async fn fetch_other_build() -> (std::path::PathBuf, &'static str) {
    let installed = graywire_localcluster::PgBinaries::locate()
        .expect("PostgreSQL binaries")
        .version()
        .expect("the installed version");
    let (package, want) = other_build(&installed);
    let cache = std::env::temp_dir().join("graywire-pg-cache");
    let bindir = tokio::task::spawn_blocking(move || {
        graywire_localcluster::fetch_debian_server(package, &cache)
    })
    .await
    .expect("fetch task")
    .unwrap_or_else(|e| {
        panic!("fetching postgresql-15={package} from Debian's archive failed: {e}")
    });
    (bindir, want)
}

/// Runs a blocking cluster operation (stop, kill, promote, …) off the runtime's threads.
pub async fn cluster_op<T: Send + 'static>(
    cluster: &Arc<std::sync::Mutex<LocalCluster>>,
    f: impl FnOnce(&mut LocalCluster) -> T + Send + 'static,
) -> T {
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || f(&mut c.lock().unwrap()))
        .await
        .unwrap()
}

/// When each step of [`planned_switchover`] began or ended.
#[derive(Debug, Clone, Copy)]
pub struct SwitchoverTimes {
    pub drain_started: std::time::Instant,
    pub promote_started: std::time::Instant,
    pub promoted: std::time::Instant,
}

/// The operator's planned switchover of a 3-node cluster through graywire's admin API: drain
/// the primary pg0 (asserting it drained), stop it, promote pg1, re-point pg2 at it, undrain
/// pg0 (now stopped, so it takes nothing).
pub async fn planned_switchover(
    cluster: &Arc<std::sync::Mutex<LocalCluster>>,
    proxy: &RunningProxy,
) -> SwitchoverTimes {
    let drain_started = std::time::Instant::now();
    let (status, body) = proxy.admin_post("/v1/nodes/pg0/drain?wait=20s").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"drained\":true"), "{body}");
    cluster_op(cluster, |c| c.stop(0, StopMode::Fast))
        .await
        .unwrap();
    let promote_started = std::time::Instant::now();
    cluster_op(cluster, |c| c.promote(1)).await.unwrap();
    let promoted = std::time::Instant::now();
    cluster_op(cluster, |c| c.repoint(2, 1)).await.unwrap();
    let (status, body) = proxy.admin_post("/v1/nodes/pg0/undrain").await;
    assert_eq!(status, 200, "{body}");
    SwitchoverTimes {
        drain_started,
        promote_started,
        promoted,
    }
}

/// Options for the generated graywire config.
#[derive(Clone, Debug)]
pub struct ProxyOptions {
    /// Node indexes in the order they are listed in the config.
    pub node_order: Option<Vec<usize>>,
    /// Extra TOML lines appended to the `[listener]` table.
    pub listener_extra: String,
    /// Extra TOML appended at the end (new tables).
    pub extra: String,
}

impl Default for ProxyOptions {
    /// Single-threaded, as benchmarked: the proxy runs on one thread without tokio's timer.
    fn default() -> Self {
        ProxyOptions {
            node_order: None,
            listener_extra: String::new(),
            extra: "[shutdown]\ntimeout = \"3s\"\n\n[runtime]\nworker_threads = 1\n".into(),
        }
    }
}

/// The config text for a cluster, with [`USERS`] and loopback listeners on port 0.
pub fn config_for(cluster: &LocalCluster, opts: &ProxyOptions) -> String {
    let mut t = format!(
        "[listener]\naddress = \"127.0.0.1:0\"\n{}\n\n[backend]\nuser = \"{}\"\npassword = \"{}\"\n\n",
        opts.listener_extra,
        cluster.superuser(),
        cluster.password()
    );
    for (name, auth, pw) in USERS {
        let _ = write!(t, "[[users]]\nname = \"{name}\"\nauth = \"{auth}\"\n");
        if !pw.is_empty() {
            let _ = writeln!(t, "password = \"{pw}\"");
        }
        t.push('\n');
    }
    let order: Vec<usize> = opts
        .node_order
        .clone()
        .unwrap_or_else(|| (0..cluster.len()).collect());
    for i in order {
        let _ = write!(
            t,
            "[[nodes]]\nname = \"pg{i}\"\nhost = \"{}\"\nport = {}\n\n",
            cluster.host(),
            cluster.port(i)
        );
    }
    t.push_str(&opts.extra);
    t
}

/// graywire running in-process in front of a cluster, on a thread of its own.
pub struct RunningProxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub proxy: Arc<Proxy>,
    pub stop: CancellationToken,
    /// Fires when the proxy's thread has finished (dropped if it panicked).
    finished: Option<oneshot::Receiver<()>>,
}

impl RunningProxy {
    /// Starts graywire with `config_text` and waits until every node was checked once. It
    /// runs on a new thread, on the runtimes `graywire run` builds for the config's
    /// `runtime.worker_threads` (with 1: one thread without tokio's timer).
    pub async fn start(config_text: &str) -> RunningProxy {
        let config = Config::from_toml(config_text).expect("valid test config");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let admin = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        admin.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let stop = CancellationToken::new();
        let (started, proxy) = oneshot::channel();
        let (finished_tx, finished) = oneshot::channel();
        let runtimes = Runtimes::for_proxy(config.worker_threads, config.probe.is_some())
            .expect("graywire's runtimes");
        let thread_stop = stop.clone();
        std::thread::Builder::new()
            .name("graywire".into())
            .spawn(move || {
                let probe_runtime = runtimes.probe();
                runtimes
                    .block_on(async move {
                        let listener = TcpListener::from_std(listener).unwrap();
                        let admin = TcpListener::from_std(admin).unwrap();
                        let proxy = Arc::new(Proxy::with_probe_runtime(config, probe_runtime));
                        let _ = started.send(proxy.clone());
                        proxy.run(listener, Some(admin), thread_stop).await;
                    })
                    .expect("the proxy thread's timers");
                drop(runtimes);
                let _ = finished_tx.send(());
            })
            .unwrap();
        let proxy = proxy.await.expect("graywire's thread started the proxy");
        assert!(
            proxy.wait_for_first_checks(Duration::from_secs(10)).await,
            "health checks did not finish"
        );
        RunningProxy {
            addr,
            admin: admin_addr,
            proxy,
            stop,
            finished: Some(finished),
        }
    }

    /// Starts graywire in front of `cluster` with the default options.
    pub async fn in_front_of(cluster: &LocalCluster) -> RunningProxy {
        Self::start(&config_for(cluster, &ProxyOptions::default())).await
    }

    /// A key=value DSN for a [`USERS`] entry.
    pub fn dsn(&self, user: &str) -> String {
        let pw = USERS
            .iter()
            .find(|(n, _, _)| *n == user)
            .map(|(_, _, p)| *p)
            .unwrap_or("");
        format!(
            "host={} port={} user={user} password='{pw}' dbname=postgres connect_timeout=10",
            self.addr.ip(),
            self.addr.port()
        )
    }

    /// A postgres:// URL for psql.
    pub fn url(&self, user: &str) -> String {
        let pw = USERS
            .iter()
            .find(|(n, _, _)| *n == user)
            .map(|(_, _, p)| *p)
            .unwrap_or("");
        format!("postgres://{user}:{pw}@{}/postgres", self.addr)
    }

    /// Connects with tokio-postgres as `user`.
    pub async fn connect(&self, user: &str) -> tokio_postgres::Client {
        connect(&self.dsn(user)).await
    }

    /// GET on the admin API; returns (status, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        http_request(self.admin, "GET", path).await
    }

    /// POST on the admin API (no token); returns (status, body).
    pub async fn admin_post(&self, path: &str) -> (u16, String) {
        http_request(self.admin, "POST", path).await
    }

    /// The parsed `/v1/nodes` entry of node `name`.
    pub async fn node_info(&self, name: &str) -> serde_json::Value {
        let (status, body) = self.admin_get("/v1/nodes").await;
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no node {name} in {body}"))
    }

    /// Waits (bounded) until node `name` shows `field` = `want` in `/v1/nodes`.
    pub async fn wait_node(&self, name: &str, field: &str, want: &str, limit: Duration) {
        let what = format!("node {name}: {field} is {want}");
        eventually_ok(limit, &what, || async {
            let n = self.node_info(name).await;
            if n[field] == want {
                Ok(())
            } else {
                Err(n)
            }
        })
        .await;
    }

    /// The value of one series on `/metrics` (`series` as printed before the value, e.g.
    /// `graywire_held_requests` or `graywire_node_up{node="pg0"}`), if it is there.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let (status, body) = self.admin_get("/metrics").await;
        assert_eq!(status, 200, "{body}");
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Waits (bounded) until `series` on `/metrics` has the value `want`.
    pub async fn wait_metric(&self, series: &str, want: f64, limit: Duration) {
        let what = format!("{series} is {want} on /metrics");
        eventually_ok(limit, &what, || async {
            match self.metric(series).await {
                Some(v) if v == want => Ok(()),
                other => Err(format!("{series} = {other:?}")),
            }
        })
        .await;
    }

    /// Stops graywire (graceful shutdown) and waits for it.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(finished) = self.finished.take() {
            tokio::time::timeout(Duration::from_secs(20), finished)
                .await
                .expect("graywire stops in time")
                .expect("graywire's thread ends without a panic");
        }
    }
}

impl Drop for RunningProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Connects with tokio-postgres and drives the connection in a task.
pub async fn connect(dsn: &str) -> tokio_postgres::Client {
    try_connect(dsn)
        .await
        .unwrap_or_else(|e| panic!("connect {dsn}: {e:?}"))
}

pub async fn try_connect(dsn: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(dsn, NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// Connects expecting a refusal; returns the error (panics if the connection succeeds).
pub async fn connect_refused(dsn: &str) -> tokio_postgres::Error {
    match try_connect(dsn).await {
        Ok(_) => panic!("connection to {dsn} should have been refused"),
        Err(e) => e,
    }
}

/// The SQLSTATE of a tokio-postgres error, if the server sent one.
pub fn sqlstate(e: &tokio_postgres::Error) -> Option<String> {
    e.code().map(|c| c.code().to_owned())
}

/// A minimal HTTP/1.1 request over a fresh connection (the tests' admin client).
pub async fn http_request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    http_request_with(addr, method, path, &[]).await
}

/// [`http_request`] with extra header lines (`"Authorization: Bearer x"`).
pub async fn http_request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut extra = String::new();
    for h in headers {
        extra.push_str(h);
        extra.push_str("\r\n");
    }
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}Content-Length: 0\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut buf))
        .await
        .expect("admin answers")
        .unwrap();
    graywire_api::split_http_response(&String::from_utf8_lossy(&buf))
}

/// Runs psql with `args` against `url`; returns (success, stdout, stderr).
pub async fn psql(url: &str, args: &[&str]) -> (bool, String, String) {
    let bindir = graywire_localcluster::PgBinaries::locate().expect("PostgreSQL binaries");
    let out = tokio::process::Command::new(bindir.program("psql"))
        .arg(url)
        .args(["-X", "-v", "ON_ERROR_STOP=1", "-At"])
        .args(args)
        .env("PGCONNECT_TIMEOUT", "10")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out)
        .await
        .expect("psql finishes")
        .expect("psql runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
