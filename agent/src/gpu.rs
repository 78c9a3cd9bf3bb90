//! GPU probes: where the arbiter's readings come from.
//!
//! [`spawn_sampler`] reads a [`Source`] periodically: on a dedicated
//! thread when its reads block (NVML), on a tokio task otherwise, so that a
//! process can host thousands of simulated agents (`lingua-bench`) without
//! a thread each. Three backends: NVML ([`nvml`]), simulated GPUs
//! whose memory and utilisation follow the jobs running on them (tests and
//! the demo), and none (a CPU-only node).
//!
//! The NVML sampler thread owns the library for as long as it runs: when
//! NVML cannot be initialised it publishes the reason (every interval, so
//! that its readings stay fresh) and retries with a doubling pause (capped
//! at [`NVML_RETRY_CAP`]); when NVML fails once initialised (it cannot
//! count the GPUs) it publishes that, shuts NVML down and initialises it
//! again; and when it stops it shuts NVML down. `[gpu] devices` keeps only the GPUs it names.

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lingua_shared::sync::lock;
use serde::Serialize;
use tokio::time::Instant as Taken;

use crate::config::{Backend, DeviceSelector, GpuConfig, SimulatedGpus as SimulatedConfig};

pub mod nvml;

use nvml::NvmlLibrary;

/// The longest pause between two attempts to initialise NVML.
pub const NVML_RETRY_CAP: Duration = Duration::from_secs(30);

/// One sample: the readings, or why there are none (NVML unavailable).
pub type Reading = Result<Vec<GpuSnapshot>, String>;

/// One GPU's readings at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuSnapshot {
    /// Index on the host.
    pub index: u32,
    /// Stable identity.
    pub uuid: String,
    /// Product name.
    pub name: String,
    /// Total memory, MiB.
    pub memory_total_mb: u64,
    /// Memory in use by anyone, MiB.
    pub memory_used_mb: u64,
    /// Utilisation, percent, when measured.
    pub utilization_pct: Option<u8>,
    /// Temperature, °C, when measured.
    pub temperature_c: Option<u32>,
    /// False after a critical error, or when the GPU is lost.
    pub healthy: bool,
    /// Why the GPU is unhealthy.
    pub reason: Option<String>,
    /// For a MIG instance, the UUID of its GPU.
    pub parent_uuid: Option<String>,
    /// The processes holding memory on it, where NVML lists them with
    /// their memory (`None` where it does not, as on MIG instances, and on
    /// the simulated backend).
    pub processes: Option<Vec<GpuProcess>>,
}

/// A process with a compute context on a GPU, as NVML lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GpuProcess {
    /// Its PID, as this host sees it.
    pub pid: u32,
    /// Its process group, when the process could still be asked (a
    /// `command` job's processes share the group of the job).
    pub group: Option<u32>,
    /// GPU memory it holds, MiB.
    pub used_mb: u64,
}

/// The process group of `pid`, or `None` when it has exited (or lives in
/// another PID namespace than the agent).
pub fn process_group(pid: u32) -> Option<u32> {
    let pid = i32::try_from(pid).ok()?;
    nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid)))
        .ok()
        .and_then(|group| u32::try_from(group.as_raw()).ok())
}

/// Why a probe could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The NVML library or driver is not there.
    #[error(
        "NVML is unavailable ({0}); install the NVIDIA driver, or set [gpu] backend = \"none\" on a CPU-only node"
    )]
    NvmlUnavailable(String),
}

/// A source of GPU readings other than NVML. `read` may block when
/// [`GpuProbe::blocks`].
pub trait GpuProbe: Send {
    /// Which backend this is.
    fn backend(&self) -> Backend;
    /// Whether `read` may block (and so needs a thread of its own).
    fn blocks(&self) -> bool {
        false
    }
    /// Current readings of every GPU.
    fn read(&mut self) -> Vec<GpuSnapshot>;
}

