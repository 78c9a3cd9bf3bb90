//! The executor keys of a `[jobs.<kind>]` or `[jobs.<kind>.fallback]`
//! table: what runs the jobs (simulated, an HTTP service, a command).

use std::time::Duration;

use lingua_shared::config_check::{Checker, ConfigError};
use serde::Deserialize;
use toml::Spanned;

use super::Backend;

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

/// The executor keys of a kind or fallback table.
pub(super) struct RawExecutor {
    pub(super) executor: Option<Spanned<String>>,
    pub(super) url: Option<Spanned<String>>,
    pub(super) command: Option<Spanned<Vec<String>>>,
    pub(super) timeout_ms: Option<Spanned<u64>>,
    pub(super) simulated: Option<RawSimulatedKind>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSimulatedKind {
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

/// The executor of a kind (`gpu_vram_mb`: the kind's `vram_mb`) or of its
/// fallback (`None`: its jobs hold no GPU, so nothing may name one), from
/// the keys of the table named `table`. Only on simulated GPUs may the
/// table leave `executor` out (it is then `"simulated"`): on a real node
/// a forgotten line would answer every job with made-up output.
pub(super) fn executor_config(
    check: Checker<'_>,
    table: &str,
    span: std::ops::Range<usize>,
    raw: RawExecutor,
    gpu_vram_mb: Option<u64>,
    backend: Backend,
) -> Result<ExecutorConfig, ConfigError> {
    let field = |key: &str| format!("{table}.{key}");
    let timeout = Duration::from_millis(check.range(
        field("timeout_ms"),
        raw.timeout_ms,
        30_000,
        1..=3_600_000,
    )?);
    let executor_span = raw.executor.as_ref().map_or(span.clone(), Spanned::span);
    let executor_name = match raw.executor {
        Some(name) => name.into_inner(),
        None if backend == Backend::Simulated => "simulated".to_owned(),
        None => {
            return Err(check.invalid(
                field("executor"),
                span,
                format!(
                    "no executor: with backend = \"{}\", name what runs the jobs: executor = \"http\" (with url) or \"command\" (with command); \"simulated\" answers every job with made-up output",
                    backend.name()
                ),
            ));
        }
    };
    match executor_name.as_str() {
        "simulated" => simulated(check, table, raw.simulated.unwrap_or_default(), gpu_vram_mb),
        "http" => {
            let url = http_url(check, (table, span), raw.url, gpu_vram_mb)?;
            Ok(ExecutorConfig::Http { url, timeout })
        }
        "command" => {
            let argv = command(check, (table, span), raw.command)?;
            Ok(ExecutorConfig::Command { argv, timeout })
        }
        other => Err(check.invalid(
            field("executor"),
            executor_span,
            format!("{other:?} is not an executor; use \"simulated\", \"http\" or \"command\""),
        )),
    }
}

/// The simulated executor of the table named `table`; a fallback's
/// (`gpu_vram_mb` none) holds no GPU.
fn simulated(
    check: Checker<'_>,
    table: &str,
    sim: RawSimulatedKind,
    gpu_vram_mb: Option<u64>,
) -> Result<ExecutorConfig, ConfigError> {
    let field = |key: &str| format!("{table}.simulated.{key}");
    if gpu_vram_mb.is_none()
        && let Some((key, span)) = sim
            .actual_vram_mb
            .as_ref()
            .map(|v| ("actual_vram_mb", v.span()))
            .or_else(|| {
                sim.utilization_pct
                    .as_ref()
                    .map(|v| ("utilization_pct", v.span()))
            })
    {
        return Err(check.invalid(
            field(key),
            span,
            "a fallback job holds no GPU: only duration_ms applies",
        ));
    }
    Ok(ExecutorConfig::Simulated {
        duration: Duration::from_millis(check.range(
            field("duration_ms"),
            sim.duration_ms,
            150,
            0..=3_600_000,
        )?),
        actual_vram_mb: check.range(
            field("actual_vram_mb"),
            sim.actual_vram_mb,
            gpu_vram_mb.unwrap_or(0),
            0..=10_000_000,
        )?,
        utilization_pct: check.range(
            field("utilization_pct"),
            sim.utilization_pct,
            if gpu_vram_mb.is_some() { 10 } else { 0 },
            0..=100,
        )?,
    })
}

/// The `url` of an `http` executor: http(s), its placeholders known, and
/// none in a fallback's (`gpu_vram_mb` none: it runs on no GPU).
fn http_url(
    check: Checker<'_>,
    (table, span): (&str, std::ops::Range<usize>),
    url: Option<Spanned<String>>,
    gpu_vram_mb: Option<u64>,
) -> Result<String, ConfigError> {
    let field = format!("{table}.url");
    let Some(url) = url else {
        return Err(check.invalid(
            field,
            span,
            "executor \"http\" needs url = \"http://127.0.0.1:8001/...\"",
        ));
    };
    let text = url.get_ref();
    let problem = if !(text.starts_with("http://") || text.starts_with("https://")) {
        Some(format!("{text:?} must start with http:// or https://"))
    } else if let Some(bad) = unknown_placeholder(text) {
        Some(format!(
            "{{{bad}}} is not a placeholder; use {{gpu_uuid}} or {{gpu_index}}"
        ))
    } else if gpu_vram_mb.is_none() && text.contains('{') {
        Some("a fallback job runs on no GPU: its url cannot name one".to_owned())
    } else {
        None
    };
    match problem {
        Some(message) => Err(check.invalid(field, url.span(), message)),
        None => Ok(url.into_inner()),
    }
}

/// The `command` of a `command` executor: at least a program.
fn command(
    check: Checker<'_>,
    (table, span): (&str, std::ops::Range<usize>),
    command: Option<Spanned<Vec<String>>>,
) -> Result<Vec<String>, ConfigError> {
    let field = format!("{table}.command");
    let Some(command) = command else {
        return Err(check.invalid(
            field,
            span,
            "executor \"command\" needs command = [\"/path/to/program\", \"args\"]",
        ));
    };
    if command.get_ref().first().is_none_or(String::is_empty) {
        return Err(check.invalid(
            field,
            command.span(),
            "the command needs at least a program",
        ));
    }
    Ok(command.into_inner())
}
