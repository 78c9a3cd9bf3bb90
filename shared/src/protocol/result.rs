//! `job_result` and what it carries: how a job ended on the node.

use serde::{Deserialize, Serialize};

use super::Device;
use crate::ids::JobId;
use crate::raw::RawJson;

/// How a job ended on the node. Read by hand (below), not by serde's
/// internally tagged enums, which buffer every field and cannot carry an
/// output as text.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// The executor produced output.
    Completed {
        /// The executor's output, as it wrote it.
        output: RawJson,
    },
    /// The job did not produce output.
    Failed {
        /// Why.
        code: FailureCode,
        /// Detail for people.
        message: String,
    },
}

/// Why a job failed on the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureCode {
    /// The executor failed (non-2xx, non-zero exit, bad output).
    ExecutorFailed,
    /// The job overran its timeout and was stopped.
    Timeout,
    /// The job was cancelled.
    Cancelled,
    /// A code newer than this build.
    #[serde(other)]
    Other,
}

impl<'de> Deserialize<'de> for Outcome {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        #[derive(Deserialize)]
        #[serde(rename_all = "snake_case")]
        enum Status {
            Completed,
            Failed,
        }
        /// Every field of either variant; unknown ones are skipped.
        #[derive(Deserialize)]
        struct Fields {
            status: Status,
            /// `output: null` is an output (`null`), not a missing one.
            #[serde(default, deserialize_with = "crate::raw::present")]
            output: Option<RawJson>,
            code: Option<FailureCode>,
            message: Option<String>,
        }
        let fields = Fields::deserialize(deserializer)?;
        match fields.status {
            Status::Completed => Ok(Outcome::Completed {
                output: fields
                    .output
                    .ok_or_else(|| D::Error::missing_field("output"))?,
            }),
            Status::Failed => Ok(Outcome::Failed {
                code: fields.code.ok_or_else(|| D::Error::missing_field("code"))?,
                message: fields
                    .message
                    .ok_or_else(|| D::Error::missing_field("message"))?,
            }),
        }
    }
}

/// node -> coordinator: a job attempt finished.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    /// The job.
    pub job_id: JobId,
    /// The attempt that ran.
    pub attempt: u32,
    /// How it ended.
    pub outcome: Outcome,
    /// Time spent running on the node.
    pub duration_ms: u64,
    /// Where it ran (absent from older agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<Device>,
}
