//! Job records: start, attempts, the one terminal state, orphans.

use super::*;

impl Store {
    /// Creates a job with its first attempt on `node`, or queued without
    /// one (`None`: attempt 0, [`Store::job_attempt`] gives it a node), or
    /// finds it.
    pub async fn job_start(
        &self,
        id: &JobId,
        request: &str,
        node: Option<&NodeId>,
        timeout: Duration,
        lifetime: Duration,
        coordinator: &str,
    ) -> Result<JobStart, StoreError> {
        let mut invocation = self.scripts.job_start.prepare_invoke();
        invocation
            .key(keys::job(id))
            .arg(request)
            .arg(node.map_or("", NodeId::as_str))
            .arg(millis(lifetime))
            .arg(coordinator)
            .arg(millis(timeout));
        let reply: Vec<Value> = self.invoke("job_start", invocation).await?;
        match reply.first().and_then(text).as_deref() {
            Some("new") => Ok(JobStart::New),
            Some("exists") => Ok(JobStart::Exists),
            Some("conflict") => Ok(JobStart::Conflict),
            _ => Err(StoreError::Unexpected {
                script: "job_start",
                reply: format!("{reply:?}"),
            }),
        }
    }

    /// Moves a queued or running job from attempt `current` to a new one
    /// on `node`.
    /// Returns the new attempt, or `None` when the job ended or moved on.
    pub async fn job_attempt(
        &self,
        id: &JobId,
        current: u32,
        node: &NodeId,
    ) -> Result<Option<u32>, StoreError> {
        let mut invocation = self.scripts.job_attempt.prepare_invoke();
        invocation
            .key(keys::job(id))
            .arg(current)
            .arg(node.as_str());
        let attempt: u32 = self.invoke("job_attempt", invocation).await?;
        Ok((attempt > 0).then_some(attempt))
    }

    /// Records the terminal state produced by `attempt`.
    pub async fn job_finish(
        &self,
        id: &JobId,
        (reporter, attempt): (Option<&NodeId>, u32),
        completed: bool,
        outcome: &serde_json::Value,
        retention: Duration,
    ) -> Result<Finish, StoreError> {
        let mut invocation = self.scripts.job_finish.prepare_invoke();
        invocation
            .key(keys::job(id))
            .arg(attempt)
            .arg(
                if completed {
                    JobStatus::Completed
                } else {
                    JobStatus::Failed
                }
                .as_str(),
            )
            .arg(outcome.to_string())
            .arg(millis(retention))
            .arg(reporter.map_or("", NodeId::as_str));
        let reply: Value = self.invoke("job_finish", invocation).await?;
        let unexpected = || StoreError::Unexpected {
            script: "job_finish",
            reply: format!("{reply:?}"),
        };
        if let Value::Array(items) = &reply {
            return match items.as_slice() {
                [status, assigned] if text(status).as_deref() == Some("foreign") => {
                    Ok(Finish::Foreign {
                        assigned: text(assigned).unwrap_or_default(),
                    })
                }
                _ => Err(unexpected()),
            };
        }
        match text(&reply).as_deref() {
            Some("applied") => Ok(Finish::Applied),
            Some("duplicate") => Ok(Finish::Duplicate),
            Some("stale") => Ok(Finish::Stale),
            _ => Err(unexpected()),
        }
    }

    /// Records a job still running past its deadline plus `grace` as
    /// failed with `outcome`: its dispatcher and its result are gone.
    pub async fn job_expire(
        &self,
        id: &JobId,
        grace: Duration,
        outcome: &serde_json::Value,
        retention: Duration,
    ) -> Result<bool, StoreError> {
        let mut invocation = self.scripts.job_expire.prepare_invoke();
        invocation
            .key(keys::job(id))
            .arg(millis(grace))
            .arg(outcome.to_string())
            .arg(millis(retention));
        let reply: String = self.invoke("job_expire", invocation).await?;
        match reply.as_str() {
            "expired" => Ok(true),
            "running" | "ended" | "missing" => Ok(false),
            _ => Err(StoreError::Unexpected {
                script: "job_expire",
                reply,
            }),
        }
    }

    /// A job, if Redis still holds it.
    pub async fn job(&self, id: &JobId) -> Result<Option<JobRecord>, StoreError> {
        let mut conn = self.conn.clone();
        let mut fields: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(keys::job(id))
            .query_async(&mut conn)
            .await?;
        let Some(status) = fields
            .remove("status")
            .and_then(|status| JobStatus::parse(&status))
        else {
            return Ok(None);
        };
        Ok(Some(JobRecord {
            status,
            attempt: fields
                .get("attempt")
                .and_then(|a| a.parse().ok())
                .unwrap_or(0),
            node: fields.remove("node"),
            outcome: fields
                .get("outcome")
                .and_then(|o| serde_json::from_str(o).ok()),
            latency_ms: fields.get("latency_ms").and_then(|l| l.parse().ok()),
            deadline_ms: fields.get("deadline_ms").and_then(|d| d.parse().ok()),
            request: fields.remove("request").unwrap_or_default(),
        }))
    }

    /// The instance dispatching job `id`.
    pub async fn job_dispatcher(&self, id: &JobId) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn.clone();
        Ok(redis::cmd("HGET")
            .arg(keys::job(id))
            .arg("coordinator")
            .query_async(&mut conn)
            .await?)
    }
}
