//! The fleet view: `GET /v1/fleet` (one snapshot) and
//! `GET /v1/fleet/events` (server-sent events, one `fleet` event a second
//! with the same JSON, shared by every watcher).

use std::convert::Infallible;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::response::IntoResponse;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures_util::Stream;
use tokio_util::sync::CancellationToken;

use super::ApiError;
use crate::fleet::{self, Live};
use crate::store::Store;

/// `GET /v1/fleet`: the whole fleet now.
pub async fn fleet(State(store): State<Store>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(fleet::snapshot(&store).await?))
}

/// `GET /v1/fleet/events`: a `fleet` event with the same JSON as
/// `GET /v1/fleet` every second (or `{"error": …}` while Redis is
/// unavailable), until the client goes or the coordinator stops.
pub async fn events(
    State(live): State<Arc<Live>>,
    State(shutdown): State<CancellationToken>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let snapshots = live.watch();
    let stream = futures_util::stream::unfold(
        (snapshots, shutdown),
        |(mut snapshots, shutdown)| async move {
            tokio::select! {
                changed = snapshots.changed() => changed.ok()?,
                () = shutdown.cancelled() => return None,
            }
            let data = snapshots.borrow_and_update().clone()?;
            let event = Event::default().event("fleet").data(&*data);
            Some((Ok(event), (snapshots, shutdown)))
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::default())
}
