//! The NVML backend: NVIDIA GPUs read through `libnvidia-ml`.
//!
//! [`NvmlLibrary`] owns one initialised NVML (loaded from the system, or
//! from `[gpu.nvml] library_path`) and shuts it down when dropped, so a
//! driver can be reloaded once the agent stops. [`NvmlProbe`] borrows it:
//! it lives on the sampler thread, next to the library.
//!
//! Each read lists the schedulable devices: every GPU, or with MIG mode on,
//! the GPU's MIG instances instead (each with its own memory). Per device:
//! memory, utilisation and temperature; `NotSupported` is a missing metric,
//! not an error. A device is unhealthy, with a reason, when NVML says it is
//! lost (`GpuLost`), when a critical Xid that is not an application Xid
//! (`[gpu.nvml] ignored_xids`) arrives, or when it has counted
//! uncorrectable (double-bit) ECC errors since the driver loaded. Xid
//! events are registered one GPU at a time, each in its own event set, so
//! a GPU that cannot be registered costs no other GPU its monitoring.
//!
//! Where NVML lists a device's compute processes with their memory, each
//! reading carries them, with their process groups, so that the arbiter can
//! attribute memory to the `command` jobs that hold it.

use std::collections::HashMap;

use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::device::Device;
use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError, TemperatureSensor};
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::event::EventSet;

use super::{GpuProcess, GpuSnapshot, ProbeError, process_group};
use crate::config::NvmlConfig;

const MIB: u64 = 1024 * 1024;

/// The memory call every read needs; drivers before R510 lack it.
const MEMORY_V2: &str = "nvmlDeviceGetMemoryInfo_v2";

/// An initialised NVML; dropping it calls `nvmlShutdown`.
pub struct NvmlLibrary {
    nvml: Nvml,
}

impl NvmlLibrary {
    /// Loads and initialises NVML.
    pub fn open(config: &NvmlConfig) -> Result<Self, ProbeError> {
        let mut builder = Nvml::builder();
        if let Some(path) = &config.library_path {
            builder.lib_path(path.as_os_str());
        }
        let nvml = builder.init().map_err(|err| {
            let from = config.library_path.as_ref().map_or_else(
                || "libnvidia-ml.so.1".to_owned(),
                |p| p.display().to_string(),
            );
            ProbeError::NvmlUnavailable(format!("{from}: {err}"))
        })?;
        Ok(Self { nvml })
    }

    /// A probe reading this library's GPUs, registered for Xid events.
    pub fn probe(&self, config: &NvmlConfig) -> NvmlProbe<'_> {
        NvmlProbe::new(&self.nvml, config)
    }
}

/// Reads NVIDIA GPUs through an [`NvmlLibrary`].
pub struct NvmlProbe<'a> {
    nvml: &'a Nvml,
    ignored_xids: Vec<u64>,
    /// One event set per GPU that accepted registration, by GPU UUID.
    events: Vec<(String, EventSet<'a>)>,
    /// GPUs (by UUID) taken out for good, with the reason.
    broken: HashMap<String, String>,
    /// UUIDs seen per index, to name a GPU that stops answering.
    known: HashMap<u32, String>,
    memory_v2_missing_told: bool,
}

impl<'a> NvmlProbe<'a> {
    fn new(nvml: &'a Nvml, config: &NvmlConfig) -> Self {
        let mut probe = Self {
            nvml,
            ignored_xids: config.ignored_xids.clone(),
            events: Vec::new(),
            broken: HashMap::new(),
            known: HashMap::new(),
            memory_v2_missing_told: false,
        };
        probe.register_events();
        probe
    }

    /// The same probe, with the GPUs taken out before NVML was initialised
    /// again (by critical Xids, whose events are not replayed) kept out.
    pub fn remembering(mut self, broken: HashMap<String, String>) -> Self {
        self.broken.extend(broken);
        self
    }

    /// The GPUs this probe took out for good, with the reasons.
    pub fn into_broken(self) -> HashMap<String, String> {
        self.broken
    }

