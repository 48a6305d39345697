//! Checking the `[[users]]` of the file: names, auth methods and their secrets, backend
//! credentials, pool mode and target, each problem with its key path.

use std::collections::HashSet;
use std::sync::Arc;

use super::raw::RawUser;
use super::validate::{parse_pool_mode, Problems};
use super::*;

pub(super) fn validate_users(p: &mut Problems, raw: Vec<RawUser>) -> Vec<Arc<UserConfig>> {
    if raw.is_empty() {
        p.add(
            "users",
            "at least one [[users]] entry is required (nobody could connect)",
        );
    }
    let mut seen = HashSet::new();
    let mut users = Vec::new();
    for (i, u) in raw.into_iter().enumerate() {
        let key = |f: &str| format!("users[{i}].{f}");
        if u.name.is_empty() || u.name.contains('\0') {
            p.add(
                &key("name"),
                format!("{:?} is not a valid user name", u.name),
            );
        } else if !seen.insert(u.name.clone()) {
            p.add(&key("name"), format!("{:?} is listed twice", u.name));
        }
        let verifier = match &u.scram_verifier {
            None => None,
            Some(v) => match ScramVerifier::parse(v.expose()) {
                Ok(v) => Some(v),
                Err(e) => {
                    p.add(&key("scram_verifier"), e);
                    None
                }
            },
        };
        if let Some(h) = &u.md5_hash {
            let hex = h.expose().strip_prefix("md5").unwrap_or("");
            if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                p.add(
                    &key("md5_hash"),
                    "must be \"md5\" followed by 32 hex digits",
                );
            }
        }
        if u.password.as_ref().is_some_and(|pw| pw.expose().is_empty()) {
            p.add(
                &key("password"),
                "empty (an empty password is never accepted)",
            );
        }
        let secrets = [
            u.password.is_some(),
            u.scram_verifier.is_some(),
            u.md5_hash.is_some(),
        ]
        .iter()
        .filter(|x| **x)
        .count();
        if secrets > 1 {
            p.add(
                &key("password"),
                "give only one of password, scram_verifier, md5_hash",
            );
        }
        let auth = match u.auth.as_str() {
            "trust" => {
                if secrets > 0 {
                    p.add(
                        &key("auth"),
                        "\"trust\" takes no password; remove it or choose another method",
                    );
                }
                Some(ClientAuth::Trust)
            }
            "password" => match (&u.password, &verifier, &u.md5_hash) {
                (Some(pw), _, _) => Some(ClientAuth::Password(StoredSecret::Plain(pw.clone()))),
                (_, Some(v), _) => Some(ClientAuth::Password(StoredSecret::Scram(v.clone()))),
                (_, _, Some(h)) => Some(ClientAuth::Password(StoredSecret::Md5(h.clone()))),
                _ => None,
            },
            "md5" => {
                match (&u.password, &u.md5_hash) {
                    (Some(pw), _) => Some(ClientAuth::Md5 {
                        md5_hash: postgres_protocol::password::md5(pw.expose().as_bytes(), &u.name),
                    }),
                    (_, Some(h)) => Some(ClientAuth::Md5 {
                        md5_hash: h.expose().to_owned(),
                    }),
                    _ => {
                        p.add(&key("auth"), "\"md5\" needs password or md5_hash (a SCRAM verifier cannot check md5)");
                        continue;
                    }
                }
            }
            "scram-sha-256" => match (&u.password, verifier) {
                (Some(pw), _) => Some(ClientAuth::ScramSha256(ScramVerifier::from_password(
                    pw.expose(),
                ))),
                (_, Some(v)) => Some(ClientAuth::ScramSha256(v)),
                _ => {
                    p.add(
                        &key("auth"),
                        "\"scram-sha-256\" needs password or scram_verifier",
                    );
                    continue;
                }
            },
            other => {
                p.add(
                    &key("auth"),
                    format!(
                        "{other:?} is not an auth method (trust, password, md5, scram-sha-256)"
                    ),
                );
                continue;
            }
        };
        let Some(auth) = auth else {
            p.add(
                &key("auth"),
                "\"password\" needs password, scram_verifier or md5_hash",
            );
            continue;
        };
        let backend = match (u.backend_user, u.backend_password) {
            (Some(user), password) if !user.is_empty() => Some(Credentials { user, password }),
            (Some(_), _) => {
                p.add(&key("backend_user"), "must not be empty");
                None
            }
            (None, Some(_)) => {
                p.add(&key("backend_password"), "needs backend_user");
                None
            }
            (None, None) => None,
        };
        let target = match u.target.as_deref() {
            None | Some("read-write") => Target::ReadWrite,
            Some("read-only") => Target::ReadOnly,
            Some(other) => {
                p.add(
                    &key("target"),
                    format!("{other:?} is not a target (\"read-write\" or \"read-only\")"),
                );
                Target::ReadWrite
            }
        };
        let pool_mode = parse_pool_mode(p, &key("pool_mode"), u.pool_mode.as_deref());
        users.push(Arc::new(UserConfig {
            name: u.name,
            auth,
            backend,
            target,
            pool_mode,
        }));
    }
    users
}
