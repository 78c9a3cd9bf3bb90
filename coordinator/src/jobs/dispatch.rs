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

    pub(super) async fn dispatch(
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
        let status = view.error_code().map_or_else(
            || view.status.as_str().to_owned(),
            |code| code.as_str().to_owned(),
        );
        self.metrics.jobs.get_or_create(&JobLabel { status }).inc();
        self.publish(&job.id, view);
    }

    pub(super) async fn run(
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

    pub(super) async fn try_node(
        &self,
        job: &Job,
        node: &NodeId,
        attempt: u32,
        deadline: Instant,
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

    pub(super) async fn follow(
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

    /// Records a failure decided here (not by a node) as the job's terminal
    /// state.
    pub(super) async fn fail(
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
