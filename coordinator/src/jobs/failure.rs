//! Why a job ended without a node's answer, and how that is stored.

use super::*;

/// Why a job ended without a node's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Failure {
    pub(super) code: JobErrorCode,
    pub(super) message: String,
    /// When it is worth submitting again (`no_capacity`).
    retry_after: Option<Duration>,
}

impl Failure {
    pub(super) fn new(code: JobErrorCode, message: String) -> Self {
        Self {
            code,
            message,
            retry_after: None,
        }
    }

    pub(super) fn retry_after(self, wait: Duration) -> Self {
        Self {
            retry_after: Some(wait),
            ..self
        }
    }

    /// The outcome as stored: `{"error": {"code", "message",
    /// "retry_after_ms"?}}`.
    pub(super) fn outcome(&self) -> Ended {
        let mut error = json!({"code": self.code, "message": self.message});
        if let Some(wait) = self.retry_after {
            error["retry_after_ms"] = json!(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX));
        }
        Ended {
            error: Some(error),
            ..Ended::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_with_a_retry_after_stores_it_in_ms() {
        let failure = Failure::new(JobErrorCode::NoCapacity, "full".into())
            .retry_after(Duration::from_millis(1500));
        let recorded = |failure: &Failure| -> Value {
            serde_json::from_str(&failure.outcome().recorded()).unwrap()
        };
        assert_eq!(
            recorded(&failure),
            json!({"error": {"code": "no_capacity", "message": "full", "retry_after_ms": 1500}})
        );
        let plain = Failure::new(JobErrorCode::Timeout, "late".into());
        assert_eq!(recorded(&plain)["error"].get("retry_after_ms"), None);
    }
}
