//! One task per job: pick a node, record the attempt, assign it, follow
//! the node's answer, move on or end; and reading a job's state back.

use super::*;

impl JobRouter {
    /// Submits a job: returns once it is recorded (or refused), with a
    /// receiver that yields its terminal view.
    pub async fn submit(
        self: &Arc<Self>,
        job: Job,
    ) -> Result<watch::Receiver<Option<JobView>>, SubmitError> {
        let (started_tx, started) = oneshot::channel();
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
        self.tasks
            .spawn(async move { this.dispatch(job, waiter, started_tx).await });
        match started.await {
            Ok(Ok(())) => Ok(receiver),
            Ok(Err(err)) => Err(err),
            Err(_) => Ok(receiver),
        }
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

    pub(super) async fn dispatch(self: Arc<Self>, job: Job, waiter: Arc<Waiter>, started: Started) {
        let mut state = Dispatch::new(&job, self.config.result_ttl, started);
        let outcome = tokio::select! {
            outcome = self.run(&mut state) => outcome,
            () = self.shutdown.cancelled() => {
                lock(&self.waiters).remove(&job.id);
                return;
            }
        };
        let view = match outcome {
            Ok(view) => view,
            Err(err) => {
                tracing::error!(job_id = %job.id, error = %err, "dispatch failed");
                if let Some(started) = state.started.take() {
                    let _ = started.send(Err(err));
                }
                lock(&self.waiters).remove(&job.id);
                drop(waiter);
                return;
            }
        };
        state.recorded();
        let status = view.error_code().map_or_else(
            || view.status.as_str().to_owned(),
            |code| code.as_str().to_owned(),
        );
        self.metrics.jobs.get_or_create(&JobLabel { status }).inc();
        self.publish(&job.id, view);
    }

    /// Tries nodes until the job ends, here or on another instance.
    async fn run(&self, state: &mut Dispatch<'_>) -> Result<JobView, SubmitError> {
        let job = state.job;
        loop {
            if let Some(failure) = state.spent(self.config.max_attempts, Instant::now()) {
                return self.fail(state, failure).await;
            }
            // Registered before the pick, so that a report landing while
            // the pick is in flight still wakes this dispatcher.
            let report = self.hints.written().notified();
            tokio::pin!(report);
            report.as_mut().enable();
            let (node, assigned) = match self.pick(state).await? {
                Picked::Node(node, assigned) => (node, assigned),
                Picked::NoNodes => {
                    // Nothing serves the pair any more: waiting would only
                    // burn the client's timeout.
                    let message = format!("no live node serves {} jobs for {}", job.kind, job.pair);
                    let failure = state.failure_or(JobErrorCode::NoNodes, message);
                    return self.fail(state, failure).await;
                }
                Picked::NoCapacity => {
                    // Every node is full, or every node with room was tried
                    // already: nodes that refused may have room again by the
                    // next report, so they become candidates again. Wait for
                    // a capacity report, as long as the job may wait.
                    state.excluded.clear();
                    if !wait_for_capacity(report, state.deadline).await {
                        let message = format!(
                            "no node had room for a {} job for {} within {} ms",
                            job.kind,
                            job.pair,
                            job.timeout.as_millis()
                        );
                        let failure = state.failure_or(JobErrorCode::NoCapacity, message);
                        return self.fail(state, failure).await;
                    }
                    continue;
                }
            };
            if !self.record_attempt(state, &node).await? {
                return self.wait_remote(&job.id, state.deadline).await;
            }
            match self
                .try_node(job, &node, state.attempt, state.deadline, assigned)
                .await
            {
                Tried::Finished => return self.wait_remote(&job.id, state.deadline).await,
                Tried::Refused(message) => {
                    state.excluded.push(node);
                    state.last_failure = (JobErrorCode::NoCapacity, message);
                }
                Tried::Move(code, message) => {
                    state.excluded.push(node);
                    state.last_failure = (code, message);
                    state.tries += 1;
                }
                Tried::TimedOut => {
                    let failure = state.timed_out();
                    return self.fail(state, failure).await;
                }
            }
        }
    }

    /// One `route_pick`, and the assignment counted in the chosen node's
    /// hints before any routing update of the pair is computed.
    async fn pick(&self, state: &Dispatch<'_>) -> Result<Picked, StoreError> {
        let job = state.job;
        let _picking = self.hints.picking(job.pair).await;
        let pick = self
            .store
            .route_pick(
                job.pair,
                &job.kind,
                job.session.as_deref(),
                SESSION_AFFINITY,
                self.config.pick,
                &state.excluded,
            )
            .await?;
        Ok(match pick {
            Pick::Node(node) => {
                let assigned = self.hints.assign(&node, &job.kind);
                Picked::Node(node, assigned)
            }
            Pick::NoNodes => Picked::NoNodes,
            Pick::NoCapacity => Picked::NoCapacity,
        })
    }

    /// Records the next attempt, on `node`: the job itself on the first
    /// one. False when the job is another dispatcher's (submitted on
    /// another instance, or moved on by one).
    async fn record_attempt(
        &self,
        state: &mut Dispatch<'_>,
        node: &NodeId,
    ) -> Result<bool, SubmitError> {
        let job = state.job;
        state.attempt = if state.attempt == 0 {
            if !self.start(state, Some(node)).await? {
                state.recorded();
                return Ok(false);
            }
            1
        } else {
            match self.store.job_attempt(&job.id, state.attempt, node).await? {
                Some(next) => next,
                None => return Ok(false),
            }
        };
        state.recorded();
        Ok(true)
    }

    pub(super) async fn try_node(
        &self,
        job: &Job,
        node: &NodeId,
        attempt: u32,
        deadline: Instant,
        assigned: Assigned,
    ) -> Tried {
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
        self.metrics.assignments.inc();
        let delivered = if self.registry.get(node).is_some() {
            let assign = Message::JobAssign(assign);
            self.registry.send(node, Control::Send(Box::new(assign)))
        } else {
            self.forward(node, &key, assign).await
        };
        let outcome = if delivered {
            self.follow(node, &key, &mut events, deadline, assigned)
                .await
        } else {
            Tried::Move(
                JobErrorCode::NodeLost,
                format!("node {node} is not connected to any live coordinator"),
            )
        };
        lock(&self.attempts).remove(&key);
        outcome
    }

    pub(super) async fn follow(
        &self,
        node: &NodeId,
        key: &JobRef,
        events: &mut mpsc::UnboundedReceiver<AttemptEvent>,
        deadline: Instant,
        assigned: Assigned,
    ) -> Tried {
        let accept_by = (Instant::now() + self.config.accept_timeout).min(deadline);
        let first = tokio::time::timeout_at(accept_by, events.recv()).await;
        drop(assigned);
        let accepted = match first {
            Ok(Some(AttemptEvent::Accepted)) => true,
            Ok(Some(AttemptEvent::Finished)) => return Tried::Finished,
            Ok(Some(AttemptEvent::Rejected(reason, message))) => {
                tracing::debug!(job_id = %key.job_id, attempt = key.attempt, node_id = %node, ?reason, "node refused the job");
                return Tried::Refused(format!("{node} refused: {message}"));
            }
            Ok(Some(AttemptEvent::NodeLost) | None) => {
                return Tried::Move(JobErrorCode::NodeLost, format!("node {node} went away"));
            }
            Err(_) => false,
        };
        if !accepted {
            self.cancel(node, key, "not accepted in time");
            if Instant::now() >= deadline {
                return Tried::TimedOut;
            }
            return Tried::Move(
                JobErrorCode::NoCapacity,
                format!("{node} did not answer the assignment in time"),
            );
        }
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(AttemptEvent::Finished)) => Tried::Finished,
            Ok(Some(AttemptEvent::NodeLost) | None) => Tried::Move(
                JobErrorCode::NodeLost,
                format!("node {node} went away while running the job"),
            ),
            Ok(Some(AttemptEvent::Accepted | AttemptEvent::Rejected(..))) => Tried::Move(
                JobErrorCode::NodeLost,
                format!("node {node} answered the assignment twice"),
            ),
            Err(_) => {
                self.cancel(node, key, "job timeout");
                Tried::TimedOut
            }
        }
    }

    pub(super) fn cancel(&self, node: &NodeId, key: &JobRef, reason: &str) {
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
            forward::post(&self.store, &self.tasks, holder, envelope);
        }
    }

    /// Records the job in Redis, its first attempt on `node` (none: it
    /// fails before any). False when the id is recorded already, with
    /// the same request.
    async fn start(
        &self,
        state: &Dispatch<'_>,
        node: Option<&NodeId>,
    ) -> Result<bool, SubmitError> {
        let job = state.job;
        let started = self
            .store
            .job_start(
                &job.id,
                &state.request,
                node,
                job.timeout,
                state.lifetime,
                &self.instance,
            )
            .await?;
        match started {
            JobStart::New => Ok(true),
            JobStart::Exists => Ok(false),
            JobStart::Conflict => Err(SubmitError::Conflict(job.id.clone())),
        }
    }

    /// Records a failure decided here (not by a node) as the job's terminal
    /// state.
    async fn fail(
        &self,
        state: &mut Dispatch<'_>,
        (code, message): (JobErrorCode, String),
    ) -> Result<JobView, SubmitError> {
        let job = state.job;
        let attempt = if state.attempt == 0 {
            if !self.start(state, None).await? {
                return self
                    .wait_remote(&job.id, Instant::now() + job.timeout)
                    .await;
            }
            1
        } else {
            state.attempt
        };
        state.recorded();
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
}

