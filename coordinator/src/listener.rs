//! The accept loop: HTTP/1.1 with WebSocket upgrades, a cap on the
//! connections served at once (a WebSocket keeps the place of the
//! connection it was upgraded from), a header-read timeout, and a bounded
//! graceful drain. docs/SECURITY.md lists the limits.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request};
use axum::serve::Listener;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

/// Shortest time between two "connection cap reached" log lines.
const CAP_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// How long shutdown waits for connections to finish cleanly.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What one listener lets its connections hold.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Connections served at once; more wait in the kernel's backlog.
    pub max: u32,
    /// Time to send a request's headers, and to start the next request
    /// on an idle keep-alive connection.
    pub header_read_timeout: Duration,
    /// Connections holding a place now.
    pub open: Gauge,
}

/// Accepts connections until `shutdown`, each served by its own task with
/// HTTP/1.1 (and WebSocket upgrades), at most `limits.max` at once; then
/// asks each to finish its request and waits up to [`DRAIN_TIMEOUT`].
pub async fn serve_on<L>(
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
    // When the cap was last logged (an attack reaches it at every accept).
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
        // Its own token: each wait on the shared one locks what all share.
        let shutdown = shutdown.child_token();
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
pub struct PlainListener(pub TcpListener);

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
