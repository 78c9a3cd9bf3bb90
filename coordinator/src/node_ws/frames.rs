//! One function per message a registered node sends that needs more than
//! a line: heartbeats, drains, refusals (results: `results.rs`).

use lingua_shared::protocol::{Drain, Heartbeat, JobRef, JobReject, RejectReason};
use std::sync::atomic::Ordering;
use tokio::time::Instant;

use super::NodeServices;
use super::{Handled, MAX_LOGGED_CHARS, Session};

/// A heartbeat: renews the connection. Recorded in Redis (in the next
/// batch) when the report changed (at most twice per interval) or once
/// half the recorded lease is spent; told to routing when the report
/// changed, while assignments to the node are unanswered, or once half its
/// routing lease is spent. An idle node's heartbeat costs Redis something
/// every other interval.
pub(super) fn heartbeat(
    services: &NodeServices,
    session: &mut Session,
    heartbeat: Heartbeat,
) -> Handled {
    services.metrics.heartbeats.inc();
    let changed = services.hints.changes(&session.node, &heartbeat.capacity);
    // More than two heartbeats per interval renew the connection
    // but cost Redis nothing: a node cannot turn its frame rate
    // into script calls. The lease recorded last must still outlast
    // a whole interval, or this heartbeat renews it whatever the rate.
    let interval = services.config.heartbeat_interval;
    let lease = services.config.lease();
    let record = session.recorded.is_none_or(|at| {
        let since = at.elapsed();
        since >= lease / 2
            || lease.saturating_sub(since) <= interval
            || (changed && since >= interval / 2)
    });
    let capacity = record.then(|| serde_json::to_string(&heartbeat.capacity).unwrap_or_default());
    session.reported(services, heartbeat.capacity);
    if changed || !services.hints.settled(&session.node) || session.published.elapsed() >= lease / 2
    {
        session.publish_soon(services);
    }
    if let Some(capacity) = capacity {
        session.recorded = Some(Instant::now());
        services
            .heartbeats
            .record(&session.node, session.epoch, capacity);
    }
    Handled::Alive
}

/// The node announces it is draining.
pub(super) async fn drain(services: &NodeServices, session: &mut Session, drain: Drain) -> Handled {
    // Once is enough: a repeated drain costs Redis nothing.
    if session.draining.swap(true, Ordering::SeqCst) {
        return Handled::Fine;
    }
    let reason: String = drain.reason.chars().take(MAX_LOGGED_CHARS).collect();
    tracing::info!(node_id = %session.node, %reason, "node is draining");
    session.publish(services);
    if let Err(err) = services
        .store
        .drain_node(&session.node, Some(session.epoch))
        .await
    {
        tracing::warn!(node_id = %session.node, error = %err, "recording drain failed");
    }
    Handled::Fine
}

/// The node refused an assignment.
pub(super) fn reject(services: &NodeServices, session: &mut Session, reject: JobReject) -> Handled {
    let key = JobRef {
        job_id: reject.job_id,
        attempt: reject.attempt,
    };
    let reason = reject.reason;
    let route = services.router.answer(
        (&session.node, session.epoch),
        &key,
        Some((reason, reject.message)),
    );
    // The node is full for that kind, whatever its last report said:
    // route nothing more of it there until it reports room again.
    if let (Some(route), RejectReason::NoCapacity) = (route, reason) {
        services.hints.full(&session.node, &route);
        session.publish(services);
    }
    Handled::Fine
}
