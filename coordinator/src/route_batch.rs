//! Batches routing updates per language pair.
//!
//! Heartbeats and capacity reports change a node's routing entries in every
//! pair it serves. Sending one script call per node and pair would cost
//! `nodes x pairs` calls per heartbeat interval; instead updates wait here
//! for a few milliseconds and each pair is flushed with one `route_update`
//! call carrying every node that changed. Entries are computed at the
//! flush, from the nodes' [`Hints`], while no pick of the pair runs.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::join_all;
use lingua_shared::sync::lock;
use lingua_shared::{LangPair, NodeId};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::hints::Hints;
use crate::registry::Registry;
use crate::store::{RouteEntry, Store};

/// How long updates gather before a flush.
const FLUSH_WINDOW: Duration = Duration::from_millis(5);

type Pending = HashMap<LangPair, HashSet<NodeId>>;

/// Pending routing updates, flushed by [`RouteBatcher::run`].
pub struct RouteBatcher {
    pending: Mutex<Pending>,
    wake: Notify,
    store: Store,
    registry: Arc<Registry>,
    max_nodes_per_pool: u32,
    lease: Duration,
    hints: Arc<Hints>,
}

impl RouteBatcher {
    /// A batcher writing the entries of `hints` through `store`; nodes of
    /// `registry` that lost their pair lease are re-joined with these pool
    /// settings.
    pub fn new(
        store: Store,
        registry: Arc<Registry>,
        max_nodes_per_pool: u32,
        lease: Duration,
        hints: Arc<Hints>,
    ) -> Self {
        Self {
            pending: Mutex::default(),
            wake: Notify::new(),
            store,
            registry,
            max_nodes_per_pool,
            lease,
            hints,
        }
    }

    /// Queues an update of `node`'s entry in each of `pairs`.
    pub fn queue(&self, pairs: impl IntoIterator<Item = LangPair>, node: &NodeId) {
        let mut pending = self.lock();
        for pair in pairs {
            pending.entry(pair).or_default().insert(node.clone());
        }
        drop(pending);
        self.wake.notify_one();
    }

    /// Flushes until `shutdown`, then once more.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = self.wake.notified() => {}
                () = shutdown.cancelled() => break,
            }
            tokio::time::sleep(FLUSH_WINDOW).await;
            self.flush().await;
        }
        self.flush().await;
    }

    async fn flush(&self) {
        let (store, lease) = (&self.store, self.lease);
        let batch = std::mem::take(&mut *self.lock());
        let hints = &self.hints;
        let calls = batch.into_iter().map(|(pair, nodes)| async move {
            let _updating = hints.updating(pair).await;
            let entries: Vec<RouteEntry> = nodes.iter().filter_map(|node| hints.entry(node)).collect();
            if entries.is_empty() {
                return (pair, Vec::new());
            }
            match store.route_update(pair, &entries, lease).await {
                Ok(missing) => (pair, missing),
                Err(err) => {
                    tracing::warn!(%pair, nodes = entries.len(), error = %err, "routing update failed");
                    (pair, Vec::new())
                }
            }
        });
        for (pair, missing) in join_all(calls).await {
            self.rejoin(pair, missing).await;
        }
        self.hints.written().notify_waiters();
    }

    /// Nodes whose pair lease ran out (a Redis stall longer than a lease,
    /// say) while their socket stayed here: put them back.
    async fn rejoin(&self, pair: LangPair, missing: Vec<NodeId>) {
        for node in missing {
            if !self
                .registry
                .get(&node)
                .is_some_and(|local| local.pairs.contains(&pair))
            {
                continue;
            }
            tracing::info!(%pair, node_id = %node, "node lost its pair lease; re-joining");
            if let Err(err) = self
                .store
                .pool_join(pair, &node, &[], self.max_nodes_per_pool, self.lease)
                .await
            {
                tracing::warn!(%pair, node_id = %node, error = %err, "re-joining pool failed");
                continue;
            }
            self.queue([pair], &node);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        // Every critical section is a single map operation, so a poisoned
        // lock holds consistent data.
        lock(&self.pending)
    }
}
