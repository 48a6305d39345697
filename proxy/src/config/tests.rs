//! Every key that can be wrong is refused with its key path; the reference file is valid.

use super::validate::parse_size;
use super::*;

const MINIMAL: &str = r#"
[listener]
address = "127.0.0.1:6432"
[backend]
user = "graywire"
password = "pw"
[[nodes]]
name = "pg1"
host = "127.0.0.1"
port = 5432
[[users]]
name = "app"
auth = "trust"
"#;

fn problems(toml_text: &str) -> String {
    match Config::from_toml(toml_text) {
        Ok(_) => panic!("accepted:\n{toml_text}"),
        Err(e) => e.to_string(),
    }
}

/// Replaces the first occurrence of `from` in MINIMAL (which must exist).
fn with(from: &str, to: &str) -> String {
    assert!(MINIMAL.contains(from), "{from}");
    MINIMAL.replacen(from, to, 1)
}

#[test]
fn minimal_config_gets_defaults() {
    let c = Config::from_toml(MINIMAL).expect("valid");
    assert_eq!(c.nodes[0].port, 5432);
    assert_eq!(c.listener.max_message_size, DEFAULT_MAX_MESSAGE_SIZE);
    assert_eq!(c.health.interval, Duration::from_millis(250));
    assert_eq!(c.health.fall, 3);
    assert_eq!(c.admin.address.to_string(), "127.0.0.1:9930");
    assert_eq!(c.pool_mode, PoolMode::Session);
    assert!(matches!(c.users[0].auth, ClientAuth::Trust));
}

#[test]
fn the_reference_config_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/graywire.toml");
    let c = Config::from_file(Path::new(path)).expect("config/graywire.toml is valid");
    assert!(c.nodes.len() >= 2);
    assert!(c.users.len() >= 3, "the reference shows each auth method");
    let app = c.user("app").expect("user app");
    let ClientAuth::ScramSha256(v) = &app.auth else {
        panic!("app uses scram-sha-256")
    };
    assert!(
        v.matches_password("app-password"),
        "the documented password fits the verifier"
    );
}

