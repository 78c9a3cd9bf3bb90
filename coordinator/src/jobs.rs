//! Job routing: from `POST /v1/jobs` to exactly one terminal state.
//!
//! Each job is dispatched by one task: pick a node (one `route_pick` call),
//! record the attempt (`job_start`, later `job_attempt`), send `job_assign`,
//! and wait for the node's answer. A refusal, an assignment not answered
//! within `accept_timeout_ms`, or the node's connection dying moves the job
//! to another node with a new attempt number, up to `max_attempts`. Results
//! are recorded by `job_finish`, fenced by attempt, so a late result of a
//! superseded attempt is acknowledged and ignored. docs/ARCHITECTURE.md
//! draws the lifecycle.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use lingua_shared::protocol::{
    FailureCode, JobAssign, JobCancel, JobRef, JobResult, Outcome, RejectReason,
};
use lingua_shared::{JobId, JobKind, LangCode, LangPair, Message, NodeId, encoded_len};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::futures::Notified;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::auth::Caller;
use crate::config::Config;
use crate::forward::{self, Envelope, RemoteAnswer};
use crate::metrics::{JobLabel, Metrics, ResultLabel};
use crate::registry::{Control, Registry};
use crate::store::{Finish, JobRecord, JobStart, Pick, Store, StoreError, wall_clock_ms};

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
/// Longest wait for a capacity report before picking again.
const CAPACITY_POLL: Duration = Duration::from_millis(50);

/// Why a job failed (the `error.code` of the API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Nothing serves the pair and kind.
    NoNodes,
    /// Every candidate refused, up to `max_attempts`.
    NoCapacity,
    /// The job did not finish within its timeout.
    Timeout,
    /// The executor on the node failed.
    ExecutorFailed,
    /// The nodes running it went away and attempts ran out.
    NodeLost,
    /// The node cancelled it.
    Cancelled,
}

impl ErrorCode {
    /// The code as the API writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NoNodes => "no_nodes",
            ErrorCode::NoCapacity => "no_capacity",
            ErrorCode::Timeout => "timeout",
            ErrorCode::ExecutorFailed => "executor_failed",
            ErrorCode::NodeLost => "node_lost",
            ErrorCode::Cancelled => "cancelled",
        }
    }

    /// The HTTP status answering a job failed with this code.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::NoNodes | ErrorCode::NoCapacity | ErrorCode::NodeLost => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ErrorCode::Timeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::ExecutorFailed | ErrorCode::Cancelled => StatusCode::BAD_GATEWAY,
        }
    }
}

/// The body of `POST /v1/jobs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    /// Client-chosen id (idempotency key); generated when absent.
    pub id: Option<String>,
    /// Job kind.
    pub kind: String,
    /// Source language.
    pub src_lang: String,
    /// Target language.
    pub tgt_lang: String,
    /// Session, for affinity.
    pub session_id: Option<String>,
    /// Opaque input.
    #[serde(default)]
    pub payload: Value,
    /// Time limit; the config's default when absent.
    pub timeout_ms: Option<u64>,
}

/// A validated job.
#[derive(Debug, Clone)]
pub struct Job {
    /// Its id.
    pub id: JobId,
    /// Its kind.
    pub kind: JobKind,
    /// Its pair.
    pub pair: LangPair,
    /// Its session.
    pub session: Option<String>,
    /// Its payload.
    pub payload: Value,
    /// Its time limit.
    pub timeout: Duration,
    /// Who submitted it: a client token's fingerprint, empty for admins.
    pub owner: String,
}

impl Job {
    /// Validates a request; the error text says which field is wrong.
    pub fn from_request(
        request: JobRequest,
        default_timeout: Duration,
        owner: String,
    ) -> Result<Self, String> {
        let id = match request.id {
            Some(id) => JobId::new(id).map_err(|e| e.to_string())?,
            None => JobId::new(format!("job-{:032x}", rand::random::<u128>()))
                .map_err(|e| e.to_string())?,
        };
        let kind = JobKind::new(request.kind).map_err(|e| e.to_string())?;
        let src: LangCode = request
            .src_lang
            .parse()
            .map_err(|e| format!("src_lang: {e}"))?;
        let tgt: LangCode = request
            .tgt_lang
            .parse()
            .map_err(|e| format!("tgt_lang: {e}"))?;
        let pair = LangPair::new(src, tgt).map_err(|e| e.to_string())?;
        let session = match request.session_id {
            Some(session) => Some(
                JobId::new(session)
                    .map_err(|e| {
                        format!(
                            "session_id: {}",
                            e.to_string().replacen("job id", "session id", 1)
                        )
                    })?
                    .to_string(),
            ),
            None => None,
        };
        let timeout = match request.timeout_ms {
            None => default_timeout,
            Some(0) => return Err("timeout_ms must be at least 1".into()),
            Some(ms) if ms > 3_600_000 => {
                return Err("timeout_ms must be at most 3600000 (one hour)".into());
            }
            Some(ms) => Duration::from_millis(ms),
        };
        Ok(Self {
            id,
            kind,
            pair,
            session,
            payload: request.payload,
            timeout,
            owner,
        })
    }

