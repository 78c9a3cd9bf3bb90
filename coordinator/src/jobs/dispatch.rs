//! A job's dispatch: pick a node (in its turn in the admission queue while
//! no node has room; the pick records the attempt), follow it, move on or
//! end.

use super::failure::Failure;
use super::pick::Picked;
use super::*;
use tracing::Instrument;

impl JobRouter {
    /// Tries nodes until the job ends, here or on another instance,
    /// starting from a pick made already (with the queue's wakes before
    /// it), if any.
    pub(super) async fn run(
        &self,
        state: &mut Dispatch<'_>,
        mut first: Option<(Picked, u64)>,
    ) -> Result<JobView, SubmitError> {
        let job = state.job;
        let mut seat: Option<Seat<'_>> = None;
        loop {
            if let Some(failure) = state.spent(self.config.max_attempts, Instant::now()) {
                return self.fail(state, failure).await;
            }
            if self.shutdown.is_cancelled() {
                // No attempt in flight: handed over rather than picked.
                return Err(self.hand_over(job, state.attempt));
            }
            let (picked, wakes) = match first.take() {
                Some(first) => first,
                None => match self.next_pick(state, &mut seat).await? {
                    Ok(picked) => picked,
                    Err(failure) => return self.fail(state, failure).await,
                },
            };
            let (node, assigned, device) = match picked {
                Picked::Node(node, ..) if self.shutdown.is_cancelled() => {
                    // Recorded on a node that never gets it: its routing
                    // entry is rewritten from its hints.
                    self.hints.due([job.pair], &node);
                    return Err(self.hand_over(job, state.attempt));
                }
                Picked::Node(node, assigned, device) => {
                    self.granted(state, seat.take());
                    (node, assigned, device)
                }
                Picked::NoNodes => {
                    let failure = state.no_nodes();
                    return self.fail(state, failure).await;
                }
                Picked::NoCapacity => {
                    if let Err(failure) = self.wait_for_room(state, &mut seat, wakes) {
                        return self.fail(state, failure).await;
                    }
                    continue;
                }
                Picked::Stale => return self.ended_elsewhere(state, state.deadline).await,
            };
            let sent = Instant::now();
            let span = tracing::info_span!("attempt", node_id = %node, attempt = state.attempt);
            match self
                .try_node(
                    job,
                    (&node, device),
                    (state.attempt, state.deadline),
                    assigned,
                    &mut state.timing,
                )
                .instrument(span)
                .await
            {
                Tried::Finished(view) => {
                    if device == DeviceChoice::Gpu {
                        // What the queue expects a job to take: on a GPU.
                        lock(&self.queues).ran(&state.key, sent.elapsed());
                    }
                    return match view {
                        Some(view) => Ok(*view),
                        None => self.ended_elsewhere(state, state.deadline).await,
                    };
                }
                Tried::Skip(code, message) => {
                    state.moved_on(node, Failure::new(code, message), false);
                }
                Tried::Move(code, message) => {
                    state.moved_on(node, Failure::new(code, message), true);
                }
                // Past its deadline: `spent` ends it.
                Tried::TimedOut => {}
                Tried::Stopped => return Err(SubmitError::Stopping),
            }
        }
    }

