//! Batches routing updates per language pair.
//!
//! Heartbeats and capacity reports change a node's routing entries in every
//! pair it serves. Sending one script call per node and pair would cost
//! `nodes x pairs` calls per heartbeat interval; instead updates wait here
//! for a few milliseconds and each pair is flushed with one `route_update`
//! call carrying every node that changed. Entries are computed at the
//! flush, from the nodes' [`Hints`], while no pick of the pair runs.
//!
//! An entry's lease in its pair runs out unless it is written again. An
//! idle node's reports change nothing, so its entries are renewed by a
//! sweep ([`sweep`]) of those written long enough ago whose
//! node reported since (a node gone silent is left to expire, as
//! before). Each pair's renewals go together: one call per pair and
//! sweep (per [`MAX_ENTRIES`] nodes), however many of its nodes are idle,
//! where renewing at each node's heartbeat cost one call per node.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::join_all;
use lingua_shared::sync::lock;
use lingua_shared::{JobKind, LangPair, NodeId};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::forward::{self, Envelope};
use crate::hints::Hints;
use crate::queue::Queues;
use crate::registry::Registry;
use crate::store::{RouteEntry, Store};

/// How long updates gather before a flush.
const FLUSH_WINDOW: Duration = Duration::from_millis(5);
/// Most nodes in one `route_update` call: a sweep of a pair of thousands
/// of idle nodes goes in several, none holding Redis long.
const MAX_ENTRIES: usize = 256;

/// Writes the routing entries [`Hints`] says are due, flushed by
/// [`RouteBatcher::run`].
pub struct RouteBatcher {
    store: Store,
    registry: Arc<Registry>,
    max_nodes_per_pool: u32,
    lease: Duration,
    /// The nodes' heartbeat interval.
    interval: Duration,
    hints: Arc<Hints>,
    queues: Arc<Mutex<Queues>>,
    instance: String,
    /// Nodes whose last update, or re-join, failed: their next heartbeat
    /// updates routing, whatever it says.
    unwritten: Mutex<HashSet<NodeId>>,
}

impl RouteBatcher {
    /// A batcher of `instance` writing the entries of `hints` through
    /// `store`, waking the `queues` of each pair and kind that has room
    /// after a flush (and other instances waiting there); nodes of
    /// `registry` that lost their pair lease are re-joined with these pool
    /// settings (most nodes per pool, lease); idle nodes' entries are
    /// renewed as their heartbeats, every `interval`, renewed them.
    pub fn new(
        (store, instance): (Store, String),
        registry: Arc<Registry>,
        (max_nodes_per_pool, lease): (u32, Duration),
        interval: Duration,
        (hints, queues): (Arc<Hints>, Arc<Mutex<Queues>>),
    ) -> Self {
        Self {
            store,
            registry,
            max_nodes_per_pool,
            lease,
            interval,
            hints,
            queues,
            instance,
            unwritten: Mutex::default(),
        }
    }

    /// True (once) when `node`'s last routing update failed.
    pub fn missed(&self, node: &NodeId) -> bool {
        lock(&self.unwritten).remove(node)
    }

    /// Queues an update of `node`'s entry in each of `pairs`.
    pub fn queue(&self, pairs: impl IntoIterator<Item = LangPair>, node: &NodeId) {
        self.hints.due(pairs, node);
    }