/// A pick, with the chosen node's assignment counted.
enum Picked {
    Node(NodeId, Assigned),
    NoNodes,
    NoCapacity,
}

/// Told once the job is recorded in Redis (or could not be): the
/// submission's answer waits for it.
pub(super) type Started = oneshot::Sender<Result<(), SubmitError>>;

/// One job's dispatch between attempts: what it was, where it stands,
/// what it may still do. Pure: the router does the IO.
pub(super) struct Dispatch<'a> {
    job: &'a Job,
    /// The canonical request JSON.
    request: String,
    /// How long its record lives.
    lifetime: Duration,
    /// When it times out.
    deadline: Instant,
    /// Nodes that refused or lost it since the last capacity wait.
    excluded: Vec<NodeId>,
    /// The current attempt number (0 before the first).
    attempt: u32,
    /// Attempts here that failed for other reasons than a refusal (a
    /// node silent or lost): refusals only move the job on, its deadline
    /// bounds them.
    tries: u32,
    /// Why the last attempt moved on.
    last_failure: (JobErrorCode, String),
    /// Until the job is recorded.
    started: Option<Started>,
}

impl<'a> Dispatch<'a> {
    pub(super) fn new(job: &'a Job, result_ttl: Duration, started: Started) -> Self {
        Self {
            job,
            request: job.canonical(),
            lifetime: job.timeout + result_ttl,
            deadline: Instant::now() + job.timeout,
            excluded: Vec::new(),
            attempt: 0,
            tries: 0,
            last_failure: (
                JobErrorCode::NoCapacity,
                String::from("every candidate node refused the job"),
            ),
            started: Some(started),
        }
    }

