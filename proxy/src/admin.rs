//! The admin HTTP API (hyper, JSON): `GET /v1/nodes`, `POST /v1/nodes/{name}/drain?wait=…`,
//! `POST /v1/nodes/{name}/undrain`, `POST /v1/pause`, `POST /v1/resume`, `/metrics`,
//! `/healthz`, `/readyz`, and with a probe `GET /v1/gate?window=…` and `GET /v1/probe`. Errors
//! are JSON objects with a message. Every JSON body is a type of the `graywire-api` crate,
//! which also holds the client (`graywire gate`, `graywire rollout`). With `admin.token` set, every mutating call needs
//! `Authorization: Bearer <token>` (401 otherwise). A standalone probe (`graywire probe`)
//! serves the same API without the proxy's endpoints.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use graywire_api::{
    DrainReply, ErrorReply, GateReply, Node, NodeList, PauseReply, ReadyReply, Remaining,
    UndrainReply,
};
use graywire_probe::gate::GateQuery;
use graywire_probe::Probe;
use tokio_util::sync::CancellationToken;

use crate::context::Context;
use crate::drain::{self, NoSuchNode};
use crate::router;
use crate::topology::{NodeName, Role};

/// The longest a drain call may be asked to wait.
const MAX_DRAIN_WAIT: Duration = Duration::from_secs(3600);

type Reply = Response<Full<Bytes>>;

/// What the admin server needs.
pub struct Admin {
    /// The proxy (absent in a standalone probe).
    pub ctx: Option<Arc<Context>>,
    pub probe: Option<Probe>,
    pub metrics: Option<PrometheusHandle>,
    /// The server stops when this is cancelled.
    pub stop: CancellationToken,
}

/// Serves the admin API until hard shutdown.
pub async fn serve(admin: Arc<Admin>, listener: TcpListener) {
    let stop = admin.stop.clone();
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    crate::timer::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(route(&admin, req).await) }
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

async fn route(admin: &Admin, req: Request<Incoming>) -> Reply {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    let mutating = matches!(
        segments.as_slice(),
        ["v1", "pause" | "resume"] | ["v1", "nodes", _, "drain" | "undrain"]
    );
    if let Some(ctx) = &admin.ctx {
        if mutating && method == Method::POST && !authorized(ctx, &req) {
            return error(
                StatusCode::UNAUTHORIZED,
                "this call needs the admin token: Authorization: Bearer <admin.token>",
            );
        }
    }
    match (&method, segments.as_slice()) {
        (&Method::GET, ["healthz"]) => text(StatusCode::OK, "ok\n"),
        (&Method::GET, ["v1", "gate"]) => gate(admin, &query),
        (&Method::GET, ["v1", "probe"]) => probe_status(admin, &query),
        (_, ["v1", "gate" | "probe"]) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{method} is not allowed on {path}"),
        ),
        (&Method::GET, ["metrics"]) => match &admin.metrics {
            Some(h) => {
                let mut r = text(StatusCode::OK, h.render() + &crate::metrics::render_kept());
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
        (_, ["healthz" | "metrics"]) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{method} is not allowed on {path}"),
        ),
        _ => match &admin.ctx {
            Some(ctx) => proxy_route(ctx, &method, &segments, &path, &query).await,
            None => error(
                StatusCode::NOT_FOUND,
                &format!("no such endpoint: {path} (this is a standalone probe)"),
            ),
        },
    }
}

/// The proxy's own endpoints.
async fn proxy_route(
    ctx: &Arc<Context>,
    method: &Method,
    segments: &[&str],
    path: &str,
    query: &str,
) -> Reply {
    match (method, segments) {
        (&Method::GET, ["readyz"]) => readyz(ctx),
        (&Method::GET, ["v1", "nodes"]) => nodes(ctx),
        (&Method::POST, ["v1", "nodes", name, "drain"]) => drain(ctx, name, query).await,
        (&Method::POST, ["v1", "nodes", name, "undrain"]) => undrain(ctx, name),
        (&Method::POST, ["v1", "pause"]) => pause(ctx, true),
        (&Method::POST, ["v1", "resume"]) => pause(ctx, false),
        (_, ["readyz"] | ["v1", "nodes"])
        | (_, ["v1", "pause" | "resume"] | ["v1", "nodes", _, "drain" | "undrain"]) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("{method} is not allowed on {path}"),
        ),
        _ => error(StatusCode::NOT_FOUND, &format!("no such endpoint: {path}")),
    }
}

/// The probe and the parsed query, or the error reply (404 without a probe, 400 on a bad
/// query).
fn probe_and_query<'a>(
    admin: &'a Admin,
    query: &str,
) -> Result<(&'a Probe, GateQuery), Box<Reply>> {
    let Some(probe) = &admin.probe else {
        return Err(Box::new(error(
            StatusCode::NOT_FOUND,
            "no probe is running: add a [probe] section to the config",
        )));
    };
    GateQuery::parse(query)
        .map(|q| (probe, q))
        .map_err(|e| Box::new(error(StatusCode::BAD_REQUEST, &e.to_string())))
}