    /// The next pick, in the job's turn when others wait for room of its
    /// pair and kind (it sits behind them), with the queue's wakes before
    /// it; or why the job must end.
    async fn next_pick<'a>(
        &'a self,
        state: &mut Dispatch<'_>,
        seat: &mut Option<Seat<'a>>,
    ) -> Result<Result<(Picked, u64), Failure>, SubmitError> {
        if seat.is_none() && lock(&self.queues).depth(&state.key) > 0 {
            match self.sit(state) {
                Ok(joined) => *seat = Some(joined),
                Err(failure) => return Ok(Err(failure)),
            }
        }
        let turn = match seat.as_ref() {
            Some(waiting) => waiting.turn(state).await?,
            None => Some(Turn::Head),
        };
        let Some(turn) = turn else {
            return Ok(Err(self.waited_too_long(state)));
        };
        let wakes = lock(&self.queues).wakes(&state.key);
        Ok(Ok((self.pick(state, turn).await?, wakes)))
    }

    /// No node had room (or every node with room was tried already): the
    /// job waits in its queue for a report of room. Nodes that refused may
    /// have room by then, so they become candidates again. A report that
    /// landed during the pick (`wakes` moved on) makes it try again at
    /// once.
    fn wait_for_room<'a>(
        &'a self,
        state: &mut Dispatch<'_>,
        seat: &mut Option<Seat<'a>>,
        wakes: u64,
    ) -> Result<(), Failure> {
        state.excluded.clear();
        if seat.is_none() {
            *seat = Some(self.sit(state)?);
        }
        if let Some(waiting) = seat
            && lock(&self.queues).wakes(&state.key) != wakes
        {
            waiting.turn.notify_one();
        }
        Ok(())
    }

    /// A seat in the job's queue, or why it cannot wait there: the queues
    /// are full, or this one cannot serve it before its deadline.
    fn sit<'a>(&'a self, state: &mut Dispatch<'_>) -> Result<Seat<'a>, Failure> {
        let job = state.job;
        let turn = Arc::new(Notify::new());
        let waiting = Waiting {
            id: job.id.clone(),
            priority: job.priority,
            share: job.share(),
            turn: Arc::clone(&turn),
            arrival: state.arrival,
            fallback: job.device == DeviceChoice::Any,
        };
        let now = Instant::now();
        let mut queues = lock(&self.queues);
        let first_of_pair = !queues
            .depths()
            .iter()
            .any(|((pair, _), _)| *pair == job.pair);
        let joined = queues.join(&state.key, waiting, now, state.deadline);
        self.show_depth(&queues, &state.key);
        drop(queues);
        let failure = match joined {
            Ok(arrival) => {
                state.arrival = Some(arrival);
                if first_of_pair {
                    // Other instances must know, to tell this one of room.
                    let (store, instance, pair) =
                        (self.store.clone(), self.instance.clone(), job.pair);
                    let ttl = self.config.lease() * WAITING_TTL_LEASES;
                    self.tasks.spawn(async move {
                        if let Err(err) = store.waiting(&[pair], &instance, ttl).await {
                            tracing::warn!(%pair, error = %err, "cannot record waiting jobs in redis");
                        }
                    });
                }
                return Ok(Seat {
                    router: self,
                    key: state.key.clone(),
                    id: job.id.clone(),
                    joined: now,
                    turn,
                    granted: false,
                });
            }
            Err(Shed::Full) => {
                self.metrics.shed("queue_full");
                let message = format!(
                    "no node has room for a {} job for {} and this coordinator's admission queue is full ({} jobs)",
                    job.kind, job.pair, self.config.max_queued
                );
                Failure::new(JobErrorCode::NoCapacity, message).retry_after(MIN_RETRY_AFTER)
            }
            Err(Shed::TooLate { wait, run }) => {
                self.metrics.shed("too_late");
                let message = format!(
                    "no node has room for a {} job for {}, and it could not finish by its deadline: about {} ms for the jobs queued ahead, about {} ms to run",
                    job.kind,
                    job.pair,
                    wait.as_millis(),
                    run.as_millis()
                );
                Failure::new(JobErrorCode::NoCapacity, message)
                    .retry_after(wait.max(MIN_RETRY_AFTER))
            }
        };
        Err(failure)
    }

    /// The last moment a waiting job may still start and finish by its
    /// deadline, given how long its kind has been taking once sent.
    fn latest_start(&self, state: &Dispatch<'_>) -> Instant {
        let run = lock(&self.queues).run_time(&state.key).unwrap_or_default();
        state.deadline.checked_sub(run).unwrap_or(state.deadline)
    }

    /// The answer to a job that could not start in time while it waited.
    fn waited_too_long(&self, state: &Dispatch<'_>) -> Failure {
        self.metrics.shed("deadline");
        let job = state.job;
        let message = format!(
            "no node had room for a {} job for {} in time to finish within {} ms",
            job.kind,
            job.pair,
            job.timeout.as_millis()
        );
        let retry = lock(&self.queues).expected_wait(&state.key, job.priority);
        let failure = state.failure_or(JobErrorCode::NoCapacity, message);
        failure.retry_after(retry.unwrap_or(MIN_RETRY_AFTER).max(MIN_RETRY_AFTER))
    }

    /// The job found room: it leaves its queue (if it sat in one), and the
    /// next in line tries at once.
    fn granted(&self, state: &Dispatch<'_>, seat: Option<Seat<'_>>) {
        let now = Instant::now();
        if let Some(seat) = &seat {
            self.metrics
                .queue_wait
                .get_or_create(&queue_label(&state.key))
                .observe(now.saturating_duration_since(seat.joined).as_secs_f64());
        }
        let mut queues = lock(&self.queues);
        queues.granted(&state.key, &state.job.id, &state.job.share(), now);
        if seat.is_some() {
            // Only a job that sat in the queue changes its depth.
            self.show_depth(&queues, &state.key);
        }
        drop(queues);
        if let Some(mut seat) = seat {
            seat.granted = true;
        }
    }

    fn show_depth(&self, queues: &Queues, key: &QueueKey) {
        let depth = i64::try_from(queues.depth(key)).unwrap_or(i64::MAX);
        self.metrics
            .queue_depth
            .get_or_create(&queue_label(key))
            .set(depth);
    }

    /// Records `outcome`, a failure decided here, as the job's terminal
    /// state at `attempt` (on `node`): its view, or none when the job had
    /// ended or moved on.
    pub(super) async fn record_failure(
        &self,
        job: &Job,
        (node, attempt): (Option<String>, u32),
        outcome: Ended,
    ) -> Result<Option<JobView>, StoreError> {
        let finished = self
            .store
            .job_finish(
                (job.pair, &job.id),
                (None, attempt),
                false,
                &outcome.recorded(),
                self.config.result_ttl,
            )
            .await?;
        Ok(match finished {
            Finish::Applied { latency_ms } => Some(JobView::ended(
                &job.id,
                (JobStatus::Failed, outcome),
                (node, attempt),
                latency_ms,
            )),
            Finish::Late { .. } | Finish::Duplicate | Finish::Stale | Finish::Foreign { .. } => {
                None
            }
        })
    }

    /// Records a failure decided here (not by a node) as the job's terminal
    /// state.
    async fn fail(
        &self,
        state: &mut Dispatch<'_>,
        failure: Failure,
    ) -> Result<JobView, SubmitError> {
        let recording = Instant::now();
        let node = state.node.as_ref().map(ToString::to_string);
        let recorded = self
            .record_failure(state.job, (node, state.attempt), failure.outcome())
            .await;
        let now = Instant::now();
        state.timing.record += now.saturating_duration_since(recording);
        state.timing.result_at = Some(now);
        if let Some(view) = recorded? {
            return Ok(view);
        }
        self.ended_elsewhere(state, state.deadline.max(now)).await
    }
}