    /// The request as stored, for comparing resubmissions: the same id with
    /// a different canonical request is a conflict.
    /// The owner is part of it: another client reusing the id conflicts
    /// instead of reading someone else's job.
    fn canonical(&self) -> String {
        let mut request = json!({
            "kind": self.kind,
            "pair": self.pair,
            "session_id": self.session,
            "payload": self.payload,
            "timeout_ms": self.timeout.as_millis() as u64,
        });
        if !self.owner.is_empty() {
            request["owner"] = json!(self.owner);
        }
        request.to_string()
    }
}

impl Job {
    /// The size of this job's `job_assign` frame, at its largest (attempt
    /// and timeout at their widest): a job over the frame limit could
    /// never reach a node.
    pub fn assign_frame_len(&self) -> usize {
        let envelope = Message::JobAssign(JobAssign {
            job_id: self.id.clone(),
            attempt: u32::MAX,
            kind: self.kind.clone(),
            pair: self.pair,
            session_id: self.session.clone(),
            payload: Value::Null,
            timeout_ms: u64::MAX,
        });
        encoded_len(&envelope) - "null".len() + encoded_len(&self.payload)
    }
}

/// The owner recorded in a canonical request (empty: an admin's job).
fn owner_of(request: &str) -> String {
    serde_json::from_str::<Value>(request)
        .ok()
        .and_then(|r| r["owner"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// A job as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobView {
    /// The id.
    pub id: String,
    /// `running`, `completed` or `failed`.
    pub status: String,
    /// The node of the last attempt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// Attempts made.
    pub attempts: u32,
    /// The executor's output, when completed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
    /// Submission to terminal state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
}

impl JobView {
    /// The view of a stored job.
    pub fn from_record(id: &JobId, record: &JobRecord) -> Self {
        let outcome = record.outcome.clone().unwrap_or(Value::Null);
        Self {
            id: id.to_string(),
            status: record.status.clone(),
            node_id: record.node.clone().filter(|n| !n.is_empty()),
            attempts: record.attempt,
            output: (record.status == "completed").then(|| outcome["output"].clone()),
            error: (record.status == "failed").then(|| outcome["error"].clone()),
            latency_ms: record.latency_ms,
        }
    }

    /// True once completed or failed.
    pub fn is_terminal(&self) -> bool {
        self.status != "running"
    }

    /// The HTTP status for this view.
    pub fn http_status(&self) -> StatusCode {
        match self.status.as_str() {
            "completed" | "running" => StatusCode::OK,
            _ => self
                .error_code()
                .map_or(StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::status),
        }
    }

    fn error_code(&self) -> Option<ErrorCode> {
        self.error
            .as_ref()
            .and_then(|e| serde_json::from_value(e["code"].clone()).ok())
    }
}

/// What a dispatch task hears about its current attempt.
#[derive(Debug)]
enum AttemptEvent {
    Accepted,
    Rejected(RejectReason, String),
    Finished,
    NodeLost,
}

/// Why a submission could not be dispatched at all.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The id belongs to a different request.
    #[error("job id {0} is already used by a different request")]
    Conflict(JobId),
    /// Redis failed.
    #[error(transparent)]
    Store(#[from] StoreError),
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
    unanswered: Mutex<HashMap<(NodeId, JobKind), u32>>,
    waiters: Mutex<HashMap<JobId, Arc<Waiter>>>,
    capacity: Arc<Notify>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is a single map operation.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl JobRouter {
    /// A router over `store`, sending through the sockets of `registry`;
    /// `capacity` is notified whenever capacity reports reach Redis. On
    /// `shutdown` dispatching stops: jobs in flight stay `running` in Redis
    /// and their results are recorded by whichever coordinator receives
    /// them.
    pub fn new(
        store: Store,
        registry: Arc<Registry>,
        config: Config,
        instance: String,
        capacity: Arc<Notify>,
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
            unanswered: Mutex::default(),
            waiters: Mutex::default(),
            capacity,
            metrics,
            shutdown,
        }
    }

    /// Submits a job: returns once it is recorded (or refused), with a
    /// receiver that yields its terminal view.
    pub async fn submit(
        self: &Arc<Self>,
        job: Job,
    ) -> Result<watch::Receiver<Option<JobView>>, SubmitError> {
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let request = job.canonical();
        let (waiter, fresh) = self.waiter(&job.id, &request);
        if waiter.request != request {
            return Err(SubmitError::Conflict(job.id));
        }
        let receiver = waiter.terminal.subscribe();
        if !fresh {
            // A submission of this id is being dispatched here already.
            return Ok(receiver);
        }
        let this = Arc::clone(self);
        tokio::spawn(async move { this.dispatch(job, waiter, started_tx).await });
        match started.await {
            Ok(Ok(())) => Ok(receiver),
            Ok(Err(err)) => Err(err),
            Err(_) => Ok(receiver),
        }
    }

    fn waiter(&self, id: &JobId, request: &str) -> (Arc<Waiter>, bool) {
        let mut waiters = lock(&self.waiters);
        if let Some(existing) = waiters.get(id) {
            return (Arc::clone(existing), false);
        }
        let waiter = Arc::new(Waiter {
            request: request.to_owned(),
            terminal: watch::channel(None).0,
        });
        waiters.insert(id.clone(), Arc::clone(&waiter));
        (waiter, true)
    }

    /// Publishes a terminal view and forgets the waiter.
    fn publish(&self, id: &JobId, view: JobView) {
        if let Some(waiter) = lock(&self.waiters).remove(id) {
            waiter.terminal.send_replace(Some(view));
        }
    }

    async fn dispatch(
        self: Arc<Self>,
        job: Job,
        waiter: Arc<Waiter>,
        started: tokio::sync::oneshot::Sender<Result<(), SubmitError>>,
    ) {
        let mut started = Some(started);
        let outcome = tokio::select! {
            outcome = self.run(&job, &mut started) => outcome,
            () = self.shutdown.cancelled() => {
                lock(&self.waiters).remove(&job.id);
                return;
            }
        };
        let view = match outcome {
            Ok(view) => view,
            Err(err) => {
                tracing::error!(job_id = %job.id, error = %err, "dispatch failed");
                if let Some(started) = started.take() {
                    let _ = started.send(Err(err));
                }
                lock(&self.waiters).remove(&job.id);
                drop(waiter);
                return;
            }
        };
        if let Some(started) = started.take() {
            let _ = started.send(Ok(()));
        }
        let status = view
            .error_code()
            .map_or_else(|| view.status.clone(), |code| code.as_str().to_owned());
        self.metrics.jobs.get_or_create(&JobLabel { status }).inc();
        self.publish(&job.id, view);
    }

    async fn run(
        &self,
        job: &Job,
        started: &mut Option<tokio::sync::oneshot::Sender<Result<(), SubmitError>>>,
    ) -> Result<JobView, SubmitError> {
        let deadline = Instant::now() + job.timeout;
        let request = job.canonical();
        let lifetime = job.timeout + self.config.result_ttl;
        let mut excluded: Vec<NodeId> = Vec::new();
        let mut attempt = 0u32;
        let mut tries = 0u32;
        let mut last_failure = (
            ErrorCode::NoCapacity,
            String::from("every candidate node refused the job"),
        );
        loop {
            if tries >= self.config.max_attempts {
                return self
                    .fail(job, attempt, &request, lifetime, last_failure, started)
                    .await;
            }
            if Instant::now() >= deadline {
                return self
                    .fail(
                        job,
                        attempt,
                        &request,
                        lifetime,
                        (
                            ErrorCode::Timeout,
                            format!("no result within {} ms", job.timeout.as_millis()),
                        ),
                        started,
                    )
                    .await;
            }
            // Registered before the pick, so that a report landing while
            // the pick is in flight still wakes this dispatcher.
            let report = self.capacity.notified();
            tokio::pin!(report);
            report.as_mut().enable();
            let pick = self
                .store
                .route_pick(
                    job.pair,
                    &job.kind,
                    job.session.as_deref(),
                    SESSION_AFFINITY,
                    self.config.pick,
                    &excluded,
                )
                .await?;
            let node = match pick {
                Pick::Node(node) => node,
                Pick::NoNodes => {
                    // Nothing serves the pair any more: waiting would only
                    // burn the client's timeout.
                    let failure = if attempt == 0 {
                        (
                            ErrorCode::NoNodes,
                            format!("no live node serves {} jobs for {}", job.kind, job.pair),
                        )
                    } else {
                        last_failure
                    };
                    return self
                        .fail(job, attempt, &request, lifetime, failure, started)
                        .await;
                }
                Pick::NoCapacity => {
                    // Every node is full, or every node with room was tried
                    // already: nodes that refused may have room again by the
                    // next report, so they become candidates again. Wait for
                    // a capacity report, as long as the job may wait.
                    excluded.clear();
                    if !wait_for_capacity(report, deadline).await {
                        let message = format!(
                            "no node had room for a {} job for {} within {} ms",
                            job.kind,
                            job.pair,
                            job.timeout.as_millis()
                        );
                        let failure = if attempt == 0 {
                            (ErrorCode::NoCapacity, message)
                        } else {
                            last_failure
                        };
                        return self
                            .fail(job, attempt, &request, lifetime, failure, started)
                            .await;
                    }
                    continue;
                }
            };
            attempt = if attempt == 0 {
                match self
                    .store
                    .job_start(
                        &job.id,
                        &request,
                        Some(&node),
                        job.timeout,
                        lifetime,
                        &self.instance,
                    )
                    .await?
                {
                    JobStart::New => 1,
                    JobStart::Conflict => return Err(SubmitError::Conflict(job.id.clone())),
                    JobStart::Exists => {
                        if let Some(started) = started.take() {
                            let _ = started.send(Ok(()));
                        }
                        return self.wait_remote(&job.id, deadline).await;
                    }
                }
            } else {
                match self.store.job_attempt(&job.id, attempt, &node).await? {
                    Some(next) => next,
                    None => return self.wait_remote(&job.id, deadline).await,
                }
            };
            if let Some(started) = started.take() {
                let _ = started.send(Ok(()));
            }
            tries += 1;
            match self.try_node(job, &node, attempt, deadline).await {
                Tried::Finished => return self.wait_remote(&job.id, deadline).await,
                Tried::Move(code, message) => {
                    excluded.push(node);
                    last_failure = (code, message);
                }
                Tried::TimedOut => {
                    let message = format!("no result within {} ms", job.timeout.as_millis());
                    return self
                        .fail(
                            job,
                            attempt,
                            &request,
                            lifetime,
                            (ErrorCode::Timeout, message),
                            started,
                        )
                        .await;
                }
            }
        }
    }

    async fn try_node(&self, job: &Job, node: &NodeId, attempt: u32, deadline: Instant) -> Tried {
        let key = JobRef {
            job_id: job.id.clone(),
            attempt,
        };
        let (tx, mut events) = mpsc::unbounded_channel();
        lock(&self.attempts).insert(
            key.clone(),
            Attempt {
                node: node.clone(),
                kind: job.kind.clone(),
                events: tx,
                holder: None,
            },
        );
        let remaining = deadline.saturating_duration_since(Instant::now());
        let assign = JobAssign {
            job_id: job.id.clone(),
            attempt,
            kind: job.kind.clone(),
            pair: job.pair,
            session_id: job.session.clone(),
            payload: job.payload.clone(),
            timeout_ms: u64::try_from(remaining.as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
        };
        *lock(&self.unanswered)
            .entry((node.clone(), job.kind.clone()))
            .or_default() += 1;
        let unanswered = Unanswered {
            router: self,
            key: (node.clone(), job.kind.clone()),
        };
        self.metrics.assignments.inc();
        let delivered = if self.registry.get(node).is_some() {
            let assign = Message::JobAssign(assign);
            self.registry.send(node, Control::Send(Box::new(assign)))
        } else {
            self.forward(node, &key, assign).await
        };
        let outcome = if delivered {
            self.follow(node, &key, &mut events, deadline, unanswered)
                .await
        } else {
            Tried::Move(
                ErrorCode::NodeLost,
                format!("node {node} is not connected to any live coordinator"),
            )
        };
        lock(&self.attempts).remove(&key);
        outcome
    }

    /// Sends an assignment for a node whose socket another live instance
    /// holds through that instance's inbox. False when no live instance
    /// holds it.
    async fn forward(&self, node: &NodeId, key: &JobRef, assign: JobAssign) -> bool {
        let holder = match self.other_holder(node).await {
            Ok(Some(holder)) => holder,
            Ok(None) => return false,
            Err(err) => {
                tracing::warn!(node_id = %node, error = %err, "cannot look up the node's coordinator");
                return false;
            }
        };
        let envelope = Envelope::Assign {
            origin: self.instance.clone(),
            node: node.clone(),
            assign,
        };
        if let Some(attempt) = lock(&self.attempts).get_mut(key) {
            attempt.holder = Some(holder.clone());
        }
        match forward::send(&self.store, &holder, &envelope).await {
            Ok(()) => {
                self.metrics.forwarded.inc();
                true
            }
            Err(err) => {
                tracing::warn!(node_id = %node, %holder, error = %err, "cannot forward the assignment");
                false
            }
        }
    }

    /// Asks the instance holding `node`'s socket to drain it; false when no
    /// other live instance holds it.
    pub async fn forward_drain(&self, node: &NodeId, reason: &str) -> Result<bool, StoreError> {
        let Some(holder) = self.other_holder(node).await? else {
            return Ok(false);
        };
        let envelope = Envelope::Drain {
            node: node.clone(),
            reason: reason.to_owned(),
        };
        forward::send(&self.store, &holder, &envelope).await?;
        Ok(true)
    }

    /// The other live instance holding `node`'s socket, if any.
    async fn other_holder(&self, node: &NodeId) -> Result<Option<String>, StoreError> {
        let Some(holder) = self
            .store
            .node_holder(node)
            .await?
            .filter(|holder| holder != &self.instance)
        else {
            return Ok(None);
        };
        Ok(self
            .store
            .instance_present(&holder)
            .await?
            .then_some(holder))
    }

    /// Records that the node's answers to `job` belong to `origin`.
    pub fn note_forwarded(&self, job: JobRef, node: &NodeId, kind: JobKind, origin: &str) {
        lock(&self.forwarded).insert(
            job,
            Forwarded {
                node: node.clone(),
                kind,
                origin: origin.to_owned(),
            },
        );
    }

    /// Forgets a forwarded assignment (it could not be delivered).
    pub fn forget_forwarded(&self, job: &JobRef) {
        lock(&self.forwarded).remove(job);
    }

    /// Sends `answer` about `job` to instance `origin`'s inbox, in the
    /// background.
    pub fn tell_later(&self, origin: String, job: JobRef, answer: RemoteAnswer) {
        forward::post(&self.store, origin, Envelope::Answer { job, answer });
    }

    /// Another instance answered about an attempt dispatched here.
    pub fn remote_answer(&self, job: &JobRef, answer: RemoteAnswer) {
        if let Some(attempt) = lock(&self.attempts).get(job) {
            let _ = attempt.events.send(match answer {
                RemoteAnswer::Accepted => AttemptEvent::Accepted,
                RemoteAnswer::Rejected { reason, message } => {
                    AttemptEvent::Rejected(reason, message)
                }
                RemoteAnswer::Finished => AttemptEvent::Finished,
                RemoteAnswer::Lost => AttemptEvent::NodeLost,
            });
        }
    }

    /// Attempts forwarded to an instance whose presence expired move on:
    /// the node will register elsewhere, and its answers would never come.
    pub async fn check_holders(&self) {
        let holders: Vec<String> = {
            let attempts = lock(&self.attempts);
            let mut holders: Vec<String> =
                attempts.values().filter_map(|a| a.holder.clone()).collect();
            holders.sort_unstable();
            holders.dedup();
            holders
        };
        for holder in holders {
            if self.store.instance_present(&holder).await.unwrap_or(true) {
                continue;
            }
            tracing::warn!(%holder, "a coordinator instance holding nodes of jobs dispatched here went away");
            for attempt in lock(&self.attempts).values() {
                if attempt.holder.as_deref() == Some(holder.as_str()) {
                    let _ = attempt.events.send(AttemptEvent::NodeLost);
                }
            }
        }
    }

    async fn follow(
        &self,
        node: &NodeId,
        key: &JobRef,
        events: &mut mpsc::UnboundedReceiver<AttemptEvent>,
        deadline: Instant,
        unanswered: Unanswered<'_>,
    ) -> Tried {
        let accept_by = (Instant::now() + self.config.accept_timeout).min(deadline);
        let first = tokio::time::timeout_at(accept_by, events.recv()).await;
        drop(unanswered);
        let accepted = match first {
            Ok(Some(AttemptEvent::Accepted)) => true,
            Ok(Some(AttemptEvent::Finished)) => return Tried::Finished,
            Ok(Some(AttemptEvent::Rejected(reason, message))) => {
                tracing::debug!(job_id = %key.job_id, attempt = key.attempt, node_id = %node, ?reason, "node refused the job");
                return Tried::Move(ErrorCode::NoCapacity, format!("{node} refused: {message}"));
            }
            Ok(Some(AttemptEvent::NodeLost) | None) => {
                return Tried::Move(ErrorCode::NodeLost, format!("node {node} went away"));
            }
            Err(_) => false,
        };
        if !accepted {
            self.cancel(node, key, "not accepted in time");
            if Instant::now() >= deadline {
                return Tried::TimedOut;
            }
            return Tried::Move(
                ErrorCode::NoCapacity,
                format!("{node} did not answer the assignment in time"),
            );
        }
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(AttemptEvent::Finished)) => Tried::Finished,
            Ok(Some(AttemptEvent::NodeLost) | None) => Tried::Move(
                ErrorCode::NodeLost,
                format!("node {node} went away while running the job"),
            ),
            Ok(Some(AttemptEvent::Accepted | AttemptEvent::Rejected(..))) => Tried::Move(
                ErrorCode::NodeLost,
                format!("node {node} answered the assignment twice"),
            ),
            Err(_) => {
                self.cancel(node, key, "job timeout");
                Tried::TimedOut
            }
        }
    }

    fn cancel(&self, node: &NodeId, key: &JobRef, reason: &str) {
        let cancel = Message::JobCancel(JobCancel {
            job_id: key.job_id.clone(),
            attempt: key.attempt,
            reason: reason.into(),
        });
        if self
            .registry
            .send(node, Control::Send(Box::new(cancel.clone())))
        {
            return;
        }
        let holder = lock(&self.attempts).get(key).and_then(|a| a.holder.clone());
        if let (Some(holder), Message::JobCancel(cancel)) = (holder, cancel) {
            let envelope = Envelope::Cancel {
                node: node.clone(),
                cancel,
            };
            forward::post(&self.store, holder, envelope);
        }
    }

    /// Records a failure decided here (not by a node) as the job's terminal
    /// state.
    async fn fail(
        &self,
        job: &Job,
        attempt: u32,
        request: &str,
        lifetime: Duration,
        (code, message): (ErrorCode, String),
        started: &mut Option<tokio::sync::oneshot::Sender<Result<(), SubmitError>>>,
    ) -> Result<JobView, SubmitError> {
        let attempt = if attempt == 0 {
            match self
                .store
                .job_start(
                    &job.id,
                    request,
                    None,
                    job.timeout,
                    lifetime,
                    &self.instance,
                )
                .await?
            {
                JobStart::New => 1,
                JobStart::Conflict => return Err(SubmitError::Conflict(job.id.clone())),
                JobStart::Exists => {
                    return self
                        .wait_remote(&job.id, Instant::now() + job.timeout)
                        .await;
                }
            }
        } else {
            attempt
        };
        if let Some(started) = started.take() {
            let _ = started.send(Ok(()));
        }
        let outcome = json!({"error": {"code": code, "message": message}});
        self.store
            .job_finish(
                &job.id,
                (None, attempt),
                false,
                &outcome,
                self.config.result_ttl,
            )
            .await?;
        self.wait_remote(&job.id, Instant::now() + job.timeout)
            .await
    }

    /// Waits for a job's terminal state by reading Redis (the job is being
    /// dispatched by another submission or instance, or by nobody).
    async fn wait_remote(&self, id: &JobId, deadline: Instant) -> Result<JobView, SubmitError> {
        let mut pause = REMOTE_POLL;
        loop {
            if let Some(record) = self.record(id).await? {
                let view = JobView::from_record(id, &record);
                if view.is_terminal() || Instant::now() >= deadline {
                    return Ok(view);
                }
            } else if Instant::now() >= deadline {
                return Ok(JobView {
                    id: id.to_string(),
                    status: "running".into(),
                    node_id: None,
                    attempts: 0,
                    output: None,
                    error: None,
                    latency_ms: None,
                });
            }
            tokio::time::sleep_until((Instant::now() + pause).min(deadline)).await;
            pause = (pause * 2).min(REMOTE_POLL_MAX);
        }
    }

    /// A job's record; one still running well past its deadline is an
    /// orphan (its dispatcher died with its coordinator, its result is
    /// lost) and is recorded failed here, so that nobody waits forever.
    async fn record(&self, id: &JobId) -> Result<Option<JobRecord>, StoreError> {
        let record = self.store.job(id).await?;
        let orphaned = record.as_ref().is_some_and(|r| {
            r.status == "running"
                && r.deadline_ms
                    .is_some_and(|d| wall_clock_ms() > d + ORPHAN_GRACE_MS)
        });
        if !orphaned {
            return Ok(record);
        }
        let outcome = json!({"error": {
            "code": ErrorCode::Timeout,
            "message": "no result by the job's deadline: the coordinator dispatching it went away and no node reported a result",
        }});
        if self
            .store
            .job_expire(
                id,
                Duration::from_millis(ORPHAN_GRACE_MS),
                &outcome,
                self.config.result_ttl,
            )
            .await?
        {
            tracing::warn!(job_id = %id, "orphaned job recorded as failed after its deadline");
        }
        self.store.job(id).await
    }

    /// The stored view of a job, waiting up to `wait` for a terminal state;
    /// `None` when it does not exist or `reader` may not see it.
    pub async fn get(
        &self,
        id: &JobId,
        wait: Duration,
        reader: &Caller,
    ) -> Result<Option<JobView>, StoreError> {
        let receiver = lock(&self.waiters).get(id).map(|w| w.terminal.subscribe());
        let Some(record) = self.record(id).await? else {
            return Ok(None);
        };
        if !reader.may_read(&owner_of(&record.request)) {
            return Ok(None);
        }
        let view = JobView::from_record(id, &record);
        if view.is_terminal() || wait.is_zero() {
            return Ok(Some(view));
        }
        let deadline = Instant::now() + wait;
        if let Some(mut receiver) = receiver {
            if let Ok(Ok(terminal)) =
                tokio::time::timeout_at(deadline, receiver.wait_for(Option::is_some)).await
            {
                return Ok(terminal.clone());
            }
            return Ok(Some(view));
        }
        match self.wait_remote(id, deadline).await {
            Ok(view) => Ok(Some(view)),
            Err(SubmitError::Store(err)) => Err(err),
            Err(SubmitError::Conflict(_)) => Ok(Some(view)),
        }
    }

    /// Assignments of `kind` sent to `node` and not answered yet.
    pub fn unanswered(&self, node: &NodeId, kind: &JobKind) -> u32 {
        lock(&self.unanswered)
            .get(&(node.clone(), kind.clone()))
            .copied()
            .unwrap_or(0)
    }

    /// A node's connection of `epoch` accepted or refused an assignment.
    /// Returns the attempt's kind when the attempt is known here and the
    /// connection is the node's current one.
    pub fn answer(
        &self,
        (node, epoch): (&NodeId, u64),
        key: &JobRef,
        refusal: Option<(RejectReason, String)>,
    ) -> Option<JobKind> {
        if !self.registry.is_current(node, epoch) {
            return None;
        }
        if let Some(attempt) = lock(&self.attempts).get(key).filter(|a| &a.node == node) {
            let _ = attempt.events.send(match refusal {
                None => AttemptEvent::Accepted,
                Some((reason, message)) => AttemptEvent::Rejected(reason, message),
            });
            return Some(attempt.kind.clone());
        }
        let mut forwarded = lock(&self.forwarded);
        let entry = forwarded.get(key).filter(|f| &f.node == node)?;
        let (kind, origin) = (entry.kind.clone(), entry.origin.clone());
        let answer = match refusal {
            None => RemoteAnswer::Accepted,
            Some((reason, message)) => {
                // A refused attempt is over here; an accepted one waits for
                // its result (or the node's loss).
                forwarded.remove(key);
                RemoteAnswer::Rejected { reason, message }
            }
        };
        drop(forwarded);
        self.tell_later(origin, key.clone(), answer);
        Some(kind)
    }

    /// A node reported a result: record it (fenced by node and attempt),
    /// wake the dispatcher, and say whether the node may drop it from its
    /// outbox.
    pub async fn result(&self, node: &NodeId, result: &JobResult) -> Result<Taken, StoreError> {
        let (completed, outcome) = match &result.outcome {
            Outcome::Completed { output } => (true, json!({"output": output})),
            Outcome::Failed { code, message } => {
                let code = match code {
                    FailureCode::Timeout => ErrorCode::Timeout,
                    FailureCode::Cancelled => ErrorCode::Cancelled,
                    FailureCode::ExecutorFailed | FailureCode::Other => ErrorCode::ExecutorFailed,
                };
                (false, json!({"error": {"code": code, "message": message}}))
            }
        };
        let finish = self
            .store
            .job_finish(
                &result.job_id,
                (Some(node), result.attempt),
                completed,
                &outcome,
                self.config.result_ttl,
            )
            .await?;
        tracing::debug!(job_id = %result.job_id, attempt = result.attempt, node_id = %node, ?finish, "job result");
        let taken = match &finish {
            Finish::Applied => "applied",
            Finish::Duplicate => "duplicate",
            Finish::Stale => "stale",
            Finish::Foreign { .. } => "foreign",
        };
        self.metrics
            .results
            .get_or_create(&ResultLabel {
                outcome: taken.into(),
            })
            .inc();
        let key = JobRef {
            job_id: result.job_id.clone(),
            attempt: result.attempt,
        };
        if let Finish::Foreign { assigned } = finish {
            tracing::warn!(node_id = %node, assigned_node = %assigned, job_id = %key.job_id, attempt = key.attempt, "result refused: the attempt is assigned to another node");
            return Ok(Taken::Foreign);
        }
        // Whatever became of it, a forwarded attempt ends with its result.
        let forwarded = lock(&self.forwarded).remove(&key);
        if finish != Finish::Applied {
            return Ok(Taken::Acknowledged);
        }
        if let Some(attempt) = lock(&self.attempts).get(&key) {
            let _ = attempt.events.send(AttemptEvent::Finished);
            return Ok(Taken::Acknowledged);
        }
        // Dispatched elsewhere (forwarded here, or its node moved to this
        // instance since): its dispatcher is waiting.
        let origin = match forwarded {
            Some(forwarded) => Some(forwarded.origin),
            None => self.store.job_dispatcher(&key.job_id).await?,
        };
        if let Some(origin) = origin.filter(|o| o != &self.instance) {
            self.tell_later(origin, key, RemoteAnswer::Finished);
        }
        Ok(Taken::Acknowledged)
    }

    /// A node's connection ended: its running attempts move elsewhere.
    pub fn node_lost(&self, node: &NodeId) {
        for attempt in lock(&self.attempts).values() {
            if &attempt.node == node {
                let _ = attempt.events.send(AttemptEvent::NodeLost);
            }
        }
        let lost: Vec<(JobRef, String)> = {
            let mut forwarded = lock(&self.forwarded);
            let keys: Vec<JobRef> = forwarded
                .iter()
                .filter(|(_, f)| &f.node == node)
                .map(|(key, _)| key.clone())
                .collect();
            keys.into_iter()
                .filter_map(|key| forwarded.remove(&key).map(|f| (key, f.origin)))
                .collect()
        };
        for (key, origin) in lost {
            self.tell_later(origin, key, RemoteAnswer::Lost);
        }
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

/// Counts an assignment as unanswered until dropped.
struct Unanswered<'a> {
    router: &'a JobRouter,
    key: (NodeId, JobKind),
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        let mut unanswered = lock(&self.router.unanswered);
        if let Some(count) = unanswered.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                unanswered.remove(&self.key);
            }
        }
    }
}

/// One attempt in flight: where it went, and its dispatcher's inbox.
struct Attempt {
    node: NodeId,
    kind: JobKind,
    events: mpsc::UnboundedSender<AttemptEvent>,
    /// The instance the assignment was forwarded to, when another one
    /// holds the node's socket.
    holder: Option<String>,
}

/// An assignment another instance forwarded here, for a node whose socket
/// this instance holds: where the node's answers must go.
struct Forwarded {
    node: NodeId,
    kind: JobKind,
    origin: String,
}

enum Tried {
    Finished,
    Move(ErrorCode, String),
    TimedOut,
}

/// Waits for `report` (the next capacity report to reach Redis), or a
/// short poll interval for reports received by other instances. False
/// once `deadline` passed.
async fn wait_for_capacity(report: Pin<&mut Notified<'_>>, deadline: Instant) -> bool {
    if Instant::now() >= deadline {
        return false;
    }
    let wake = (Instant::now() + CAPACITY_POLL).min(deadline);
    let _ = tokio::time::timeout_at(wake, report).await;
    Instant::now() < deadline
}
