//! Job routing: from `POST /v1/jobs` to exactly one terminal state.
//!
//! Each job has one dispatcher (the waiting request's task, else a task of
//! its own, `submit.rs`): pick a node and record the attempt
//! (one `route_pick` call, which at the job's arrival also records the
//! job), send `job_assign`, and wait for the node's answer. A refusal, an assignment not answered
//! within `accept_timeout_ms`, or the node's connection dying moves the job
//! to another node with a new attempt number, up to `max_attempts`. Results
//! are recorded by `job_finish`, fenced by attempt, so a late result of a
//! superseded attempt is acknowledged and ignored; the answer is built from
//! what `job_finish` recorded, not read back. docs/ARCHITECTURE.md
//! draws the lifecycle.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use lingua_shared::protocol::{
    Device, DeviceChoice, FailureCode, JobAssign, JobCancel, JobRef, JobResult, Outcome,
    RejectReason,
};
use lingua_shared::sync::lock;
use lingua_shared::{JobId, JobKind, LangCode, LangPair, Message, NodeId, RawJson, encoded_len};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Caller;
use crate::config::Config;
use crate::forward::{self, Envelope, RemoteAnswer};
use crate::hints::{Assigned, Hints};
use crate::metrics::{Metrics, QueueLabel};
use crate::queue::{QueueKey, Queues, Shed, Turn, Waiting};
use crate::registry::{Control, Registry};
use crate::store::{
    Finish, JobPick, JobRecord, JobStart, JobStatus, NewJob, PickOn, Route, Store, StoreError,
    wall_clock_ms,
};

/// How long a session keeps preferring the node that served it last.
const SESSION_AFFINITY: Duration = Duration::from_secs(600);
/// How often a wait on a job dispatched elsewhere re-reads Redis: at
/// first soon (most such jobs are a duplicate submission about to end),
/// then less and less often, up to `REMOTE_POLL_MAX`.
const REMOTE_POLL: Duration = Duration::from_millis(10);
const REMOTE_POLL_MAX: Duration = Duration::from_millis(250);
/// How long past its deadline a running job must be before any instance
/// ends it as an orphan: its own dispatcher ends it at the deadline.
const ORPHAN_GRACE_MS: u64 = 2_000;
/// How long a takeover asked for by a read stands before a read asks
/// again: should the message be lost on the way (or read by an instance
/// stopping since), the job is asked for anew. Longer than a takeover's
/// tries while Redis refuses at once (about 3 s); while it hangs, a
/// second takeover may start beside the first, and `job_adopt` lets one
/// of them through.
const ASK_AGAIN_AFTER_MS: u64 = 10_000;
/// How many leases an instance's record of waiting jobs lasts (renewed
/// every heartbeat interval while jobs wait; clocks may differ a little).
const WAITING_TTL_LEASES: u32 = 3;
/// The shortest Retry-After given with `no_capacity`.
const MIN_RETRY_AFTER: Duration = Duration::from_secs(1);

mod answers;
mod attempts;
mod dispatch;
mod failure;
mod lookup;
mod pick;
mod remote;
mod request;
mod submit;
mod takeover;
mod timing;
mod view;

pub use request::{Job, JobRequest};
pub use submit::Submitted;
pub use timing::Timing;
use view::Ended;
pub use view::{JobErrorCode, JobView};

/// What a dispatcher hears about its current attempt.
#[derive(Debug)]
enum AttemptEvent {
    Accepted,
    Rejected(RejectReason, String),
    /// The result is recorded: its view when this instance recorded it
    /// (else the dispatcher reads it back).
    Finished(Option<Box<JobView>>),
    NodeLost,
    /// Forwarded, unanswered, and cancelled by its holder's stop.
    Withdrawn,
    /// Forwarded and accepted; its holder stopped, and the node runs it on
    /// while it moves to another instance.
    Moving,
}

/// Why a submission could not be dispatched at all.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The id belongs to a different request.
    #[error("job id {0} is already used by a different request")]
    Conflict(JobId),
    /// It would wait behind others while this instance's admission queue
    /// is full.
    #[error("the admission queue is full")]
    QueueFull {
        /// When it is worth submitting again.
        retry_after: Duration,
    },
    /// Redis failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Its dispatch ended before saying whether the job was recorded
    /// (it panicked).
    #[error("the job's dispatch stopped before the job was recorded")]
    Stopped,
    /// This instance is stopping: the dispatch stopped where nothing is
    /// lost (the job handed over, or running on its node).
    #[error("the coordinator is stopping")]
    Stopping,
}

struct Waiter {
    request: String,
    terminal: watch::Sender<Option<JobView>>,
}

