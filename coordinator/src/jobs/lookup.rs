//! Reading a job's state back: from a local waiter, or from Redis (ending
//! an orphan whose dispatcher died on the way).

use super::pick::{First, Opened};
use super::request::owner_of;
use super::*;

impl JobRouter {
    /// Waits for a job's terminal state by reading Redis (the job is being
    /// dispatched by another submission or instance, or by nobody).
    pub(super) async fn wait_remote(
        &self,
        id: &JobId,
        deadline: Instant,
    ) -> Result<JobView, StoreError> {
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

    /// After a recording of `job` (canonical `request`) whose reply timed
    /// out, when Redis may have it, or may get it late: records it again
    /// (which the first recording, landing later, cannot undo), until
    /// Redis answers, the job's deadline, or shutdown. What its dispatch
    /// goes on from: its first pick, when this recorded it or Redis has it
    /// as this instance recorded it (no dispatcher but this, then); none,
    /// for a job to follow. `None`: nothing to do.
    pub(super) async fn reopen(&self, job: Job, request: &str) -> Option<(Job, Option<First>)> {
        let deadline = Instant::now() + job.timeout;
        let mut pause = Duration::from_millis(50);
        loop {
            tokio::select! {
                opened = self.open(&job, request) => match opened {
                    Ok(Opened::New(first)) => return Some((job, Some(first))),
                    Ok(Opened::Exists) => return Some(self.taken_on(job).await),
                    Ok(Opened::Conflict) => return None,
                    Err(_) if Instant::now() < deadline => {}
                    Err(_) => return None,
                },
                () = self.shutdown.cancelled() => return None,
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// A job found recorded on its reopening: taken on from where it
    /// stands, with the time it has left, when this instance recorded it
    /// and it has not ended; else followed.
    async fn taken_on(&self, mut job: Job) -> (Job, Option<First>) {
        let record = match self.store.job(&job.id).await {
            Ok(Some((_, record))) => record,
            Ok(None) | Err(_) => return (job, None),
        };
        let ours = record.coordinator.as_deref() == Some(self.instance.as_str());
        let Some(deadline_ms) = record.deadline_ms.filter(|_| ours) else {
            return (job, None);
        };
        if record.status.is_terminal() {
            return (job, None);
        }
        job.timeout = Duration::from_millis(deadline_ms.saturating_sub(wall_clock_ms()));
        tracing::warn!(job_id = %job.id, attempt = record.attempt,
            "recorded although its reply timed out: dispatched from where it stands");
        let first = First {
            attempt: record.attempt,
            node: None,
            excluded: Vec::new(),
            picked: None,
            wakes: 0,
            locked: Duration::ZERO,
        };
        (job, Some(first))
    }

    /// A job's record; one still running well past its deadline is an
    /// orphan (its dispatcher died with its coordinator, its result is
    /// lost) and is recorded failed here, so that nobody waits forever.
    pub(super) async fn record(&self, id: &JobId) -> Result<Option<JobRecord>, StoreError> {
        let Some((pair, record)) = self.store.job(id).await? else {
            return Ok(None);
        };
        let orphaned = !record.status.is_terminal()
            && record
                .deadline_ms
                .is_some_and(|d| wall_clock_ms() > d + ORPHAN_GRACE_MS);
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
        // Shutting down, this instance answers with the job as it stands
        // (the client asks another): its HTTP drain does not wait out the
        // poll.
        tokio::select! {
            waited = self.wait_remote(id, deadline) => Ok(Some(waited?)),
            () = self.shutdown.cancelled() => match self.record(id).await {
                Ok(Some(record)) => Ok(Some(JobView::from_record(id, &record))),
                Ok(None) | Err(_) => Ok(Some(view)),
            },
        }
    }
}
