//! The HTTP API (README.md, docs/ARCHITECTURE.md): jobs, nodes and pools,
//! the fleet view and its dashboard, health and metrics. Each handler takes only the services it uses, as
//! axum `State` substates ([`crate::state`] says how each is found).
//! Errors are `{"error": {"code", "message"}}` with a fitting status, and
//! the job's `id` where the job may exist all the same.

use axum::Json;
use axum::extract::Query;
use axum::extract::rejection::QueryRejection;
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use lingua_shared::JobId;

use crate::store::StoreError;

pub mod access;
pub mod fleet;
pub mod jobs;
pub mod nodes;
pub mod ops;
pub mod ui;

/// An API error: status, stable code, message for people.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    retry_after: Option<Duration>,
    /// The job the request was about, for one the client can follow.
    job: Option<JobId>,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
            job: None,
        }
    }

    /// The same, telling the client when to try again (`Retry-After`).
    pub fn retry_after(self, wait: Duration) -> Self {
        Self {
            retry_after: Some(wait),
            ..self
        }
    }

    /// The same, naming the job it is about (`error.id`): one that may be
    /// recorded all the same, with an id the client may not have chosen.
    pub fn about(self, job: JobId) -> Self {
        Self {
            job: Some(job),
            ..self
        }
    }

    /// 400 `invalid_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
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
        let body = match self.job {
            Some(id) => json!({"error": {"code": self.code, "message": self.message, "id": id}}),
            None => json!({"error": {"code": self.code, "message": self.message}}),
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(wait) = self.retry_after {
            set_retry_after(&mut response, wait);
        }
        response
    }
}

/// Sets `Retry-After` (whole seconds, at least one) on `response`.
fn set_retry_after(response: &mut Response, wait: Duration) {
    let seconds = wait.as_millis().div_ceil(1000).max(1);
    if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
}

/// A query string, or 400 saying what is wrong with it.
fn query<T>(query: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    query
        .map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request(format!("bad query string: {}", e.body_text())))
}
