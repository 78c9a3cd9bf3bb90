//! Messages of the node <-> coordinator WebSocket protocol, versions 1
//! to 3 (2 adds [`CapacityReport::room`]; from 3 a `job_result` answers
//! for its `job_accept`).
//!
//! Every frame is one JSON object tagged by `type`. Unknown fields are
//! ignored so that either side can be upgraded first; unknown `type`s are an
//! error the receiver answers with an [`ErrorFrame`]. docs/PROTOCOL.md has an
//! example of each message and the connection state machine.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::bounded::{MAX_REPORTED_DEVICES, MAX_REPORTED_KINDS, at_most};
use crate::ids::{JobId, JobKind, NodeId};
use crate::lang::{LangCode, LangPair};
use crate::raw::RawJson;
use crate::room::Room;

mod result;

pub use result::{FailureCode, JobResult, Outcome};

/// The newest protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 3;
/// From this version on, a `job_result` answers for its `job_accept`: a
/// node may leave the accept out when the result comes first, and the
/// coordinator counts the result as the answer as soon as it reads it.
pub const RESULT_ANSWERS_VERSION: u32 = 3;
/// The oldest protocol version this build still speaks.
pub const MIN_PROTOCOL_VERSION: u32 = 1;

/// One protocol message. The serde tag `type` is the snake_case variant
/// name. Frames are read by [`crate::codec::decode`], which reads the
/// variant its `type` names straight from the text.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// node -> coordinator: the first frame of a connection.
    Register(Register),
    /// coordinator -> node: registration accepted.
    RegisterAck(RegisterAck),
    /// node -> coordinator: "still alive", with current capacity.
    Heartbeat(Heartbeat),
    /// node -> coordinator: capacity changed in a way routing cares about.
    Capacity(CapacityReport),
    /// coordinator -> node: run this job.
    JobAssign(JobAssign),
    /// node -> coordinator: the job was admitted and is running.
    JobAccept(JobRef),
    /// node -> coordinator: the job was refused; try another node.
    JobReject(JobReject),
    /// node -> coordinator: the job finished (completed or failed).
    JobResult(JobResult),
    /// coordinator -> node: the result is recorded; drop it from the outbox.
    ResultAck(JobRef),
    /// coordinator -> node: stop this job and free its slot.
    JobCancel(JobCancel),
    /// Either way: the node is draining (announced by the node, or asked of
    /// it by the coordinator).
    Drain(Drain),
    /// Either way: the previous frame could not be handled.
    Error(ErrorFrame),
}

impl Message {
    /// Every value of the `type` tag, in declaration order.
    pub const TYPES: [&'static str; 12] = [
        "register",
        "register_ack",
        "heartbeat",
        "capacity",
        "job_assign",
        "job_accept",
        "job_reject",
        "job_result",
        "result_ack",
        "job_cancel",
        "drain",
        "error",
    ];

    /// The `type` tag of this message.
    pub fn type_name(&self) -> &'static str {
        let index = match self {
            Message::Register(_) => 0,
            Message::RegisterAck(_) => 1,
            Message::Heartbeat(_) => 2,
            Message::Capacity(_) => 3,
            Message::JobAssign(_) => 4,
            Message::JobAccept(_) => 5,
            Message::JobReject(_) => 6,
            Message::JobResult(_) => 7,
            Message::ResultAck(_) => 8,
            Message::JobCancel(_) => 9,
            Message::Drain(_) => 10,
            Message::Error(_) => 11,
        };
        Self::TYPES[index]
    }
}

/// A secret token: serialised as is, never printed by `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// An inclusive range of protocol versions a peer speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRange {
    /// Oldest version spoken.
    pub min: u32,
    /// Newest version spoken.
    pub max: u32,
}

impl VersionRange {
    /// The versions this build speaks.
    pub const OURS: VersionRange = VersionRange {
        min: MIN_PROTOCOL_VERSION,
        max: PROTOCOL_VERSION,
    };

    /// The newest version both ranges contain, if any.
    pub fn negotiate(self, other: VersionRange) -> Option<u32> {
        let high = self.max.min(other.max);
        let low = self.min.max(other.min);
        (low <= high).then_some(high)
    }
}

/// What a node can do: the languages it hears and speaks, and the job kinds
/// it runs. It joins one pool for every directed pair `src:tgt`, `src != tgt`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Languages it can recognise.
    pub src_langs: Vec<LangCode>,
    /// Languages it can translate or speak into.
    pub tgt_langs: Vec<LangCode>,
    /// Job kinds it runs.
    pub kinds: Vec<JobKind>,
}

impl Capabilities {
    /// The directed pairs these capabilities serve.
    pub fn pairs(&self) -> Vec<LangPair> {
        LangPair::all_from(&self.src_langs, &self.tgt_langs)
    }
}

/// A GPU's static description, sent at registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// Index on the host (as NVML numbers them).
    pub index: u32,
    /// Stable identity (`GPU-…` under NVML).
    pub uuid: String,
    /// Product name.
    pub name: String,
    /// Total memory in MiB.
    pub memory_total_mb: u64,
}

