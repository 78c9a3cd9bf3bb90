//! The HTTP admin API of SPEC.md: nodes, pools, drain, health, metrics.
//! Errors are `{"error": {"code", "message"}}` with a fitting status.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use lingua_shared::NodeId;
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::metrics::PoolLabel;
use crate::registry::Control;
use crate::server::Shared;
use crate::store::{DrainOutcome, RouteEntry, StoreError};

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

/// Requires `Authorization: Bearer <token>` when API tokens are configured.
pub async fn require_token(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let tokens = &shared.config.api_tokens;
    if tokens.is_empty() {
        return next.run(request).await;
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let valid = tokens.iter().fold(false, |found, token| {
        found | bool::from(token.as_bytes().ct_eq(presented.as_bytes()))
    });
    if !valid {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token: send `Authorization: Bearer <api token>`",
        )
        .into_response();
    }
    next.run(request).await
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
            let told = shared
                .registry
                .send(&id, Control::Drain("drain requested by an admin".into()));
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

/// `GET /metrics`: Prometheus text; pool sizes are read from Redis now.
pub async fn metrics(State(shared): State<Arc<Shared>>) -> Result<impl IntoResponse, ApiError> {
    let pools = shared.store.pools().await?;
    shared.metrics.pool_nodes.clear();
    for pool in pools {
        let size = i64::try_from(pool.nodes.len()).unwrap_or(i64::MAX);
        shared
            .metrics
            .pool_nodes
            .get_or_create(&PoolLabel {
                pair: pool.pair,
                pool: pool.pool,
            })
            .set(size);
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        shared.metrics.render(),
    ))
}

/// Any other route.
pub async fn fallback() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route; see SPEC.md for the API",
    )
}
