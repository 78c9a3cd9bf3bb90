//! The HTTP API (README.md, docs/ARCHITECTURE.md): nodes, pools, drain, health, metrics.
//! Errors are `{"error": {"code", "message"}}` with a fitting status.

use std::sync::Arc;

use axum::{Extension, Json};
use std::time::Duration;

use axum::body::Body;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use lingua_shared::{JobId, MAX_FRAME_BYTES, MAX_REQUEST_BODY_BYTES, NodeId};
use serde_json::json;

use crate::auth::{Caller, Role};
use crate::jobs::{Job, JobRequest, JobView, SubmitError};
use crate::metrics::PoolLabel;
use crate::state::Shared;
use crate::store::{DrainOutcome, JobStatus, RouteEntry, StoreError};

/// An API error: status, stable code, message for people.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        tracing::error!(error = %err, "redis call failed");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "redis is unavailable",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}

/// The caller presenting `headers`, or 401.
fn caller(shared: &Shared, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    shared.api_tokens.caller(authorization).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token: send `Authorization: Bearer <api token>`",
        )
    })
}

/// Admin routes: an admin token, when API tokens are configured.
pub async fn require_admin(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    match caller(&shared, &headers) {
        Ok(caller) if caller.role == Role::Admin => next.run(request).await,
        Ok(_) => ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this route needs an admin token (auth.api_tokens); client tokens submit and read jobs only",
        )
        .into_response(),
        Err(err) => err.into_response(),
    }
}

/// Job routes: any valid token; the caller travels with the request.
pub async fn require_caller(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    mut request: Request,
    next: Next,
) -> Response {
    match caller(&shared, &headers) {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(err) => err.into_response(),
    }
}

fn node_id(raw: &str) -> Result<NodeId, ApiError> {
    NodeId::new(raw)
        .map_err(|err| ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", err.to_string()))
}

fn not_found(node: &NodeId) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no node {node} has registered"),
    )
}

/// `GET /v1/nodes`
pub async fn nodes(State(shared): State<Arc<Shared>>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(json!({"nodes": shared.store.nodes().await?})))
}

/// `GET /v1/nodes/{id}`
pub async fn node(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let id = node_id(&id)?;
    let view = shared
        .store
        .node(&id)
        .await?
        .ok_or_else(|| not_found(&id))?;
    Ok(Json(view))
}

/// `POST /v1/nodes/{id}/drain`: stop routing to the node and tell it.
pub async fn drain(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let id = node_id(&id)?;
    match shared.store.drain_node(&id, None).await? {
        DrainOutcome::Unknown => Err(not_found(&id)),
        DrainOutcome::Offline | DrainOutcome::Stale => Err(ApiError::new(
            StatusCode::CONFLICT,
            "offline",
            format!("node {id} is offline; there is nothing to drain"),
        )),
        DrainOutcome::Draining { pairs, kinds, .. } => {
            let entry = RouteEntry {
                node: id.clone(),
                free: kinds.into_iter().map(|kind| (kind, 0)).collect(),
            };
            for pair in &pairs {
                shared
                    .store
                    .route_update(*pair, std::slice::from_ref(&entry), shared.config.lease())
                    .await?;
            }
            let reason = "drain requested by an admin";
            // The instance holding the node's socket must know, or its next
            // heartbeat would make the node routable again.
            let told = shared.registry.drain(&id, reason.into())
                || shared.router.forward_drain(&id, reason).await?;
            tracing::info!(node_id = %id, told, "node drained by admin request");
            let view = shared
                .store
                .node(&id)
                .await?
                .ok_or_else(|| not_found(&id))?;
            Ok((StatusCode::ACCEPTED, Json(view)))
        }
    }
}

/// `GET /v1/pools`
pub async fn pools(State(shared): State<Arc<Shared>>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(json!({"pools": shared.store.pools().await?})))
}

/// `GET /healthz`: 200 when Redis answers.
pub async fn healthz(State(shared): State<Arc<Shared>>) -> Result<impl IntoResponse, ApiError> {
    shared.store.ping().await?;
    Ok(Json(json!({"status": "ok", "instance": shared.instance})))
}

/// `GET /metrics`: Prometheus text. It asks Redis nothing: pool sizes
/// count the nodes this instance holds (sum them over instances), so a
/// scrape costs the same however many keys Redis holds, and answers while
/// Redis is down.
pub async fn metrics(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    shared.metrics.pool_nodes.clear();
    for ((pair, pool), size) in shared.registry.pool_sizes() {
        shared
            .metrics
            .pool_nodes
            .get_or_create(&PoolLabel {
                pair: pair.to_string(),
                pool,
            })
            .set(size);
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        shared.metrics.render(),
    )
}

