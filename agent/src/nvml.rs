//! The NVML backend: NVIDIA GPUs read through `libnvidia-ml`.
//!
//! NVML is initialised once per process. Each read asks every GPU for its
//! memory, utilisation, temperature and name; `NotSupported` is a missing
//! metric, not an error. A GPU that reports a critical Xid error or is lost
//! (`GpuLost`) is marked unhealthy for good: the arbiter gives it no slots
//! until the agent restarts.

use std::collections::HashSet;

use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::event::EventSet;

use crate::config::Backend;
use crate::gpu::{GpuProbe, GpuSnapshot, ProbeError};

const MIB: u64 = 1024 * 1024;

/// Reads NVIDIA GPUs through NVML.
pub struct NvmlProbe {
    nvml: &'static Nvml,
    events: Option<EventSet<'static>>,
    broken: HashSet<String>,
}

impl NvmlProbe {
    /// Loads and initialises NVML, and subscribes to critical Xid errors
    /// where the GPUs support it.
    pub fn init() -> Result<Self, ProbeError> {
        let nvml = Nvml::init().map_err(|e| ProbeError::NvmlUnavailable(e.to_string()))?;
        // NVML lives as long as the process; the event set borrows it.
        let nvml: &'static Nvml = Box::leak(Box::new(nvml));
        let count = nvml
            .device_count()
            .map_err(|e| ProbeError::NvmlUnavailable(e.to_string()))?;
        let mut events = nvml.create_event_set().ok();
        for index in 0..count {
            let (Some(set), Ok(device)) = (events.take(), nvml.device_by_index(index)) else {
                continue;
            };
            events = match device.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
                Ok(set) => Some(set),
                Err(err) => {
                    tracing::info!(gpu = index, error = %err.error, "xid events unavailable");
                    nvml.create_event_set().ok()
                }
            };
        }
        Ok(Self {
            nvml,
            events,
            broken: HashSet::new(),
        })
    }

    fn drain_xid_events(&mut self) {
        let Some(events) = &self.events else { return };
        while let Ok(event) = events.wait(0) {
            if let Ok(uuid) = event.device.uuid() {
                tracing::error!(gpu = %uuid, xid = ?event.event_data, "critical xid error: gpu taken out of admission");
                self.broken.insert(uuid);
            }
        }
    }
}

fn metric<T>(result: Result<T, NvmlError>) -> Option<T> {
    result.ok()
}

impl GpuProbe for NvmlProbe {
    fn backend(&self) -> Backend {
        Backend::Nvml
    }

    fn blocks(&self) -> bool {
        true
    }

    fn read(&mut self) -> Vec<GpuSnapshot> {
        self.drain_xid_events();
        let count = self.nvml.device_count().unwrap_or(0);
        let mut snapshots = Vec::with_capacity(count as usize);
        for index in 0..count {
            let device = match self.nvml.device_by_index(index) {
                Ok(device) => device,
                Err(err) => {
                    tracing::error!(gpu = index, error = %err, "gpu unreachable");
                    snapshots.push(unhealthy(index, format!("GPU-unreachable-{index}")));
                    continue;
                }
            };
            let uuid = device
                .uuid()
                .unwrap_or_else(|_| format!("GPU-unknown-{index}"));
            let memory = match device.memory_info() {
                Ok(memory) => memory,
                Err(err) => {
                    if matches!(err, NvmlError::GpuLost) {
                        self.broken.insert(uuid.clone());
                    }
                    tracing::error!(gpu = %uuid, error = %err, "memory reading failed");
                    snapshots.push(unhealthy(index, uuid));
                    continue;
                }
            };
            snapshots.push(GpuSnapshot {
                index,
                name: device.name().unwrap_or_else(|_| "NVIDIA GPU".into()),
                memory_total_mb: memory.total / MIB,
                memory_used_mb: memory.total.saturating_sub(memory.free).div_ceil(MIB),
                utilization_pct: metric(device.utilization_rates()).map(|u| u.gpu.min(100) as u8),
                temperature_c: metric(device.temperature(TemperatureSensor::Gpu)),
                healthy: !self.broken.contains(&uuid),
                uuid,
            });
        }
        snapshots
    }
}

fn unhealthy(index: u32, uuid: String) -> GpuSnapshot {
    GpuSnapshot {
        index,
        uuid,
        name: "NVIDIA GPU".into(),
        memory_total_mb: 0,
        memory_used_mb: 0,
        utilization_pct: None,
        temperature_c: None,
        healthy: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_driver_init_is_an_error_not_a_panic() {
        // These machines have no NVIDIA driver; on a GPU host this test
        // checks that init succeeds and reads every GPU instead.
        match NvmlProbe::init() {
            Err(ProbeError::NvmlUnavailable(reason)) => assert!(!reason.is_empty()),
            Ok(mut probe) => {
                let snapshots = probe.read();
                assert!(
                    snapshots
                        .iter()
                        .all(|g| g.memory_total_mb > 0 && g.uuid.starts_with("GPU-"))
                );
            }
        }
    }
}
