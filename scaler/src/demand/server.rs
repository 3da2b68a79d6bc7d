//! The demand endpoint over HTTP: [`app`] is the router, [`serve`] runs it on a
//! listener that speaks HTTP/1.1 and h2c (HTTP/2 with prior knowledge, what activators
//! use) on the same port.
//!
//! Routes (paths shared with the activator through `blink_crds::demand`):
//! - `POST` [`SNAPSHOT_PATH`] with a JSON [`Snapshot`]: `204` when applied; `200` with
//!   `{"stale": true, "lastSeq": n}` when dropped as not newer than the last snapshot
//!   applied from its session (nothing to retry).
//! - `POST` [`POKE_PATH`] with a JSON [`Poke`]: `204`.
//!
//! Every request is checked in this order, before its body is read:
//! 1. `Authorization: Bearer <token>` ([`Authenticator`]): `401` without a valid token
//!    for the `blink-scaler` audience, `403` for another user's token, `503` when the
//!    token cannot be checked now.
//! 2. Leadership: a scaler that does not hold the Lease answers `421 Misdirected
//!    Request` with `{"leader": "<holderIdentity>"}` (`null` when unknown) and the
//!    header [`LEADER_HEADER`].
//! 3. The body: at most [`BODY_LIMIT`] bytes (`413`), valid JSON of the right shape
//!    with non-negative values (`400` saying what is wrong).
//!
//! Errors are JSON `{"error": "..."}`. Every report is counted in [`DemandMetrics`].

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use blink_crds::demand::{POKE_PATH, Poke, SNAPSHOT_PATH, Snapshot};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use super::auth::{Authenticator, Verdict};
pub use super::auth::{KubeTokenReviewer, TokenReviewer};
use super::metrics::{DemandMetrics, ReportResult};
use super::{Demand, SnapshotOutcome};
use crate::leader::Leadership;

/// The largest request body accepted: a snapshot of 10,000 functions is ≈ 1 MiB.
pub const BODY_LIMIT: usize = 4 * 1024 * 1024;
/// The header naming the Lease holder on a `421` answer.
pub const LEADER_HEADER: HeaderName = HeaderName::from_static(blink_crds::demand::LEADER_HEADER);
/// Longest `activator` or `session` accepted (a pod name is at most 253 characters).
const MAX_NAME_LEN: usize = 253;

/// What the endpoint needs; cheap to clone.
#[derive(Clone, Debug)]
pub struct ServerState {
    pub demand: Arc<Demand>,
    pub leadership: Leadership,
    pub auth: Arc<Authenticator>,
    pub metrics: DemandMetrics,
}

impl ServerState {
    /// The state for a scaler that accepts reports from `activator_user` only (see
    /// [`service_account_user`](super::auth::service_account_user)), checked by
    /// `reviewer`.
    pub fn new(
        demand: Arc<Demand>,
        leadership: Leadership,
        reviewer: Arc<dyn TokenReviewer>,
        activator_user: impl Into<String>,
        metrics: DemandMetrics,
    ) -> Self {
        Self {
            demand,
            leadership,
            auth: Arc::new(Authenticator::new(reviewer, activator_user)),
            metrics,
        }
    }
}

/// The demand endpoint's routes.
pub fn app(state: ServerState) -> Router {
    Router::new()
        .route(SNAPSHOT_PATH, post(snapshot))
        .route(POKE_PATH, post(poke))
        // Runs before the handlers' extractors, so no body is read for a request
        // that will be refused.
        .route_layer(middleware::from_fn_with_state(state.clone(), guard))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = serde_json::json!({ "error": message.into() });
    (status, axum::Json(body)).into_response()
}

/// Authentication, then leadership.
async fn guard(State(state): State<ServerState>, request: Request, next: Next) -> Response {
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let refused = match state.auth.check(authorization).await {
        Verdict::Allowed => None,
        Verdict::Unauthenticated => {
            let mut response = error(
                StatusCode::UNAUTHORIZED,
                "a bearer token for audience blink-scaler is required",
            );
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            Some(response)
        }
        Verdict::Forbidden { user } => Some(error(
            StatusCode::FORBIDDEN,
            format!(
                "{user} may not report demand; only {} may",
                state.auth.allowed_user()
            ),
        )),
        Verdict::Unavailable => Some(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the token cannot be checked now; retry",
        )),
    };
    if let Some(response) = refused {
        state.metrics.report(ReportResult::RefusedAuth);
        return response;
    }
    let leader = state.leadership.state();
    if !leader.is_leader {
        state.metrics.report(ReportResult::RefusedNotLeader);
        return misdirected(leader.holder.as_deref());
    }
    next.run(request).await
}