/// Where readings come from: a probe, or NVML (opened on the sampler
/// thread, which owns it).
pub struct Source {
    kind: SourceKind,
    devices: Vec<DeviceSelector>,
}

enum SourceKind {
    Probe(Box<dyn GpuProbe>),
    Nvml(crate::config::NvmlConfig),
}

/// Opens the source the config asks for. `simulated` is the shared model of
/// the simulated backend (the simulated executor allocates on it).
pub fn open(config: &GpuConfig, simulated: Option<Arc<SimulatedGpus>>) -> Source {
    let kind = match config.backend {
        Backend::Nvml => SourceKind::Nvml(config.nvml.clone()),
        Backend::Simulated => SourceKind::Probe(Box::new(SimulatedProbe(
            simulated.unwrap_or_else(|| SimulatedGpus::new(&config.simulated)),
        ))),
        Backend::None => SourceKind::Probe(Box::new(NoGpu)),
    };
    Source {
        kind,
        devices: config.devices.clone(),
    }
}

impl Source {
    /// A source reading `probe`, keeping only `devices` (all when empty).
    pub fn probe(probe: Box<dyn GpuProbe>, devices: Vec<DeviceSelector>) -> Self {
        Self {
            kind: SourceKind::Probe(probe),
            devices,
        }
    }

    /// Which backend this is.
    pub fn backend(&self) -> Backend {
        match &self.kind {
            SourceKind::Probe(probe) => probe.backend(),
            SourceKind::Nvml(_) => Backend::Nvml,
        }
    }

    /// One reading now (NVML is opened for it and shut down after).
    pub fn read_once(&mut self) -> Result<Vec<GpuSnapshot>, ProbeError> {
        let gpus = match &mut self.kind {
            SourceKind::Probe(probe) => probe.read(),
            SourceKind::Nvml(config) => {
                let library = NvmlLibrary::open(config)?;
                library.probe(config).read()?
            }
        };
        Ok(select(&self.devices, gpus))
    }
}

/// The readings of the devices `[gpu] devices` names (all when empty). A
/// MIG instance is selected by its own UUID, its GPU's UUID or index.
pub fn select(devices: &[DeviceSelector], gpus: Vec<GpuSnapshot>) -> Vec<GpuSnapshot> {
    if devices.is_empty() {
        return gpus;
    }
    gpus.into_iter()
        .filter(|gpu| {
            devices.iter().any(|d| match d {
                DeviceSelector::Index(index) => gpu.index == *index,
                DeviceSelector::Uuid(uuid) => {
                    gpu.uuid == *uuid || gpu.parent_uuid.as_deref() == Some(uuid.as_str())
                }
            })
        })
        .collect()
}

/// Reads `source` every `interval` and hands each reading to `publish`
/// with when it was taken (as its read began: a job admitted while a
/// read takes long may not show in it), until the returned [`Sampler`] is
/// dropped: on a thread of its own when the source blocks, else on a task
/// of the current tokio runtime.
pub fn spawn_sampler(
    source: Source,
    interval: Duration,
    publish: impl Fn(Reading, Taken) + Send + 'static,
) -> std::io::Result<Sampler> {
    let Source { kind, devices } = source;
    let mut probe = match kind {
        SourceKind::Probe(probe) => probe,
        SourceKind::Nvml(config) => {
            return spawn_thread(move |stopped| {
                nvml_loop(&config, &devices, interval, &publish, stopped);
            });
        }
    };
    if !probe.blocks() {
        let task = tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let taken = Taken::now();
                publish(Ok(select(&devices, probe.read())), taken);
            }
        });
        return Ok(Sampler::Task(task.abort_handle()));
    }
    spawn_thread(move |stopped| {
        loop {
            let taken = Taken::now();
            publish(Ok(select(&devices, probe.read())), taken);
            if stop_requested(stopped, interval) {
                return;
            }
        }
    })
}

