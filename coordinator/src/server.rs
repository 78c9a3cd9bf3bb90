//! Wires the coordinator together and serves it on a listener until
//! shutdown: `run(listener, config, store, shutdown)`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request};
use axum::routing::{get, post};
use axum::serve::Listener;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::auth::{ApiTokens, NodeCredentials};
use crate::config::Config;
use crate::jobs::JobRouter;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::route_batch::RouteBatcher;
use crate::store::Store;
use crate::tls::TlsListener;
use crate::{api, forward, node_ws};
use lingua_shared::MAX_REQUEST_BODY_BYTES;

/// Shortest time between two "connection cap reached" log lines.
const CAP_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// How long shutdown waits for node connections to close cleanly.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// State shared by every request and connection.
pub struct Shared {
    /// The validated configuration.
    pub config: Config,
    /// What nodes present to register.
    pub node_credentials: NodeCredentials,
    /// API tokens by role.
    pub api_tokens: ApiTokens,
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
    flusher_stop.cancel();
    let _ = flusher.await;
    let _ = receiver.await;
    let _ = announcer.await;
    served
}

/// What one listener lets its connections hold.
#[derive(Debug, Clone)]
struct ConnectionLimits {
    /// Connections served at once; more wait in the kernel's backlog.
    max: u32,
    /// Time to send a request's headers, and to start the next request
    /// on an idle keep-alive connection.
    header_read_timeout: Duration,
    /// Connections holding a place now.
    open: Gauge,
}

/// Accepts connections until `shutdown`, each served by its own task with
/// HTTP/1.1 (and WebSocket upgrades), at most `limits.max` at once; then
/// asks each to finish its request and waits up to [`DRAIN_TIMEOUT`].
async fn serve_on<L>(
    mut listener: L,
    app: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()>
where
    L: Listener<Addr = SocketAddr>,
    L::Io: Send + 'static,
{
    let permits = Arc::new(Semaphore::new(limits.max as usize));
    let connections = TaskTracker::new();
    // When the cap was last reported: once per CAP_LOG_INTERVAL at most,
    // since under attack it is reached at every accept.
    let mut reported: Option<tokio::time::Instant> = None;
    loop {
        let permit = match permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                if reported.is_none_or(|at| at.elapsed() >= CAP_LOG_INTERVAL) {
                    reported = Some(tokio::time::Instant::now());
                    tracing::warn!(
                        max_connections = limits.max,
                        "connection cap reached: new connections wait until one closes (raise limits.max_connections and LimitNOFILE if this is load, not an attack)"
                    );
                }
                tokio::select! {
                    permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                    () = shutdown.cancelled() => break,
                }
            }
        };
        let (io, peer) = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        // Every request carries the connection's permit, so that a socket
        // upgraded to a WebSocket keeps counting against the cap after
        // the HTTP connection hands it over.
        let permit = ConnectionPermit::new(permit, limits.open.clone());
        let held = permit.clone();
        let service = app
            .clone()
            .map_request(move |mut request: Request<Incoming>| {
                let extensions = request.extensions_mut();
                extensions.insert(ConnectInfo(PeerAddr(peer)));
                extensions.insert(held.clone());
                request
            });
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout);
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let _held = permit;
            let connection = http
                .serve_connection(TokioIo::new(io), TowerToHyperService::new(service))
                .with_upgrades();
            tokio::pin!(connection);
            let served = tokio::select! {
                served = connection.as_mut() => served,
                () = shutdown.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(err) = served {
                tracing::debug!(%peer, error = %err, "connection ended with an error");
            }
        });
    }
    connections.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("http connections did not finish in time");
    }
    Ok(())
}

/// A connection's place under the connection cap, held by the HTTP
/// connection and by a WebSocket upgraded from it; counted in
/// `lingua_connections_open` while either lives.
#[derive(Debug, Clone)]
pub struct ConnectionPermit {
    _held: Arc<HeldPermit>,
}

#[derive(Debug)]
struct HeldPermit {
    _permit: OwnedSemaphorePermit,
    open: Gauge,
}

impl ConnectionPermit {
    fn new(permit: OwnedSemaphorePermit, open: Gauge) -> Self {
        open.inc();
        Self {
            _held: Arc::new(HeldPermit {
                _permit: permit,
                open,
            }),
        }
    }
}

impl Drop for HeldPermit {
    fn drop(&mut self) {
        self.open.dec();
    }
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