    fn register_events(&mut self) {
        let count = self.nvml.device_count().unwrap_or(0);
        for index in 0..count {
            let Ok(device) = self.nvml.device_by_index(index) else {
                continue;
            };
            let Ok(uuid) = device.uuid() else { continue };
            let set = match self.nvml.create_event_set() {
                Ok(set) => set,
                Err(err) => {
                    tracing::warn!(gpu = index, %uuid, error = %err, "cannot create an nvml event set: xid errors of this gpu go unseen");
                    continue;
                }
            };
            match device.register_events(EventTypes::CRITICAL_XID_ERROR, set) {
                Ok(set) => self.events.push((uuid, set)),
                Err(err) => {
                    tracing::warn!(gpu = index, %uuid, error = %err.error, "xid events unavailable on this gpu; the others are still watched");
                }
            }
        }
    }

    /// GPUs with Xid monitoring, by UUID.
    pub fn watched(&self) -> Vec<&str> {
        self.events.iter().map(|(uuid, _)| uuid.as_str()).collect()
    }

    fn drain_xid_events(&mut self) {
        for (uuid, set) in &self.events {
            while let Ok(event) = set.wait(0) {
                let xid = match event.event_data {
                    Some(XidError::Value(xid)) => Some(xid),
                    Some(XidError::Unknown) | None => None,
                };
                if let Some(xid) = xid
                    && self.ignored_xids.contains(&xid)
                {
                    tracing::warn!(gpu = %uuid, xid, "application xid (a CUDA program failed); the gpu stays in admission");
                    continue;
                }
                let reason = match xid {
                    Some(xid) => format!("critical Xid {xid}"),
                    None => "critical Xid (unknown code)".to_owned(),
                };
                tracing::error!(gpu = %uuid, %reason, "gpu taken out of admission until the agent restarts");
                self.broken.entry(uuid.clone()).or_insert(reason);
            }
        }
    }

    /// Current readings of every schedulable device, or why NVML itself
    /// failed (it cannot count the GPUs: the driver was unloaded or
    /// reloaded, say), which initialising it again may mend.
    pub fn read(&mut self) -> Result<Vec<GpuSnapshot>, ProbeError> {
        self.drain_xid_events();
        let count = self
            .nvml
            .device_count()
            .map_err(|err| ProbeError::NvmlUnavailable(format!("nvml stopped answering: {err}")))?;
        let mut snapshots = Vec::with_capacity(count as usize);
        for index in 0..count {
            let known = self.known.get(&index).cloned();
            let device = match self.nvml.device_by_index(index) {
                Ok(device) => device,
                Err(err) => {
                    let uuid = known.unwrap_or_else(|| format!("GPU-unreachable-{index}"));
                    snapshots.push(self.lost(index, uuid, None, &err));
                    continue;
                }
            };
            let uuid = match device.uuid() {
                Ok(uuid) => uuid,
                Err(err) => {
                    let uuid = known.unwrap_or_else(|| format!("GPU-unreachable-{index}"));
                    snapshots.push(self.lost(index, uuid, None, &err));
                    continue;
                }
            };
            self.known.insert(index, uuid.clone());
            if let Ok(ecc) = device.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
                && ecc > 0
            {
                self.broken.entry(uuid.clone()).or_insert_with(|| {
                    tracing::error!(gpu = %uuid, errors = ecc, "uncorrectable ecc errors: gpu taken out of admission");
                    format!("{ecc} uncorrectable (double-bit) ECC errors since the driver loaded")
                });
            }
            let mig_on = matches!(device.mig_mode(), Ok(mode) if mode.current == 1);
            if !mig_on {
                snapshots.push(self.snapshot(&device, index, uuid, None));
                continue;
            }
            let slots = device.mig_device_count().unwrap_or(0);
            for slot in 0..slots {
                let Ok(instance) = device.mig_device_by_index(slot) else {
                    continue;
                };
                match instance.uuid() {
                    Ok(mig_uuid) => {
                        snapshots.push(self.snapshot(&instance, index, mig_uuid, Some(&uuid)));
                    }
                    Err(err) => {
                        let name = format!("{uuid}-mig-{slot}");
                        snapshots.push(self.lost(index, name, Some(&uuid), &err));
                    }
                }
            }
        }
        Ok(snapshots)
    }

