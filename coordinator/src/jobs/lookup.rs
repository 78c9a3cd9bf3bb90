//! Reading a job's state back: from a local waiter, or from Redis (ending
//! an orphan whose dispatcher died on the way).

use super::dispatch::Dispatch;
use super::pick::{First, Opened};
use super::request::owner_of;
use super::*;

impl JobRouter {
    /// Waits for a job's terminal state by reading Redis (the job is being
    /// dispatched by another submission or instance, or by nobody), as
    /// `reader` may see it (a dispatch reads its own job as
    /// [`Caller::open`]).
    pub(super) async fn wait_remote(
        &self,
        id: &JobId,
        deadline: Instant,
        reader: &Caller,
    ) -> Result<JobView, StoreError> {
        let mut pause = REMOTE_POLL;
        loop {
            if let Some(record) = self.record(id, reader).await? {
                let view = JobView::from_record(id, &record);
                if view.is_terminal() || Instant::now() >= deadline {
                    return Ok(view);
                }
            } else if Instant::now() >= deadline {
                return Ok(JobView {
                    id: id.to_string(),
                    status: JobStatus::Running,
                    node_id: None,
                    device: None,
                    attempts: 0,
                    output: None,
                    error: None,
                    latency_ms: None,
                    timing: None,
                });
            }
            tokio::time::sleep_until((Instant::now() + pause).min(deadline)).await;
            pause = (pause * 2).min(REMOTE_POLL_MAX);
        }
    }

    /// The job's terminal state, recorded by another dispatcher, instance
    /// or node, by `deadline`. A job still not ended then is failed
    /// `timeout` here, at the attempt Redis holds (one never sent: a pick
    /// whose answer was lost), so that its answer is never a job still
    /// running.
    pub(super) async fn ended_elsewhere(
        &self,
        state: &mut Dispatch<'_>,
        deadline: Instant,
    ) -> Result<JobView, SubmitError> {
        let job = state.job;
        let itself = Caller::open();
        let view = tokio::select! {
            biased;
            view = self.wait_remote(&job.id, deadline, &itself) => view?,
            () = self.shutdown.cancelled() => return Err(SubmitError::Stopping),
        };
        if view.is_terminal() {
            return Ok(view);
        }
        let at = (view.node_id.clone(), view.attempts);
        if let Some(ended) = self
            .record_failure(job, at, state.timed_out().outcome())
            .await?
        {
            tracing::warn!(job_id = %job.id, attempt = view.attempts, "the job was not ended elsewhere by its deadline: recorded as failed, timeout");
            return Ok(ended);
        }
        // Ended (or moved on) just now, or its record is gone: what Redis
        // says, and failed `timeout` if that is still not an end.
        let view = self.wait_remote(&job.id, Instant::now(), &itself).await?;
        if view.is_terminal() {
            return Ok(view);
        }
        let waited = u64::try_from(job.timeout.as_millis()).unwrap_or(u64::MAX);
        Ok(JobView::ended(
            &job.id,
            (JobStatus::Failed, state.timed_out().outcome()),
            (view.node_id, view.attempts),
            waited,
        ))
    }

