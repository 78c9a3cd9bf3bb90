//! Who may call what: admin routes need an admin token, job routes any
//! valid token (when API tokens are configured).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::ApiError;
use crate::auth::{ApiTokens, Caller, Role};

/// The caller presenting `headers`, or 401.
fn caller(tokens: &ApiTokens, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    tokens.caller(authorization).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong bearer token: send `Authorization: Bearer <api token>`",
        )
    })
}

/// Admin routes: an admin token, when API tokens are configured.
pub async fn require_admin(
    State(tokens): State<Arc<ApiTokens>>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    match caller(&tokens, &headers) {
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
    State(tokens): State<Arc<ApiTokens>>,
    headers: HeaderMap,
    mut request: Request,
    next: Next,
) -> Response {
    match caller(&tokens, &headers) {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(err) => err.into_response(),
    }
}
