//! One function per message a registered node sends that needs more than
//! a line: heartbeats, drains, refusals (results: `results.rs`); and what
//! this instance's stop reads and sends.

use lingua_shared::close::CloseCode;
use lingua_shared::protocol::{CapacityReport, Drain, JobCancel, JobRef, JobReject, RejectReason};
use lingua_shared::{Message, split_heartbeat};
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::ws::WebSocket;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until, timeout};

use super::NodeServices;
use super::results::Results;
use super::{
    BadFrames, Ending, Frame, Handled, MAX_LOGGED_CHARS, Session, feed, frame_of, instruct, take,
};
use crate::metrics::Direction;
use crate::registry::Control;

/// How long the stop spends with a node before the close: reading its
/// answers, writing its cancels, recording its results.
const STOP_WRITES: Duration = Duration::from_secs(1);
/// How long, of that, the stop waits for the node to answer the
/// assignments it was sent before it cancels the rest.
const STOP_ANSWERS: Duration = Duration::from_millis(500);

/// How `lingua_shared::encode` begins a heartbeat.
const HEARTBEAT_START: &[u8] = br#"{"type":"heartbeat","#;

/// A heartbeat frame, read only as far as needed: a capacity with the
/// same text as the node's last one is not read again (an idle node's
/// heartbeats are all alike), the report held is taken anew. `None` when
/// `frame` is not a heartbeat read this way ([`lingua_shared::decode`]
/// then says what it is).
pub(super) fn heartbeat_frame(
    services: &NodeServices,
    session: &mut Session,
    frame: &[u8],
) -> Option<Handled> {
    // Other frames (results, with their outputs) are not read twice: a
    // heartbeat encoded otherwise than `lingua_shared::encode` does it
    // goes through `decode`, to the same end.
    if !frame.starts_with(HEARTBEAT_START) {
        return None;
    }
    let (_, text) = split_heartbeat(frame)?;
    let report = if services
        .hints
        .report_again((&session.node, session.epoch), text)
    {
        None
    } else {
        Some(serde_json::from_str(text).ok()?)
    };
    services.metrics.frame(Direction::In, "heartbeat");
    Some(heartbeat(services, session, text, report))
}