/// Query of `POST /v1/jobs`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitQuery {
    /// `false`: answer 202 once the job is recorded, without waiting.
    #[serde(default = "yes")]
    wait: bool,
}

fn yes() -> bool {
    true
}

/// Query of `GET /v1/jobs/{id}`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GetQuery {
    /// Long-poll: wait up to this long for a terminal state.
    #[serde(default)]
    wait_ms: u64,
}

/// The longest `wait_ms` honoured.
pub const MAX_WAIT_MS: u64 = 60_000;

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", message)
}

fn query<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    query
        .map(|Query(q)| q)
        .map_err(|e| bad_request(format!("bad query string: {}", e.body_text())))
}

fn view_response(view: JobView) -> Response {
    (view.http_status(), Json(view)).into_response()
}

/// Reads a request body of at most [`MAX_REQUEST_BODY_BYTES`] within
/// `limit`: a client that trickles its body cannot hold a connection (and
/// a place under the connection cap) for longer than it may take for its
/// headers.
async fn read_body(body: Body, limit: Duration) -> Result<Bytes, ApiError> {
    let limited = Limited::new(body, MAX_REQUEST_BODY_BYTES);
    match tokio::time::timeout(limit, limited.collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(err)) if err.is::<LengthLimitError>() => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "the request body exceeds the limit of {MAX_REQUEST_BODY_BYTES} bytes (one node frame); \
                 send large inputs by reference (a URL) instead"
            ),
        )),
        Ok(Err(err)) => Err(bad_request(format!("cannot read the request body: {err}"))),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request",
            format!(
                "the request body did not arrive within {} ms",
                limit.as_millis()
            ),
        )),
    }
}

/// `POST /v1/jobs`: submit a job and, by default, wait for its result.
pub async fn submit_job(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    submit: Result<Query<SubmitQuery>, QueryRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let submit = query(submit)?;
    let body = read_body(body, shared.config.header_read_timeout).await?;
    let request: JobRequest =
        serde_json::from_slice(&body).map_err(|e| bad_request(format!("bad job request: {e}")))?;
    let job = Job::from_request(
        request,
        shared.config.default_job_timeout,
        caller.owner.clone(),
    )
    .map_err(bad_request)?;
    let frame = job.assign_frame_len();
    if frame > MAX_FRAME_BYTES {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "the job's assignment would be a {frame}-byte frame, over the node frame limit of \
                 {MAX_FRAME_BYTES} bytes; send large inputs by reference (a URL) instead"
            ),
        ));
    }
    let timeout = job.timeout;
    let id = job.id.clone();
    let mut terminal = match shared.router.submit(job).await {
        Ok(terminal) => terminal,
        Err(SubmitError::Conflict(id)) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("job id {id} was already submitted with a different body"),
            ));
        }
        Err(SubmitError::Store(err)) => return Err(err.into()),
    };
    if !submit.wait {
        let status = terminal
            .borrow()
            .as_ref()
            .map_or(JobStatus::Running, |v| v.status);
        return Ok((
            StatusCode::ACCEPTED,
            Json(json!({"id": id, "status": status})),
        )
            .into_response());
    }
    // The dispatcher ends the job at its timeout; the margin covers Redis.
    // A coordinator shutting down answers with the job still running: the
    // client can ask another instance for it.
    let margin = timeout + Duration::from_secs(5);
    let waited = tokio::select! {
        waited = tokio::time::timeout(margin, terminal.wait_for(Option::is_some)) => match waited {
            Ok(Ok(view)) => view.clone(),
            _ => None,
        },
        () = shared.shutdown.cancelled() => None,
    };
    if let Some(view) = waited {
        return Ok(view_response(view));
    }
    match shared.router.get(&id, Duration::ZERO, &caller).await? {
        Some(view) => Ok(view_response(view)),
        None => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the job was lost; submit it again",
        )),
    }
}

/// `GET /v1/jobs/{id}`: status or result; `?wait_ms=N` long-polls.
pub async fn job(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    get: Result<Query<GetQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let get = query(get)?;
    let id = JobId::new(id).map_err(|e| bad_request(e.to_string()))?;
    let wait = Duration::from_millis(get.wait_ms.min(MAX_WAIT_MS));
    match shared.router.get(&id, wait, &caller).await? {
        Some(view) => Ok(view_response(view)),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no job {id}: never submitted, or its result expired"),
        )),
    }
}

/// Any other route.
pub async fn fallback() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route; the API is described in the README and docs/ARCHITECTURE.md",
    )
}