/// Waits `pause`; true when the sampler was stopped meanwhile.
fn stop_requested(stopped: &Receiver<()>, pause: Duration) -> bool {
    match stopped.recv_timeout(pause) {
        Err(RecvTimeoutError::Timeout) => false,
        Ok(()) | Err(RecvTimeoutError::Disconnected) => true,
    }
}

fn spawn_thread(body: impl FnOnce(&Receiver<()>) + Send + 'static) -> std::io::Result<Sampler> {
    let (stop, stopped) = mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("gpu-sampler".into())
        .spawn(move || body(&stopped))?;
    Ok(Sampler::Thread {
        stop: Some(stop),
        thread: Some(thread),
    })
}

/// The NVML sampler: initialise (retrying with backoff, publishing why it
/// fails), then read until stopped; NVML is shut down on the way out.
fn nvml_loop(
    config: &crate::config::NvmlConfig,
    devices: &[DeviceSelector],
    interval: Duration,
    publish: &dyn Fn(Reading, Taken),
    stopped: &Receiver<()>,
) {
    let mut pause = interval;
    // GPUs taken out for good stay out when NVML is initialised again.
    let mut broken = HashMap::new();
    loop {
        match NvmlLibrary::open(config) {
            Err(err) => {
                tracing::warn!(error = %err, retry_in_ms = pause.as_millis() as u64, "nvml unavailable: no gpu slots until it initialises");
                // Published every interval until the retry: the sampler is
                // alive (the watchdog is fed), its answer the same.
                let retry_at = Instant::now() + pause;
                loop {
                    publish(Err(err.to_string()), Taken::now());
                    let left = retry_at.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    if stop_requested(stopped, interval.min(left)) {
                        return;
                    }
                }
                pause = (pause * 2).min(NVML_RETRY_CAP);
            }
            Ok(library) => {
                let mut probe = library
                    .probe(config)
                    .remembering(std::mem::take(&mut broken));
                tracing::info!(xid_watched = ?probe.watched(), "nvml initialised");
                loop {
                    let taken = Taken::now();
                    match probe.read() {
                        Ok(gpus) => publish(Ok(select(devices, gpus)), taken),
                        Err(err) => {
                            // Shut down, and initialised again an
                            // interval later.
                            tracing::error!(error = %err, "nvml failed: no gpu slots until it initialises again");
                            publish(Err(err.to_string()), taken);
                            break;
                        }
                    }
                    if stop_requested(stopped, interval) {
                        return;
                    }
                }
                broken = probe.into_broken();
                drop(library);
                pause = interval;
                if stop_requested(stopped, interval) {
                    return;
                }
            }
        }
    }
}

/// The running sampler; dropping it stops it (and waits for its thread).
pub enum Sampler {
    /// A blocking probe's thread.
    Thread {
        /// Dropped to stop the thread.
        stop: Option<mpsc::Sender<()>>,
        /// Joined on drop.
        thread: Option<JoinHandle<()>>,
    },
    /// A non-blocking probe's task.
    Task(tokio::task::AbortHandle),
}

impl Drop for Sampler {
    fn drop(&mut self) {
        match self {
            Self::Thread { stop, thread } => {
                stop.take();
                if let Some(thread) = thread.take() {
                    let _ = thread.join();
                }
            }
            Self::Task(task) => task.abort(),
        }
    }
}

struct NoGpu;

impl GpuProbe for NoGpu {
    fn backend(&self) -> Backend {
        Backend::None
    }

    fn read(&mut self) -> Vec<GpuSnapshot> {
        Vec::new()
    }
}

struct SimulatedProbe(Arc<SimulatedGpus>);

impl GpuProbe for SimulatedProbe {
    fn backend(&self) -> Backend {
        Backend::Simulated
    }

    fn read(&mut self) -> Vec<GpuSnapshot> {
        self.0.snapshot()
    }
}

#[derive(Debug)]
struct SimulatedGpu {
    total_mb: u64,
    external_mb: u64,
    jobs: HashMap<u32, (u64, u8)>,
}

