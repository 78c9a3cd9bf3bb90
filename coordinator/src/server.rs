//! Wires the coordinator together and serves it on a listener until
//! shutdown: `run(listener, tls, config, store, metrics, shutdown)`. Nothing
//! depends on this module; it depends on everything.

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use lingua_shared::MAX_REQUEST_BODY_BYTES;
use lingua_shared::ids::new_instance_id;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{ApiTokens, NodeCredentials};
use crate::config::Config;
use crate::jobs::JobRouter;
use crate::listener::{ConnectionLimits, DRAIN_TIMEOUT, PlainListener, serve_on};
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::route_batch::RouteBatcher;
use crate::state::Shared;
use crate::store::Store;
use crate::tls::TlsListener;
use crate::{api, inbox, node_ws};

/// The HTTP routes.
pub fn router(shared: Arc<Shared>) -> Router {
    let admin = Router::new()
        .route("/v1/nodes", get(api::nodes))
        .route("/v1/nodes/{id}", get(api::node))
        .route("/v1/nodes/{id}/drain", post(api::drain))
        .route("/v1/pools", get(api::pools))
        .route("/metrics", get(api::metrics))
        .route_layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            api::require_admin,
        ));
    let jobs = Router::new()
        .route("/v1/jobs", post(api::submit_job))
        .route("/v1/jobs/{id}", get(api::job))
        .route_layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            api::require_caller,
        ));
    Router::new()
        .route("/v1/node", get(node_ws::upgrade))
        .route("/healthz", get(api::healthz))
        .merge(admin)
        .merge(jobs)
        .fallback(api::fallback)
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BODY_BYTES))
        .with_state(shared)
}

/// Serves the coordinator on `listener` (over TLS when `tls` is given)
/// until `shutdown` is cancelled, then closes node sockets with 1001,
/// finishes in-flight requests and returns.
pub async fn run(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    config: Config,
    store: Store,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let registry = Arc::new(Registry::default());
    let capacity = Arc::new(tokio::sync::Notify::new());
    let batcher = Arc::new(RouteBatcher::new(
        store.clone(),
        registry.clone(),
        config.max_nodes_per_pool,
        config.lease(),
        capacity.clone(),
    ));
    let instance = new_instance_id();
    let job_router = Arc::new(JobRouter::new(
        store.clone(),
        registry.clone(),
        config.clone(),
        instance.clone(),
        capacity,
        metrics.clone(),
        shutdown.clone(),
    ));
    let shared = Arc::new(Shared {
        node_credentials: NodeCredentials {
            shared: config.node_tokens.clone(),
            secret: config.node_secret.clone(),
        },
        api_tokens: ApiTokens {
            admin: config.api_tokens.clone(),
            client: config.client_tokens.clone(),
        },
        config,
        store,
        router: job_router,
        registry,
        batcher: batcher.clone(),
        metrics,
        instance,
        shutdown: shutdown.clone(),
        tasks: TaskTracker::new(),
    });
    let flusher_stop = CancellationToken::new();
    let flusher = tokio::spawn(batcher.run(flusher_stop.clone()));
    let listen = listener.local_addr()?.to_string();
    let announcer = tokio::spawn(inbox::announce(
        shared.clone(),
        listen,
        flusher_stop.clone(),
    ));
    let receiver = tokio::spawn(inbox::receive(shared.clone(), flusher_stop.clone()));
    tracing::info!(
        listen = %listener.local_addr()?,
        tls = tls.is_some(),
        instance = %shared.instance,
        "coordinator serving"
    );

    let app = router(shared.clone());
    let limits = ConnectionLimits {
        max: shared.config.max_connections,
        header_read_timeout: shared.config.header_read_timeout,
        open: shared.metrics.connections_open.clone(),
    };
    let served = match tls {
        Some(acceptor) => {
            serve_on(TlsListener::new(listener, acceptor)?, app, limits, shutdown).await
        }
        None => serve_on(PlainListener(listener), app, limits, shutdown).await,
    };

    shared.tasks.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, shared.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("node connections did not close in time");
    }
    if !shared.router.finish(DRAIN_TIMEOUT).await {
        tracing::warn!("job dispatch tasks did not end in time");
    }
    flusher_stop.cancel();
    let _ = flusher.await;
    let _ = receiver.await;
    let _ = announcer.await;
    served
}
