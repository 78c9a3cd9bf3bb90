//! An admin drain, start to end: the node stops being routed to in every
//! pair it serves, and the instance holding its socket (this one, or
//! another through its inbox) tells the agent, which then admits nothing
//! new and finishes what it runs.

use std::sync::Arc;
use std::time::Duration;

use lingua_shared::NodeId;

use crate::forward::{self, Envelope};
use crate::registry::Registry;
use crate::store::{DrainOutcome, Route, RouteEntry, Store, StoreError};

/// What became of a drain request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// The node is draining now.
    Draining,
    /// The node is known but offline: nothing to drain.
    Offline,
    /// No such node ever registered.
    Unknown,
}

/// Drains nodes on an admin's request.
pub struct Drainer {
    /// Redis.
    pub store: Store,
    /// Node sockets held here.
    pub registry: Arc<Registry>,
    /// This coordinator instance's random id.
    pub instance: String,
    /// How long routing entries live.
    pub lease: Duration,
}

impl Drainer {
    /// Drains `node`, for `reason`.
    pub async fn drain(&self, node: &NodeId, reason: &str) -> Result<Drained, StoreError> {
        let (pairs, kinds) = match self.store.drain_node(node, None).await? {
            DrainOutcome::Unknown => return Ok(Drained::Unknown),
            DrainOutcome::Offline | DrainOutcome::Stale => return Ok(Drained::Offline),
            DrainOutcome::Draining { pairs, kinds, .. } => (pairs, kinds),
        };
        // The instance holding the node's socket must know, or its next
        // routing update would make the node routable again. Held here,
        // the node's hints say draining from now on, before its routes are
        // zeroed: an update computed after this writes no room either.
        let told_here = self.registry.drain(node, reason.into());
        let told_holder = if told_here {
            Ok(false)
        } else {
            self.tell_holder(node, reason).await
        };
        // Zeroed whether or not the holder could be told: the drain is
        // recorded already.
        let entry = RouteEntry {
            node: node.clone(),
            free: kinds
                .iter()
                .flat_map(|kind| [Route::gpu(kind), Route::fallback(kind)])
                .map(|route| (route, 0))
                .collect(),
            room: None,
        };
        for pair in &pairs {
            self.store
                .route_update(*pair, std::slice::from_ref(&entry), self.lease)
                .await?;
        }
        let told = told_here || told_holder?;
        tracing::info!(node_id = %node, told, "node drained by admin request");
        Ok(Drained::Draining)
    }

    /// Asks the other live instance holding `node`'s socket to drain it;
    /// false when none holds it.
    async fn tell_holder(&self, node: &NodeId, reason: &str) -> Result<bool, StoreError> {
        let Some(holder) = self.store.other_live_holder(node, &self.instance).await? else {
            return Ok(false);
        };
        let envelope = Envelope::Drain {
            node: node.clone(),
            reason: reason.to_owned(),
        };
        forward::send(&self.store, &holder, &envelope).await
    }
}