    fn snapshot(
        &mut self,
        device: &Device<'_>,
        index: u32,
        uuid: String,
        parent: Option<&str>,
    ) -> GpuSnapshot {
        let memory = match device.memory_info() {
            Ok(memory) => memory,
            Err(err) => return self.lost(index, uuid, parent, &err),
        };
        let reason = self
            .broken
            .get(parent.unwrap_or(&uuid))
            .or_else(|| self.broken.get(&uuid))
            .cloned();
        GpuSnapshot {
            index,
            name: device.name().unwrap_or_else(|_| "NVIDIA GPU".into()),
            memory_total_mb: memory.total / MIB,
            memory_used_mb: memory.total.saturating_sub(memory.free).div_ceil(MIB),
            utilization_pct: device
                .utilization_rates()
                .ok()
                .map(|u| u.gpu.min(100) as u8),
            temperature_c: device.temperature(TemperatureSensor::Gpu).ok(),
            healthy: reason.is_none(),
            reason,
            parent_uuid: parent.map(str::to_owned),
            processes: compute_processes(device, &uuid),
            uuid,
        }
    }

    /// A device that could not be read: no slots, and why.
    fn lost(
        &mut self,
        index: u32,
        uuid: String,
        parent: Option<&str>,
        err: &NvmlError,
    ) -> GpuSnapshot {
        let reason = match err {
            NvmlError::GpuLost => {
                let reason = "GPU lost (fallen off the bus); it needs a reset or a reboot";
                self.broken
                    .entry(parent.unwrap_or(&uuid).to_owned())
                    .or_insert_with(|| {
                        tracing::error!(gpu = %uuid, "gpu lost: taken out of admission");
                        reason.to_owned()
                    });
                reason.to_owned()
            }
            NvmlError::FailedToLoadSymbol(_) => {
                if !self.memory_v2_missing_told {
                    self.memory_v2_missing_told = true;
                    tracing::error!(
                        call = MEMORY_V2,
                        "the nvidia driver lacks {MEMORY_V2} (drivers before R510); upgrade the driver: no gpu gets slots until then"
                    );
                }
                format!("the NVIDIA driver lacks {MEMORY_V2} (drivers before R510); upgrade it")
            }
            other => {
                tracing::warn!(gpu = %uuid, error = %other, "gpu reading failed");
                format!("NVML: {other}")
            }
        };
        GpuSnapshot {
            index,
            uuid,
            name: "NVIDIA GPU".into(),
            memory_total_mb: 0,
            memory_used_mb: 0,
            utilization_pct: None,
            temperature_c: None,
            healthy: false,
            reason: Some(reason),
            parent_uuid: parent.map(str::to_owned),
            processes: None,
        }
    }
}

/// The device's compute processes and the memory each holds, each with its
/// process group. `None` where NVML does not list them (`NotSupported`: MIG
/// instances, older boards; a driver without the call) or the call fails:
/// the arbiter then keeps a job's reservation for its kind's load time and
/// cannot attribute memory to it. A process listed without a memory figure
/// is left out.
fn compute_processes(device: &Device<'_>, uuid: &str) -> Option<Vec<GpuProcess>> {
    let listed = match device.running_compute_processes() {
        Ok(listed) => listed,
        Err(NvmlError::NotSupported) => return None,
        Err(err) => {
            tracing::debug!(gpu = %uuid, error = %err, "compute processes not listed: no per-process memory this reading");
            return None;
        }
    };
    let processes = listed
        .into_iter()
        .filter_map(|process| match process.used_gpu_memory {
            UsedGpuMemory::Used(bytes) => Some(GpuProcess {
                pid: process.pid,
                group: process_group(process.pid),
                used_mb: bytes.div_ceil(MIB),
            }),
            UsedGpuMemory::Unavailable => None,
        })
        .collect();
    Some(processes)
}
