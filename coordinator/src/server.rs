//! Wires the coordinator together and serves it on a listener until
//! shutdown: `run(listener, config, store, shutdown)`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::extract::connect_info::Connected;
use axum::routing::{get, post};
use axum::serve::{IncomingStream, Listener};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::jobs::JobRouter;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::route_batch::RouteBatcher;
use crate::store::Store;
use crate::tls::TlsListener;
use crate::{api, forward, node_ws};

/// Longest HTTP request body accepted.
pub const MAX_BODY_BYTES: usize = 2 << 20;
/// How long shutdown waits for node connections to close cleanly.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// State shared by every request and connection.
pub struct Shared {
    /// The validated configuration.
    pub config: Config,
    /// Redis.
    pub store: Store,
    /// Node sockets held here.
    pub registry: Arc<Registry>,
    /// Pending routing updates.
    pub batcher: Arc<RouteBatcher>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Job routing.
    pub router: Arc<JobRouter>,
    /// This coordinator instance's random id.
    pub instance: String,
    /// Cancelled when the coordinator shuts down.
    pub shutdown: CancellationToken,
    /// Node connection tasks, awaited on shutdown.
    pub tasks: TaskTracker,
}

/// A random id for this coordinator process.
pub fn new_instance_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// The HTTP routes.
pub fn router(shared: Arc<Shared>) -> Router {
    let admin = Router::new()
        .route("/v1/nodes", get(api::nodes))
        .route("/v1/nodes/{id}", get(api::node))
        .route("/v1/nodes/{id}/drain", post(api::drain))
        .route("/v1/pools", get(api::pools))
        .route("/v1/jobs", post(api::submit_job))
        .route("/v1/jobs/{id}", get(api::job))
        .route("/metrics", get(api::metrics))
        .route_layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            api::require_token,
        ));
    Router::new()
        .route("/v1/node", get(node_ws::upgrade))
        .route("/healthz", get(api::healthz))
        .merge(admin)
        .fallback(api::fallback)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
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
    let announcer = tokio::spawn(forward::announce(
        shared.clone(),
        listen,
        flusher_stop.clone(),
    ));
    let receiver = tokio::spawn(forward::receive(shared.clone(), flusher_stop.clone()));
    tracing::info!(
        listen = %listener.local_addr()?,
        tls = tls.is_some(),
        instance = %shared.instance,
        "coordinator serving"
    );

    let app = router(shared.clone());
    let served = match tls {
        Some(acceptor) => serve_on(TlsListener::new(listener, acceptor)?, app, shutdown).await,
        None => serve_on(PlainListener(listener), app, shutdown).await,
    };

    shared.tasks.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, shared.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("node connections did not close in time");
    }
    flusher_stop.cancel();
    let _ = flusher.await;
    let _ = receiver.await;
    let _ = announcer.await;
    served
}

async fn serve_on<L>(listener: L, app: Router, shutdown: CancellationToken) -> std::io::Result<()>
where
    L: Listener<Addr = SocketAddr>,
    PeerAddr: for<'a> Connected<IncomingStream<'a, L>>,
{
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<PeerAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled().await })
    .await
}

/// The remote address of a connection, plain or TLS.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// Plain TCP with Nagle's algorithm off: a small frame (an assignment
/// right after a pong, say) must not wait up to 40 ms for the peer's
/// delayed ACK.
struct PlainListener(TcpListener);

impl Listener for PlainListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        let (stream, peer) = Listener::accept(&mut self.0).await;
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %err, "cannot set TCP_NODELAY");
        }
        (stream, peer)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

impl Connected<IncomingStream<'_, PlainListener>> for PeerAddr {
    fn connect_info(stream: IncomingStream<'_, PlainListener>) -> Self {
        PeerAddr(*stream.remote_addr())
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for PeerAddr {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Self {
        PeerAddr(*stream.remote_addr())
    }
}
