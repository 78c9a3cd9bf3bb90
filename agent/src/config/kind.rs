//! One `[jobs.<kind>]` table: its limits, its executor, and what to do
//! when a job holds more GPU memory than the kind declares.

use std::time::Duration;

use lingua_shared::config_check::{Checker, ConfigError};
use serde::Deserialize;
use toml::Spanned;

/// What the agent does when a `command` job's own processes hold more GPU
/// memory than its kind's `vram_mb` (`[jobs.<kind>] on_vram_overrun`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OverrunAction {
    /// Log it and count it; the job runs on.
    #[default]
    Warn,
    /// Also kill the job's process group and fail the job.
    Kill,
}

impl OverrunAction {
    /// The name used in the config.
    pub fn name(self) -> &'static str {
        match self {
            OverrunAction::Warn => "warn",
            OverrunAction::Kill => "kill",
        }
    }
}

/// How a kind's jobs run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecutorConfig {
    /// Sleep, holding simulated VRAM.
    Simulated {
        /// How long a job runs.
        duration: Duration,
        /// VRAM a running job really holds (defaults to the kind's
        /// `vram_mb`).
        actual_vram_mb: u64,
        /// Utilisation a running job adds to its GPU, in percent.
        utilization_pct: u8,
    },
    /// POST the payload to a local inference service.
    Http {
        /// The service URL; `{gpu_uuid}` and `{gpu_index}` are replaced by
        /// the GPU the job was placed on (one service per GPU).
        url: String,
        /// Request timeout.
        timeout: Duration,
    },
    /// Run a command: payload on stdin, JSON on stdout.
    Command {
        /// Program and arguments.
        argv: Vec<String>,
        /// Time limit; the process group is killed past it.
        timeout: Duration,
    },
}

/// One `[jobs.<kind>]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindConfig {
    /// Estimated VRAM a running job holds, in MiB (an upper bound).
    pub vram_mb: u64,
    /// Higher wins under pressure (0..=100).
    pub priority: u8,
    /// Most jobs of this kind at once.
    pub max_concurrent: u32,
    /// How long a job may wait for a slot before it is refused (0: refuse
    /// at once).
    pub queue_wait: Duration,
    /// How long a job may take to allocate its VRAM (model load); until a
    /// reading taken this long after admission, its `vram_mb` is counted
    /// on top of the measured memory.
    pub load_time: Duration,
    /// What to do when a job's processes hold more than `vram_mb`.
    pub on_vram_overrun: OverrunAction,
    /// How its jobs run.
    pub executor: ExecutorConfig,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKind {
    vram_mb: Option<Spanned<u64>>,
    priority: Option<Spanned<u8>>,
    max_concurrent: Option<Spanned<u32>>,
    queue_wait_ms: Option<Spanned<u64>>,
    load_time_ms: Option<Spanned<u64>>,
    executor: Option<Spanned<String>>,
    url: Option<Spanned<String>>,
    command: Option<Spanned<Vec<String>>>,
    timeout_ms: Option<Spanned<u64>>,
    on_vram_overrun: Option<Spanned<String>>,
    simulated: Option<RawSimulatedKind>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSimulatedKind {
    duration_ms: Option<Spanned<u64>>,
    actual_vram_mb: Option<Spanned<u64>>,
    utilization_pct: Option<Spanned<u8>>,
}

/// The first `{…}` in a URL template that is not a known placeholder.
fn unknown_placeholder(url: &str) -> Option<String> {
    let mut rest = url;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let close = after.find('}').unwrap_or(after.len());
        let name = &after[..close];
        if name != "gpu_uuid" && name != "gpu_index" {
            return Some(name.to_owned());
        }
        rest = &after[close..];
    }
    None
}

