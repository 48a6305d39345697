//! The configuration files of a local node: settings appended to `postgresql.conf`, the whole
//! `pg_hba.conf`, and a standby's upstream in `postgresql.auto.conf`; plus libpq and GUC quoting.

use std::io::Write;
use std::path::Path;

use super::LocalClusterError;

/// Settings every node runs with, as `name = value` with the value already in GUC syntax.
/// They are tuned for a throwaway cluster on a small machine: no durability, small memory,
/// room for many test connections and replication.
const SERVER_SETTINGS: &[(&str, &str)] = &[
    ("listen_addresses", "'127.0.0.1'"),
    ("fsync", "off"),
    ("full_page_writes", "off"),
    ("shared_buffers", "'32MB'"),
    ("max_connections", "400"),
    ("password_encryption", "'scram-sha-256'"),
    ("wal_level", "replica"),
    ("max_wal_senders", "10"),
    ("max_replication_slots", "10"),
    ("wal_keep_size", "'256MB'"),
    ("hot_standby", "on"),
    // A standby whose upstream vanished retries every second instead of every five.
    ("wal_retrieve_retry_interval", "'1s'"),
    ("logging_collector", "off"),
    ("log_line_prefix", "'%m [%p] %q%a '"),
];

/// Appends the fixture's settings, then the caller's `extra` lines (which therefore win), to
/// `postgresql.conf`. Standbys inherit the file through `pg_basebackup`.
pub(crate) fn append_server_settings(
    data_dir: &Path,
    socket_dir: &Path,
    extra: &[String],
) -> Result<(), LocalClusterError> {
    let mut text = String::from("\n# --- graywire localcluster ---\n");
    for (name, value) in SERVER_SETTINGS {
        text.push_str(&format!("{name} = {value}\n"));
    }
    let socket_dir = socket_dir.to_str().ok_or_else(|| {
        LocalClusterError::InvalidSpec(format!(
            "the socket directory {} is not valid UTF-8",
            socket_dir.display()
        ))
    })?;
    text.push_str(&format!(
        "unix_socket_directories = {}\n",
        guc_quote(socket_dir)
    ));
    if !extra.is_empty() {
        text.push_str("# --- extra_conf from the ClusterSpec ---\n");
        for line in extra {
            text.push_str(line);
            text.push('\n');
        }
    }
    append(&data_dir.join("postgresql.conf"), &text)
}

/// Replaces `pg_hba.conf`: trust over the Unix socket (only the OS user that owns the cluster
/// can reach it), SCRAM over loopback TCP for normal and replication connections.
pub(crate) fn write_hba(data_dir: &Path) -> Result<(), LocalClusterError> {
    let text = "\
# graywire localcluster: TYPE DATABASE USER ADDRESS METHOD
local all         all                trust
local replication all                trust
host  all         all  127.0.0.1/32  scram-sha-256
host  replication all  127.0.0.1/32  scram-sha-256
";
    let path = data_dir.join("pg_hba.conf");
    std::fs::write(&path, text)
        .map_err(|e| LocalClusterError::io(format!("writing {}", path.display()), e))
}

/// Points a standby at its upstream: rewrites `postgresql.auto.conf` so it holds exactly one
/// `primary_conninfo` (ours) and `recovery_target_timeline = 'latest'`, keeping other lines.
pub(crate) fn set_upstream(data_dir: &Path, conninfo: &str) -> Result<(), LocalClusterError> {
    const OURS: [&str; 3] = [
        "primary_conninfo",
        "recovery_target_timeline",
        "primary_slot_name",
    ];
    let path = data_dir.join("postgresql.auto.conf");
    let old = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => {
            return Err(LocalClusterError::io(
                format!("reading {}", path.display()),
                e,
            ))
        }
    };
    let mut text: String = old
        .lines()
        .filter(|line| !setting_name(line).is_some_and(|name| OURS.contains(&name.as_str())))
        .map(|line| format!("{line}\n"))
        .collect();
    text.push_str(&format!("primary_conninfo = {}\n", guc_quote(conninfo)));
    text.push_str("recovery_target_timeline = 'latest'\n");
    std::fs::write(&path, text)
        .map_err(|e| LocalClusterError::io(format!("writing {}", path.display()), e))
}

/// Whether `data_dir` starts as a standby (`standby.signal` is present).
pub(crate) fn is_standby(data_dir: &Path) -> bool {
    data_dir.join("standby.signal").is_file()
}

/// The lower-cased setting name a config line assigns, if it assigns one.
fn setting_name(line: &str) -> Option<String> {
    let line = line.trim_start();
    if line.starts_with('#') {
        return None;
    }
    let end = line.find(|c: char| c == '=' || c.is_whitespace())?;
    let name = &line[..end];
    (!name.is_empty()).then(|| name.to_ascii_lowercase())
}

/// A libpq key=value connection string from `pairs`, every value quoted.
pub(crate) fn conninfo(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(key, value)| format!("{key}={}", conninfo_quote(value)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A value quoted for a libpq connection string: in single quotes, `\` and `'` backslashed.
fn conninfo_quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\\' || c == '\'' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

/// A value quoted for a PostgreSQL configuration file: in single quotes, `'` doubled and `\`
/// doubled (the file parser treats backslash as an escape).
fn guc_quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

fn append(path: &Path, text: &str) -> Result<(), LocalClusterError> {
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| LocalClusterError::io(format!("opening {}", path.display()), e))?;
    file.write_all(text.as_bytes())
        .map_err(|e| LocalClusterError::io(format!("appending to {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_conninfo_values() {
        let cases = [
            ("plain", "'plain'"),
            ("with space", "'with space'"),
            ("it's", r"'it\'s'"),
            (r"back\slash", r"'back\\slash'"),
            ("", "''"),
        ];
        for (value, want) in cases {
            assert_eq!(conninfo_quote(value), want, "{value:?}");
        }
        assert_eq!(
            conninfo(&[("host", "127.0.0.1"), ("password", "a b")]),
            "host='127.0.0.1' password='a b'"
        );
    }

    #[test]
    fn quotes_guc_values() {
        assert_eq!(guc_quote("x"), "'x'");
        assert_eq!(guc_quote("password='it\\'s'"), r"'password=''it\\''s'''");
    }

    #[test]
    fn finds_setting_names() {
        let cases = [
            ("primary_conninfo = 'x'", Some("primary_conninfo")),
            ("Primary_Conninfo='x'", Some("primary_conninfo")),
            (
                "  recovery_target_timeline 'latest'",
                Some("recovery_target_timeline"),
            ),
            ("# primary_conninfo = 'x'", None),
            ("", None),
        ];
        for (line, want) in cases {
            assert_eq!(setting_name(line).as_deref(), want, "{line:?}");
        }
    }

    #[test]
    fn set_upstream_replaces_only_its_own_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let auto = dir.path().join("postgresql.auto.conf");
        std::fs::write(
            &auto,
            "# Do not edit this file manually!\nwork_mem = '8MB'\nprimary_conninfo = 'old'\n",
        )
        .expect("write");
        set_upstream(dir.path(), "port=1").expect("first");
        set_upstream(dir.path(), "port=2").expect("second");
        let text = std::fs::read_to_string(&auto).expect("read");
        assert_eq!(
            text,
            "# Do not edit this file manually!\nwork_mem = '8MB'\n\
             primary_conninfo = 'port=2'\nrecovery_target_timeline = 'latest'\n"
        );
    }
}
