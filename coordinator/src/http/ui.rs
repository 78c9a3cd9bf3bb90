//! The dashboard (`GET /ui`): a page, a script and a style sheet compiled
//! into the binary. They hold no data and need no token; the script asks
//! for one and calls the admin API with it (`/v1/fleet/events`,
//! `/v1/nodes/{id}/drain`, `/v1/jobs/{id}`).

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Redirect, Response};

const PAGE: &str = include_str!("../../ui/index.html");
const SCRIPT: &str = include_str!("../../ui/app.js");
const STYLE: &str = include_str!("../../ui/app.css");

/// Only this origin's script and style, no frames, no referrer.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// `GET /`: to the dashboard.
pub async fn root() -> Redirect {
    Redirect::to("/ui")
}

/// `GET /ui`
pub async fn page() -> Response {
    asset("text/html; charset=utf-8", PAGE)
}

/// `GET /ui/app.js`
pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

/// `GET /ui/app.css`
pub async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}