/// `421`, naming the holder so the activator can go there.
fn misdirected(holder: Option<&str>) -> Response {
    let mut headers = HeaderMap::new();
    if let Some(value) = holder.and_then(|h| HeaderValue::from_str(h).ok()) {
        headers.insert(LEADER_HEADER, value);
    }
    let body = serde_json::json!({ "leader": holder });
    (StatusCode::MISDIRECTED_REQUEST, headers, axum::Json(body)).into_response()
}

/// The body, or the answer that refuses it (boxed: a `Response` is large).
fn parse<T: serde::de::DeserializeOwned>(
    state: &ServerState,
    what: &str,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, Box<Response>> {
    let refuse = |response: Response| {
        state.metrics.report(ReportResult::Invalid);
        Box::new(response)
    };
    let bytes = body.map_err(|rejection| refuse(rejection.into_response()))?;
    serde_json::from_slice(&bytes).map_err(|e| {
        refuse(error(
            StatusCode::BAD_REQUEST,
            format!("invalid {what}: {e}"),
        ))
    })
}

fn check_names(activator: &str, session: &str) -> Result<(), String> {
    if activator.is_empty() || activator.len() > MAX_NAME_LEN {
        return Err(format!(
            "activator must be a pod name (1-{MAX_NAME_LEN} characters)"
        ));
    }
    if session.is_empty() || session.len() > MAX_NAME_LEN {
        return Err(format!("session must be 1-{MAX_NAME_LEN} characters"));
    }
    Ok(())
}

/// What the protocol cannot carry: a snapshot with impossible values is refused whole
/// rather than read as something it does not say.
pub fn validate_snapshot(snapshot: &Snapshot) -> Result<(), String> {
    check_names(&snapshot.activator, &snapshot.session)?;
    for demand in &snapshot.functions {
        for (field, value) in [("inFlight", demand.in_flight), ("queued", demand.queued)] {
            if !value.is_finite() || value < 0.0 {
                return Err(format!(
                    "{field} of {} must be a non-negative number, not {value}",
                    demand.key
                ));
            }
        }
    }
    Ok(())
}

/// The clock reports are stamped with: tokio's, like the workers that read them.
fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

async fn snapshot(
    State(state): State<ServerState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let snapshot: Snapshot = match parse(&state, "snapshot", body) {
        Ok(snapshot) => snapshot,
        Err(response) => return *response,
    };
    if let Err(message) = validate_snapshot(&snapshot) {
        state.metrics.report(ReportResult::Invalid);
        return error(
            StatusCode::BAD_REQUEST,
            format!("invalid snapshot: {message}"),
        );
    }
    match state.demand.apply_snapshot(snapshot, now()) {
        SnapshotOutcome::Applied => {
            state.metrics.report(ReportResult::Accepted);
            StatusCode::NO_CONTENT.into_response()
        }
        SnapshotOutcome::Stale { last_seq } => {
            state.metrics.report(ReportResult::Stale);
            let body = serde_json::json!({ "stale": true, "lastSeq": last_seq });
            (StatusCode::OK, axum::Json(body)).into_response()
        }
    }
}

async fn poke(State(state): State<ServerState>, body: Result<Bytes, BytesRejection>) -> Response {
    // The wall clock, so that the cold path can be followed across processes.
    let arrived_at = k8s_openapi::jiff::Timestamp::now();
    let poke: Poke = match parse(&state, "poke", body) {
        Ok(poke) => poke,
        Err(response) => return *response,
    };
    if let Err(message) = check_names(&poke.activator, &poke.session) {
        state.metrics.report(ReportResult::Invalid);
        return error(StatusCode::BAD_REQUEST, format!("invalid poke: {message}"));
    }
    let key = tracing::enabled!(tracing::Level::DEBUG).then(|| poke.key.clone());
    state.demand.apply_poke(poke, now());
    state.metrics.report(ReportResult::Accepted);
    if let Some(key) = key {
        tracing::debug!(function = %key, %arrived_at, "poke applied");
    }
    StatusCode::NO_CONTENT.into_response()
}

/// Serves `app` on `listener`, HTTP/1.1 and h2c on the same port, until `shutdown`;
/// then stops accepting, lets open connections finish their requests (HTTP/2
/// GOAWAY, HTTP/1.1 close after the response), and returns when they have.
pub async fn serve(listener: TcpListener, app: Router, shutdown: CancellationToken) {
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: pause rather than spin.
                tracing::warn!(error = %e, "accepting a demand connection failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        // Small reports (pokes above all) go out at once.
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let service = hyper::service::service_fn(move |request| app.clone().oneshot(request));
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "demand connection ended with an error");
            }
        });
    }
    while connections.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests;