/// A heartbeat whose capacity is the JSON `text`, with the report read
/// from it (`None`: the same text as the report held, taken again).
///
/// A heartbeat renews the connection. Recorded in Redis (in the next
/// batch) when the node's report changed since the last one recorded (at
/// most twice per interval), when the last one failed, or when the lease
/// recorded last would otherwise run short: unless the next heartbeat,
/// an interval later, would still leave half an interval of it. At the
/// default three-interval lease, an idle node's heartbeat costs Redis
/// something every other interval. Told to routing when the report
/// changed, while assignments to the node are unanswered, and after a
/// routing update of the node failed; an idle node's routing entries are
/// renewed by [`crate::route_batch::RouteBatcher`]'s sweep.
pub(super) fn heartbeat(
    services: &NodeServices,
    session: &mut Session,
    text: &str,
    report: Option<CapacityReport>,
) -> Handled {
    services.metrics.heartbeats.inc();
    let changed = report
        .as_ref()
        .is_some_and(|report| services.hints.changes(&session.node, report));
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
    if report.is_some() {
        // Made when a heartbeat of this report is recorded.
        session.capacity = None;
    }
    let capacity = record.then(|| session.capacity_json(text, report.as_ref()));
    if let Some(report) = report {
        let connection = (&session.node, session.epoch);
        services.hints.report_from(connection, report, text);
    }
    if changed || !services.hints.settled(&session.node) || services.batcher.missed(&session.node) {
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

/// This instance is stopping. First the node's frames are read, as
/// usual, and what the rest of the coordinator asked of the connection is
/// written, until the node has answered every assignment sent to it (for
/// up to [`STOP_ANSWERS`]): an accept on its way when the stop began is
/// read, and that job runs on where it started, its result recorded
/// wherever the node goes, rather than being cancelled there and run
/// again elsewhere. Then every attempt the node still has not answered
/// (it waits for room on the node, or never reached it) is cancelled,
/// ahead of the close, when its job goes on elsewhere: handed to another
/// instance, or (forwarded here) moved on by its dispatcher. Without the
/// cancel the node would still run it, for nothing: its result is refused
/// as superseded. An answer sent after all that is overtaken: an attempt
/// the node accepted stops at the cancel, and records nothing. With no
/// other instance to take its job, an attempt dispatched here is not
/// cancelled: the node's run of it, whose result is recorded once the
/// node is back, is the job's one chance before its deadline. Last, the
/// results being recorded are recorded, with the time left, also when
/// the node went away meanwhile: their dispatchers on other instances
/// hear of them, and the node gets their acknowledgements.
pub(super) async fn stopping<'a>(
    socket: &mut WebSocket,
    services: &'a NodeServices,
    (session, control, bad_frames): (&mut Session, &mut mpsc::Receiver<Control>, &mut BadFrames),
    results: &mut Results<'a>,
) -> Ending {
    let writes = async {
        let answered = answers(socket, services, (session, control, bad_frames), results).await;
        if answered.is_ok() {
            // What is left is written as the connection would, not lost.
            while let Ok(first) = control.try_recv() {
                if instruct(socket, services, session, (Some(first), control))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            let _ = cancels(socket, services, session).await;
        }
        while results.recording() {
            if let Some(recorded) = results.recorded().await {
                // Recorded whatever becomes of its acknowledgement.
                let _ = results
                    .answer(socket, services, &session.node, recorded)
                    .await;
            }
        }
    };
    // Sent with the close frame; a node that does not take them within
    // the time, or Redis slow to record, is closed without the rest.
    let _ = timeout(STOP_WRITES, writes).await;
    Ending::new(CloseCode::GoingAway, "coordinator shutting down")
}

/// Reads the node's frames, and writes what was asked of the connection,
/// as the connection does, until the node has answered every assignment
/// sent to it, or for [`STOP_ANSWERS`].
async fn answers<'a>(
    socket: &mut WebSocket,
    services: &'a NodeServices,
    (session, control, bad_frames): (&mut Session, &mut mpsc::Receiver<Control>, &mut BadFrames),
    results: &mut Results<'a>,
) -> Result<(), Ending> {
    let by = Instant::now() + STOP_ANSWERS;
    while !services.hints.settled(&session.node) {
        let received = tokio::select! {
            received = socket.recv(), if results.has_room() => received,
            Some(recorded) = results.recorded(), if results.recording() => {
                let handled = results.answer(socket, services, &session.node, recorded).await?;
                bad_frames.count(&handled)?;
                continue;
            }
            instruction = control.recv() => {
                instruct(socket, services, session, (instruction, control)).await?;
                results.sent();
                continue;
            }
            () = sleep_until(by) => return Ok(()),
        };
        if let Frame::Data(frame) = frame_of(received)? {
            let handled = take(socket, services, session, &frame, results).await?;
            bad_frames.count(&handled)?;
        }
    }
    Ok(())
}

/// Cancels the attempts the node has not answered whose jobs go on
/// elsewhere.
async fn cancels(
    socket: &mut WebSocket,
    services: &NodeServices,
    session: &Session,
) -> Result<(), Ending> {
    let (mut local, forwarded) = services.router.unanswered(&session.node);
    if !local.is_empty() && !services.router.hands_over().await {
        local.clear();
    }
    for key in local.into_iter().chain(forwarded) {
        let cancel = Message::JobCancel(JobCancel {
            job_id: key.job_id,
            attempt: key.attempt,
            reason: "coordinator stopping".into(),
        });
        feed(socket, services, &cancel).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use lingua_shared::protocol::Heartbeat;
    use lingua_shared::{Message, encode};

    use super::*;

    #[test]
    fn an_encoded_heartbeat_begins_as_the_fast_path_expects() {
        let beat = Message::Heartbeat(Heartbeat {
            seq: 7,
            capacity: CapacityReport::default(),
        });
        assert!(encode(&beat).as_bytes().starts_with(HEARTBEAT_START));
    }
}
