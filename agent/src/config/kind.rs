//! One `[jobs.<kind>]` table: its limits, its executor, what to do when
//! a job holds more GPU memory than the kind declares, and what to do
//! when no GPU has room (`busy`, with an optional `[jobs.<kind>.fallback]`
//! executor that runs without a GPU).

use std::time::Duration;

use lingua_shared::config_check::{Checker, ConfigError};
use serde::Deserialize;
use toml::Spanned;

use super::Backend;
use super::executor::{ExecutorConfig, RawExecutor, RawSimulatedKind, executor_config};

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

/// What a job of a kind does when no GPU has room for it
/// (`[jobs.<kind>] busy`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Busy {
    /// It is refused at once: the coordinator tries another node.
    Refuse,
    /// It waits for a slot, up to `queue_wait_ms` when set, and never
    /// longer than it could still finish by its deadline.
    Wait {
        /// `queue_wait_ms`, when set.
        at_most: Option<Duration>,
    },
    /// It runs on the kind's fallback executor, without a GPU, while that
    /// has room.
    Fallback(Fallback),
}

impl Busy {
    /// The name used in the config.
    pub fn name(&self) -> &'static str {
        match self {
            Busy::Refuse => "refuse",
            Busy::Wait { .. } => "wait",
            Busy::Fallback(_) => "fallback",
        }
    }

    /// The fallback executor, with `busy = "fallback"`.
    pub fn fallback(&self) -> Option<&Fallback> {
        match self {
            Busy::Fallback(fallback) => Some(fallback),
            Busy::Refuse | Busy::Wait { .. } => None,
        }
    }
}

/// A kind's `[jobs.<kind>.fallback]` table: an executor that runs its jobs
/// on no GPU (a smaller or slower model), with its own concurrency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fallback {
    /// Most fallback jobs of the kind at once.
    pub max_concurrent: u32,
    /// How they run.
    pub executor: ExecutorConfig,
}

/// One `[jobs.<kind>]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindConfig {
    /// Estimated VRAM a running job holds, in MiB (an upper bound).
    pub vram_mb: u64,
    /// Higher wins under pressure (0..=100).
    pub priority: u8,
    /// Most jobs of this kind at once on the GPUs.
    pub max_concurrent: u32,
    /// What a job does when no GPU has room.
    pub busy: Busy,
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
    busy: Option<Spanned<String>>,
    fallback: Option<Spanned<RawFallback>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFallback {
    max_concurrent: Option<Spanned<u32>>,
    executor: Option<Spanned<String>>,
    url: Option<Spanned<String>>,
    command: Option<Spanned<Vec<String>>>,
    timeout_ms: Option<Spanned<u64>>,
    simulated: Option<RawSimulatedKind>,
}

pub(super) fn kind_config(
    check: Checker<'_>,
    name: &str,
    span: std::ops::Range<usize>,
    raw: RawKind,
    backend: Backend,
) -> Result<KindConfig, ConfigError> {
    let field = |key: &str| format!("jobs.{name}.{key}");
    if backend == Backend::Nvml && raw.vram_mb.is_none() {
        // Left out, it would be 0: jobs admitted by count alone, however
        // little memory the GPU has left.
        return Err(check.invalid(
            field("vram_mb"),
            span,
            "no vram_mb: with backend = \"nvml\" (the default) the arbiter admits a job only on a GPU with this much memory free (MiB), so each kind states it: a little above the peak a job of the kind holds (to measure it, set vram_mb = 0 for a while and watch `lingua-agent probe` as one job runs), or 0 for a kind that uses no GPU memory".to_owned(),
        ));
    }
    let vram_mb = check.range(field("vram_mb"), raw.vram_mb, 0, 0..=10_000_000)?;
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
    let executor = executor_config(
        check,
        &format!("jobs.{name}"),
        span.clone(),
        RawExecutor {
            executor: raw.executor,
            url: raw.url,
            command: raw.command,
            timeout_ms: raw.timeout_ms,
            simulated: raw.simulated,
        },
        Some(vram_mb),
        backend,
    )?;
    // A command loads its model on every run; a service or the simulator
    // holds its memory already, so one reading shows a job's memory.
    let default_load_ms = match executor {
        ExecutorConfig::Command { .. } => 10_000,
        ExecutorConfig::Simulated { .. } | ExecutorConfig::Http { .. } => 0,
    };
    let busy = busy(
        check,
        name,
        span,
        raw.busy,
        raw.queue_wait_ms,
        raw.fallback,
        backend,
    )?;
    Ok(KindConfig {
        vram_mb,
        load_time: Duration::from_millis(check.range(
            field("load_time_ms"),
            raw.load_time_ms,
            default_load_ms,
            0..=3_600_000,
        )?),
        priority: check.range(field("priority"), raw.priority, 50, 0..=100)?,
        max_concurrent: check.range(field("max_concurrent"), raw.max_concurrent, 1, 1..=10_000)?,
        busy,
        on_vram_overrun,
        executor,
    })
}

