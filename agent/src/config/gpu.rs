//! The `[gpu]` table: which probe, which GPUs, how often they are read,
//! and the arbiter's pressure mode.

use std::path::PathBuf;
use std::time::Duration;

use lingua_shared::config_check::{Checker, ConfigError};
use serde::Deserialize;
use toml::Spanned;

/// Which GPU probe to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// NVIDIA GPUs through NVML.
    Nvml,
    /// Fake GPUs whose memory follows the jobs (tests, the demo).
    Simulated,
    /// No GPU: admission by `max_concurrent` alone.
    None,
}

impl Backend {
    /// The name used in the config and in `probe` output.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Nvml => "nvml",
            Backend::Simulated => "simulated",
            Backend::None => "none",
        }
    }
}

/// The simulated GPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimulatedGpus {
    /// How many.
    pub count: u32,
    /// Memory of each, in MiB.
    pub memory_mb: u64,
    /// Memory held on each by processes the agent does not own.
    pub external_used_mb: u64,
}

/// The utilisation-pressure mode of the arbiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pressure {
    /// Enter pressure when a GPU's utilisation reaches this (percent).
    pub enter_pct: u8,
    /// Leave pressure when every GPU is at or below this (percent).
    pub exit_pct: u8,
    /// Under pressure only kinds with at least this priority are admitted.
    pub min_priority: u8,
}

/// Application Xids: errors a CUDA program causes (a bad kernel, a
/// process killed mid-work) that leave the GPU itself fine.
pub const DEFAULT_IGNORED_XIDS: [u64; 6] = [13, 31, 43, 45, 68, 109];

/// One entry of `[gpu] devices`: a GPU (or MIG instance) by UUID, or a GPU
/// by its NVML index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSelector {
    /// `GPU-…` or `MIG-…`.
    Uuid(String),
    /// The NVML index (the order of `nvidia-smi -L`).
    Index(u32),
}

/// The `[gpu.nvml]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NvmlConfig {
    /// Load NVML from this file instead of the system's `libnvidia-ml.so.1`.
    pub library_path: Option<PathBuf>,
    /// Xid errors that do not take a GPU out.
    pub ignored_xids: Vec<u64>,
}

