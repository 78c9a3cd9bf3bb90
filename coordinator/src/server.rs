//! Wires the coordinator together and serves it on a listener until
//! shutdown: `run(listener, tls, config, store, metrics, shutdown)`. Nothing
//! depends on this module; it depends on everything.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use lingua_shared::MAX_REQUEST_BODY_BYTES;
use lingua_shared::ids::new_instance_id;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{ApiTokens, NodeCredentials, Tokens};
use crate::config::Config;
use crate::drain::Drainer;
use crate::fleet::{self, Live};
use crate::heartbeats::HeartbeatBatcher;
use crate::hints::Hints;
use crate::http::{access, fleet as fleet_view, jobs, nodes, ops, ui};
use crate::inbox::{self, Peers};
use crate::jobs::JobRouter;
use crate::listener::{ConnectionLimits, DRAIN_TIMEOUT, PlainListener, serve_on};
use crate::metrics::Metrics;
use crate::node_ws::{self, NodeServices};
use crate::queue::Queues;
use crate::registry::Registry;
use crate::route_batch::RouteBatcher;
use crate::state::Shared;
use crate::store::Store;
use crate::tls::TlsListener;

/// The HTTP routes.
pub fn router(shared: Shared) -> Router {
    let admin = Router::new()
        .route("/v1/nodes", get(nodes::nodes))
        .route("/v1/nodes/{id}", get(nodes::node))
        .route("/v1/nodes/{id}/drain", post(nodes::drain))
        .route("/v1/pools", get(nodes::pools))
        .route("/v1/fleet", get(fleet_view::fleet))
        .route("/v1/fleet/events", get(fleet_view::events))
        .route("/metrics", get(ops::metrics))
        .route_layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            access::require_admin,
        ));
    let jobs = Router::new()
        .route("/v1/jobs", post(jobs::submit_job))
        .route("/v1/jobs/{id}", get(jobs::job))
        .route_layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            access::require_caller,
        ));
    Router::new()
        .route("/v1/node", get(node_ws::upgrade))
        .route("/healthz", get(ops::healthz))
        .route("/", get(ui::root))
        .route("/ui", get(ui::page))
        .route("/ui/app.js", get(ui::script))
        .route("/ui/app.css", get(ui::style))
        .merge(admin)
        .merge(jobs)
        .fallback(ops::fallback)
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BODY_BYTES))
        .with_state(shared)
}

/// The services of one coordinator instance, wired together.
fn services(
    config: Config,
    store: Store,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> NodeServices {
    let registry = Arc::new(Registry::default());
    let instance = new_instance_id();
    let hints = Arc::new(Hints::new(config.kinds_share_memory));
    let queues = Arc::new(Mutex::new(Queues::new(config.max_queued as usize)));
    let batcher = Arc::new(RouteBatcher::new(
        (store.clone(), instance.clone()),
        registry.clone(),
        (config.max_nodes_per_pool, config.lease()),
        config.heartbeat_interval,
        (hints.clone(), queues.clone()),
    ));
    let router = Arc::new(JobRouter::new(
        store.clone(),
        registry.clone(),
        config.clone(),
        instance.clone(),
        (hints.clone(), queues),
        metrics.clone(),
        shutdown.clone(),
    ));
    let heartbeats = Arc::new(HeartbeatBatcher::new(
        store.clone(),
        registry.clone(),
        (config.lease(), config.offline_retention),
    ));
    NodeServices {
        heartbeats,
        credentials: NodeCredentials {
            shared: Tokens::new(&config.node_tokens),
            secrets: config
                .node_secret
                .iter()
                .chain(&config.previous_node_secret)
                .cloned()
                .collect(),
        },
        config,
        store,
        registry,
        batcher,
        metrics,
        router,
        hints,
        instance,
        shutdown,
        tasks: TaskTracker::new(),
    }
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
    let nodes = Arc::new(services(config, store, metrics, shutdown.clone()));
    let config = &nodes.config;
    let shared = Shared {
        api_tokens: Arc::new(ApiTokens {
            admin: Tokens::new(&config.api_tokens),
            client: Tokens::new(&config.client_tokens),
        }),
        drainer: Arc::new(Drainer {
            store: nodes.store.clone(),
            registry: nodes.registry.clone(),
            instance: nodes.instance.clone(),
            lease: config.lease(),
        }),
        live: Arc::new(Live::new(
            nodes.store.clone(),
            nodes.metrics.clone(),
            fleet::INTERVAL,
        )),
        nodes: nodes.clone(),
    };
    let peers = Arc::new(Peers {
        store: nodes.store.clone(),
        router: nodes.router.clone(),
        registry: nodes.registry.clone(),
        instance: nodes.instance.clone(),
        leaving: shutdown.clone(),
    });
    let loops_stop = CancellationToken::new();
    let listen = listener.local_addr()?.to_string();
    let loops = [
        tokio::spawn(nodes.batcher.clone().run(loops_stop.clone())),
        tokio::spawn(nodes.heartbeats.clone().run(loops_stop.clone())),
        tokio::spawn(inbox::announce(
            peers.clone(),
            listen.clone(),
            config.heartbeat_interval,
            config.lease(),
            loops_stop.clone(),
        )),
        tokio::spawn(inbox::receive(peers, loops_stop.clone())),
        tokio::spawn(fleet::publish(
            nodes.store.clone(),
            nodes.metrics.clone(),
            nodes.router.clone(),
            nodes.instance.clone(),
            loops_stop.clone(),
        )),
    ];
    tracing::info!(%listen, tls = tls.is_some(), instance = %nodes.instance, "coordinator serving");

    let limits = ConnectionLimits {
        max: config.max_connections,
        header_read_timeout: config.header_read_timeout,
        open: nodes.metrics.connections_open.clone(),
    };
    let app = router(shared);
    let served = match tls {
        Some(acceptor) => {
            serve_on(TlsListener::new(listener, acceptor)?, app, limits, shutdown).await
        }
        None => serve_on(PlainListener(listener), app, limits, shutdown).await,
    };
    finish(&nodes).await;
    loops_stop.cancel();
    for task in loops {
        let _ = task.await;
    }
    served
}

/// Waits (a while) for node connections and job dispatchers to end.
async fn finish(nodes: &NodeServices) {
    nodes.tasks.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, nodes.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("node connections did not close in time");
    }
    if !nodes.router.finish(DRAIN_TIMEOUT).await {
        tracing::warn!("job dispatchers did not end in time");
    }
}