    /// After a recording of `job` (canonical `request`, by the submission
    /// marked `opener`) that got no answer, when Redis may have it, or may
    /// get it late: records it again (which the first recording, landing
    /// later, cannot undo) until Redis answers, the job's deadline, or
    /// shutdown. What its dispatch goes on from: its first pick, when this
    /// recorded it or Redis has it as this submission recorded it (no
    /// dispatcher but this, then); none, for a job to follow. `None`:
    /// nothing to do, or `max_queued` jobs being recorded again already.
    pub(super) async fn reopen(
        &self,
        job: Job,
        request: &str,
        opener: u64,
    ) -> Option<(Job, Option<First>)> {
        let Some(_place) = Reopening::take(&self.reopening, self.config.max_queued) else {
            tracing::warn!(job_id = %job.id,
                "too many jobs being recorded again: left to the orphan rule if recorded");
            return None;
        };
        let deadline = Instant::now() + job.timeout;
        let mut pause = Duration::from_millis(50);
        let record = loop {
            let tried = tokio::select! {
                tried = self.reopen_once(&job, request, opener) => tried,
                () = self.shutdown.cancelled() => return None,
            };
            match tried {
                Ok(Reopened::Recorded(first)) => return Some((job, Some(first))),
                Ok(Reopened::Found(record)) => break record,
                Ok(Reopened::Nothing) => return None,
                Err(_) if Instant::now() < deadline => {}
                Err(_) => return None,
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        };
        Some(self.taken_on(job, &record, opener))
    }

    /// One try of [`JobRouter::reopen`].
    async fn reopen_once(
        &self,
        job: &Job,
        request: &str,
        opener: u64,
    ) -> Result<Reopened, StoreError> {
        Ok(match self.open(job, request, opener).await? {
            Opened::New(first) => Reopened::Recorded(first),
            Opened::Conflict => Reopened::Nothing,
            // The id's index may name another pair's job (a conflict whose
            // answer was lost): only this request's record is the job.
            Opened::Exists => match self.store.job(&job.id).await? {
                Some((_, record)) if record.request == request => Reopened::Found(record),
                _ => Reopened::Nothing,
            },
        })
    }

    /// A job found recorded on its reopening: taken on from where it
    /// stands, with the time it has left, when the submission marked
    /// `opener` on this instance recorded it (another's may still be
    /// dispatching it) and it has not ended; else followed.
    fn taken_on(&self, mut job: Job, record: &JobRecord, opener: u64) -> (Job, Option<First>) {
        let Some(deadline_ms) = own_deadline(record, &self.instance, opener) else {
            return (job, None);
        };
        job.deadline = Some(Instant::now() + remaining(deadline_ms, job.timeout));
        // The slot its recorded pick took there is not in this instance's
        // hints: the node's entry is rewritten from them.
        if let Some(node) = record.node.as_deref().and_then(|n| NodeId::new(n).ok()) {
            self.hints.due([job.pair], &node);
        }
        tracing::warn!(job_id = %job.id, attempt = record.attempt,
            "recorded although its answer was lost: dispatched from where it stands");
        (job, Some(First::resumed(record.attempt)))
    }

    /// A job's record, `None` when it does not exist or `reader` may not
    /// see it; one still running well past its deadline is an orphan (its
    /// dispatcher died with its coordinator, its result is lost) and is
    /// recorded failed here, so that nobody waits forever. One still
    /// queued whose dispatcher is gone is taken over.
    pub(super) async fn record(
        &self,
        id: &JobId,
        reader: &Caller,
    ) -> Result<Option<JobRecord>, StoreError> {
        let Some((pair, record)) = self.store.job(id).await? else {
            return Ok(None);
        };
        if !reader.may_read(&owner_of(&record.request)) {
            return Ok(None);
        }
        self.take_if_abandoned((pair, id), &record).await;
        let orphaned = !record.status.is_terminal()
            && record
                .deadline_ms
                .is_some_and(|d| wall_clock_ms() > d.saturating_add(ORPHAN_GRACE_MS));
        if !orphaned {
            return Ok(Some(record));
        }
        let outcome = json!({"error": {
            "code": JobErrorCode::Timeout,
            "message": "no result by the job's deadline: the coordinator dispatching it went away and no node reported a result",
        }});
        if self
            .store
            .job_expire(
                (pair, id),
                Duration::from_millis(ORPHAN_GRACE_MS),
                &outcome.to_string(),
                self.config.result_ttl,
            )
            .await?
        {
            tracing::warn!(job_id = %id, "orphaned job recorded as failed after its deadline");
        }
        Ok(self.store.job(id).await?.map(|(_, record)| record))
    }

    /// A job recorded `queued` (waiting for room: no node has it) whose
    /// dispatching instance is gone, having died without handing it over,
    /// is taken over here, as one handed over is: through this instance's
    /// own inbox, once (not once per read; again when the asking failed).
    /// Should that instance be alive after all (its presence lapsed), the
    /// attempt fence lets only one of the two dispatchers' picks through.
    async fn take_if_abandoned(&self, (pair, id): (LangPair, &JobId), record: &JobRecord) {
        let now = wall_clock_ms();
        let Some((from, deadline_ms)) = record
            .coordinator
            .as_deref()
            .filter(|from| record.status == JobStatus::Queued && *from != self.instance)
            .zip(record.deadline_ms.filter(|deadline| now < *deadline))
        else {
            return;
        };
        if self.shutdown.is_cancelled() {
            return;
        }
        let asking = (id.clone(), from.to_owned(), record.attempt);
        {
            let mut adopting = lock(&self.adopting);
            adopting.retain(|_, lapses| now < *lapses);
            let lapses = deadline_ms.min(now.saturating_add(ASK_AGAIN_AFTER_MS));
            if adopting.insert(asking.clone(), lapses).is_some() {
                return;
            }
        }
        let envelope = Envelope::Adopt {
            from: from.to_owned(),
            pair,
            job_id: id.clone(),
            attempt: record.attempt,
        };
        let asked = match self.store.instance_present(from).await {
            Ok(false) => forward::send(&self.store, &self.instance, &envelope).await,
            present => present.map(|_| false),
        };
        if !matches!(asked, Ok(true)) {
            self.adoption_failed(&asking);
        }
        if let Err(err) = asked {
            tracing::warn!(job_id = %id, error = %err, "cannot ask for a job waiting for room to be taken over from a coordinator instance that is gone: the next read asks again");
        }
    }

    /// Forgets that this instance asked to take a job over (the asking or
    /// the takeover failed): the next read asks again.
    pub(super) fn adoption_failed(&self, asking: &Adopting) {
        lock(&self.adopting).remove(asking);
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
        let Some(record) = self.record(id, reader).await? else {
            return Ok(None);
        };
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
        // Shutting down, this instance answers with the job as it stands
        // (the client asks another): its HTTP drain does not wait out the
        // poll.
        tokio::select! {
            waited = self.wait_remote(id, deadline, reader) => Ok(Some(waited?)),
            () = self.shutdown.cancelled() => match self.record(id, reader).await {
                Ok(Some(record)) => Ok(Some(JobView::from_record(id, &record))),
                Ok(None) | Err(_) => Ok(Some(view)),
            },
        }
    }
}

/// The deadline of a job that the submission marked `opener` on
/// `instance` recorded and that has not ended: one to take on.
fn own_deadline(record: &JobRecord, instance: &str, opener: u64) -> Option<u64> {
    let own = record.coordinator.as_deref() == Some(instance) && record.opener == Some(opener);
    record
        .deadline_ms
        .filter(|_| own && !record.status.is_terminal())
}

/// What one try of reopening a job gave.
enum Reopened {
    /// Recorded by this try.
    Recorded(First),
    /// Recorded before, as this.
    Found(JobRecord),
    /// Another request's id, or gone.
    Nothing,
}

/// A place among the jobs being recorded again, given back when dropped.
struct Reopening<'a>(&'a AtomicUsize);