fn queue_label((pair, kind): &QueueKey) -> QueueLabel {
    QueueLabel {
        pair: pair.to_string(),
        kind: kind.to_string(),
    }
}

/// A job's place in its admission queue; leaving the queue when dropped
/// (its deadline, a failure, its task cancelled) unless it was granted.
struct Seat<'a> {
    router: &'a JobRouter,
    key: QueueKey,
    id: JobId,
    joined: Instant,
    turn: Arc<Notify>,
    /// It found room: it left the queue that way.
    granted: bool,
}

impl Seat<'_> {
    /// Waits until a report says there may be room and the job may try
    /// (it heads its queue, or stands in for the head on the fallback's
    /// room); `None` once it could no longer start in time. The wait is
    /// the job's `queue` stage. When the coordinator stops meanwhile, the
    /// job (no attempt in flight) is handed over.
    async fn turn(&self, state: &mut Dispatch<'_>) -> Result<Option<Turn>, SubmitError> {
        let waiting = Instant::now();
        let turn = tokio::select! {
            biased;
            () = self.router.shutdown.cancelled() => {
                return Err(self.router.hand_over(state.job, state.attempt));
            }
            turn = self.next_turn(self.router.latest_start(state)) => turn,
        };
        state.timing.queue += waiting.elapsed();
        Ok(turn)
    }

    async fn next_turn(&self, deadline: Instant) -> Option<Turn> {
        loop {
            if tokio::time::timeout_at(deadline, self.turn.notified())
                .await
                .is_err()
            {
                return None;
            }
            let mut queues = lock(&self.router.queues);
            if let Some(turn) = queues.turn(&self.key, &self.id) {
                return Some(turn);
            }
            // Woken while another job had moved ahead: its turn.
            queues.wake(&self.key);
        }
    }
}

impl Drop for Seat<'_> {
    fn drop(&mut self) {
        if self.granted {
            return;
        }
        let mut queues = lock(&self.router.queues);
        queues.leave(&self.key, &self.id);
        self.router.show_depth(&queues, &self.key);
    }
}

/// One job's dispatch between attempts: what it was, where it stands,
/// what it may still do. Pure: the router does the IO.
pub(in crate::jobs) struct Dispatch<'a> {
    pub(in crate::jobs) job: &'a Job,
    /// Its admission queue.
    key: QueueKey,
    /// When it times out.
    deadline: Instant,
    /// Nodes that refused or lost it since the last capacity wait.
    pub(in crate::jobs) excluded: Vec<NodeId>,
    /// Where its time went so far.
    pub(in crate::jobs) timing: Timing,
    /// Its place in its queue, taken when it arrived (or when it first
    /// joined): back after a refusal, it keeps it.
    pub(in crate::jobs) arrival: Option<u64>,
    /// The current attempt number (0 while queued).
    pub(in crate::jobs) attempt: u32,
    /// The node of the current attempt.
    pub(in crate::jobs) node: Option<NodeId>,
    /// Attempts here that failed for other reasons than a refusal or an
    /// assignment that never reached its node (a node silent or lost):
    /// those only move the job on, its deadline bounds them.
    tries: u32,
    /// Why the last attempt here moved on (none yet: a job taken on or
    /// resumed at a later attempt has made none here).
    last_failure: Option<Failure>,
}