    /// Flushes until `shutdown`, then once more.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let (every, age) = sweep(self.lease, self.interval);
        let mut sweep = tokio::time::interval(every);
        sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.hints.wait_due() => {
                    tokio::time::sleep(FLUSH_WINDOW).await;
                    self.flush(self.hints.take_due()).await;
                }
                _ = sweep.tick() => self.flush(self.hints.stale(age)).await,
                () = shutdown.cancelled() => break,
            }
        }
        self.flush(self.hints.take_due()).await;
    }

    async fn flush(&self, batch: HashMap<LangPair, HashSet<NodeId>>) {
        let (store, lease) = (&self.store, self.lease);
        let hints = &self.hints;
        let chunks = batch.into_iter().flat_map(|(pair, nodes)| {
            let nodes: Vec<NodeId> = nodes.into_iter().collect();
            let chunks: Vec<_> = nodes
                .chunks(MAX_ENTRIES)
                .map(|c| (pair, c.to_vec()))
                .collect();
            chunks
        });
        let calls = chunks.map(|(pair, nodes)| async move {
            let updating = hints.updating(pair).await;
            let at = Instant::now();
            let entries: Vec<RouteEntry> = nodes.iter().filter_map(|node| hints.entry(node)).collect();
            if entries.is_empty() {
                return (pair, Vec::new());
            }
            let updated = store.route_update(pair, &entries, lease).await;
            drop(updating);
            match updated {
                Ok(updated) => {
                    let written = entries.iter().map(|e| &e.node);
                    hints.wrote(pair, written.filter(|node| !updated.missing.contains(node)), at);
                    self.wake(pair, &entries, &updated.waiting).await;
                    (pair, updated.missing)
                }
                Err(err) => {
                    tracing::warn!(%pair, nodes = entries.len(), error = %err, "routing update failed");
                    lock(&self.unwritten).extend(entries.into_iter().map(|e| e.node));
                    (pair, Vec::new())
                }
            }
        });
        for (pair, missing) in join_all(calls).await {
            self.rejoin(pair, missing).await;
        }
    }

    /// After an update of `pair` showing room (on a GPU or a fallback):
    /// the head of each of this instance's queues of a kind with room
    /// tries again, and the other instances with jobs `waiting` there are
    /// told.
    async fn wake(&self, pair: LangPair, entries: &[RouteEntry], waiting: &[String]) {
        let mut roomy: Vec<&JobKind> = entries
            .iter()
            .flat_map(|e| e.free.iter())
            .filter(|(_, free)| **free > 0)
            .map(|(route, _)| &route.kind)
            .collect();
        if roomy.is_empty() {
            return;
        }
        roomy.sort_unstable();
        roomy.dedup();
        {
            let mut queues = lock(&self.queues);
            for kind in &roomy {
                queues.wake(&(pair, (*kind).clone()));
            }
        }
        let kinds = roomy.into_iter().cloned().collect();
        let envelope = Envelope::Capacity { pair, kinds };
        for instance in waiting.iter().filter(|i| **i != self.instance) {
            if let Err(err) = forward::send(&self.store, instance, &envelope).await {
                tracing::warn!(%pair, %instance, error = %err, "cannot tell a waiting instance about room");
            }
        }
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
                // Its next heartbeat tries again.
                lock(&self.unwritten).insert(node);
                continue;
            }
            self.queue([pair], &node);
        }
    }
}

/// How often the sweep runs with this `lease` and heartbeat `interval`,
/// and how old an entry it renews is: an entry is renewed at an age of
/// its lease less an interval and a half (as a heartbeat renewed it: when
/// the next one would leave less than half an interval), within a sixth
/// of a lease or half an interval (the shorter) after, once its node
/// reported since. With heartbeats every interval, an entry has about an
/// interval of its lease left when renewed (two thirds of one at two
/// missed heartbeats).
fn sweep(lease: Duration, interval: Duration) -> (Duration, Duration) {
    let every = (lease / 6).min(interval / 2);
    (every, lease.saturating_sub(interval * 3 / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_entries_are_renewed_with_about_an_interval_left() {
        let ms = Duration::from_millis;
        // The default: a 2 s interval, three missed heartbeats.
        assert_eq!(sweep(ms(6000), ms(2000)), (ms(1000), ms(3000)));
        assert_eq!(sweep(ms(4000), ms(2000)), (ms(4000) / 6, ms(1000)));
        assert_eq!(sweep(ms(20_000), ms(2000)), (ms(1000), ms(17_000)));
        for missed in 2..=10 {
            let (interval, lease) = (ms(2000), ms(2000) * missed);
            let (every, age) = sweep(lease, interval);
            // Renewed at the latest a sweep after the age, and after a
            // heartbeat (every interval) since the last write.
            let renewed = age.max(interval) + every;
            assert!(lease - renewed >= interval * 2 / 3, "{missed} missed");
        }
    }
}