#[test]
fn each_bad_value_is_named_by_its_key() {
    let extra_node = "port = 5432\n[[nodes]]\nname = \"pg2\"\nhost = \"h\"\nport = 70000";
    let cases: Vec<(String, &str)> = vec![
        (with("port = 5432", extra_node), "nodes[1].port: 70000 is not a port"),
        (with("port = 5432", "port = 0"), "nodes[0].port: 0 is not a port"),
        (with("name = \"pg1\"", "name = \"a b\""), "nodes[0].name: \"a b\" is not a valid name"),
        (with("host = \"127.0.0.1\"", "host = \"\""), "nodes[0].host: must not be empty"),
        (with("address = \"127.0.0.1:6432\"", "address = \"nowhere\""), "listener.address: \"nowhere\" is not an address"),
        (with("[backend]", "[listener.x]\n[backend]"), "unknown field `x`"),
        (with("[backend]", "[admin]\naddress = \"0.0.0.0:9930\"\n[backend]"), "admin.address: 0.0.0.0:9930 is not a loopback address"),
        (with("[backend]", "[admin]\ntoken = \"short\"\n[backend]"), "admin.token: must be at least 16"),
        (with("[backend]", "[health]\ninterval = \"fast\"\n[backend]"), "health.interval: \"fast\" is not a duration"),
        (with("[backend]", "[health]\ntimeout = \"0s\"\n[backend]"), "health.timeout: \"0s\" must be longer than zero"),
        (with("[backend]", "[health]\nfall = 0\n[backend]"), "health.fall: 0 is out of range"),
        (with("[backend]", "[pool]\nmode = \"statement\"\n[backend]"), "pool.mode: \"statement\" is not a pool mode"),
        (with("[backend]", "[shutdown]\ntimeout = \"x\"\n[backend]"), "shutdown.timeout: \"x\" is not a duration"),
        (with("[backend]", "[pool]\nsize = 0\n[backend]"), "pool.size: 0 is out of range"),
        (with("[backend]", "[pool]\nidle_timeout = \"never\"\n[backend]"), "pool.idle_timeout: \"never\" is not a duration"),
        (with("[backend]", "[routing]\nmax_lag = \"far\"\n[backend]"), "routing.max_lag: \"far\" is not a duration"),
        (with("[backend]", "[routing]\nmax_lag_bytes = \"1QB\"\n[backend]"), "routing.max_lag_bytes: \"1QB\" has an unknown unit"),
        (with("[backend]", "[routing]\nsplit_brain = \"coin\"\n[backend]"), "routing.split_brain: \"coin\" is not a policy"),
        (with("[backend]", "[routing]\nread_only_databases = \"x\"\n[backend]"), "invalid type"),
        (with("[backend]", "[drain]\ntimeout = \"soon\"\n[backend]"), "drain.timeout: \"soon\" is not a duration"),
        (with("[backend]", "[drain]\non_timeout = \"panic\"\n[backend]"), "drain.on_timeout: \"panic\" is not an action"),
        (with("[backend]", "[drain]\non_timeout = \"end_transactions\"\n[backend]"), "drain.on_timeout: \"end_transactions\" needs drain.timeout"),
        (format!("{MINIMAL}\n[probe]\npassword = \"x\"\n"), "probe.user: required"),
        (format!("{MINIMAL}\n[probe]\nuser = \"nobody\"\n"), "probe.user: \"nobody\" is not one of [[users]]"),
        (format!("{MINIMAL}\n[probe]\nuser = \"app\"\nmode = \"hope\"\n"), "probe.mode: \"hope\" is not a probe mode"),
        (format!("{MINIMAL}\n[probe]\nuser = \"app\"\ninterval = \"often\"\n"), "probe.interval: \"often\" is not a duration"),
        (format!("{MINIMAL}\n[probe]\nuser = \"app\"\nverify_interval = \"0s\"\n"), "probe.verify_interval: \"0s\" must be longer than zero"),
        (format!("{MINIMAL}\n[probe]\nuser = \"app\"\ntarget = \"host=x port=notaport\"\n"), "probe.target: not a connection string"),
        (format!("{MINIMAL}\n[probe]\nuser = \"app\"\nwriter = \"\"\n"), "probe.writer: must not be empty"),
        (format!("{MINIMAL}\n[probe]\nuser = \"app\"\ngate = \"window=soon\"\n"), "probe.gate: "),
        (format!("{MINIMAL}\n[[users]]\nname = \"e\"\nauth = \"password\"\npassword = \"\"\n"), "users[1].password: empty"),
        (format!("{MINIMAL}\n[probe]\nuser = \"app\"\ngate = \"max_gaps=none\"\n"), "probe.gate: "),
        (format!("{MINIMAL}\n[probe]\nuser = \"app\"\ngate = \"colour=red\"\n"), "probe.gate: "),
        (format!("{MINIMAL}\n[probe]\nuser = \"app\"\ncolour = \"red\"\n"), "unknown field `colour`"),
        (with("auth = \"trust\"", "auth = \"trust\"\ntarget = \"replica\""), "users[0].target: \"replica\" is not a target"),
        (with("auth = \"trust\"", "auth = \"trust\"\npool_mode = \"statement\""), "users[0].pool_mode: \"statement\" is not a pool mode"),
        (with("[backend]", "[runtime]\nworker_threads = -1\n[backend]"), "runtime.worker_threads: -1 is out of range"),
        (with("address = \"127.0.0.1:6432\"", "address = \"127.0.0.1:6432\"\nmax_message_size = \"12XB\""), "listener.max_message_size: \"12XB\" has an unknown unit"),
        (with("address = \"127.0.0.1:6432\"", "address = \"127.0.0.1:6432\"\nmax_message_size = 10"), "listener.max_message_size: 10 bytes is out of range"),
        (with("address = \"127.0.0.1:6432\"", "address = \"127.0.0.1:6432\"\nmax_client_connections = 0"), "listener.max_client_connections: 0 is out of range"),
        (with("user = \"graywire\"", "user = \"\""), "backend.user: must not be empty"),
        (with("auth = \"trust\"", "auth = \"kerberos\""), "users[0].auth: \"kerberos\" is not an auth method"),
        (with("auth = \"trust\"", "auth = \"trust\"\npassword = \"x\""), "users[0].auth: \"trust\" takes no password"),
        (with("auth = \"trust\"", "auth = \"md5\""), "users[0].auth: \"md5\" needs password or md5_hash"),
        (with("auth = \"trust\"", "auth = \"scram-sha-256\""), "users[0].auth: \"scram-sha-256\" needs password"),
        (with("auth = \"trust\"", "auth = \"password\""), "users[0].auth: \"password\" needs password"),
        (with("auth = \"trust\"", "auth = \"scram-sha-256\"\nscram_verifier = \"SCRAM-SHA-256$x\""), "users[0].scram_verifier: invalid SCRAM verifier"),
        (with("auth = \"trust\"", "auth = \"md5\"\nmd5_hash = \"md5zz\""), "users[0].md5_hash: must be \"md5\" followed by 32 hex digits"),
        (with("auth = \"trust\"", "auth = \"password\"\npassword = \"a\"\nmd5_hash = \"md5\""), "give only one of"),
        (with("auth = \"trust\"", "auth = \"trust\"\nbackend_password = \"x\""), "users[0].backend_password: needs backend_user"),
        (with("name = \"app\"", "name = \"\""), "users[0].name: \"\" is not a valid user name"),
        (MINIMAL.replace("[[users]]\nname = \"app\"\nauth = \"trust\"\n", ""), "users: at least one"),
        (format!("{MINIMAL}\n[[users]]\nname = \"app\"\nauth = \"trust\"\n"), "users[1].name: \"app\" is listed twice"),
        (format!("{MINIMAL}\n[[nodes]]\nname = \"pg1\"\nhost = \"x\"\nport = 1\n"), "nodes[1].name: \"pg1\" is used by another node"),
        (format!("{MINIMAL}\n[[nodes]]\nname = \"pg2\"\nhost = \"127.0.0.1\"\nport = 5432\n"), "nodes[1].port: 127.0.0.1:5432 is the address of another node"),
        ("[listener]\naddress = \"127.0.0.1:1\"\n[backend]\nuser = \"u\"\n[[users]]\nname = \"a\"\nauth = \"trust\"\n".to_string(), "nodes: at least one"),
        ("this is not toml".to_string(), "expected"),
    ];
    for (text, want) in cases {
        let got = problems(&text);
        assert!(got.contains(want), "expected {want:?} in:\n{got}");
    }
}

