//! This instance's side of several coordinators: its presence in Redis,
//! kept alive ([`announce`]), and its inbox, read and acted on
//! ([`receive`]). The messages are [`crate::forward`]'s.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use lingua_shared::protocol::{JobAssign, JobRef};
use lingua_shared::{Message, NodeId};
use tokio_util::sync::CancellationToken;

use crate::forward::{Envelope, RemoteAnswer};
use crate::jobs::JobRouter;
use crate::registry::{Control, Registry};
use crate::store::{Route, Store};

/// How long one inbox read blocks before the loop looks around.
const READ_BLOCK: Duration = Duration::from_secs(2);

/// What the presence and inbox loops use.
pub struct Peers {
    /// Redis.
    pub store: Store,
    /// Job routing: forwarded attempts and remote answers.
    pub router: Arc<JobRouter>,
    /// Node sockets held here.
    pub registry: Arc<Registry>,
    /// This coordinator instance's random id.
    pub instance: String,
    /// Cancelled when this instance starts to stop (it still serves its
    /// nodes and inbox a while).
    pub leaving: CancellationToken,
}

/// Keeps this instance's presence (`listen`) alive every `every`, for
/// `ttl`, reaps instances that died, and moves on attempts held by dead
/// instances. Once `leaving`, it says it is stopping; on `stop` the
/// instance removes itself.
pub async fn announce(
    peers: Arc<Peers>,
    listen: String,
    every: Duration,
    ttl: Duration,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(every);
    let mut left = false;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            // Stopping: no more jobs are handed to this instance, at once.
            () = peers.leaving.cancelled(), if !left => left = true,
            () = stop.cancelled() => break,
        }
        // A stop that began meanwhile is said now, not a tick later (its
        // `hands_over` has said it already: this write must not undo it).
        left |= peers.leaving.is_cancelled();
        if let Err(err) = peers
            .store
            .instance_alive(&peers.instance, &listen, (ttl, left))
            .await
        {
            tracing::warn!(error = %err, "cannot renew this instance's presence");
            continue;
        }
        match peers.store.reap_instances().await {
            Ok(reaped) => {
                for instance in reaped {
                    tracing::info!(%instance, "cleaned up after a coordinator instance that went away");
                }
            }
            Err(err) => tracing::warn!(error = %err, "cannot look for dead instances"),
        }
        peers.router.check_holders().await;
        peers.router.still_waiting(ttl).await;
    }
    if let Err(err) = peers.store.instance_gone(&peers.instance).await {
        tracing::warn!(error = %err, "cannot remove this instance's presence");
    }
}

/// Reads this instance's inbox until `stop`, on a connection of its own
/// (the read blocks), and acts on each message.
pub async fn receive(peers: Arc<Peers>, stop: CancellationToken) {
    // Jittered, so that instances that lost Redis together do not come
    // back in step.
    let backoff = ExponentialBuilder::new()
        .with_jitter()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .without_max_times();
    let mut pauses = backoff.build();
    loop {
        let opened = match peers.store.dedicated().await {
            Ok(reader) => match reader.inbox_open(&peers.instance).await {
                Ok(()) => Ok(reader),
                Err(err) => Err(format!("cannot open this instance's inbox: {err}")),
            },
            Err(err) => Err(format!("cannot open the inbox connection: {err}")),
        };
        let reader = match opened {
            Ok(reader) => reader,
            Err(why) => {
                let pause = pauses.next().unwrap_or(Duration::from_secs(5));
                tracing::warn!(reason = %why, retry_in_ms = pause.as_millis() as u64, "inbox unavailable");
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = stop.cancelled() => return,
                }
                continue;
            }
        };
        pauses = backoff.build();
        loop {
            let read = tokio::select! {
                read = reader.inbox_read(&peers.instance, READ_BLOCK) => read,
                () = stop.cancelled() => return,
            };
            let entries = match read {
                Ok(entries) => entries,
                Err(err) => {
                    tracing::warn!(error = %err, "reading the inbox failed; reconnecting");
                    break;
                }
            };
            let ids: Vec<String> = entries.iter().map(|(id, _)| id.clone()).collect();
            for (_, text) in entries {
                match Envelope::read(&text) {
                    Ok(envelope) => deliver(&peers, envelope).await,
                    Err(err) => tracing::warn!(error = %err, "ignoring a malformed inbox entry"),
                }
            }
            if let Err(err) = reader.inbox_ack(&peers.instance, &ids).await {
                tracing::warn!(error = %err, "acknowledging inbox entries failed");
            }
        }
    }
}

async fn deliver(peers: &Peers, envelope: Envelope) {
    match envelope {
        Envelope::Assign {
            origin,
            node,
            assign,
        } => forwarded(peers, origin, &node, assign),
        Envelope::Drain { node, reason } => {
            peers.registry.drain(&node, reason);
        }
        Envelope::Cancel { node, cancel } => {
            // Its sender gave up on the attempt: whether or not the node
            // ever answers, it holds no room here any longer.
            peers.router.forget_forwarded(&JobRef {
                job_id: cancel.job_id.clone(),
                attempt: cancel.attempt,
            });
            peers
                .registry
                .send(&node, Control::Send(Box::new(Message::JobCancel(cancel))));
        }
        Envelope::Answer { job, answer } => peers.router.remote_answer(&job, answer),
        Envelope::Watch {
            origin,
            node,
            job,
            pair,
            kind,
            fallback,
        } => {
            let route = Route { kind, fallback };
            if !peers
                .router
                .watch_forwarded(job.clone(), &node, (route, pair), &origin)
            {
                // Gone from here already: the node moves on, and its
                // dispatcher looks for it again.
                peers.router.tell_later(origin, job, RemoteAnswer::Moving);
            }
        }
        Envelope::Adopt {
            from,
            pair,
            job_id,
            attempt,
        } => peers.router.adopt(from, pair, (job_id, attempt)),
        Envelope::Capacity { pair, kinds } => peers.router.room_in(pair, &kinds),
    }
}

/// An assignment another instance (`origin`) forwarded for `node`, held
/// here: sent on to the node, or answered at once when it cannot be.
fn forwarded(peers: &Peers, origin: String, node: &NodeId, assign: JobAssign) {
    let job = JobRef {
        job_id: assign.job_id.clone(),
        attempt: assign.attempt,
    };
    if peers.leaving.is_cancelled() {
        // Stopping: its nodes are about to move, and new work for them
        // goes elsewhere, as if the node were not held here.
        peers
            .router
            .tell_later(origin, job, RemoteAnswer::Withdrawn);
        return;
    }
    peers.router.note_forwarded(
        job.clone(),
        node,
        (crate::jobs::route_of(&assign), assign.pair),
        &origin,
    );
    let sent = peers
        .registry
        .send(node, Control::Send(Box::new(Message::JobAssign(assign))));
    if !sent {
        peers.router.forget_forwarded(&job);
        // Not held here (its socket closed, by this instance's stop say):
        // it never reached the node, which uses up no attempt. Held, but
        // closing or stalled: that counts, as a silence.
        let answer = if peers.registry.get(node).is_some() {
            RemoteAnswer::Lost
        } else {
            RemoteAnswer::Withdrawn
        };
        peers.router.tell_later(origin, job, answer);
    }
}
