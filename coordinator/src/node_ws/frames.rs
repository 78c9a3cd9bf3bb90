//! One function per message a registered node sends that needs more than
//! a line: heartbeats, drains, refusals, results.

use axum::extract::ws::WebSocket;
use lingua_shared::Message;
use lingua_shared::close::CloseCode;
use lingua_shared::protocol::{
    Drain, ErrorCode, Heartbeat, JobRef, JobReject, JobResult, RejectReason,
};
use std::sync::atomic::Ordering;
use tokio::time::Instant;

use super::NodeServices;
use super::{Ending, Handled, MAX_LOGGED_CHARS, Session, send, send_error};
use crate::jobs::Taken;

/// A heartbeat: renews the connection; recorded in Redis (in the next
/// batch) at most twice per interval.
pub(super) fn heartbeat(
    services: &NodeServices,
    session: &mut Session,
    heartbeat: Heartbeat,
) -> Handled {
    services.metrics.heartbeats.inc();
    session.reported(services, heartbeat.capacity);
    // More than two heartbeats per interval renew the connection
    // but cost Redis nothing: a node cannot turn its frame rate
    // into script calls.
    // The lease recorded last must still outlast a whole interval,
    // or this heartbeat renews it whatever the rate.
    let interval = services.config.heartbeat_interval;
    let lease = services.config.lease();
    if session.recorded.is_some_and(|at| {
        at.elapsed() < interval / 2 && lease.saturating_sub(at.elapsed()) > interval
    }) {
        session.publish_soon(services);
        return Handled::Alive;
    }
    session.recorded = Some(Instant::now());
    let capacity = serde_json::to_string(&session.capacity).unwrap_or_default();
    services
        .heartbeats
        .record(&session.node, session.epoch, capacity);
    session.publish_soon(services);
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

/// A job's result: recorded (fenced by node and attempt) and acknowledged,
/// or refused when the attempt is another node's.
pub(super) async fn result(
    socket: &mut WebSocket,
    services: &NodeServices,
    session: &Session,
    result: JobResult,
) -> Result<Handled, Ending> {
    match services.router.result(&session.node, &result).await {
        Ok(Taken::Acknowledged) => {}
        Ok(Taken::Foreign) => {
            let text = format!(
                "job {} attempt {} is not assigned to node {}: result refused",
                result.job_id, result.attempt, session.node
            );
            send_error(socket, services, ErrorCode::NotAssigned, text).await?;
            return Ok(Handled::Bad);
        }
        Err(err) => {
            // Unacknowledged, the result stays in the agent's outbox
            // and comes back after it reconnects.
            tracing::error!(node_id = %session.node, job_id = %result.job_id, error = %err, "recording a result failed");
            return Err(Ending::new(CloseCode::Internal, "redis unavailable"));
        }
    }
    let ack = Message::ResultAck(JobRef {
        job_id: result.job_id,
        attempt: result.attempt,
    });
    send(socket, services, &ack).await?;
    Ok(Handled::Fine)
}
