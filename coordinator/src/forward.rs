//! Several coordinators on one Redis (or Redis Cluster).
//!
//! Each instance announces itself with a presence key that expires unless
//! renewed ([`announce`]), and reads its own inbox, a Redis stream, with a
//! consumer group ([`receive`]). A job accepted by instance A for a node
//! whose socket instance B holds (the node's hash records B) goes to B's
//! inbox as an [`Envelope::Assign`]; B hands it to the node and sends the
//! node's answers back to A's inbox ([`Envelope::Answer`]). Whichever
//! instance records a job's result tells the job's dispatcher. When B's
//! presence expires, A moves B's attempts on; any instance reaps a dead
//! instance's inbox. docs/ARCHITECTURE.md has the sequence.

use std::sync::Arc;
use std::time::Duration;

use lingua_shared::protocol::{JobAssign, JobCancel, JobRef, RejectReason};
use lingua_shared::{Message, NodeId};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::registry::Control;
use crate::server::Shared;
use crate::store::{Store, StoreError};

/// How long one inbox read blocks before the loop looks around.
const READ_BLOCK: Duration = Duration::from_secs(2);

/// A message between coordinator instances.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Envelope {
    /// For the holder of `node`: send it this assignment; `origin`
    /// dispatches the job and wants the answers.
    Assign {
        /// The dispatching instance.
        origin: String,
        /// The node.
        node: NodeId,
        /// The assignment.
        assign: JobAssign,
    },
    /// For the holder of `node`: drain it (an admin asked another
    /// instance).
    Drain {
        /// The node.
        node: NodeId,
        /// Why, for the node's log.
        reason: String,
    },
    /// For the holder of `node`: send it this cancel.
    Cancel {
        /// The node.
        node: NodeId,
        /// The cancel.
        cancel: JobCancel,
    },
    /// For a job's dispatcher: what became of one attempt.
    Answer {
        /// The attempt.
        job: JobRef,
        /// What became of it.
        answer: RemoteAnswer,
    },
}

/// What became of a forwarded attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum RemoteAnswer {
    /// The node accepted it.
    Accepted,
    /// The node refused it.
    Rejected {
        /// Why.
        reason: RejectReason,
        /// The node's words.
        message: String,
    },
    /// Its result is recorded.
    Finished,
    /// The node is gone (or was never there).
    Lost,
}

/// Appends `envelope` to `instance`'s inbox.
pub async fn send(store: &Store, instance: &str, envelope: &Envelope) -> Result<(), StoreError> {
    let text = serde_json::to_string(envelope).expect("envelopes serialise");
    store.inbox_push(instance, &text).await
}

/// [`send`] in the background. A failure is logged: the receiver's
/// timeouts cover a message that never arrives.
pub fn post(store: &Store, instance: String, envelope: Envelope) {
    let store = store.clone();
    tokio::spawn(async move {
        if let Err(err) = send(&store, &instance, &envelope).await {
            tracing::warn!(%instance, error = %err, "cannot reach another coordinator instance's inbox");
        }
    });
}

/// Keeps this instance's presence alive every heartbeat interval, reaps
/// instances that died, and moves on attempts held by dead instances. On
/// `stop` the instance removes itself.
pub async fn announce(shared: Arc<Shared>, listen: String, stop: CancellationToken) {
    let ttl = shared.config.lease();
    let mut ticker = tokio::time::interval(shared.config.heartbeat_interval);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            () = stop.cancelled() => break,
        }
        if let Err(err) = shared
            .store
            .instance_alive(&shared.instance, &listen, ttl)
            .await
        {
            tracing::warn!(error = %err, "cannot renew this instance's presence");
            continue;
        }
        match shared.store.reap_instances().await {
            Ok(reaped) => {
                for instance in reaped {
                    tracing::info!(%instance, "cleaned up after a coordinator instance that went away");
                }
            }
            Err(err) => tracing::warn!(error = %err, "cannot look for dead instances"),
        }
        shared.router.check_holders().await;
    }
    if let Err(err) = shared.store.instance_gone(&shared.instance).await {
        tracing::warn!(error = %err, "cannot remove this instance's presence");
    }
}

/// Reads this instance's inbox until `stop`, on a connection of its own
/// (the read blocks), and acts on each message.
pub async fn receive(shared: Arc<Shared>, stop: CancellationToken) {
    let mut pause = Duration::from_millis(100);
    loop {
        let reader = match shared.store.dedicated().await {
            Ok(reader) => reader,
            Err(err) => {
                tracing::warn!(error = %err, "cannot open the inbox connection; retrying");
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = stop.cancelled() => return,
                }
                pause = (pause * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        if let Err(err) = reader.inbox_open(&shared.instance).await {
            tracing::warn!(error = %err, "cannot open this instance's inbox; retrying");
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = stop.cancelled() => return,
            }
            continue;
        }
        pause = Duration::from_millis(100);
        loop {
            let read = tokio::select! {
                read = reader.inbox_read(&shared.instance, READ_BLOCK) => read,
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
                match serde_json::from_str::<Envelope>(&text) {
                    Ok(envelope) => deliver(&shared, envelope).await,
                    Err(err) => tracing::warn!(error = %err, "ignoring a malformed inbox entry"),
                }
            }
            if let Err(err) = reader.inbox_ack(&shared.instance, &ids).await {
                tracing::warn!(error = %err, "acknowledging inbox entries failed");
            }
        }
    }
}

async fn deliver(shared: &Shared, envelope: Envelope) {
    match envelope {
        Envelope::Assign {
            origin,
            node,
            assign,
        } => {
            let job = JobRef {
                job_id: assign.job_id.clone(),
                attempt: assign.attempt,
            };
            shared
                .router
                .note_forwarded(job.clone(), &node, assign.kind.clone(), &origin);
            let sent = shared
                .registry
                .send(&node, Control::Send(Box::new(Message::JobAssign(assign))));
            if !sent {
                shared.router.forget_forwarded(&job);
                shared.router.tell_later(origin, job, RemoteAnswer::Lost);
            }
        }
        Envelope::Drain { node, reason } => {
            shared.registry.drain(&node, reason);
        }
        Envelope::Cancel { node, cancel } => {
            shared
                .registry
                .send(&node, Control::Send(Box::new(Message::JobCancel(cancel))));
        }
        Envelope::Answer { job, answer } => shared.router.remote_answer(&job, answer),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_as_json() {
        let assign = JobAssign {
            job_id: lingua_shared::JobId::new("j-1").unwrap(),
            attempt: 2,
            kind: lingua_shared::JobKind::new("asr").unwrap(),
            pair: "zh:en".parse().unwrap(),
            session_id: None,
            payload: serde_json::json!({"text": "hi"}),
            timeout_ms: 1000,
        };
        let job = JobRef {
            job_id: assign.job_id.clone(),
            attempt: 2,
        };
        for envelope in [
            Envelope::Assign {
                origin: "a".into(),
                node: NodeId::new("gpu-1").unwrap(),
                assign,
            },
            Envelope::Answer {
                job: job.clone(),
                answer: RemoteAnswer::Rejected {
                    reason: RejectReason::NoCapacity,
                    message: "full".into(),
                },
            },
            Envelope::Answer {
                job,
                answer: RemoteAnswer::Finished,
            },
        ] {
            let text = serde_json::to_string(&envelope).unwrap();
            assert_eq!(serde_json::from_str::<Envelope>(&text).unwrap(), envelope);
        }
        assert!(serde_json::from_str::<Envelope>("{\"type\":\"bogus\"}").is_err());
    }
}
