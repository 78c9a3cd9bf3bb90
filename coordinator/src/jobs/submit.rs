//! Taking a job in: recorded in Redis at once (with its first pick, when
//! nothing waits ahead of it), then one dispatcher takes it on. Recording
//! and dispatch are one future, driven in the task of the submission that
//! waits for the answer, else in a task of its own (from the moment the
//! submission is dropped, even while the job is being recorded);
//! submissions of the same id share its answer.

use super::dispatch::Dispatch;
use super::pick::{First, Opened};
use super::*;
use crate::recent::{FailedJob, now_ms};
use std::future::poll_fn;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::oneshot;
use tracing::Instrument;

/// A job taken in: where it stands now, and its terminal view to come.
pub struct Submitted {
    /// Its status as recorded.
    pub status: JobStatus,
    /// Yields its terminal view.
    terminal: watch::Receiver<Option<JobView>>,
    /// Its recording and dispatch, when this submission started them:
    /// driven by [`JobRouter::submit`] and then [`Submitted::answer`] in
    /// the caller's task (no task of its own, no hand-off between tasks
    /// for its answer), or by a task of its own once this is dropped
    /// before it ends.
    dispatch: Option<Dispatching>,
}

type Dispatching = Pin<Box<dyn Future<Output = ()> + Send>>;

/// What recording a job gave its submission: its status, or why it was
/// not taken.
type Recorded = Result<JobStatus, SubmitError>;

impl Submitted {
    /// The job's terminal view, once it ends; its dispatch is driven here
    /// while this is awaited. `None` when its dispatcher stopped first
    /// (the coordinator is shutting down, or the dispatch panicked): the
    /// job is as Redis has it.
    pub async fn answer(mut self) -> Option<JobView> {
        poll_fn(|cx| self.drive(cx)).await;
        let view = self.terminal.wait_for(Option::is_some).await.ok()?;
        view.clone()
    }

    /// Drives the dispatch until the job is recorded (or refused).
    async fn recorded(&mut self, mut recorded: oneshot::Receiver<Recorded>) -> Recorded {
        poll_fn(|cx| {
            // The dispatch first: it sends what recording gave, then goes
            // on. Once it has ended, whatever it sent has arrived.
            let _ = self.drive(cx);
            Pin::new(&mut recorded)
                .poll(cx)
                .map(|recorded| recorded.unwrap_or(Err(SubmitError::Stopped)))
        })
        .await
    }

    /// Polls the dispatch, if any is left: ready once it has ended. A
    /// panic stays the dispatch's own, as on a task of its own: the
    /// request still gets an answer.
    fn drive(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(dispatch) = self.dispatch.as_mut() else {
            return Poll::Ready(());
        };
        match catch_unwind(AssertUnwindSafe(|| dispatch.as_mut().poll(cx))) {
            Ok(Poll::Pending) => return Poll::Pending,
            Ok(Poll::Ready(())) => {}
            Err(_) => tracing::error!("a job's dispatch panicked; its answer is read from Redis"),
        }
        self.dispatch = None;
        Poll::Ready(())
    }

    /// Lets the dispatch go on, on a task of its own, without waiting.
    pub fn detach(mut self) {
        self.go_on();
    }

    /// Hands what is left of the dispatch, if any, to a task of its own.
    fn go_on(&mut self) {
        let Some(dispatch) = self.dispatch.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(dispatch)),
            Err(_) => tracing::error!(
                "no runtime to go on with a job's dispatch: it stays as Redis has it"
            ),
        }
    }
}

impl Drop for Submitted {
    /// A dispatch not driven to its end goes on in a task of its own: a
    /// job handed to its dispatcher is not left half-dispatched because
    /// its client went away.
    fn drop(&mut self) {
        self.go_on();
    }
}

