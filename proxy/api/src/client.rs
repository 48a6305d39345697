//! The admin API's own client: one HTTP/1.0 request per call (1.0, so no server answers with
//! chunked encoding), used by `graywire gate`, `graywire rollout` and the tests.
#![allow(clippy::disallowed_methods)] // its callers' runtimes have tokio's timer.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An `--admin` URL that is not `http://host:port`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{url:?} is not an admin URL like http://127.0.0.1:9930")]
pub struct AdminUrlError {
    pub url: String,
}

/// A minimal HTTP/1.0 GET (for `graywire gate`, and the tests' Prometheus client), answered
/// within 10 s. Returns (status, body).
pub async fn http_get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    http_call(addr, "GET", path, None, Duration::from_secs(10)).await
}

/// One HTTP/1.0 request (`GET` or a body-less `POST`) with an optional bearer token, answered
/// within `limit`. Returns (status, body).
pub async fn http_call(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    limit: Duration,
) -> std::io::Result<(u16, String)> {
    let work = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let req =
            format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok(split_http_response(&String::from_utf8_lossy(&buf)))
    };
    tokio::time::timeout(limit, work).await.map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {limit:?}"),
        )
    })?
}

/// `http://host:port` (a trailing `/` allowed) as `host:port`.
pub fn admin_address(url: &str) -> Result<String, AdminUrlError> {
    url.strip_prefix("http://")
        .map(|a| a.trim_end_matches('/').to_owned())
        .filter(|a| !a.is_empty() && !a.contains('/') && a.contains(':'))
        .ok_or_else(|| AdminUrlError {
            url: url.to_owned(),
        })
}

/// (status, body) of a whole HTTP response (status 0 if it has no status line).
pub fn split_http_response(text: &str) -> (u16, String) {
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_urls_are_host_and_port() {
        assert_eq!(
            admin_address("http://127.0.0.1:9930/").as_deref(),
            Ok("127.0.0.1:9930")
        );
        for bad in ["https://x:1", "http://x", "http://x:1/v1", "http://"] {
            let e = admin_address(bad).expect_err(bad).to_string();
            assert_eq!(
                e,
                format!("{bad:?} is not an admin URL like http://127.0.0.1:9930")
            );
        }
    }

    #[test]
    fn responses_split_into_status_and_body() {
        assert_eq!(
            split_http_response("HTTP/1.0 503 Service Unavailable\r\nA: b\r\n\r\n{\"x\":1}"),
            (503, "{\"x\":1}".to_owned())
        );
        assert_eq!(split_http_response(""), (0, String::new()));
    }
}
