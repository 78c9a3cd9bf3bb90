//! A registered connection's state, and when it tells routing about the
//! node (what it tells is the node's [`crate::hints::Hints`]).

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use futures_util::future::join_all;
use lingua_shared::protocol::CapacityReport;
use lingua_shared::{JobKind, LangPair, NodeId};
use tokio::time::Instant;

use super::{MIN_PUBLISH_INTERVAL, NodeServices};

/// A registered connection.
pub(super) struct Session {
    pub(super) node: NodeId,
    pub(super) epoch: u64,
    pub(super) pairs: Vec<LangPair>,
    pub(super) kinds: Vec<JobKind>,
    /// Shared with the registry entry and the hints: an admin drain sets
    /// it.
    pub(super) draining: Arc<AtomicBool>,
    /// When this connection's routing entries were last queued.
    pub(super) published: Instant,
    /// A report arrived within [`MIN_PUBLISH_INTERVAL`] of the last one
    /// and waits for the interval's end.
    pub(super) publish_pending: bool,
    /// When a heartbeat was last recorded in Redis (never, at first).
    pub(super) recorded: Option<Instant>,
    /// The node's report changed since the last heartbeat recorded (a
    /// capacity report, or a heartbeat not recorded): the next heartbeat
    /// records it.
    pub(super) record_due: bool,
    /// The capacity of the node's last heartbeat, as recorded in Redis
    /// (JSON), once one of that capacity was recorded.
    pub(super) capacity: Option<String>,
}

impl Session {
    /// Takes a report from the node: its hints follow it.
    pub(super) fn reported(&mut self, services: &NodeServices, report: CapacityReport) {
        services.hints.report(&self.node, report);
    }

    /// The JSON to record for the heartbeat capacity `text` (read as
    /// `report`; `None` when it was the same text as the last one), made
    /// once per capacity.
    pub(super) fn capacity_json(&mut self, text: &str, report: Option<&CapacityReport>) -> String {
        self.capacity
            .get_or_insert_with(|| {
                let json = match report {
                    Some(report) => serde_json::to_string(report),
                    None => serde_json::from_str::<CapacityReport>(text)
                        .and_then(|report| serde_json::to_string(&report)),
                };
                json.unwrap_or_default()
            })
            .clone()
    }

    /// Queues this node's routing entries in every pair it serves.
    pub(super) fn publish(&mut self, services: &NodeServices) {
        self.published = Instant::now();
        self.publish_pending = false;
        services
            .batcher
            .queue(self.pairs.iter().copied(), &self.node);
    }

    /// Publishes now, or at the end of the current interval when the last
    /// publication was less than [`MIN_PUBLISH_INTERVAL`] ago: however
    /// fast a node reports, its reports cost at most one routing update
    /// per interval.
    pub(super) fn publish_soon(&mut self, services: &NodeServices) {
        if self.published.elapsed() >= MIN_PUBLISH_INTERVAL {
            self.publish(services);
        } else {
            self.publish_pending = true;
        }
    }

    /// Takes the closed connection's node out of routing, unless a newer
    /// registration of the same node already replaced it.
    pub(super) async fn leave(&self, services: &NodeServices) {
        services.heartbeats.forget(&self.node, self.epoch);
        if services.registry.remove(&self.node, self.epoch) {
            services.router.node_lost(&self.node);
            services.hints.forget(&self.node);
        }
        match services.store.node_offline(&self.node, self.epoch).await {
            Ok(true) => {
                // Closed by this instance's stop, the node is moving to
                // another: still serving its pairs until its lease runs out.
                let moving = services.shutdown.is_cancelled();
                let leaves = self.pairs.iter().map(|&pair| {
                    let (store, node, kinds) = (&services.store, &self.node, &self.kinds);
                    async move {
                        if moving {
                            store.pool_leave_moving(pair, node, kinds).await
                        } else {
                            store.pool_leave(pair, node, kinds).await
                        }
                    }
                });
                for result in join_all(leaves).await {
                    if let Err(err) = result {
                        tracing::warn!(node_id = %self.node, error = %err, "leaving pool failed; the pair lease will expire");
                    }
                }
            }
            Ok(false) => {}
            Err(err) => {
                tracing::warn!(node_id = %self.node, error = %err, "marking node offline failed; its lease will expire");
            }
        }
    }
}
