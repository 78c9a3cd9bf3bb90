//! Operations routes: `GET /healthz`, `GET /metrics`, and the answer to
//! any other route.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::IntoResponse;
use lingua_shared::metrics::exposition;
use serde_json::json;

use super::ApiError;
use crate::metrics::{Metrics, PoolLabel};
use crate::registry::Registry;
use crate::store::Store;

/// This coordinator instance's random id, as `/healthz` shows it.
#[derive(Debug, Clone)]
pub struct InstanceId(pub String);

/// `GET /healthz`: 200 when Redis answers.
pub async fn healthz(
    State(store): State<Store>,
    State(InstanceId(instance)): State<InstanceId>,
) -> Result<impl IntoResponse, ApiError> {
    store.ping().await?;
    Ok(Json(json!({"status": "ok", "instance": instance})))
}

/// `GET /metrics`: OpenMetrics for a scraper that asks for it, the
/// classic Prometheus text otherwise. It asks Redis nothing: pool sizes
/// count the nodes this instance holds (sum them over instances), so a
/// scrape costs the same however many keys Redis holds, and answers while
/// Redis is down (`lingua_redis_up` then says 0).
pub async fn metrics(
    State(metrics): State<Arc<Metrics>>,
    State(registry): State<Arc<Registry>>,
    headers: HeaderMap,
) -> impl IntoResponse {
    metrics.pool_nodes.clear();
    for ((pair, pool), size) in registry.pool_sizes() {
        metrics
            .pool_nodes
            .get_or_create(&PoolLabel {
                pair: pair.to_string(),
                pool,
            })
            .set(size);
    }
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let (content_type, body) = exposition(accept, metrics.render());
    ([(header::CONTENT_TYPE, content_type)], body)
}

/// Any other route.
pub async fn fallback() -> ApiError {
    ApiError::not_found(
        "no such route; the API is described in the README and docs/ARCHITECTURE.md",
    )
}
