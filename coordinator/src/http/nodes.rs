//! The admin routes over nodes and pools: `GET /v1/nodes`,
//! `GET /v1/nodes/{id}`, `POST /v1/nodes/{id}/drain`, `GET /v1/pools`
//! (the shapes they answer with are [`crate::fleet::views`]).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use lingua_shared::NodeId;
use serde::Serialize;

use super::ApiError;
use crate::drain::{Drained, Drainer};
use crate::fleet::views::{NodeView, PoolView};
use crate::store::Store;

#[derive(Serialize)]
struct Nodes {
    nodes: Vec<NodeView>,
}

#[derive(Serialize)]
struct Pools {
    pools: Vec<PoolView>,
}

fn node_id(raw: &str) -> Result<NodeId, ApiError> {
    NodeId::new(raw).map_err(|err| ApiError::bad_request(err.to_string()))
}

fn not_found(node: &NodeId) -> ApiError {
    ApiError::not_found(format!("no node {node} has registered"))
}

async fn view(store: &Store, id: &NodeId) -> Result<NodeView, ApiError> {
    let record = store.node(id).await?.ok_or_else(|| not_found(id))?;
    Ok(record.into())
}

/// `GET /v1/nodes`
pub async fn nodes(State(store): State<Store>) -> Result<impl IntoResponse, ApiError> {
    let nodes = store
        .nodes()
        .await?
        .into_iter()
        .map(NodeView::from)
        .collect();
    Ok(Json(Nodes { nodes }))
}

/// `GET /v1/nodes/{id}`
pub async fn node(
    State(store): State<Store>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(view(&store, &node_id(&id)?).await?))
}

/// `POST /v1/nodes/{id}/drain`: stop routing to the node and tell it.
pub async fn drain(
    State(store): State<Store>,
    State(drainer): State<Arc<Drainer>>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let id = node_id(&id)?;
    match drainer.drain(&id, "drain requested by an admin").await? {
        Drained::Unknown => Err(not_found(&id)),
        Drained::Offline => Err(ApiError::new(
            StatusCode::CONFLICT,
            "offline",
            format!("node {id} is offline; there is nothing to drain"),
        )),
        Drained::Draining => Ok((StatusCode::ACCEPTED, Json(view(&store, &id).await?))),
    }
}

/// `GET /v1/pools`
pub async fn pools(State(store): State<Store>) -> Result<impl IntoResponse, ApiError> {
    let pools = store
        .pools()
        .await?
        .into_iter()
        .map(PoolView::from)
        .collect();
    Ok(Json(Pools { pools }))
}