/// The kind's `busy` policy from `busy`, `queue_wait_ms` and the
/// `[jobs.<kind>.fallback]` table. Without `busy`, a kind with a
/// `queue_wait_ms` above 0 waits and any other refuses.
fn busy(
    check: Checker<'_>,
    name: &str,
    span: std::ops::Range<usize>,
    policy: Option<Spanned<String>>,
    queue_wait_ms: Option<Spanned<u64>>,
    fallback: Option<Spanned<RawFallback>>,
    backend: Backend,
) -> Result<Busy, ConfigError> {
    let field = |key: &str| format!("jobs.{name}.{key}");
    let at_most = check
        .range(field("queue_wait_ms"), queue_wait_ms.clone(), 0, 0..=60_000)
        .map(|ms| (ms > 0).then(|| Duration::from_millis(ms)))?;
    let policy_name = match &policy {
        Some(policy) => policy.get_ref().as_str(),
        None if at_most.is_some() => "wait",
        None if fallback.is_some() => "fallback",
        None => "refuse",
    };
    let policy_span = policy.as_ref().map_or(span, Spanned::span);
    let named = policy.is_some();
    busy_keys_agree(check, name, (policy_name, named), &queue_wait_ms, &fallback)?;
    match policy_name {
        "refuse" => Ok(Busy::Refuse),
        "wait" => Ok(Busy::Wait { at_most }),
        "fallback" => {
            let Some(table) = fallback else {
                return Err(check.invalid(
                    field("busy"),
                    policy_span,
                    format!("busy = \"fallback\" needs a [jobs.{name}.fallback] table with the executor that runs without a GPU"),
                ));
            };
            fallback_config(check, name, table, backend).map(Busy::Fallback)
        }
        other => Err(check.invalid(
            field("busy"),
            policy_span,
            format!("{other:?} is not a busy policy; use \"refuse\", \"wait\" or \"fallback\""),
        )),
    }
}

/// `queue_wait_ms` and a fallback table go with their policy only
/// (`policy_name`, `named` when `busy` was written).
fn busy_keys_agree(
    check: Checker<'_>,
    name: &str,
    (policy_name, named): (&str, bool),
    queue_wait_ms: &Option<Spanned<u64>>,
    fallback: &Option<Spanned<RawFallback>>,
) -> Result<(), ConfigError> {
    let field = |key: &str| format!("jobs.{name}.{key}");
    if policy_name != "wait"
        && let Some(wait) = queue_wait_ms
        && *wait.get_ref() > 0
    {
        return Err(check.invalid(
            field("queue_wait_ms"),
            wait.span(),
            format!("queue_wait_ms applies to busy = \"wait\" only; this kind has busy = {policy_name:?}"),
        ));
    }
    if policy_name != "fallback"
        && let Some(table) = fallback
    {
        let why = if named {
            format!("this kind has busy = {policy_name:?}")
        } else {
            String::from(
                "queue_wait_ms makes this kind wait: remove it, or set busy = \"fallback\"",
            )
        };
        return Err(check.invalid(
            field("fallback"),
            table.span(),
            format!("a [jobs.{name}.fallback] executor runs only with busy = \"fallback\"; {why}"),
        ));
    }
    if policy_name == "wait"
        && let Some(wait) = queue_wait_ms
        && *wait.get_ref() == 0
    {
        return Err(check.invalid(
            field("queue_wait_ms"),
            wait.span(),
            "queue_wait_ms = 0 would refuse at once: use busy = \"refuse\", or leave queue_wait_ms out to wait up to each job's deadline",
        ));
    }
    Ok(())
}

/// The `[jobs.<kind>.fallback]` table of kind `name`.
fn fallback_config(
    check: Checker<'_>,
    name: &str,
    table: Spanned<RawFallback>,
    backend: Backend,
) -> Result<Fallback, ConfigError> {
    let table_span = table.span();
    let table = table.into_inner();
    let executor = executor_config(
        check,
        &format!("jobs.{name}.fallback"),
        table_span,
        RawExecutor {
            executor: table.executor,
            url: table.url,
            command: table.command,
            timeout_ms: table.timeout_ms,
            simulated: table.simulated,
        },
        None,
        backend,
    )?;
    Ok(Fallback {
        max_concurrent: check.range(
            format!("jobs.{name}.fallback.max_concurrent"),
            table.max_concurrent,
            1,
            1..=10_000,
        )?,
        executor,
    })
}

