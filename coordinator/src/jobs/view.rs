//! A job as the API shows it, and the error codes of failed jobs.

use super::*;

/// Why a job failed (the `error.code` of the API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobErrorCode {
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

impl JobErrorCode {
    /// The code as the API writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            JobErrorCode::NoNodes => "no_nodes",
            JobErrorCode::NoCapacity => "no_capacity",
            JobErrorCode::Timeout => "timeout",
            JobErrorCode::ExecutorFailed => "executor_failed",
            JobErrorCode::NodeLost => "node_lost",
            JobErrorCode::Cancelled => "cancelled",
        }
    }

    /// The HTTP status answering a job failed with this code.
    pub fn status(self) -> StatusCode {
        match self {
            JobErrorCode::NoNodes | JobErrorCode::NoCapacity | JobErrorCode::NodeLost => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            JobErrorCode::Timeout => StatusCode::GATEWAY_TIMEOUT,
            JobErrorCode::ExecutorFailed | JobErrorCode::Cancelled => StatusCode::BAD_GATEWAY,
        }
    }
}

/// A job as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobView {
    /// The id.
    pub id: String,
    /// Where it stands.
    pub status: JobStatus,
    /// The node of the last attempt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// Where it ran, once its node answered: `gpu`, or `cpu` (a kind's
    /// fallback executor, or a node without GPUs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Attempts made.
    pub attempts: u32,
    /// The executor's output, when completed, as the executor wrote it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<RawJson>,
    /// Why it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
    /// Submission to terminal state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// Where its time went, for the submitting client's answer (the
    /// `Server-Timing` header); never in the JSON.
    #[serde(skip)]
    pub timing: Option<Timing>,
}

/// How a job ended, as its record holds it (`outcome`, the JSON of this)
/// and its answer shows it.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Ended {
    /// The executor's output, as it wrote it.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lingua_shared::raw::present"
    )]
    pub output: Option<RawJson>,
    /// Why it failed: `code`, `message`, and `retry_after_ms` for a
    /// failure worth retrying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
    /// Where it ran (a name this build does not know: not shown).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "known_device"
    )]
    pub device: Option<Device>,
}

/// A recorded device, or none for a name this build does not know: one
/// field must not make the rest of the outcome unreadable.
fn known_device<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Device>, D::Error> {
    let name = Option::<String>::deserialize(deserializer)?;
    Ok(name.and_then(|name| {
        [Device::Gpu, Device::Cpu]
            .into_iter()
            .find(|d| d.name() == name)
    }))
}

impl Ended {
    /// How a node said a job ended, on `device`.
    pub fn reported(outcome: Outcome, device: Option<Device>) -> Self {
        match outcome {
            Outcome::Completed { output } => Self {
                output: Some(output),
                device,
                ..Self::default()
            },
            Outcome::Failed { code, message } => {
                let code = match code {
                    FailureCode::Timeout => JobErrorCode::Timeout,
                    FailureCode::Cancelled => JobErrorCode::Cancelled,
                    FailureCode::ExecutorFailed | FailureCode::Other => {
                        JobErrorCode::ExecutorFailed
                    }
                };
                Self {
                    error: Some(json!({"code": code, "message": message})),
                    device,
                    ..Self::default()
                }
            }
        }
    }

    /// The text stored as the record's `outcome`.
    pub fn recorded(&self) -> String {
        // A JSON text, a JSON value and a name: serialisation cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

impl JobView {
    /// The view of a stored job.
    pub fn from_record(id: &JobId, record: &JobRecord) -> Self {
        // Read from its text: the output stays as the executor wrote it.
        let ended = match record.outcome.as_deref().map(serde_json::from_str) {
            Some(Ok(ended)) => ended,
            Some(Err(err)) => {
                tracing::warn!(job_id = %id, error = %err, "the job's recorded outcome cannot be read");
                Ended::default()
            }
            None => Ended::default(),
        };
        let mut view = Self::ended(
            id,
            (record.status, ended),
            (record.node.clone(), record.attempt),
            0,
        );
        view.latency_ms = record.latency_ms;
        view
    }

    /// The view of a job in `status` with `outcome` as stored (`output`,
    /// or `error`, and `device`), at `attempts` on `node`, `latency_ms`
    /// after it was submitted.
    pub fn ended(
        id: &JobId,
        (status, ended): (JobStatus, Ended),
        (node, attempts): (Option<String>, u32),
        latency_ms: u64,
    ) -> Self {
        Self {
            id: id.to_string(),
            status,
            node_id: node.filter(|n| !n.is_empty()),
            device: ended.device.map(|device| device.name().to_owned()),
            attempts,
            output: (status == JobStatus::Completed).then(|| ended.output.unwrap_or_default()),
            error: (status == JobStatus::Failed).then(|| ended.error.unwrap_or_default()),
            latency_ms: Some(latency_ms),
            timing: None,
        }
    }

    /// True once completed or failed.
    pub fn is_terminal(&self) -> bool {
        self.status.is_terminal()
    }

    /// The HTTP status for this view.
    pub fn http_status(&self) -> StatusCode {
        match self.status {
            JobStatus::Completed | JobStatus::Running | JobStatus::Queued => StatusCode::OK,
            JobStatus::Failed => self
                .error_code()
                .map_or(StatusCode::INTERNAL_SERVER_ERROR, JobErrorCode::status),
        }
    }

    /// When a failed job is worth submitting again, if its error says.
    pub fn retry_after(&self) -> Option<Duration> {
        let ms = self.error.as_ref()?.get("retry_after_ms")?.as_u64()?;
        Some(Duration::from_millis(ms))
    }

    pub(super) fn error_code(&self) -> Option<JobErrorCode> {
        self.error
            .as_ref()
            .and_then(|e| serde_json::from_value(e["code"].clone()).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(status: JobStatus, outcome: &str) -> JobRecord {
        JobRecord {
            status,
            attempt: 1,
            node: Some("gpu-1".into()),
            outcome: Some(outcome.into()),
            latency_ms: Some(12),
            deadline_ms: None,
            request: String::new(),
            coordinator: None,
            opener: None,
        }
    }

    /// A read-back answer shows what the record holds, the output as the
    /// executor wrote it, whatever else the record says.
    #[test]
    fn a_recorded_outcome_is_read_field_by_field() {
        let id = JobId::new("j-1").unwrap();
        let done = record(
            JobStatus::Completed,
            r#"{"output":{"z": 1.50, "a": [ ]},"device":"gpu"}"#,
        );
        let view = JobView::from_record(&id, &done);
        assert_eq!(
            view.output.as_ref().map(RawJson::get),
            Some(r#"{"z": 1.50, "a": [ ]}"#)
        );
        assert_eq!(view.device.as_deref(), Some("gpu"));
        // A device this build does not know leaves the output readable.
        let newer = record(JobStatus::Completed, r#"{"output":7,"device":"tpu"}"#);
        let view = JobView::from_record(&id, &newer);
        assert_eq!(view.output.as_ref().map(RawJson::get), Some("7"));
        assert_eq!(view.device, None);
        let failed = record(
            JobStatus::Failed,
            r#"{"error":{"code":"timeout","message":"late"}}"#,
        );
        let view = JobView::from_record(&id, &failed);
        assert_eq!(view.error_code(), Some(JobErrorCode::Timeout));
        assert_eq!(view.output, None);
    }
}
