//! Finding the PostgreSQL server programs (`initdb`, `postgres`, `pg_ctl`, `pg_basebackup`,
//! `psql`) and asking them their version.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::process::{program, run_bounded};
use super::LocalClusterError;

/// Environment variable naming the directory that holds the PostgreSQL server programs.
pub const BINDIR_ENV: &str = "GRAYWIRE_PG_BINDIR";

/// Programs the fixture runs; [`PgBinaries::at`] insists on all of them.
const REQUIRED: [&str; 5] = ["initdb", "postgres", "pg_ctl", "pg_basebackup", "psql"];

/// Where Debian-family packages install each major version's server programs.
const DEBIAN_ROOT: &str = "/usr/lib/postgresql";

/// A directory holding the PostgreSQL server programs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgBinaries {
    /// The directory, e.g. `/usr/lib/postgresql/15/bin`.
    pub bindir: PathBuf,
}

impl PgBinaries {
    /// `$GRAYWIRE_PG_BINDIR` if set; else `pg_config --bindir` if that directory holds `postgres`
    /// and `initdb`; else the highest-numbered `/usr/lib/postgresql/*/bin`.
    pub fn locate() -> Result<Self, LocalClusterError> {
        if let Some(dir) = std::env::var_os(BINDIR_ENV) {
            return Self::at(PathBuf::from(dir)).map_err(|e| match e {
                LocalClusterError::BinariesNotFound { looked_in } => {
                    LocalClusterError::BinariesNotFound {
                        looked_in: format!("{looked_in}, named by ${BINDIR_ENV}"),
                    }
                }
                other => other,
            });
        }
        let mut looked_in = Vec::new();
        match pg_config_bindir() {
            Some(dir) if has_server(&dir) => return Self::at(dir),
            Some(dir) => looked_in.push(format!("{} (from pg_config --bindir)", dir.display())),
            None => looked_in.push("pg_config on PATH (not found)".to_owned()),
        }
        match highest_debian_bindir() {
            Some(dir) => Self::at(dir),
            None => {
                looked_in.push(format!("{DEBIAN_ROOT}/*/bin"));
                Err(LocalClusterError::BinariesNotFound {
                    looked_in: looked_in.join(", "),
                })
            }
        }
    }

    /// The programs in `dir`, which must hold every one the fixture runs.
    pub fn at(dir: impl Into<PathBuf>) -> Result<Self, LocalClusterError> {
        let bindir = dir.into();
        let missing: Vec<&str> = REQUIRED
            .iter()
            .copied()
            .filter(|name| !program(&bindir, name).is_file())
            .collect();
        if missing.is_empty() {
            Ok(Self { bindir })
        } else {
            Err(LocalClusterError::BinariesNotFound {
                looked_in: format!("{}: missing {}", bindir.display(), missing.join(", ")),
            })
        }
    }

    /// The server version from `postgres --version`, e.g. `"15.18"`.
    pub fn version(&self) -> Result<String, LocalClusterError> {
        let mut cmd = Command::new(self.program("postgres"));
        cmd.arg("--version");
        let output = run_bounded(cmd, "postgres --version", Duration::from_secs(30))?;
        parse_version(&output.stdout).ok_or_else(|| LocalClusterError::UnexpectedOutput {
            what: "postgres --version".to_owned(),
            output: output.stdout,
        })
    }

    /// The path of one program in this directory.
    pub fn program(&self, name: &str) -> PathBuf {
        program(&self.bindir, name)
    }
}

/// Whether `dir` holds the two programs that make a server installation.
fn has_server(dir: &Path) -> bool {
    program(dir, "postgres").is_file() && program(dir, "initdb").is_file()
}

/// `pg_config --bindir`, if `pg_config` runs.
fn pg_config_bindir() -> Option<PathBuf> {
    let mut cmd = Command::new("pg_config");
    cmd.arg("--bindir");
    let output = run_bounded(cmd, "pg_config --bindir", Duration::from_secs(30)).ok()?;
    let dir = output.stdout.trim();
    (!dir.is_empty()).then(|| PathBuf::from(dir))
}

