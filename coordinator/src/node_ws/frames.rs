//! One function per message a registered node sends that needs more than
//! a line: heartbeats, drains, refusals (results: `results.rs`).

use lingua_shared::protocol::{Drain, Heartbeat, JobRef, JobReject, RejectReason};
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::NodeServices;
use super::{Handled, MAX_LOGGED_CHARS, Session};

/// A heartbeat: renews the connection. Recorded in Redis (in the next
/// batch) when the node's report changed since the last one recorded (at
/// most twice per interval), when the last one failed, or when the lease
/// recorded last would otherwise run short: unless the next heartbeat,
/// an interval later, would still leave half an interval of it. Told to
/// routing on the same terms, and while assignments to the node are
/// unanswered. At the default three-interval lease, an idle node's
/// heartbeat costs Redis something every other interval.
pub(super) fn heartbeat(
    services: &NodeServices,
    session: &mut Session,
    heartbeat: Heartbeat,
) -> Handled {
    services.metrics.heartbeats.inc();
    let changed = services.hints.changes(&session.node, &heartbeat.capacity);
    let interval = services.config.heartbeat_interval;
    let lease = services.config.lease();
    let runs_short = |since: Duration| lease.saturating_sub(since + interval) < interval / 2;
    // More than two heartbeats per interval renew the connection but cost
    // Redis nothing: a node cannot turn its frame rate into script calls.
    let record_changed = std::mem::take(&mut session.record_due) || changed;
    let record = services.heartbeats.missed(&session.node, session.epoch)
        || session.recorded.is_none_or(|at| {
            let since = at.elapsed();
            runs_short(since) || (record_changed && since >= interval / 2)
        });
    let capacity = record.then(|| serde_json::to_string(&heartbeat.capacity).unwrap_or_default());
    session.reported(services, heartbeat.capacity);
    if changed
        || !services.hints.settled(&session.node)
        || services.batcher.missed(&session.node)
        || runs_short(session.published.elapsed())
    {
        session.publish_soon(services);
    }
    match capacity {
        Some(capacity) => {
            session.recorded = Some(Instant::now());
            services
                .heartbeats
                .record(&session.node, session.epoch, capacity);
        }
        // Not recorded now: what changed goes with the next record.
        None => session.record_due |= record_changed,
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