/// `GET /v1/gate?window=30s&max_stall=1s&…`: 200 on pass, 503 on fail, 400 on a bad query.
fn gate(admin: &Admin, query: &str) -> Reply {
    let (probe, q) = match probe_and_query(admin, query) {
        Ok(x) => x,
        Err(reply) => return *reply,
    };
    let nodes = admin
        .ctx
        .as_ref()
        .map(|ctx| crate::probe::node_figures(ctx));
    let verdict = probe.gate(&q, nodes.as_deref());
    let status = if verdict.pass {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_reply(status, &GateReply::from(verdict))
}

/// `GET /v1/probe?window=60s`: the probe's figures.
fn probe_status(admin: &Admin, query: &str) -> Reply {
    match probe_and_query(admin, query) {
        Ok((probe, q)) => json_reply(StatusCode::OK, &probe.status(q.window)),
        Err(reply) => *reply,
    }
}

/// True when no token is configured, or the request carries it.
fn authorized(ctx: &Context, req: &Request<Incoming>) -> bool {
    let config = ctx.config.load();
    let Some(token) = &config.admin.token else {
        return true;
    };
    let Some(given) = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    crate::protocol::scram::constant_time_eq(given.trim().as_bytes(), token.expose().as_bytes())
}

/// Reads `wait=DURATION` (default: do not wait); any other parameter is an error.
fn wait_param(query: &str) -> Result<Duration, String> {
    let mut wait = Duration::ZERO;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "wait" => {
                wait = if v == "0" {
                    Duration::ZERO
                } else {
                    humantime::parse_duration(v).map_err(|e| {
                        format!("wait={v:?} is not a duration (e.g. 30s, 500ms): {e}")
                    })?
                };
                if wait > MAX_DRAIN_WAIT {
                    return Err(format!(
                        "wait={v} is longer than the most a drain call waits ({MAX_DRAIN_WAIT:?})"
                    ));
                }
            }
            other => return Err(format!("unknown parameter {other:?} (only wait=DURATION)")),
        }
    }
    Ok(wait)
}

async fn drain(ctx: &Arc<Context>, name: &str, query: &str) -> Reply {
    let wait = match wait_param(query) {
        Ok(w) => w,
        Err(e) => return error(StatusCode::BAD_REQUEST, &e),
    };
    let node = NodeName::new(name);
    match drain::drain(ctx, &node, wait).await {
        Err(NoSuchNode) => no_such_node(name),
        Ok(report) => {
            let status = if report.drained {
                StatusCode::OK
            } else {
                StatusCode::ACCEPTED
            };
            let state = ctx
                .topology
                .load()
                .node(&node)
                .map(|n| n.state_str())
                .unwrap_or("removed");
            json_reply(
                status,
                &DrainReply {
                    node: name.to_owned(),
                    state: state.to_owned(),
                    drained: report.drained,
                    waited_seconds: report.waited.as_secs_f64(),
                    remaining: Remaining {
                        sessions: report.remaining.sessions,
                        backend_connections: report.remaining.backend_connections,
                        pinned_sessions: report.remaining.pinned,
                    },
                },
            )
        }
    }
}

fn undrain(ctx: &Context, name: &str) -> Reply {
    let node = NodeName::new(name);
    match drain::undrain(ctx, &node) {
        Err(NoSuchNode) => no_such_node(name),
        Ok(before) => json_reply(
            StatusCode::OK,
            &UndrainReply {
                node: name.to_owned(),
                state: "active".to_owned(),
                was: drain::admin_str(before).to_owned(),
            },
        ),
    }
}

fn pause(ctx: &Context, paused: bool) -> Reply {
    let before = drain::set_paused(ctx, paused);
    json_reply(
        StatusCode::OK,
        &PauseReply {
            paused,
            was_paused: before,
        },
    )
}

fn no_such_node(name: &str) -> Reply {
    error(StatusCode::NOT_FOUND, &format!("no node named {name:?}"))
}

fn readyz(ctx: &Context) -> Reply {
    if ctx.shutdown.soft.is_cancelled() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    }
    match router::primary(&ctx.topology.load()) {
        Some(n) => json_reply(
            StatusCode::OK,
            &ReadyReply {
                ready: true,
                primary: n.name.as_str().to_owned(),
            },
        ),
        None => error(StatusCode::SERVICE_UNAVAILABLE, "no primary node is known"),
    }
}

fn nodes(ctx: &Context) -> Reply {
    let snapshot = ctx.topology.load();
    let nodes: Vec<_> = snapshot
        .nodes
        .iter()
        .map(|n| {
            let load = ctx.loads.figures(n.name());
            Node {
                name: n.name().as_str().to_owned(),
                address: format!("{}:{}", n.config.host, n.config.port),
                role: n.role.as_str().to_owned(),
                state: n.state_str().to_owned(),
                admin_state: drain::admin_str(n.admin).to_owned(),
                version: n.version.clone(),
                started_at: n.started_at,
                lag_bytes: snapshot.lag_bytes(n),
                lag_seconds: if n.role == Role::Standby {
                    n.wal.replay_delay
                } else {
                    None
                },
                sessions: load.sessions,
                backend_connections: load.backend_connections,
                pinned_sessions: load.pinned,
                last_error: n.last_error.clone(),
            }
        })
        .collect();
    json_reply(
        StatusCode::OK,
        &NodeList {
            nodes,
            sessions: ctx.open_sessions() as u64,
            paused: snapshot.paused,
            split_brain: snapshot.split_brain(),
            primary: router::primary(&snapshot).map(|n| n.name.as_str().to_owned()),
        },
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

/// `body` as JSON. It goes through [`serde_json::Value`], whose objects keep their keys in
/// alphabetical order: the order these replies have always had.
fn json_reply(status: StatusCode, body: &impl Serialize) -> Reply {
    let text = serde_json::to_value(body).unwrap_or_default().to_string();
    let mut r = Response::new(Full::new(Bytes::from(text)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error(status: StatusCode, message: &str) -> Reply {
    json_reply(
        status,
        &ErrorReply {
            error: message.to_owned(),
        },
    )
}