/// Fake GPUs: used memory is what "another process" holds plus what the
/// running jobs really hold; utilisation is the sum of the jobs' share.
/// Each job's memory is listed as a process of its own (its allocation id
/// as PID and process group), as NVML lists compute processes.
#[derive(Debug)]
pub struct SimulatedGpus {
    gpus: Mutex<(u32, Vec<SimulatedGpu>)>,
}

impl SimulatedGpus {
    /// The GPUs of `[gpu.simulated]`.
    pub fn new(config: &SimulatedConfig) -> Arc<Self> {
        let gpus = (0..config.count)
            .map(|_| SimulatedGpu {
                total_mb: config.memory_mb,
                external_mb: config.external_used_mb,
                jobs: HashMap::new(),
            })
            .collect();
        Arc::new(Self {
            gpus: Mutex::new((0, gpus)),
        })
    }

    /// Holds `mb` of memory and `utilization_pct` of GPU `index` until the
    /// returned guard drops; its [`SimulatedAllocation::group`] is the
    /// process group its memory is listed under. An unknown index holds
    /// nothing.
    pub fn allocate(
        self: &Arc<Self>,
        index: u32,
        mb: u64,
        utilization_pct: u8,
    ) -> SimulatedAllocation {
        let mut state = self.lock();
        state.0 = state.0.wrapping_add(1);
        let id = state.0;
        if let Some(gpu) = state.1.get_mut(index as usize) {
            gpu.jobs.insert(id, (mb, utilization_pct));
        }
        SimulatedAllocation {
            gpus: Arc::clone(self),
            index,
            id,
        }
    }

    /// Sets the memory held by processes the agent does not own.
    pub fn set_external(&self, index: u32, mb: u64) {
        if let Some(gpu) = self.lock().1.get_mut(index as usize) {
            gpu.external_mb = mb;
        }
    }

