//! The operator's view of the whole fleet: [`summary::Fleet`] (what
//! `GET /v1/fleet` answers), the live snapshots behind the dashboard and
//! `lingua-ctl top` ([`Live`]), and this instance's share of it, its last
//! minute of jobs, published to Redis every second ([`publish`]) so that
//! every instance shows every instance's jobs.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use lingua_shared::sync::lock;
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::jobs::JobRouter;
use crate::metrics::Metrics;
use crate::recent::{Stats, now_ms};
use crate::store::{Store, StoreError};

pub mod summary;
pub mod views;

use summary::Fleet;
use views::{NodeView, PoolView};

/// How often live views get a snapshot, and instances publish their jobs.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// How long an instance's published jobs outlive it.
const STATS_TTL: Duration = Duration::from_secs(3);

/// Reads the fleet from Redis.
pub async fn snapshot(store: &Store) -> Result<Fleet, StoreError> {
    let nodes = store.nodes().await?.into_iter().map(NodeView::from);
    let pools = store.pools().await?.into_iter().map(PoolView::from);
    let stats = store
        .instance_stats()
        .await?
        .iter()
        .filter_map(|text| serde_json::from_str::<Stats>(text).ok())
        .collect();
    Ok(Fleet::new(
        now_ms(),
        nodes.collect(),
        pools.collect(),
        stats,
    ))
}

/// Fleet snapshots for live views: one per [`INTERVAL`] while anyone
/// watches, however many watch, none while nobody does.
pub struct Live {
    store: Store,
    metrics: Arc<Metrics>,
    every: Duration,
    /// The latest snapshot as JSON (or an `error` object), shared by
    /// every watcher.
    latest: watch::Sender<Option<Arc<str>>>,
    /// Whether the snapshot task runs.
    running: Mutex<bool>,
}

impl Live {
    /// Live snapshots of `store`'s fleet every `every`.
    pub fn new(store: Store, metrics: Arc<Metrics>, every: Duration) -> Self {
        Self {
            store,
            metrics,
            every,
            latest: watch::channel(None).0,
            running: Mutex::new(false),
        }
    }

    /// Watches the snapshots: the next one comes within one interval.
    /// The snapshot task starts with the first watcher and stops, at its
    /// next tick, once the last one is gone.
    pub fn watch(self: &Arc<Self>) -> watch::Receiver<Option<Arc<str>>> {
        let mut running = lock(&self.running);
        let mut receiver = self.latest.subscribe();
        receiver.mark_unchanged();
        if !*running {
            *running = true;
            tokio::spawn(Arc::clone(self).run());
        }
        receiver
    }

    async fn run(self: Arc<Self>) {
        let mut ticker = tokio::time::interval(self.every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            {
                let mut running = lock(&self.running);
                if self.latest.receiver_count() == 0 {
                    *running = false;
                    return;
                }
            }
            let event = match snapshot(&self.store).await {
                Ok(fleet) => serde_json::to_string(&fleet).unwrap_or_default(),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot read the fleet for live views");
                    json!({"error": {"code": "unavailable", "message": "redis is unavailable"}})
                        .to_string()
                }
            };
            self.metrics.fleet_snapshots.inc();
            self.latest.send_replace(Some(event.into()));
        }
    }
}

/// Publishes this instance's last minute of jobs every [`INTERVAL`] until
/// `stop`, for every instance's fleet view; whether Redis took it sets
/// `lingua_redis_up`.
pub async fn publish(
    store: Store,
    metrics: Arc<Metrics>,
    router: Arc<JobRouter>,
    instance: String,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(INTERVAL);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stop.cancelled() => return,
        }
        let stats = metrics.recent.stats(router.queued() as u64);
        let Ok(text) = serde_json::to_string(&stats) else {
            continue;
        };
        // The call a second that tells `lingua_redis_up`.
        match store.publish_stats(&instance, &text, STATS_TTL).await {
            Ok(()) => {
                metrics.redis_up.set(1);
            }
            Err(err) => {
                metrics.redis_up.set(0);
                tracing::debug!(error = %err, "cannot publish this instance's job counts");
            }
        }
    }
}
