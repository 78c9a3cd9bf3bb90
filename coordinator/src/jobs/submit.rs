//! Taking a job in: recorded in Redis at once (with its first pick, when
//! nothing waits ahead of it), then one task dispatches it; submissions of
//! the same id share its answer.

use super::dispatch::Dispatch;
use super::pick::{First, Opened};
use super::*;
use crate::recent::{FailedJob, now_ms};
use tracing::Instrument;

/// A job taken in: where it stands now, and its terminal view to come.
pub struct Submitted {
    /// Its status as recorded.
    pub status: JobStatus,
    /// Yields its terminal view.
    pub terminal: watch::Receiver<Option<JobView>>,
}

impl JobRouter {
    /// Submits a job: returns once it is recorded (queued, or running on
    /// its first pick) or found, without picking a node for an id that
    /// exists. Refused without
    /// being recorded when it would wait behind others while this
    /// instance already holds `max_queued` waiting jobs.
    pub async fn submit(self: &Arc<Self>, job: Job) -> Result<Submitted, SubmitError> {
        let request = job.canonical();
        let (waiter, fresh) = self.waiter(&job.id, &request);
        if waiter.request != request {
            return Err(SubmitError::Conflict(job.id));
        }
        let terminal = waiter.terminal.subscribe();
        if !fresh {
            // A submission of this id is being dispatched here already.
            let status = terminal
                .borrow()
                .as_ref()
                .map_or(JobStatus::Running, |v| v.status);
            return Ok(Submitted { status, terminal });
        }
        if let Some(retry_after) = self.queue_full(&job) {
            lock(&self.waiters).remove(&job.id);
            self.metrics.shed("queue_full");
            return Err(SubmitError::QueueFull { retry_after });
        }
        let recording = Instant::now();
        let opened = self.open(&job, &request).await;
        let start = recording.elapsed();
        let (status, first) = match opened {
            Ok(Opened::New(first)) if first.attempt > 0 => (JobStatus::Running, Some(first)),
            Ok(Opened::New(first)) => (JobStatus::Queued, Some(first)),
            Ok(Opened::Exists) => (JobStatus::Running, None),
            Ok(Opened::Conflict) => {
                lock(&self.waiters).remove(&job.id);
                return Err(SubmitError::Conflict(job.id));
            }
            Err(err) => {
                lock(&self.waiters).remove(&job.id);
                return Err(err.into());
            }
        };
        let this = Arc::clone(self);
        // Every line logged for the job carries its id (its attempts add
        // the node and the attempt number).
        let span = tracing::info_span!("job", job_id = %job.id);
        self.tasks.spawn(
            async move { this.follow_job(job, waiter, first, start).await }.instrument(span),
        );
        Ok(Submitted { status, terminal })
    }

    /// Retry-After for a job that would wait behind others while the
    /// queues are full; `None` when it may go on.
    fn queue_full(&self, job: &Job) -> Option<Duration> {
        let queues = lock(&self.queues);
        let key = (job.pair, job.kind.clone());
        (queues.full() && queues.depth(&key) > 0).then(|| {
            queues
                .expected_wait(&key, job.priority)
                .unwrap_or(MIN_RETRY_AFTER)
                .max(MIN_RETRY_AFTER)
        })
    }

    pub(super) fn waiter(&self, id: &JobId, request: &str) -> (Arc<Waiter>, bool) {
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
    pub(super) fn publish(&self, id: &JobId, view: JobView) {
        if let Some(waiter) = lock(&self.waiters).remove(id) {
            waiter.terminal.send_replace(Some(view));
        }
    }

    /// Dispatches a job recorded just now (which took `start`), from
    /// its `first` pick. A Redis error does not end it: the dispatch goes
    /// on from where it stood once Redis answers, until the job's
    /// deadline (the job is recorded; nobody else would). Its answer says
    /// where its time went.
    async fn dispatch(
        &self,
        job: &Job,
        first: First,
        start: Duration,
    ) -> Result<JobView, SubmitError> {
        let mut state = Dispatch::new(job);
        state.timing.start = start.saturating_sub(first.locked);
        state.timing.pick = first.locked;
        state.attempt = first.attempt;
        state.node = first.node;
        state.excluded = first.excluded;
        let mut picked = first.picked.map(|picked| (picked, first.wakes));
        let mut pause = Duration::from_millis(50);
        loop {
            match self.run(&mut state, picked.take()).await {
                Ok(mut view) => {
                    state.timing.answered(Instant::now());
                    view.timing = Some(state.timing);
                    return Ok(view);
                }
                Err(SubmitError::Store(err)) if !state.past_deadline() => {
                    tracing::warn!(job_id = %job.id, error = %err, "dispatch paused: redis unavailable");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                outcome => return outcome,
            }
        }
    }

    /// Dispatches a job recorded just now (from its `first` pick), or
    /// waits for one recorded before (by an earlier submission here or
    /// elsewhere), and publishes its terminal view. On shutdown it stops:
    /// the job stays in Redis as it is.
    async fn follow_job(
        self: Arc<Self>,
        job: Job,
        waiter: Arc<Waiter>,
        first: Option<First>,
        start: Duration,
    ) {
        let fresh = first.is_some();
        let outcome = tokio::select! {
            outcome = async {
                match first {
                    Some(first) => self.dispatch(&job, first, start).await,
                    None => Ok(self.wait_remote(&job.id, Instant::now() + job.timeout).await?),
                }
            } => outcome,
            () = self.shutdown.cancelled() => {
                lock(&self.waiters).remove(&job.id);
                return;
            }
        };
        let view = match outcome {
            Ok(view) => view,
            Err(err) => {
                tracing::error!(job_id = %job.id, error = %err, "dispatch failed");
                lock(&self.waiters).remove(&job.id);
                drop(waiter);
                return;
            }
        };
        if fresh {
            self.count_ended(&job, &view);
        }
        self.publish(&job.id, view);
    }

    /// Counts a job dispatched here that ended (a job followed for another
    /// submission is counted where it was dispatched).
    fn count_ended(&self, job: &Job, view: &JobView) {
        let code = view.error_code();
        let failure = code.map(|code| FailedJob {
            id: job.id.to_string(),
            pair: job.pair.to_string(),
            kind: job.kind.to_string(),
            code: code.as_str().to_owned(),
            message: view.error.as_ref().map_or_else(String::new, |e| {
                e["message"].as_str().unwrap_or_default().to_owned()
            }),
            node_id: view.node_id.clone(),
            at_ms: now_ms(),
        });
        let status = code.map_or(view.status.as_str(), JobErrorCode::as_str);
        let latency_ms = view.latency_ms.unwrap_or(0);
        self.metrics
            .job_ended((job.kind.as_str(), status), latency_ms, failure);
        if let Some(timing) = &view.timing {
            // A stage the job never went through (no wait for room, no
            // node reached) is not counted as a zero.
            for (stage, took) in timing.stages() {
                if !took.is_zero() {
                    self.metrics.stage(stage, took);
                }
            }
        }
    }
}
