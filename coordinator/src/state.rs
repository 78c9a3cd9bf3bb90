//! What every request handler, node socket and background loop shares:
//! the configuration, the services below it, and shutdown.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{ApiTokens, NodeCredentials};
use crate::config::Config;
use crate::jobs::JobRouter;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::route_batch::RouteBatcher;
use crate::store::Store;

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