pub(super) fn kind_config(
    check: Checker<'_>,
    name: &str,
    span: std::ops::Range<usize>,
    raw: RawKind,
) -> Result<KindConfig, ConfigError> {
    let field = |key: &str| format!("jobs.{name}.{key}");
    let vram_mb = check.range(field("vram_mb"), raw.vram_mb, 0, 0..=10_000_000)?;
    let timeout = Duration::from_millis(check.range(
        field("timeout_ms"),
        raw.timeout_ms,
        30_000,
        1..=3_600_000,
    )?);
    let load_time_field = raw.load_time_ms;
    let on_vram_overrun = match raw.on_vram_overrun {
        None => OverrunAction::Warn,
        Some(action) => match action.get_ref().as_str() {
            "warn" => OverrunAction::Warn,
            "kill" => OverrunAction::Kill,
            other => {
                return Err(check.invalid(
                    field("on_vram_overrun"),
                    action.span(),
                    format!("{other:?} is not an action; use \"warn\" (the default) or \"kill\""),
                ));
            }
        },
    };
    let executor_span = raw.executor.as_ref().map_or(span.clone(), Spanned::span);
    let executor_name = raw
        .executor
        .map_or_else(|| "simulated".to_owned(), Spanned::into_inner);
    let executor = match executor_name.as_str() {
        "simulated" => {
            let sim = raw.simulated.unwrap_or_default();
            ExecutorConfig::Simulated {
                duration: Duration::from_millis(check.range(
                    field("simulated.duration_ms"),
                    sim.duration_ms,
                    150,
                    0..=3_600_000,
                )?),
                actual_vram_mb: check.range(
                    field("simulated.actual_vram_mb"),
                    sim.actual_vram_mb,
                    vram_mb,
                    0..=10_000_000,
                )?,
                utilization_pct: check.range(
                    field("simulated.utilization_pct"),
                    sim.utilization_pct,
                    10,
                    0..=100,
                )?,
            }
        }
        "http" => {
            let Some(url) = raw.url else {
                return Err(check.invalid(
                    field("url"),
                    span,
                    "executor \"http\" needs url = \"http://127.0.0.1:8001/...\"",
                ));
            };
            if !(url.get_ref().starts_with("http://") || url.get_ref().starts_with("https://")) {
                return Err(check.invalid(
                    field("url"),
                    url.span(),
                    format!("{:?} must start with http:// or https://", url.get_ref()),
                ));
            }
            if let Some(bad) = unknown_placeholder(url.get_ref()) {
                return Err(check.invalid(
                    field("url"),
                    url.span(),
                    format!("{{{bad}}} is not a placeholder; use {{gpu_uuid}} or {{gpu_index}}"),
                ));
            }
            ExecutorConfig::Http {
                url: url.into_inner(),
                timeout,
            }
        }
        "command" => {
            let Some(command) = raw.command else {
                return Err(check.invalid(
                    field("command"),
                    span,
                    "executor \"command\" needs command = [\"/path/to/program\", \"args\"]",
                ));
            };
            if command.get_ref().is_empty() || command.get_ref()[0].is_empty() {
                return Err(check.invalid(
                    field("command"),
                    command.span(),
                    "the command needs at least a program",
                ));
            }
            ExecutorConfig::Command {
                argv: command.into_inner(),
                timeout,
            }
        }
        other => {
            return Err(check.invalid(
                field("executor"),
                executor_span,
                format!("{other:?} is not an executor; use \"simulated\", \"http\" or \"command\""),
            ));
        }
    };
    // A command loads its model on every run; a service or the simulator
    // holds its memory already, so one reading shows a job's memory.
    let default_load_ms = match executor {
        ExecutorConfig::Command { .. } => 10_000,
        ExecutorConfig::Simulated { .. } | ExecutorConfig::Http { .. } => 0,
    };
    Ok(KindConfig {
        vram_mb,
        load_time: Duration::from_millis(check.range(
            field("load_time_ms"),
            load_time_field,
            default_load_ms,
            0..=3_600_000,
        )?),
        priority: check.range(field("priority"), raw.priority, 50, 0..=100)?,
        max_concurrent: check.range(field("max_concurrent"), raw.max_concurrent, 1, 1..=10_000)?,
        queue_wait: Duration::from_millis(check.range(
            field("queue_wait_ms"),
            raw.queue_wait_ms,
            0,
            0..=60_000,
        )?),
        on_vram_overrun,
        executor,
    })
}
