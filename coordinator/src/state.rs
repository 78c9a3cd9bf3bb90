//! The state behind the HTTP router, and how each handler's substate is
//! found in it (axum `FromRef`): a handler names the services it uses,
//! never the whole.

use std::sync::Arc;

use axum::extract::FromRef;
use tokio_util::sync::CancellationToken;

use crate::auth::ApiTokens;
use crate::drain::Drainer;
use crate::fleet::Live;
use crate::http::jobs::JobLimits;
use crate::http::ops::InstanceId;
use crate::jobs::JobRouter;
use crate::metrics::Metrics;
use crate::node_ws::NodeServices;
use crate::registry::Registry;
use crate::store::Store;

/// The router's state: cheap to clone (every field is shared).
#[derive(Clone)]
pub struct Shared {
    /// What node sockets use (and the services below them).
    pub nodes: Arc<NodeServices>,
    /// API tokens by role.
    pub api_tokens: Arc<ApiTokens>,
    /// Admin drains.
    pub drainer: Arc<Drainer>,
    /// Live fleet snapshots for dashboards.
    pub live: Arc<Live>,
}

macro_rules! substate {
    ($ty:ty, |$shared:ident| $get:expr) => {
        impl FromRef<Shared> for $ty {
            fn from_ref($shared: &Shared) -> Self {
                $get
            }
        }
    };
}

substate!(Arc<NodeServices>, |shared| shared.nodes.clone());
substate!(Arc<ApiTokens>, |shared| shared.api_tokens.clone());
substate!(Arc<Drainer>, |shared| shared.drainer.clone());
substate!(Arc<Live>, |shared| shared.live.clone());
substate!(Store, |shared| shared.nodes.store.clone());
substate!(Arc<JobRouter>, |shared| shared.nodes.router.clone());
substate!(Arc<Metrics>, |shared| shared.nodes.metrics.clone());
substate!(Arc<Registry>, |shared| shared.nodes.registry.clone());
substate!(CancellationToken, |shared| shared.nodes.shutdown.clone());
substate!(InstanceId, |shared| InstanceId(
    shared.nodes.instance.clone()
));
substate!(JobLimits, |shared| JobLimits {
    body_timeout: shared.nodes.config.header_read_timeout,
    default_timeout: shared.nodes.config.default_job_timeout,
    client_max_priority: shared.nodes.config.client_max_priority,
});
