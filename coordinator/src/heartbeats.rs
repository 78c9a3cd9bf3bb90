//! Records heartbeats in Redis in batches.
//!
//! Every node held here heartbeats once per interval: 10,000 nodes make
//! 5,000 `node_heartbeat` calls a second. A connection does not wait for
//! its own: the heartbeat waits here a few milliseconds, and each flush
//! sends every one due together, which the Redis connection pipelines
//! (about one round trip per flush rather than one per node, and no frame
//! of the node waits behind Redis). A heartbeat whose epoch is no longer
//! current (a newer registration of the node exists) closes its
//! connection, as an unbatched one did; one still due when its connection
//! ends is dropped ([`HeartbeatBatcher::forget`]), so that it cannot
//! renew the lease of a node marked offline.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lingua_shared::NodeId;
use lingua_shared::close::CloseCode;
use lingua_shared::sync::lock;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::registry::{Control, Registry};
use crate::store::Store;

/// How long heartbeats gather before a flush.
const FLUSH_WINDOW: Duration = Duration::from_millis(5);
/// Most heartbeats sent at once.
const MAX_BATCH: usize = 512;

/// Heartbeats waiting to be recorded, flushed by [`HeartbeatBatcher::run`].
pub struct HeartbeatBatcher {
    store: Store,
    registry: Arc<Registry>,
    /// How long a recorded heartbeat keeps the node alive, and how long
    /// its keys outlive that.
    lease: Duration,
    retention: Duration,
    /// Per connection (node and epoch): the capacity to record (JSON).
    due: Mutex<HashMap<(NodeId, u64), String>>,
    due_now: Notify,
    /// Connections whose last heartbeat Redis did not record: their next
    /// one is recorded, whatever it says.
    unrecorded: Mutex<HashSet<(NodeId, u64)>>,
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
            unrecorded: Mutex::default(),
        }
    }

    /// True (once) when the last heartbeat queued for `node`'s connection
    /// of `epoch` was not recorded.
    pub fn missed(&self, node: &NodeId, epoch: u64) -> bool {
        lock(&self.unrecorded).remove(&(node.clone(), epoch))
    }

    /// Queues a heartbeat of `node`'s connection of `epoch`, with its
    /// capacity (JSON); a later one of the same connection before the
    /// flush replaces it.
    pub fn record(&self, node: &NodeId, epoch: u64, capacity: String) {
        lock(&self.due).insert((node.clone(), epoch), capacity);
        self.due_now.notify_one();
    }

    /// The connection of `epoch` ended: its heartbeat, if still due, is
    /// not recorded.
    pub fn forget(&self, node: &NodeId, epoch: u64) {
        let key = (node.clone(), epoch);
        lock(&self.due).remove(&key);
        lock(&self.unrecorded).remove(&key);
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
        let due: Vec<((NodeId, u64), String)> =
            std::mem::take(&mut *lock(&self.due)).into_iter().collect();
        for batch in due.chunks(MAX_BATCH) {
            let recorded = self
                .store
                .heartbeats(batch, (self.lease, self.retention))
                .await;
            let failed = recorded.iter().filter(|r| r.is_none()).count();
            if failed > 0 {
                // A Redis outage does not end the links: closing every
                // socket on a Redis blip would move every running job (and
                // run it twice). The connection's next heartbeat is
                // recorded, and renews the lease once Redis answers.
                tracing::warn!(
                    heartbeats = failed,
                    "heartbeats not recorded: redis unavailable"
                );
            }
            for (((node, epoch), _), recorded) in batch.iter().zip(recorded) {
                if recorded.is_none() {
                    lock(&self.unrecorded).insert((node.clone(), *epoch));
                }
                if recorded == Some(false) {
                    self.registry.send_to(
                        node,
                        *epoch,
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