/// The `bin` directory of the highest major version under `/usr/lib/postgresql` that holds a
/// server.
fn highest_debian_bindir() -> Option<PathBuf> {
    std::fs::read_dir(DEBIAN_ROOT)
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = version_key(entry.file_name().to_str()?)?;
            let bin = entry.path().join("bin");
            has_server(&bin).then_some((version, bin))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, bin)| bin)
}

/// A sortable key for a directory name like `15` or `9.6`.
fn version_key(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|part| part.parse().ok()).collect()
}

/// `"postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"` → `"15.18"`.
fn parse_version(text: &str) -> Option<String> {
    let version = text.split_whitespace().nth(2)?;
    version
        .starts_with(|c: char| c.is_ascii_digit())
        .then(|| version.to_owned())
}

/// Fetches the Debian package `postgresql-<major>=<version>` (e.g. `"15.20-0+deb12u1"`) from
/// the configured apt sources into `cache` and unpacks it there, without installing it;
/// returns its server `bin` directory. A version already unpacked is reused. Needs `apt-get`
/// and `dpkg`; fails with their output, never silently.
pub fn fetch_debian_server(version: &str, cache: &Path) -> Result<PathBuf, LocalClusterError> {
    let major = version.split('.').next().unwrap_or_default();
    if major.is_empty() || !major.bytes().all(|b| b.is_ascii_digit()) {
        return Err(LocalClusterError::InvalidSpec(format!(
            "{version:?} is not a Debian PostgreSQL version like 15.20-0+deb12u1"
        )));
    }
    let root = cache.join(format!("postgresql-{version}"));
    let bindir = root.join(format!("usr/lib/postgresql/{major}/bin"));
    if bindir.join("postgres").is_file() {
        return Ok(bindir);
    }
    std::fs::create_dir_all(cache)
        .map_err(|e| LocalClusterError::io(format!("creating {}", cache.display()), e))?;
    // The server runs as an unprivileged user: it must be able to reach the programs.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(cache, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| LocalClusterError::io(format!("chmod {}", cache.display()), e))?;
    }
    let package = format!("postgresql-{major}={version}");
    let mut download = Command::new("apt-get");
    download
        .args(["download", "-q", &package])
        .current_dir(cache);
    let out = run_bounded(
        download,
        &format!("apt-get download {package}"),
        Duration::from_secs(300),
    )?;
    let deb = std::fs::read_dir(cache)
        .map_err(|e| LocalClusterError::io(format!("reading {}", cache.display()), e))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with(&format!("postgresql-{major}_"))
                    && n.contains(&version.replace(':', "%3a"))
                    && n.ends_with(".deb")
            })
        })
        .ok_or_else(|| LocalClusterError::UnexpectedOutput {
            what: format!(
                "apt-get download {package} (no .deb in {})",
                cache.display()
            ),
            output: out.stdout,
        })?;
    let mut unpack = Command::new("dpkg");
    unpack.arg("-x").arg(&deb).arg(&root);
    run_bounded(unpack, "dpkg -x", Duration::from_secs(120))?;
    if !bindir.join("postgres").is_file() {
        return Err(LocalClusterError::BinariesNotFound {
            looked_in: format!("{} after unpacking {}", bindir.display(), deb.display()),
        });
    }
    Ok(bindir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_version_lines() {
        let cases = [
            (
                "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n",
                Some("15.18"),
            ),
            ("postgres (PostgreSQL) 17beta1\n", Some("17beta1")),
            ("postgres (PostgreSQL)\n", None),
            ("something else entirely\n", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_version(text).as_deref(), want, "{text:?}");
        }
    }

    #[test]
    fn orders_major_versions_numerically() {
        assert!(version_key("15") > version_key("9.6"));
        assert!(version_key("10") > version_key("9"));
        assert_eq!(version_key("main"), None);
    }

    #[test]
    fn missing_directory_names_the_package() {
        let err = PgBinaries::at("/nonexistent/graywire/bin").expect_err("no such dir");
        let text = err.to_string();
        assert!(text.contains("apt-get install -y postgresql-15"), "{text}");
        assert!(text.contains("/nonexistent/graywire/bin"), "{text}");
        assert!(text.contains("initdb"), "{text}");
    }
}