/// node -> coordinator, first frame: who the node is and what it serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Register {
    /// The node's id.
    pub node_id: NodeId,
    /// The node token, when the coordinator requires one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    /// Protocol versions the agent speaks.
    pub protocol: VersionRange,
    /// The agent's build version, for logs and `/v1/nodes`.
    pub agent_version: String,
    /// Random id of this agent process. A reconnect carries the same value,
    /// which tells the coordinator it replaces a stale connection rather than
    /// competing with another live agent claiming the same node id.
    pub instance: String,
    /// Languages and kinds served.
    pub capabilities: Capabilities,
    /// The node's GPUs (empty on a CPU-only node).
    #[serde(default, deserialize_with = "at_most::<MAX_REPORTED_DEVICES, _, _>")]
    pub gpus: Vec<GpuInfo>,
    /// Capacity at the time of registration.
    pub capacity: CapacityReport,
    /// True when the agent registers while draining (it finishes jobs but
    /// takes no new ones).
    #[serde(default)]
    pub draining: bool,
}

/// coordinator -> node: the registration is accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterAck {
    /// The protocol version both sides use from now on.
    pub protocol_version: u32,
    /// This registration's epoch: strictly greater than every earlier
    /// registration of the same node id.
    pub epoch: u64,
    /// How often the node must send a heartbeat.
    pub heartbeat_interval_ms: u64,
    /// The pools the node was placed in.
    pub pairs: Vec<LangPair>,
}

/// node -> coordinator: proof of life, every `heartbeat_interval_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Increments with each heartbeat of a connection.
    pub seq: u64,
    /// Capacity now.
    pub capacity: CapacityReport,
}

/// What a node can take right now, per kind, and its GPU readings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CapacityReport {
    /// How many more jobs of each kind the arbiter would admit now.
    #[serde(deserialize_with = "at_most::<MAX_REPORTED_KINDS, _, _>")]
    pub free_slots: BTreeMap<JobKind, u32>,
    /// Current GPU readings.
    #[serde(default, deserialize_with = "at_most::<MAX_REPORTED_DEVICES, _, _>")]
    pub gpus: Vec<GpuReading>,
    /// Why the node's GPUs admit nothing as a whole (NVML unavailable, a
    /// stale reading); absent when they can be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_problem: Option<String>,
    /// The node's memory for new jobs, shared by every kind (version 2;
    /// absent from older agents and from nodes without GPUs): the
    /// coordinator shrinks every kind's hint when it assigns any kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<Room>,
    /// Jobs running on the node now (absent from older agents): a drained
    /// node is idle, and can be stopped, once this is 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<u32>,
    /// How many more jobs of each kind with `busy = "fallback"` the
    /// node's fallback (CPU) executors would take now; absent when no kind
    /// has one. Routing uses this room only when no GPU room is left.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "at_most::<MAX_REPORTED_KINDS, _, _>"
    )]
    pub fallback_slots: BTreeMap<JobKind, u32>,
}

/// One GPU's current readings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuReading {
    /// Stable identity.
    pub uuid: String,
    /// Total memory in MiB.
    pub memory_total_mb: u64,
    /// Memory in use, by anyone, in MiB.
    pub memory_used_mb: u64,
    /// Utilisation in percent, when the backend measures it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilization_pct: Option<u8>,
    /// Temperature in °C, when the backend measures it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_c: Option<u32>,
    /// False once the GPU reported a critical error or was lost.
    pub healthy: bool,
    /// Why the GPU is unhealthy (a critical Xid, ECC errors, lost).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// coordinator -> node: run a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobAssign {
    /// The job.
    pub job_id: JobId,
    /// Which attempt this is (1, 2, …); answers must carry it back.
    pub attempt: u32,
    /// The kind of work.
    pub kind: JobKind,
    /// The language pair.
    pub pair: LangPair,
    /// The client's session, for logs and local caches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// Opaque input for the executor, as the client sent it.
    pub payload: RawJson,
    /// How long the job may run on the node before it is stopped: the time
    /// left to its deadline.
    pub timeout_ms: u64,
    /// Where the node may run it: `gpu` only, or `any` (a kind's fallback
    /// executor too, when no GPU has room). `gpu` when absent: an older
    /// coordinator picks nodes by their GPU room only.
    #[serde(default)]
    pub device: DeviceChoice,
    /// How long the coordinator waits for `job_accept` or `job_reject`
    /// before it moves the job on: a node waiting for a slot answers
    /// before then. Absent from older coordinators.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_within_ms: Option<u64>,
}

/// Where a job may run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceChoice {
    /// On a GPU only.
    #[default]
    Gpu,
    /// On a GPU, or on its kind's fallback executor when no GPU has room.
    Any,
}

/// Where a job ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Device {
    /// On a GPU.
    Gpu,
    /// Without one: a kind's fallback executor, or a node without GPUs.
    Cpu,
}

