//! The job routes: `POST /v1/jobs` and `GET /v1/jobs/{id}`.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use lingua_shared::{JobId, MAX_FRAME_BYTES, MAX_REQUEST_BODY_BYTES};
use serde_json::json;

use super::{ApiError, query, set_retry_after};
use crate::auth::{Caller, Role};
use crate::jobs::{Job, JobRequest, JobRouter, JobView, SubmitError};

/// The limits a job request is held to.
#[derive(Debug, Clone, Copy)]
pub struct JobLimits {
    /// How long a request body may take to arrive.
    pub body_timeout: Duration,
    /// The timeout of a job that names none.
    pub default_timeout: Duration,
    /// The highest priority a client token's job may name.
    pub client_max_priority: u8,
}

impl JobLimits {
    /// A client token's job may name a priority up to
    /// `client_max_priority`; an admin's any.
    fn check_priority(&self, caller: &Caller, asked: Option<u8>) -> Result<(), ApiError> {
        let most = self.client_max_priority;
        match asked {
            Some(priority) if caller.role == Role::Client && priority > most => {
                Err(ApiError::bad_request(format!(
                    "priority {priority} is over {most}, the most a client token's job may name \
                     ([auth] client_max_priority); submit it with a lower one"
                )))
            }
            _ => Ok(()),
        }
    }
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

/// A job's view; a `no_capacity` failure tells when to try again
/// (`Retry-After`).
/// A job's view as the answer: its status code, `Retry-After` when it is
/// worth submitting again, and `Server-Timing` (where its time went on
/// this coordinator) for the client that submitted and waited for it.
fn view_response(view: JobView) -> Response {
    let retry_after = view.retry_after();
    let timing = view
        .timing
        .as_ref()
        .and_then(|timing| HeaderValue::from_str(&timing.header()).ok());
    let mut response = (view.http_status(), Json(view)).into_response();
    if let Some(wait) = retry_after {
        set_retry_after(&mut response, wait);
    }
    if let Some(timing) = timing {
        response.headers_mut().insert("server-timing", timing);
    }
    response
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
        Ok(Err(err)) => Err(ApiError::bad_request(format!(
            "cannot read the request body: {err}"
        ))),
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
    State(router): State<Arc<JobRouter>>,
    State(limits): State<JobLimits>,
    Extension(caller): Extension<Caller>,
    submit: Result<Query<SubmitQuery>, QueryRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let submit = query(submit)?;
    let body = read_body(body, limits.body_timeout).await?;
    let request: JobRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("bad job request: {e}")))?;
    limits.check_priority(&caller, request.priority)?;
    let mut job = Job::from_request(request, limits.default_timeout, caller.owner.clone())
        .map_err(ApiError::bad_request)?;
    job.cap_priority(limits.client_max_priority);
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
    let submitted = router
        .submit(job)
        .await
        .map_err(|err| not_taken(err, &id))?;
    if !submit.wait {
        let status = submitted.status;
        submitted.detach();
        return Ok((
            StatusCode::ACCEPTED,
            Json(json!({"id": id, "status": status})),
        )
            .into_response());
    }
    // The dispatcher ends the job at its timeout; the margin covers Redis.
    // A coordinator shutting down answers with the job still running (its
    // dispatcher stops): the client can ask another instance for it.
    let margin = timeout + Duration::from_secs(5);
    let waited = tokio::time::timeout(margin, submitted.answer())
        .await
        .ok()
        .flatten();
    if let Some(view) = waited {
        return Ok(view_response(view));
    }
    match router.get(&id, Duration::ZERO, &caller).await? {
        Some(view) => Ok(view_response(view)),
        None => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the job was lost; submit it again",
        )),
    }
}

/// The answer to a submission of job `id` that was not taken in.
fn not_taken(err: SubmitError, id: &JobId) -> ApiError {
    match err {
        SubmitError::Conflict(id) => ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("job id {id} was already submitted with a different body"),
        ),
        SubmitError::QueueFull { retry_after } => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "queue_full",
            "no node has room and this coordinator's admission queue is full ([jobs] max_queued); retry after the time in Retry-After",
        )
        .retry_after(retry_after),
        SubmitError::Store(err) if err.may_have_run() => {
            tracing::error!(job_id = %id, error = %err, "a job's recording got no answer");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!(
                    "redis did not answer, and may have recorded the job all the same; \
                     submit it again with id {id} to follow it (a job is recorded once)"
                ),
            )
            .about(id.clone())
        }
        SubmitError::Store(err) => err.into(),
        SubmitError::Stopped | SubmitError::Stopping => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!(
                "taking the job in failed; submit it again with id {id} (a job is recorded once)"
            ),
        )
        .about(id.clone()),
    }
}

/// `GET /v1/jobs/{id}`: status or result; `?wait_ms=N` long-polls.
pub async fn job(
    State(router): State<Arc<JobRouter>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    get: Result<Query<GetQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let get = query(get)?;
    let id = JobId::new(id).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let wait = Duration::from_millis(get.wait_ms.min(MAX_WAIT_MS));
    match router.get(&id, wait, &caller).await? {
        Some(view) => Ok(view_response(view)),
        None => Err(ApiError::not_found(format!(
            "no job {id}: never submitted, or its result expired"
        ))),
    }
}
