//! Several coordinators on one Redis (or Redis Cluster).
//!
//! Each instance announces itself with a presence key that expires unless
//! renewed, and reads its own inbox, a Redis stream, with a consumer group
//! ([`crate::inbox`]). A job accepted by instance A for a node
//! whose socket instance B holds (the node's hash records B) goes to B's
//! inbox as an [`Envelope::Assign`]; B hands it to the node and sends the
//! node's answers back to A's inbox ([`Envelope::Answer`]). Whichever
//! instance records a job's result tells the job's dispatcher. When B's
//! presence expires, A moves B's attempts on; any instance reaps a dead
//! instance's inbox. docs/ARCHITECTURE.md has the sequence.
//!
//! This module holds the messages and how to post them; [`crate::inbox`]
//! runs the loops that announce this instance and read its inbox.

use lingua_shared::protocol::{JobAssign, JobCancel, JobRef, RejectReason};
use lingua_shared::{JobId, JobKind, LangPair, NodeId};
use serde::{Deserialize, Serialize};

use tokio_util::task::TaskTracker;

use crate::store::{Store, StoreError};

/// A message between coordinator instances.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Envelope {
    /// For the holder of `node`: send it this assignment; `origin`
    /// dispatches the job and wants the answers. Read by
    /// [`Envelope::read`], not by serde.
    #[serde(skip_deserializing)]
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
    /// For an instance with jobs waiting for room in `pair`: a routing
    /// update of the pair showed room (the head of each queue may try).
    Capacity {
        /// The language pair.
        pair: LangPair,
        /// The kinds with room.
        kinds: Vec<JobKind>,
    },
    /// For a live instance: take over the dispatch of a job that `from`
    /// held with no attempt in flight at `attempt`: it stopped, or died
    /// with the job queued.
    Adopt {
        /// The instance that stopped or died.
        from: String,
        /// The job's pair (the slot of its record).
        pair: LangPair,
        /// The job.
        job_id: JobId,
        /// The attempt it stood at: taken over only from there.
        attempt: u32,
    },
    /// For the instance a node moved to (its holder stopped) while it runs
    /// `job`, which `origin` dispatches: tell `origin` what becomes of it,
    /// as of an attempt forwarded there and accepted.
    Watch {
        /// The dispatching instance.
        origin: String,
        /// The node.
        node: NodeId,
        /// The attempt.
        job: JobRef,
        /// The job's pair.
        pair: LangPair,
        /// The job's kind.
        kind: JobKind,
        /// Whether it runs on the kind's fallback.
        fallback: bool,
    },
    /// For a job's dispatcher: what became of one attempt.
    Answer {
        /// The attempt.
        job: JobRef,
        /// What became of it.
        answer: RemoteAnswer,
    },
}

impl Envelope {
    /// An envelope from its text. An assignment is read straight from the
    /// text: serde reads an internally tagged enum through a buffer, which
    /// cannot keep its payload as written ([`lingua_shared::RawJson`]).
    pub fn read(text: &str) -> Result<Self, serde_json::Error> {
        #[derive(Deserialize)]
        struct Tag<'a> {
            #[serde(rename = "type", borrow)]
            ty: std::borrow::Cow<'a, str>,
        }
        #[derive(Deserialize)]
        struct Assign {
            origin: String,
            node: NodeId,
            assign: JobAssign,
        }
        if serde_json::from_str::<Tag<'_>>(text)?.ty == "assign" {
            let Assign {
                origin,
                node,
                assign,
            } = serde_json::from_str(text)?;
            return Ok(Envelope::Assign {
                origin,
                node,
                assign,
            });
        }
        serde_json::from_str(text)
    }
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
    /// The assignment never reached the node (its socket is no longer
    /// held there), or the instance holding it stopped before the node
    /// answered and cancelled it: not the node's failure, so no attempt is
    /// used up. (An older instance ignores it, and moves the attempt on
    /// once the holder's presence is gone, or at the accept timeout.)
    Withdrawn,
    /// The node accepted, and the instance holding it stopped: the node
    /// runs the job on while it moves to another instance, which records
    /// its result. (An older instance ignores it, and moves the attempt
    /// on once the holder's presence is gone.)
    Moving,
}

/// Appends `envelope` to `instance`'s inbox; false when that instance is
/// gone (its inbox with it).
pub async fn send(store: &Store, instance: &str, envelope: &Envelope) -> Result<bool, StoreError> {
    let text = serde_json::to_string(envelope).expect("envelopes serialise");
    store.inbox_push(instance, &text).await
}

/// [`send`] in the background, as a task of `tasks`. A failure is logged:
/// the receiver's timeouts cover a message that never arrives.
pub fn post(store: &Store, tasks: &TaskTracker, instance: String, envelope: Envelope) {
    let store = store.clone();
    tasks.spawn(async move {
        if let Err(err) = send(&store, &instance, &envelope).await {
            tracing::warn!(%instance, error = %err, "cannot reach another coordinator instance's inbox");
        }
    });
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
            // Kept as written across the hop: a rewrite would change it.
            payload: serde_json::from_str(r#"{"z": 1.50,  "a": [ ]}"#).unwrap(),
            timeout_ms: 1000,
            device: lingua_shared::protocol::DeviceChoice::Gpu,
            answer_within_ms: Some(500),
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
                job: job.clone(),
                answer: RemoteAnswer::Finished,
            },
            Envelope::Answer {
                job: job.clone(),
                answer: RemoteAnswer::Moving,
            },
            Envelope::Watch {
                origin: "a".into(),
                node: NodeId::new("gpu-1").unwrap(),
                job,
                pair: "zh:en".parse().unwrap(),
                kind: lingua_shared::JobKind::new("asr").unwrap(),
                fallback: false,
            },
            Envelope::Adopt {
                from: "b".into(),
                pair: "zh:en".parse().unwrap(),
                job_id: lingua_shared::JobId::new("j-2").unwrap(),
                attempt: 3,
            },
        ] {
            let text = serde_json::to_string(&envelope).unwrap();
            assert_eq!(Envelope::read(&text).unwrap(), envelope);
        }
        assert!(Envelope::read("{\"type\":\"bogus\"}").is_err());
    }
}