impl Device {
    /// The name the protocol and the API use.
    pub fn name(self) -> &'static str {
        match self {
            Device::Gpu => "gpu",
            Device::Cpu => "cpu",
        }
    }
}

/// Names one attempt of one job.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct JobRef {
    /// The job.
    pub job_id: JobId,
    /// The attempt.
    pub attempt: u32,
}

/// Why a node refused a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// The arbiter has no room for this kind now.
    NoCapacity,
    /// The node does not run this kind.
    UnknownKind,
    /// The node does not serve this pair.
    UnsupportedPair,
    /// The node is draining.
    Draining,
    /// The node already runs or ran this attempt.
    Duplicate,
    /// A reason newer than this build.
    #[serde(other)]
    Other,
}

/// node -> coordinator: the job was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobReject {
    /// The job.
    pub job_id: JobId,
    /// The attempt refused.
    pub attempt: u32,
    /// Why.
    pub reason: RejectReason,
    /// Detail for people.
    #[serde(default)]
    pub message: String,
}

/// coordinator -> node: stop a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobCancel {
    /// The job.
    pub job_id: JobId,
    /// The attempt to stop.
    pub attempt: u32,
    /// Why, for logs.
    #[serde(default)]
    pub reason: String,
}

/// The node is draining: it runs what it has and takes nothing new.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drain {
    /// Why, for logs.
    #[serde(default)]
    pub reason: String,
}

/// What went wrong with a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not valid JSON, or not a JSON object.
    MalformedFrame,
    /// A `type` this side does not know.
    UnknownType,
    /// A known `type` with missing or ill-typed fields.
    InvalidMessage,
    /// Over the frame size limit.
    FrameTooLarge,
    /// The message is not allowed in the connection's current state.
    UnexpectedMessage,
    /// Missing or wrong token.
    Unauthorized,
    /// No protocol version in common.
    UnsupportedVersion,
    /// Another live agent holds this node id.
    NodeIdConflict,
    /// The receiver failed for reasons of its own.
    Internal,
    /// A result names a job attempt that is assigned to another node.
    NotAssigned,
    /// A code newer than this build.
    #[serde(other)]
    Other,
}

/// Either way: the previous frame could not be handled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorFrame {
    /// What kind of problem.
    pub code: ErrorCode,
    /// Detail for people.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_negotiation_picks_the_newest_common_version() {
        let ours = VersionRange { min: 1, max: 3 };
        assert_eq!(ours.negotiate(VersionRange { min: 2, max: 5 }), Some(3));
        assert_eq!(ours.negotiate(VersionRange { min: 1, max: 1 }), Some(1));
        assert_eq!(ours.negotiate(VersionRange { min: 4, max: 9 }), None);
        assert_eq!(ours.negotiate(VersionRange { min: 3, max: 2 }), None);
    }

    #[test]
    fn secrets_do_not_leak_into_debug_output() {
        let text = format!("{:?}", Secret("hunter2".into()));
        assert!(!text.contains("hunter2"));
    }

    #[test]
    fn an_outcome_keeps_its_output_as_written_and_names_what_is_missing() {
        let read = |text: &str| serde_json::from_str::<Outcome>(text);
        let Ok(Outcome::Completed { output }) =
            read(r#"{"status": "completed", "output": {"b": 1.50,  "a": null}, "extra": 1}"#)
        else {
            panic!("a completed outcome reads")
        };
        assert_eq!(output.get(), r#"{"b": 1.50,  "a": null}"#);
        let Ok(Outcome::Completed { output }) = read(r#"{"status": "completed", "output": null}"#)
        else {
            panic!("a null output is an output")
        };
        assert_eq!(output.get(), "null");
        let missing = read(r#"{"status": "completed"}"#).unwrap_err().to_string();
        assert!(missing.contains("missing field `output`"), "{missing}");
        assert_eq!(
            read(r#"{"status": "failed", "code": "timeout", "message": "slow"}"#).unwrap(),
            Outcome::Failed {
                code: FailureCode::Timeout,
                message: "slow".into()
            }
        );
        assert_eq!(
            read(r#"{"status": "failed", "code": "from_the_future", "message": "?"}"#).unwrap(),
            Outcome::Failed {
                code: FailureCode::Other,
                message: "?".into()
            }
        );
        let missing = read(r#"{"status": "failed", "message": "m"}"#)
            .unwrap_err()
            .to_string();
        assert!(missing.contains("missing field `code`"), "{missing}");
        let unknown = read(r#"{"status": "exploded"}"#).unwrap_err().to_string();
        assert!(unknown.contains("unknown variant `exploded`"), "{unknown}");
    }

    #[test]
    fn type_names_match_the_serde_tags() {
        let message = Message::Drain(Drain {
            reason: "maintenance".into(),
        });
        let json: serde_json::Value = serde_json::to_value(&message).unwrap();
        assert_eq!(json["type"], message.type_name());
    }
}
