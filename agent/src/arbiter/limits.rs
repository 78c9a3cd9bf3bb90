//! What the arbiter is configured with, per kind and per node, as it
//! applies it.

use std::collections::BTreeMap;
use std::time::Duration;

use lingua_shared::JobKind;

use crate::config::{AgentConfig, Backend, Busy, KindConfig, OverrunAction, Pressure};

/// The limits of one kind, as the arbiter applies them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindLimits {
    /// Estimated VRAM of a running job, MiB.
    pub vram_mb: u64,
    /// Priority: higher wins under pressure, and goes first in the wait
    /// queue.
    pub priority: u8,
    /// Most running at once.
    pub max_concurrent: u32,
    /// How long `admit` may wait in the queue for a slot (`busy = "wait"`;
    /// `Duration::MAX` when only the job's deadline bounds it).
    pub queue_wait: Duration,
    /// Most jobs at once on the kind's fallback executor (`busy =
    /// "fallback"`).
    pub fallback: Option<u32>,
    /// How long a job may take to show its memory in a reading.
    pub load_time: Duration,
    /// What a job holding more than `vram_mb` is told to do.
    pub on_overrun: OverrunAction,
}

impl From<&KindConfig> for KindLimits {
    fn from(kind: &KindConfig) -> Self {
        Self {
            vram_mb: kind.vram_mb,
            priority: kind.priority,
            max_concurrent: kind.max_concurrent,
            queue_wait: match kind.busy {
                Busy::Wait { at_most } => at_most.unwrap_or(Duration::MAX),
                Busy::Refuse | Busy::Fallback(_) => Duration::ZERO,
            },
            fallback: kind.busy.fallback().map(|f| f.max_concurrent),
            load_time: kind.load_time,
            on_overrun: kind.on_vram_overrun,
        }
    }
}

/// Everything the arbiter is configured with; replaced as a whole on reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// `false` for backend `none`: admission by `max_concurrent` alone.
    pub uses_gpus: bool,
    /// VRAM per GPU never handed out, MiB.
    pub reserve_mb: u64,
    /// Pressure thresholds.
    pub pressure: Pressure,
    /// How long after admission a job's memory may take to show in a
    /// reading; until then it is counted on top of the measurement.
    pub settle: Duration,
    /// A reading older than this admits nothing.
    pub stale_after: Duration,
    /// Per-kind limits.
    pub kinds: BTreeMap<JobKind, KindLimits>,
}

impl Limits {
    /// The limits a config describes.
    pub fn from_config(config: &AgentConfig) -> Self {
        Self {
            uses_gpus: config.gpu.backend != Backend::None,
            reserve_mb: config.gpu.reserve_mb,
            pressure: config.gpu.pressure,
            settle: config.gpu.poll_interval,
            stale_after: config.gpu.stale_after,
            kinds: config
                .jobs
                .iter()
                .map(|(k, v)| (k.clone(), KindLimits::from(v)))
                .collect(),
        }
    }
}