impl JobRouter {
    /// Submits a job: returns once it is recorded (queued, or running on
    /// its first pick) or found, without picking a node for an id that
    /// exists. Refused without
    /// being recorded when it would wait behind others while this
    /// instance already holds `max_queued` waiting jobs. Dropped while the
    /// job is being recorded, its dispatch goes on without it.
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
            return Ok(Submitted {
                status,
                terminal,
                dispatch: None,
            });
        }
        // However this submission ends (refused, its request dropped
        // while the job is recorded, its dispatch done, stopped, dropped
        // or panicked), a later one of the id does not wait on its waiter.
        let registered = Registered {
            router: Arc::clone(self),
            id: job.id.clone(),
            waiter,
        };
        if let Some(retry_after) = self.queue_full(&job) {
            self.metrics.shed("queue_full");
            return Err(SubmitError::QueueFull { retry_after });
        }
        let (told, recorded) = oneshot::channel();
        let this = Arc::clone(self);
        // Every line logged for the job carries its id (its attempts add
        // the node and the attempt number).
        let span = tracing::info_span!("job", job_id = %job.id);
        let dispatch = self.tasks.track_future(
            async move {
                let _registered = registered;
                this.record_and_dispatch(job, request, told).await;
            }
            .instrument(span),
        );
        let mut submitted = Submitted {
            status: JobStatus::Queued,
            terminal,
            dispatch: Some(Box::pin(dispatch)),
        };
        submitted.status = submitted.recorded(recorded).await?;
        Ok(submitted)
    }

    /// Records a fresh submission's job (canonical `request`), tells the
    /// submission what that gave, then dispatches it.
    async fn record_and_dispatch(
        self: Arc<Self>,
        job: Job,
        request: String,
        told: oneshot::Sender<Recorded>,
    ) {
        let opener = self.openers.fetch_add(1, Ordering::Relaxed);
        let recording = Instant::now();
        let opened = self.open(&job, &request, opener).await;
        let start = recording.elapsed();
        let (status, first) = match opened {
            Ok(Opened::New(first)) if first.attempt > 0 => (JobStatus::Running, Some(first)),
            Ok(Opened::New(first)) => (JobStatus::Queued, Some(first)),
            Ok(Opened::Exists) => (JobStatus::Running, None),
            Ok(Opened::Conflict) => {
                let _ = told.send(Err(SubmitError::Conflict(job.id)));
                return;
            }
            Err(err) => {
                let may_have_run = err.may_have_run();
                let _ = told.send(Err(err.into()));
                // Its answer lost, the record may have reached Redis all
                // the same (or may yet), with no dispatcher but this.
                if may_have_run && let Some((job, first)) = self.reopen(job, &request, opener).await
                {
                    self.follow_job(job, first, recording.elapsed()).await;
                }
                return;
            }
        };
        // Its submission may be gone: the job goes on all the same.
        let _ = told.send(Ok(status));
        self.follow_job(job, first, start).await;
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
        state.arrival = first.arrival;
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
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        // `job_adopt`, fenced by the attempt, lets the
                        // takeover through only if nothing moved it on.
                        () = self.shutdown.cancelled() => return Err(self.hand_over(job, state.attempt)),
                    }
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
    pub(super) async fn follow_job(
        self: Arc<Self>,
        job: Job,
        first: Option<First>,
        start: Duration,
    ) {
        let fresh = first.is_some();
        // A dispatch stops on its own when the shutdown comes, where
        // nothing is lost: it finishes a pick under way, and hands over a
        // job with no attempt in flight (`JobRouter::hand_over`). A job
        // only followed is left as it stands.
        let outcome = match first {
            Some(first) => self.dispatch(&job, first, start).await,
            None => {
                let (deadline, itself) = (Instant::now() + job.timeout, Caller::open());
                tokio::select! {
                    waited = self.wait_remote(&job.id, deadline, &itself) => waited.map_err(SubmitError::from),
                    () = self.shutdown.cancelled() => return,
                }
            }
        };
        let view = match outcome {
            Ok(view) => view,
            Err(SubmitError::Stopping) => return,
            Err(err) => {
                tracing::error!(job_id = %job.id, error = %err, "dispatch failed");
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
        // A kind no live node served is only the client's word.
        let served = (code != Some(JobErrorCode::NoNodes)).then_some(job.kind.as_str());
        self.metrics
            .job_ended((served, status), latency_ms, failure);
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

/// A waiter that a submission put in the map, held by the submission and
/// then by its dispatch (to its end, even one never polled): taken out
/// when this is dropped, unless another has replaced it there (publishing
/// a view takes it out first). Its subscribers' wait ends with it: they
/// read the job from Redis instead.
pub(super) struct Registered {
    pub(super) router: Arc<JobRouter>,
    pub(super) id: JobId,
    pub(super) waiter: Arc<Waiter>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        forget(&self.router.waiters, &self.id, &self.waiter);
    }
}

/// Takes `waiter` out of `waiters`, unless another holds `id`'s place.
fn forget(waiters: &Mutex<HashMap<JobId, Arc<Waiter>>>, id: &JobId, waiter: &Arc<Waiter>) {
    let mut waiters = lock(waiters);
    if waiters
        .get(id)
        .is_some_and(|held| Arc::ptr_eq(held, waiter))
    {
        waiters.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiter() -> Arc<Waiter> {
        Arc::new(Waiter {
            request: String::new(),
            terminal: watch::channel(None).0,
        })
    }

    #[test]
    fn a_forgotten_waiter_leaves_the_map_unless_another_took_its_place() {
        let id = JobId::new("j-1").unwrap();
        let waiters = Mutex::new(HashMap::new());
        let first = waiter();
        lock(&waiters).insert(id.clone(), Arc::clone(&first));
        let subscriber = first.terminal.subscribe();
        forget(&waiters, &id, &first);
        assert!(!lock(&waiters).contains_key(&id), "taken out");
        drop(first);
        assert!(
            subscriber.has_changed().is_err(),
            "with the waiter gone, its subscribers' wait ends"
        );
        let (older, newer) = (waiter(), waiter());
        lock(&waiters).insert(id.clone(), Arc::clone(&newer));
        forget(&waiters, &id, &older);
        let held = lock(&waiters).get(&id).cloned().unwrap();
        assert!(Arc::ptr_eq(&held, &newer), "another's waiter stays");
    }
}