#[test]
fn ha_settings_parse() {
    let text = with(
        "[backend]",
        "[pool]\nmode = \"transaction\"\nsize = 7\n[routing]\nmax_lag = \"2s\"\nmax_lag_bytes = \"16MB\"\n\
         read_fallback_to_primary = false\nread_only_databases = [\"reports\"]\nsplit_brain = \"highest_timeline\"\n\
         [drain]\ntimeout = \"30s\"\non_timeout = \"end_transactions\"\n[backend]",
    )
    .replace("auth = \"trust\"", "auth = \"trust\"\ntarget = \"read-only\"\npool_mode = \"session\"");
    let c = Config::from_toml(&text).expect("valid");
    assert_eq!(c.pool_mode, PoolMode::Transaction);
    assert_eq!(c.pool_size, 7);
    assert_eq!(c.routing.max_lag, Some(Duration::from_secs(2)));
    assert_eq!(c.routing.max_lag_bytes, Some(16 << 20));
    assert!(!c.routing.read_fallback_to_primary);
    assert_eq!(c.routing.read_only_databases, vec!["reports".to_owned()]);
    assert!(c.routing.split_brain_highest_timeline);
    assert_eq!(c.drain_timeout, Some(Duration::from_secs(30)));
    assert_eq!(c.drain_on_timeout, DrainTimeoutAction::EndTransactions);
    let app = c.user("app").expect("app");
    assert_eq!(app.target, Target::ReadOnly);
    assert_eq!(c.pool_mode_of(app), PoolMode::Session);
}

#[test]
fn all_problems_are_reported_at_once() {
    let text = with("port = 5432", "port = -1").replace("auth = \"trust\"", "auth = \"nope\"");
    let got = problems(&text);
    assert!(got.contains("nodes[0].port"), "{got}");
    assert!(got.contains("users[0].auth"), "{got}");
}

#[test]
fn secrets_never_show_in_debug_output() {
    let text = with(
        "auth = \"trust\"",
        "auth = \"scram-sha-256\"\npassword = \"hunter2-secret\"",
    );
    let c = Config::from_toml(&text).expect("valid");
    let dump = format!("{c:?}");
    assert!(!dump.contains("hunter2"), "{dump}");
    assert!(!dump.contains("\"pw\""), "{dump}");
}

#[test]
fn sizes_parse_with_units() {
    use toml::Value;
    assert_eq!(parse_size(&Value::Integer(2048)), Ok(2048));
    assert_eq!(parse_size(&Value::String("64MiB".into())), Ok(64 << 20));
    assert_eq!(parse_size(&Value::String("512 kB".into())), Ok(512 << 10));
    assert!(parse_size(&Value::String("big".into())).is_err());
    assert!(parse_size(&Value::Integer(-1)).is_err());
    assert!(parse_size(&Value::Boolean(true)).is_err());
}

#[test]
fn a_syntax_error_names_its_place_but_never_echoes_the_line() {
    let text = format!("{MINIMAL}\n[[users]]\nname = \"x\"\npassword = \"s3cret-value\n");
    let e = Config::from_toml(&text).expect_err("unterminated string");
    let shown = e.to_string();
    assert!(!shown.contains("s3cret"), "{shown}");
    let line = text
        .lines()
        .position(|l| l.contains("s3cret"))
        .expect("the line")
        + 1;
    assert!(shown.contains(&format!("line {line}, column")), "{shown}");
}