/// Routes jobs; shared by the HTTP handlers and the node connections.
pub struct JobRouter {
    store: Store,
    registry: Arc<Registry>,
    config: Config,
    instance: String,
    attempts: Mutex<HashMap<JobRef, Attempt>>,
    forwarded: Mutex<HashMap<JobRef, Forwarded>>,
    waiters: Mutex<HashMap<JobId, Arc<Waiter>>>,
    hints: Arc<Hints>,
    /// Jobs waiting for room, per pair and kind (routing updates wake them).
    queues: Arc<Mutex<Queues>>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    /// Dispatchers (in a request's task or their own) and messages posted
    /// to other instances, awaited on shutdown ([`JobRouter::finish`]).
    tasks: TaskTracker,
    /// Jobs being recorded again after a reply that did not come
    /// ([`JobRouter::reopen`]); at most `max_queued`.
    reopening: AtomicUsize,
    /// The next submission's mark in its job's record.
    openers: AtomicU64,
    /// Abandoned jobs this instance asked itself to take over, by the
    /// instance that left them and the attempt they stood at, with when
    /// the asking lapses (ms): asked once, not once per read
    /// ([`JobRouter::record`]); forgotten at the job's deadline or
    /// [`ASK_AGAIN_AFTER_MS`] after the asking, whichever comes first, or
    /// when the asking or the takeover failed. Left again (by another
    /// taker that died too, or at a later attempt), a job is asked for
    /// again.
    adopting: Mutex<HashMap<Adopting, u64>>,
    /// Stopping, whether another live instance takes this one's jobs
    /// over: asked of Redis once ([`JobRouter::hands_over`]).
    successor: tokio::sync::OnceCell<bool>,
}

impl JobRouter {
    /// A router over `store`, sending through the sockets of `registry`,
    /// counting its assignments in `hints`; jobs without room wait in
    /// `queues`, which routing updates wake. On
    /// `shutdown` dispatching stops: jobs in flight stay `running` in Redis
    /// and their results are recorded by whichever coordinator receives
    /// them.
    pub fn new(
        store: Store,
        registry: Arc<Registry>,
        config: Config,
        instance: String,
        (hints, queues): (Arc<Hints>, Arc<Mutex<Queues>>),
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            store,
            registry,
            config,
            instance,
            attempts: Mutex::default(),
            forwarded: Mutex::default(),
            waiters: Mutex::default(),
            hints,
            queues,
            metrics,
            shutdown,
            tasks: TaskTracker::new(),
            reopening: AtomicUsize::new(0),
            openers: AtomicU64::new(0),
            adopting: Mutex::default(),
            successor: tokio::sync::OnceCell::new(),
        }
    }

    /// After shutdown: waits up to `limit` for the dispatchers (they stop
    /// at once, leaving their jobs `running` in Redis) and the messages
    /// posted to other instances. False when some were still running.
    pub async fn finish(&self, limit: Duration) -> bool {
        self.tasks.close();
        tokio::time::timeout(limit, self.tasks.wait()).await.is_ok()
    }

    /// Jobs waiting in this instance's admission queues.
    pub fn queued(&self) -> usize {
        lock(&self.queues).total()
    }
}

/// What became of a result a node reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// Recorded, or a duplicate or stale one: the node may forget it.
    Acknowledged,
    /// The attempt is assigned to another node: refused.
    Foreign,
}

/// The route an assignment was picked from: a GPU's room when it may run
/// on a GPU only, the kind's fallback room when it may run anywhere.
pub fn route_of(assign: &JobAssign) -> Route {
    match assign.device {
        DeviceChoice::Gpu => Route::gpu(&assign.kind),
        DeviceChoice::Any => Route::fallback(&assign.kind),
    }
}

/// One attempt in flight: where it went, and its dispatcher's inbox.
struct Attempt {
    node: NodeId,
    pair: LangPair,
    route: Route,
    events: mpsc::UnboundedSender<AttemptEvent>,
    /// Counted in the node's hints until the node's first answer, taken
    /// (dropped) by the socket task that reads it, in frame order with the
    /// node's reports.
    assigned: Option<Assigned>,
    /// The instance the assignment was forwarded to, when another one
    /// holds the node's socket.
    holder: Option<String>,
    /// Since when the node, which accepted, moves to another instance (its
    /// holder stopped): until it is back, or a lease has passed.
    moving_since: Option<Instant>,
    /// The node moved once, with the job running: should the instance it
    /// came back to go away, the node moves again, with the job.
    moved: bool,
}

/// An assignment another instance forwarded here, for a node whose socket
/// this instance holds: where the node's answers must go.
struct Forwarded {
    node: NodeId,
    pair: LangPair,
    route: Route,
    origin: String,
    /// Counted in the node's hints until its first answer.
    counted: bool,
}

/// The time a job recorded with `deadline_ms` has left, now, at most its
/// `timeout` (a deadline Redis holds is trusted no further).
fn remaining(deadline_ms: u64, timeout: Duration) -> Duration {
    Duration::from_millis(deadline_ms.saturating_sub(wall_clock_ms())).min(timeout)
}

/// A takeover asked for: the job, the instance that left it, the attempt
/// it stood at.
type Adopting = (JobId, String, u32);

/// How an attempt ended for its dispatcher.
enum Tried {
    /// The node finished it (its result is recorded): its view when this
    /// instance recorded it.
    Finished(Option<Box<JobView>>),
    /// The node said "not now", or the assignment never reached it (no
    /// live instance holds its socket): try another, as long as time
    /// allows, without using up an attempt.
    Skip(JobErrorCode, String),
    /// The node did not answer or went away: try another, up to
    /// `max_attempts`.
    Move(JobErrorCode, String),
    /// The job's time ran out.
    TimedOut,
    /// This instance is stopping while the node runs the job: its result
    /// is recorded by whichever instance it reaches.
    Stopped,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recorded_deadline_gives_at_most_the_jobs_timeout() {
        let timeout = Duration::from_secs(5);
        assert_eq!(remaining(u64::MAX, timeout), timeout, "no overflow");
        assert_eq!(remaining(0, timeout), Duration::ZERO, "long past");
        let later = remaining(wall_clock_ms() + 3_600_000, timeout);
        assert_eq!(later, timeout, "an hour left, five seconds given");
    }
}