impl<'a> Reopening<'a> {
    /// A place, when fewer than `most` are taken.
    fn take(count: &'a AtomicUsize, most: u32) -> Option<Self> {
        let most = usize::try_from(most).unwrap_or(usize::MAX);
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < most).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(count))
    }
}

impl Drop for Reopening<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_submissions_own_record_that_has_not_ended_is_taken_on() {
        let record = JobRecord {
            status: JobStatus::Running,
            attempt: 1,
            node: Some("gpu-1".into()),
            outcome: None,
            latency_ms: None,
            deadline_ms: Some(5_000),
            request: String::new(),
            coordinator: Some("c-1".into()),
            opener: Some(7),
        };
        assert_eq!(own_deadline(&record, "c-1", 7), Some(5_000));
        assert_eq!(
            own_deadline(&record, "c-1", 8),
            None,
            "another submission's"
        );
        assert_eq!(own_deadline(&record, "c-2", 7), None, "another instance's");
        let older = JobRecord {
            opener: None,
            ..record.clone()
        };
        assert_eq!(own_deadline(&older, "c-1", 7), None, "written before marks");
        let ended = JobRecord {
            status: JobStatus::Completed,
            ..record
        };
        assert_eq!(own_deadline(&ended, "c-1", 7), None, "ended: followed");
    }

    #[test]
    fn places_to_reopen_are_capped_and_given_back() {
        let count = AtomicUsize::new(0);
        let first = Reopening::take(&count, 2).expect("a first place");
        let second = Reopening::take(&count, 2).expect("a second place");
        assert!(Reopening::take(&count, 2).is_none(), "two at most");
        drop(first);
        let third = Reopening::take(&count, 2).expect("a place given back");
        drop((second, third));
        assert_eq!(count.load(Ordering::Acquire), 0);
    }
}