    /// The failure ending the job before another pick, if it must end: no
    /// attempts left, or its deadline passed at `now`.
    fn spent(&self, max_attempts: u32, now: Instant) -> Option<(JobErrorCode, String)> {
        if self.tries >= max_attempts {
            Some(self.last_failure.clone())
        } else if now >= self.deadline {
            Some(self.timed_out())
        } else {
            None
        }
    }

    /// The job timed out.
    fn timed_out(&self) -> (JobErrorCode, String) {
        let message = format!("no result within {} ms", self.job.timeout.as_millis());
        (JobErrorCode::Timeout, message)
    }

    /// `code` before any attempt; after one, why the last one moved on
    /// (what the client can act on).
    fn failure_or(&self, code: JobErrorCode, message: String) -> (JobErrorCode, String) {
        if self.attempt == 0 {
            (code, message)
        } else {
            self.last_failure.clone()
        }
    }

    /// The job is recorded: the submission may answer.
    fn recorded(&mut self) {
        if let Some(started) = self.started.take() {
            let _ = started.send(Ok(()));
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> Job {
        let request: JobRequest = serde_json::from_value(json!({
            "id": "j1", "kind": "asr", "src_lang": "en", "tgt_lang": "es", "timeout_ms": 1000
        }))
        .unwrap();
        Job::from_request(request, Duration::from_secs(30), String::new()).unwrap()
    }

    #[test]
    fn a_dispatch_ends_when_its_tries_or_its_time_run_out() {
        let job = job();
        let (started, _) = oneshot::channel();
        let mut state = Dispatch::new(&job, Duration::from_secs(60), started);
        let now = Instant::now();
        assert_eq!(state.spent(3, now), None);
        state.tries = 3;
        state.last_failure = (JobErrorCode::NodeLost, "node n1 went away".into());
        assert_eq!(
            state.spent(3, now),
            Some((JobErrorCode::NodeLost, "node n1 went away".into()))
        );
        state.tries = 1;
        let (code, message) = state.spent(3, now + Duration::from_secs(1)).unwrap();
        assert_eq!(code, JobErrorCode::Timeout);
        assert_eq!(message, "no result within 1000 ms");
        assert_eq!(state.lifetime, Duration::from_secs(61));
    }

    #[test]
    fn after_an_attempt_the_last_failure_is_the_answer() {
        let job = job();
        let (started, _) = oneshot::channel();
        let mut state = Dispatch::new(&job, Duration::from_secs(60), started);
        let first = state.failure_or(JobErrorCode::NoNodes, "nothing serves it".into());
        assert_eq!(first.0, JobErrorCode::NoNodes);
        state.attempt = 2;
        state.last_failure = (JobErrorCode::NoCapacity, "n1 refused: full".into());
        let later = state.failure_or(JobErrorCode::NoNodes, "nothing serves it".into());
        assert_eq!(later, (JobErrorCode::NoCapacity, "n1 refused: full".into()));
    }

    #[test]
    fn the_submission_hears_once_that_the_job_is_recorded() {
        let job = job();
        let (started, mut heard) = oneshot::channel();
        let mut state = Dispatch::new(&job, Duration::from_secs(60), started);
        assert!(heard.try_recv().is_err());
        state.recorded();
        state.recorded();
        assert!(matches!(heard.try_recv(), Ok(Ok(()))));
    }
}
