//! Records heartbeats in Redis in batches.
//!
//! Every node held here heartbeats once per interval: 10,000 nodes make
//! 5,000 `node_heartbeat` calls a second. Sending each on its own costs a
//! round trip and a request's bookkeeping per node; instead a heartbeat
//! to record waits here a few milliseconds, and each flush sends every
//! one due as one pipeline (a round trip per [`MAX_BATCH`] nodes; on
//! Redis Cluster, one per master holding some of them). A heartbeat whose
//! epoch is no longer current (a newer registration of the node exists)
//! closes its connection, as an unbatched one did.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lingua_shared::NodeId;
use lingua_shared::close::CloseCode;
use lingua_shared::sync::lock;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::registry::{Control, Registry};
use crate::store::{Beat, Store};

/// How long heartbeats gather before a flush.
const FLUSH_WINDOW: Duration = Duration::from_millis(5);
/// Most heartbeats in one pipeline.
pub const MAX_BATCH: usize = 512;

/// Heartbeats waiting to be recorded, flushed by [`HeartbeatBatcher::run`].
pub struct HeartbeatBatcher {
    store: Store,
    registry: Arc<Registry>,
    /// How long a recorded heartbeat keeps the node alive, and how long
    /// its keys outlive that.
    lease: Duration,
    retention: Duration,
    due: Mutex<HashMap<NodeId, Beat>>,
    due_now: Notify,
}

impl HeartbeatBatcher {
    /// A batcher recording through `store` with `(lease, retention)`, and
    /// closing stale connections of `registry`.
    pub fn new(
        store: Store,
        registry: Arc<Registry>,
        (lease, retention): (Duration, Duration),
    ) -> Self {
        Self {
            store,
            registry,
            lease,
            retention,
            due: Mutex::default(),
            due_now: Notify::new(),
        }
    }

    /// Queues a heartbeat of `node`'s connection of `epoch`, with its
    /// capacity (JSON); a later one of the same node before the flush
    /// replaces it.
    pub fn record(&self, node: &NodeId, epoch: u64, capacity: String) {
        lock(&self.due).insert(node.clone(), Beat { epoch, capacity });
        self.due_now.notify_one();
    }

    /// Flushes until `shutdown`, then once more.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = self.due_now.notified() => {}
                () = shutdown.cancelled() => break,
            }
            tokio::time::sleep(FLUSH_WINDOW).await;
            self.flush().await;
        }
        self.flush().await;
    }

    async fn flush(&self) {
        let due: Vec<(NodeId, Beat)> = std::mem::take(&mut *lock(&self.due)).into_iter().collect();
        for batch in due.chunks(MAX_BATCH) {
            // A Redis outage does not end the links: closing every socket
            // on a Redis blip would move every running job (and run it
            // twice). The next heartbeat renews the lease once Redis
            // answers.
            let current = match self
                .store
                .heartbeats(batch, (self.lease, self.retention))
                .await
            {
                Ok(current) => current,
                Err(err) => {
                    tracing::warn!(nodes = batch.len(), error = %err, "heartbeats not recorded: redis unavailable");
                    continue;
                }
            };
            for ((node, beat), current) in batch.iter().zip(current) {
                if !current {
                    self.registry.send_to(
                        node,
                        beat.epoch,
                        Control::Close(
                            CloseCode::Superseded,
                            "a newer registration of this node exists",
                        ),
                    );
                }
            }
        }
    }
}