#[cfg(test)]
mod tests {
    use lingua_shared::JobKind;

    use super::*;
    use crate::config::AgentConfig;

    /// A node serving `[jobs.mt]` with `table` as the kind's keys.
    fn kind(table: &str) -> Result<KindConfig, String> {
        let text = format!(
            "node_id = \"n1\"\n[capabilities]\nsrc_langs = [\"zh\"]\ntgt_langs = [\"en\"]\n[gpu]\nbackend = \"simulated\"\n[jobs.mt]\nvram_mb = 1000\n{table}\n"
        );
        AgentConfig::parse(&text)
            .map(|config| config.jobs[&JobKind::new("mt").unwrap()].clone())
            .map_err(|err| err.to_string())
    }

    #[test]
    fn busy_defaults_to_wait_with_a_queue_wait_and_to_refuse_without() {
        assert_eq!(kind("").unwrap().busy, Busy::Refuse);
        assert_eq!(
            kind("queue_wait_ms = 200").unwrap().busy,
            Busy::Wait {
                at_most: Some(Duration::from_millis(200))
            }
        );
        assert_eq!(
            kind("busy = \"wait\"").unwrap().busy,
            Busy::Wait { at_most: None },
            "bounded by each job's deadline only"
        );
        assert_eq!(kind("busy = \"refuse\"").unwrap().busy, Busy::Refuse);
    }

    #[test]
    fn a_fallback_is_an_executor_of_its_own() {
        let config = kind(
            "busy = \"fallback\"\n[jobs.mt.fallback]\nmax_concurrent = 3\nexecutor = \"command\"\ncommand = [\"/usr/bin/mt-cpu\"]\ntimeout_ms = 5000",
        )
        .unwrap();
        assert_eq!(
            config.busy,
            Busy::Fallback(Fallback {
                max_concurrent: 3,
                executor: ExecutorConfig::Command {
                    argv: vec!["/usr/bin/mt-cpu".into()],
                    timeout: Duration::from_secs(5),
                },
            })
        );
        let implied =
            kind("[jobs.mt.fallback]\n[jobs.mt.fallback.simulated]\nduration_ms = 900").unwrap();
        assert_eq!(
            implied.busy,
            Busy::Fallback(Fallback {
                max_concurrent: 1,
                executor: ExecutorConfig::Simulated {
                    duration: Duration::from_millis(900),
                    actual_vram_mb: 0,
                    utilization_pct: 0,
                },
            }),
            "the table alone means busy = \"fallback\""
        );
    }

    #[test]
    fn busy_settings_that_contradict_each_other_are_errors() {
        let cases = [
            (
                "busy = \"later\"",
                "jobs.mt.busy (line 9): \"later\" is not a busy policy",
            ),
            (
                "busy = \"fallback\"",
                "busy = \"fallback\" needs a [jobs.mt.fallback] table",
            ),
            (
                "busy = \"refuse\"\nqueue_wait_ms = 100",
                "queue_wait_ms applies to busy = \"wait\" only",
            ),
            (
                "busy = \"wait\"\nqueue_wait_ms = 0",
                "queue_wait_ms = 0 would refuse at once",
            ),
            (
                "busy = \"wait\"\n[jobs.mt.fallback]",
                "runs only with busy = \"fallback\"; this kind has busy = \"wait\"",
            ),
            (
                "[jobs.mt.fallback]\nmax_concurrent = 0",
                "jobs.mt.fallback.max_concurrent",
            ),
            (
                "[jobs.mt.fallback]\nexecutor = \"http\"\nurl = \"http://127.0.0.1:8001/{gpu_uuid}\"",
                "a fallback job runs on no GPU: its url cannot name one",
            ),
            (
                "[jobs.mt.fallback]\n[jobs.mt.fallback.simulated]\nactual_vram_mb = 10",
                "jobs.mt.fallback.simulated.actual_vram_mb",
            ),
            ("[jobs.mt.fallback]\nvram_mb = 10", "vram_mb"),
            (
                "queue_wait_ms = 100\n[jobs.mt.fallback]",
                "queue_wait_ms makes this kind wait",
            ),
        ];
        for (table, expected) in cases {
            let error = kind(table).unwrap_err();
            assert!(error.contains(expected), "{table:?}: {error}");
        }
    }
}
