//! The admin HTTP API (hyper, JSON): `/v1/nodes`, `/metrics`, `/healthz`, `/readyz`.
//! Errors are JSON objects with a message.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::context::Context;
use crate::router;

type Reply = Response<Full<Bytes>>;

/// What the admin server needs.
pub struct Admin {
    pub ctx: Arc<Context>,
    pub metrics: Option<PrometheusHandle>,
}

/// Serves the admin API until hard shutdown.
pub async fn serve(admin: Arc<Admin>, listener: TcpListener) {
    let stop = admin.ctx.shutdown.hard.clone();
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(route(&admin, req)) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%peer, error = %e, "admin connection ended");
            }
        });
    }
}

fn route(admin: &Admin, req: Request<Incoming>) -> Reply {
    let path = req.uri().path();
    match (req.method(), path) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => readyz(admin),
        (&Method::GET, "/metrics") => match &admin.metrics {
            Some(h) => {
                let mut r = text(StatusCode::OK, h.render());
                r.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                r
            }
            None => error(
                StatusCode::SERVICE_UNAVAILABLE,
                "metrics recorder is not installed",
            ),
        },
        (&Method::GET, "/v1/nodes") => nodes(admin),
        (_, "/healthz" | "/readyz" | "/metrics" | "/v1/nodes") => error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{} is not allowed on {path}", req.method()),
        ),
        _ => error(StatusCode::NOT_FOUND, &format!("no such endpoint: {path}")),
    }
}

fn readyz(admin: &Admin) -> Reply {
    let ctx = &admin.ctx;
    if ctx.shutdown.soft.is_cancelled() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    }
    match router::primary(&ctx.topology.load()) {
        Some(n) => json_reply(
            StatusCode::OK,
            json!({"ready": true, "primary": n.name.as_str()}),
        ),
        None => error(StatusCode::SERVICE_UNAVAILABLE, "no primary node is known"),
    }
}

fn nodes(admin: &Admin) -> Reply {
    let snapshot = admin.ctx.topology.load();
    let nodes: Vec<_> = snapshot
        .nodes
        .iter()
        .map(|n| {
            json!({
                "name": n.name().as_str(),
                "address": format!("{}:{}", n.config.host, n.config.port),
                "role": n.role.as_str(),
                "state": n.state_str(),
                "version": n.version,
                "last_error": n.last_error,
            })
        })
        .collect();
    json_reply(
        StatusCode::OK,
        json!({ "nodes": nodes, "sessions": admin.ctx.open_sessions() }),
    )
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json_reply(status: StatusCode, v: serde_json::Value) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error(status: StatusCode, message: &str) -> Reply {
    json_reply(status, json!({ "error": message }))
}