/// The `[gpu]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuConfig {
    /// The probe.
    pub backend: Backend,
    /// The GPUs this agent schedules on (empty: all of them).
    pub devices: Vec<DeviceSelector>,
    /// A reading older than this admits nothing.
    pub stale_after: Duration,
    /// NVML settings.
    pub nvml: NvmlConfig,
    /// VRAM per GPU never handed out.
    pub reserve_mb: u64,
    /// How often the probe is read.
    pub poll_interval: Duration,
    /// Pressure thresholds.
    pub pressure: Pressure,
    /// The simulated GPUs (backend `simulated`).
    pub simulated: SimulatedGpus,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawGpu {
    backend: Option<Spanned<String>>,
    reserve_mb: Option<Spanned<u64>>,
    poll_interval_ms: Option<Spanned<u64>>,
    pressure_enter_pct: Option<Spanned<u8>>,
    pressure_exit_pct: Option<Spanned<u8>>,
    pressure_min_priority: Option<Spanned<u8>>,
    devices: Option<Spanned<Vec<RawDevice>>>,
    stale_after_ms: Option<Spanned<u64>>,
    nvml: Option<RawNvml>,
    simulated: Option<RawSimulatedGpus>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawDevice {
    Index(i64),
    Uuid(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNvml {
    library_path: Option<Spanned<PathBuf>>,
    ignored_xids: Option<Spanned<Vec<u64>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSimulatedGpus {
    count: Option<Spanned<u32>>,
    memory_mb: Option<Spanned<u64>>,
    external_used_mb: Option<Spanned<u64>>,
}

pub(super) fn gpu_config(check: Checker<'_>, raw: RawGpu) -> Result<GpuConfig, ConfigError> {
    let backend = backend(check, raw.backend)?;
    let pressure = pressure(
        check,
        (raw.pressure_enter_pct, raw.pressure_exit_pct),
        raw.pressure_min_priority,
    )?;
    let simulated = simulated(check, raw.simulated.unwrap_or_default())?;
    let poll_interval = Duration::from_millis(check.range(
        "gpu.poll_interval_ms",
        raw.poll_interval_ms,
        500,
        10..=60_000,
    )?);
    Ok(GpuConfig {
        backend,
        stale_after: stale_after(check, raw.stale_after_ms, poll_interval)?,
        devices: devices(check, raw.devices)?,
        nvml: nvml(check, raw.nvml.unwrap_or_default())?,
        reserve_mb: check.range("gpu.reserve_mb", raw.reserve_mb, 1024, 0..=10_000_000)?,
        poll_interval,
        pressure,
        simulated,
    })
}

fn backend(check: Checker<'_>, name: Option<Spanned<String>>) -> Result<Backend, ConfigError> {
    let Some(name) = name else {
        return Ok(Backend::Nvml);
    };
    match name.get_ref().as_str() {
        "nvml" => Ok(Backend::Nvml),
        "simulated" => Ok(Backend::Simulated),
        "none" => Ok(Backend::None),
        other => Err(check.invalid(
            "gpu.backend",
            name.span(),
            format!("{other:?} is not a backend; use \"nvml\", \"simulated\" or \"none\""),
        )),
    }
}

fn pressure(
    check: Checker<'_>,
    (enter, exit): (Option<Spanned<u8>>, Option<Spanned<u8>>),
    min_priority: Option<Spanned<u8>>,
) -> Result<Pressure, ConfigError> {
    let exit_span = exit.as_ref().map(Spanned::span);
    let pressure = Pressure {
        enter_pct: check.range("gpu.pressure_enter_pct", enter, 85, 1..=100)?,
        exit_pct: check.range("gpu.pressure_exit_pct", exit, 78, 0..=100)?,
        min_priority: check.range("gpu.pressure_min_priority", min_priority, 70, 0..=100)?,
    };
    if pressure.exit_pct < pressure.enter_pct {
        return Ok(pressure);
    }
    let message = format!(
        "{} must be below pressure_enter_pct ({}) so the mode has hysteresis",
        pressure.exit_pct, pressure.enter_pct
    );
    Err(match exit_span {
        Some(span) => check.invalid("gpu.pressure_exit_pct", span, message),
        None => ConfigError::invalid("gpu.pressure_exit_pct", message),
    })
}

fn simulated(check: Checker<'_>, sim: RawSimulatedGpus) -> Result<SimulatedGpus, ConfigError> {
    Ok(SimulatedGpus {
        count: check.range("gpu.simulated.count", sim.count, 1, 1..=64)?,
        memory_mb: check.range(
            "gpu.simulated.memory_mb",
            sim.memory_mb,
            24_576,
            1..=10_000_000,
        )?,
        external_used_mb: check.range(
            "gpu.simulated.external_used_mb",
            sim.external_used_mb,
            0,
            0..=10_000_000,
        )?,
    })
}

/// How old a reading may be, by default five intervals (at least 2 s),
/// and always longer than one.
fn stale_after(
    check: Checker<'_>,
    value: Option<Spanned<u64>>,
    poll_interval: Duration,
) -> Result<Duration, ConfigError> {
    let default_stale = (5 * poll_interval.as_millis() as u64).max(2_000);
    let stale_after = Duration::from_millis(check.range(
        "gpu.stale_after_ms",
        value,
        default_stale,
        1..=3_600_000,
    )?);
    if stale_after > poll_interval {
        return Ok(stale_after);
    }
    Err(ConfigError::invalid(
        "gpu.stale_after_ms",
        format!(
            "{} ms must be longer than poll_interval_ms ({} ms), or every reading is stale",
            stale_after.as_millis(),
            poll_interval.as_millis()
        ),
    ))
}

fn devices(
    check: Checker<'_>,
    list: Option<Spanned<Vec<RawDevice>>>,
) -> Result<Vec<DeviceSelector>, ConfigError> {
    let Some(list) = list else {
        return Ok(Vec::new());
    };
    let span = list.span();
    let mut devices = Vec::new();
    for device in list.into_inner() {
        devices.push(match device {
            RawDevice::Index(index) => DeviceSelector::Index(u32::try_from(index).map_err(|_| {
                check.invalid("gpu.devices", span.clone(), format!("{index} is not a GPU index"))
            })?),
            RawDevice::Uuid(uuid) if uuid.starts_with("GPU-") || uuid.starts_with("MIG-") => {
                DeviceSelector::Uuid(uuid)
            }
            RawDevice::Uuid(other) => {
                return Err(check.invalid(
                    "gpu.devices",
                    span,
                    format!("{other:?} is neither a GPU index nor a UUID like \"GPU-…\" or \"MIG-…\" (see nvidia-smi -L)"),
                ));
            }
        });
    }
    if devices.is_empty() {
        return Err(check.invalid(
            "gpu.devices",
            span,
            "list at least one GPU, or leave devices out to use them all",
        ));
    }
    Ok(devices)
}

fn nvml(check: Checker<'_>, raw: RawNvml) -> Result<NvmlConfig, ConfigError> {
    let library_path = match raw.library_path {
        None => None,
        Some(path) if path.get_ref().as_os_str().is_empty() => {
            return Err(check.invalid(
                "gpu.nvml.library_path",
                path.span(),
                "give the path of libnvidia-ml.so.1, or leave it out",
            ));
        }
        Some(path) => Some(path.into_inner()),
    };
    Ok(NvmlConfig {
        library_path,
        ignored_xids: raw
            .ignored_xids
            .map_or_else(|| DEFAULT_IGNORED_XIDS.to_vec(), Spanned::into_inner),
    })
}