    /// Current readings.
    pub fn snapshot(&self) -> Vec<GpuSnapshot> {
        self.lock()
            .1
            .iter()
            .enumerate()
            .map(|(index, gpu)| {
                let jobs_mb: u64 = gpu.jobs.values().map(|(mb, _)| mb).sum();
                let utilization: u32 = gpu.jobs.values().map(|&(_, pct)| u32::from(pct)).sum();
                GpuSnapshot {
                    index: index as u32,
                    uuid: format!("GPU-simulated-{index}"),
                    name: "Simulated GPU".into(),
                    memory_total_mb: gpu.total_mb,
                    memory_used_mb: gpu.external_mb + jobs_mb,
                    utilization_pct: Some(utilization.min(100) as u8),
                    // Idle at 30 °C, 80 °C at full load: something to show.
                    temperature_c: Some(30 + utilization.min(100) / 2),
                    healthy: true,
                    reason: None,
                    parent_uuid: None,
                    processes: Some(
                        gpu.jobs
                            .iter()
                            .map(|(&id, &(used_mb, _))| GpuProcess {
                                pid: id,
                                group: Some(id),
                                used_mb,
                            })
                            .collect(),
                    ),
                }
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u32, Vec<SimulatedGpu>)> {
        // Every critical section is a few map operations that cannot panic
        // half-way, so the data behind a poisoned lock is consistent.
        lock(&self.gpus)
    }
}

/// Memory held on a simulated GPU by one running job.
#[derive(Debug)]
pub struct SimulatedAllocation {
    gpus: Arc<SimulatedGpus>,
    index: u32,
    id: u32,
}

impl SimulatedAllocation {
    /// The process group its memory is listed under.
    pub fn group(&self) -> u32 {
        self.id
    }
}

impl Drop for SimulatedAllocation {
    fn drop(&mut self) {
        if let Some(gpu) = self.gpus.lock().1.get_mut(self.index as usize) {
            gpu.jobs.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sim() -> Arc<SimulatedGpus> {
        SimulatedGpus::new(&SimulatedConfig {
            count: 2,
            memory_mb: 1000,
            external_used_mb: 100,
        })
    }

    #[test]
    fn simulated_memory_follows_allocations() {
        let gpus = sim();
        let a = gpus.allocate(1, 300, 40);
        let b = gpus.allocate(1, 200, 70);
        let snapshot = gpus.snapshot();
        assert_eq!(snapshot[0].memory_used_mb, 100);
        assert_eq!(snapshot[1].memory_used_mb, 600);
        assert_eq!(snapshot[1].utilization_pct, Some(100));
        drop(a);
        assert_eq!(gpus.snapshot()[1].memory_used_mb, 300);
        gpus.set_external(1, 0);
        assert_eq!(gpus.snapshot()[1].memory_used_mb, 200);
        drop(b);
        assert_eq!(gpus.snapshot()[1].utilization_pct, Some(0));
    }

    /// A probe that says it blocks, to exercise the thread sampler.
    struct Blocking(SimulatedProbe);

    impl GpuProbe for Blocking {
        fn backend(&self) -> Backend {
            Backend::Nvml
        }

        fn blocks(&self) -> bool {
            true
        }

        fn read(&mut self) -> Vec<GpuSnapshot> {
            self.0.read()
        }
    }

    #[test]
    fn a_blocking_probe_is_sampled_on_a_thread_until_dropped() {
        let (tx, rx) = mpsc::channel();
        let probe = Source::probe(Box::new(Blocking(SimulatedProbe(sim()))), Vec::new());
        let sampler = spawn_sampler(probe, Duration::from_millis(1), move |reading, _| {
            let _ = tx.send(reading.map(|r| r.len()));
        })
        .unwrap();
        assert!(matches!(sampler, Sampler::Thread { .. }));
        assert_eq!(rx.recv().unwrap(), Ok(2));
        assert_eq!(rx.recv().unwrap(), Ok(2));
        drop(sampler);
        while rx.recv().is_ok() {}
    }

    /// A probe that takes its time, saying when each read began.
    struct Slow(Arc<Mutex<Vec<Taken>>>);

    impl GpuProbe for Slow {
        fn backend(&self) -> Backend {
            Backend::Nvml
        }

        fn blocks(&self) -> bool {
            true
        }

        fn read(&mut self) -> Vec<GpuSnapshot> {
            lock(&self.0).push(Taken::now());
            std::thread::sleep(Duration::from_millis(20));
            Vec::new()
        }
    }

    /// A reading is dated when its read began, not when it ended: a job
    /// admitted while a read takes long is not taken for one it shows.
    #[test]
    fn a_reading_is_dated_when_its_read_began() {
        let began = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let probe = Source::probe(Box::new(Slow(Arc::clone(&began))), Vec::new());
        let sampler = spawn_sampler(probe, Duration::from_millis(1), move |_, taken| {
            let _ = tx.send(taken);
        })
        .unwrap();
        let taken = rx.recv().unwrap();
        drop(sampler);
        let began = lock(&began)[0];
        assert!(
            taken <= began,
            "dated {:?} after its read began",
            taken - began
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_simulated_probe_is_sampled_on_a_task_until_dropped() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        // Only GPU 1 is selected.
        let probe = Source::probe(
            Box::new(SimulatedProbe(sim())),
            vec![DeviceSelector::Index(1)],
        );
        let sampler = spawn_sampler(probe, Duration::from_millis(100), move |reading, _| {
            let _ = tx.send(reading.map(|r| r.iter().map(|g| g.index).collect::<Vec<_>>()));
        })
        .unwrap();
        assert!(matches!(sampler, Sampler::Task(_)));
        assert_eq!(rx.recv().await, Some(Ok(vec![1])));
        assert_eq!(rx.recv().await, Some(Ok(vec![1])));
        drop(sampler);
        while rx.recv().await.is_some() {}
    }
}