impl<'a> Dispatch<'a> {
    pub(in crate::jobs) fn new(job: &'a Job) -> Self {
        Self {
            job,
            key: (job.pair, job.kind.clone()),
            deadline: job.deadline.unwrap_or_else(|| Instant::now() + job.timeout),
            excluded: Vec::new(),
            timing: Timing::default(),
            arrival: None,
            attempt: 0,
            node: None,
            tries: 0,
            last_failure: None,
        }
    }

    /// The failure ending the job before another pick, if it must end: no
    /// attempts left, or its deadline passed at `now`.
    fn spent(&self, max_attempts: u32, now: Instant) -> Option<Failure> {
        if self.tries >= max_attempts {
            Some(self.failure_or(
                JobErrorCode::NoCapacity,
                String::from("every candidate node refused the job"),
            ))
        } else if now >= self.deadline {
            Some(self.timed_out())
        } else {
            None
        }
    }

    /// The attempt on `node` ended without a result, for `failure`: the
    /// job moves on, and the attempt `counts` toward `max_attempts` unless
    /// the node only said "not now" or never got it.
    fn moved_on(&mut self, node: NodeId, failure: Failure, counts: bool) {
        self.excluded.push(node);
        self.last_failure = Some(failure);
        if counts {
            self.tries += 1;
        }
    }

    /// Nothing serves the pair and kind: waiting would only burn the
    /// client's timeout.
    fn no_nodes(&self) -> Failure {
        let job = self.job;
        let message = format!("no live node serves {} jobs for {}", job.kind, job.pair);
        self.failure_or(JobErrorCode::NoNodes, message)
    }

    /// Whether the job's deadline passed.
    pub(in crate::jobs) fn past_deadline(&self) -> bool {
        Instant::now() >= self.deadline
    }

    /// The job timed out.
    pub(super) fn timed_out(&self) -> Failure {
        let message = format!("no result within {} ms", self.job.timeout.as_millis());
        Failure::new(JobErrorCode::Timeout, message)
    }

    /// Why the last attempt here moved on (what the client can act on);
    /// `code` before any did, even when the job was taken on or resumed at
    /// a later attempt.
    fn failure_or(&self, code: JobErrorCode, message: String) -> Failure {
        self.last_failure
            .clone()
            .unwrap_or_else(|| Failure::new(code, message))
    }
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
        let mut state = Dispatch::new(&job);
        let now = Instant::now();
        assert_eq!(state.spent(3, now), None);
        let node = || NodeId::new("n1").unwrap();
        let refused = Failure::new(JobErrorCode::NoCapacity, "n1 refused: full".into());
        state.moved_on(node(), refused.clone(), false);
        assert_eq!(
            (state.tries, state.excluded.len()),
            (0, 1),
            "a refusal is free"
        );
        state.moved_on(node(), refused, true);
        assert_eq!(state.tries, 1, "a silence or a loss counts");
        state.tries = 3;
        state.last_failure = Some(Failure::new(
            JobErrorCode::NodeLost,
            "node n1 went away".into(),
        ));
        assert_eq!(
            state.spent(3, now),
            Some(Failure::new(
                JobErrorCode::NodeLost,
                "node n1 went away".into()
            ))
        );
        state.tries = 1;
        let timed_out = state.spent(3, now + Duration::from_secs(1)).unwrap();
        assert_eq!(timed_out.code, JobErrorCode::Timeout);
        assert_eq!(timed_out.message, "no result within 1000 ms");
    }

    #[test]
    fn after_an_attempt_the_last_failure_is_the_answer() {
        let job = job();
        let mut state = Dispatch::new(&job);
        let first = state.failure_or(JobErrorCode::NoNodes, "nothing serves it".into());
        assert_eq!(first.code, JobErrorCode::NoNodes);
        // Taken on at its second attempt: nothing moved on here yet.
        state.attempt = 2;
        let taken_on = state.failure_or(JobErrorCode::NoNodes, "nothing serves it".into());
        assert_eq!(taken_on.code, JobErrorCode::NoNodes);
        let refused = Failure::new(JobErrorCode::NoCapacity, "n1 refused: full".into());
        state.moved_on(NodeId::new("n1").unwrap(), refused.clone(), false);
        let later = state.failure_or(JobErrorCode::NoNodes, "nothing serves it".into());
        assert_eq!(later, refused);
    }
}
