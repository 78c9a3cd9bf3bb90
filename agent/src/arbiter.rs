//! The slot arbiter: the authority on what this node can run right now.
//!
//! A job of kind K is admitted on GPU g only if, after admission, neither
//! view of g's memory overcommits it:
//!
//! - measured: the memory the probe last saw in use (by anyone) plus the
//!   VRAM of jobs admitted too recently to show in that reading;
//! - reserved: the VRAM of every job admitted and still running;
//!
//! `max(measured, reserved) + vram(K) <= total - reserve_mb`. A job counts
//! as "not showing yet" until a reading taken its kind's load time (at
//! least one sample interval) after its admission: a model that loads
//! slowly stays counted while it loads. Memory taken by other processes
//! shrinks capacity as soon as a reading shows it. Jobs are placed best-fit:
//! on the healthy GPU (or MIG instance) with the least room left that still
//! fits, which keeps large holes for large jobs. On top of memory,
//! `max_concurrent` caps each kind, draining admits nothing, a reading older
//! than `stale_after` admits nothing, and a GPU under utilisation pressure
//! (hysteresis between `pressure_enter_pct` and `pressure_exit_pct`; memory
//! use stands in where utilisation is not measured, as on MIG) takes only
//! kinds with `priority >= pressure_min_priority`. docs/ARBITER.md works
//! through an example.
//!
//! A job that cannot be admitted at once waits (in [`Arbiter::admit`]) up
//! to its kind's `queue_wait` in a queue ordered by kind priority, higher
//! first, then arrival. After every change (a permit dropped, a reading, a
//! reload, drain on or off, a job joining or leaving the queue) the queue
//! is served in that order: a waiting job that fits is admitted, and the
//! first one that waits for memory, the head, has room held for it: its
//! `vram_mb` on the healthy GPU it may use that has the most room now.
//! Jobs behind it, and new arrivals that do not outrank it, are placed as
//! if that room were taken: they may still fit elsewhere (backfill), but
//! cannot starve it. A head waiting for its kind's `max_concurrent` holds
//! no memory: the job it waits for frees its own as it ends. A wait that
//! runs out answers what an arrival would get then; draining answers every
//! waiting job; a dropped `admit` future leaves the queue.
//!
//! A `command` job's permit learns its process group. Where a reading
//! lists the GPU's compute processes with their memory, the memory of the
//! job's group is attributed to it: during its load time only the part of
//! its `vram_mb` not yet held by its own processes is counted on top of
//! the measurement (all of it is released early once they hold it), and a
//! job whose processes hold more than `vram_mb` is an overrun: counted per
//! kind, and signalled to the job through its permit ([`Permit::overrun`])
//! with the kind's `on_vram_overrun` action. Without per-process data
//! (MIG, the simulated backend) the load time alone applies.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use lingua_shared::JobKind;
use lingua_shared::room::Room;
use lingua_shared::sync::lock;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::config::OverrunAction;
use crate::gpu::GpuSnapshot;

/// The most jobs that wait for a slot at once: one more is answered at
/// once. The coordinator assigns only where its hints say there is room,
/// so only a coordinator that ignores them comes near it; each waiting
/// job holds its payload.
pub const MAX_WAITING: usize = 1024;

mod fallback;
mod limits;
mod permit;
mod queue;
mod state;

pub use limits::{KindLimits, Limits};
pub use permit::Permit;
use state::{Admission, State, load_pct};

/// Why a job was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The node does not serve this kind.
    #[error("this node does not run {0} jobs")]
    UnknownKind(JobKind),
    /// The node is draining.
    #[error("the node is draining")]
    Draining,
    /// `max_concurrent` jobs of the kind are running.
    #[error("{kind}: all {max} slots are in use")]
    Concurrency {
        /// The kind.
        kind: JobKind,
        /// Its `max_concurrent`.
        max: u32,
    },
    /// The GPUs are under utilisation pressure and the kind's priority is
    /// below the threshold.
    #[error("{kind}: priority {priority} is below {min} while the GPUs are under pressure")]
    Pressure {
        /// The kind.
        kind: JobKind,
        /// Its priority.
        priority: u8,
        /// The threshold.
        min: u8,
    },
    /// The GPUs cannot be read (NVML unavailable).
    #[error("the GPUs cannot be read: {0}")]
    Unavailable(String),
    /// The last reading is too old to trust (the sampler is stuck).
    #[error("the last GPU reading is {age_ms} ms old; admitting nothing until a fresh one")]
    Stale {
        /// Its age.
        age_ms: u64,
    },
    /// No healthy GPU has the VRAM (the room held for the head of the
    /// wait queue counting as taken).
    #[error("{kind}: no healthy GPU has {vram_mb} MiB free")]
    Memory {
        /// The kind.
        kind: JobKind,
        /// Its `vram_mb`.
        vram_mb: u64,
    },
    /// No GPU had room and every fallback slot of the kind is in use.
    #[error("{kind}: no GPU has room and all {max} fallback slots are in use")]
    Fallback {
        /// The kind.
        kind: JobKind,
        /// Its fallback `max_concurrent`.
        max: u32,
    },
}

/// Where an admitted job runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The GPU's NVML index (for a MIG instance, its GPU's).
    pub index: u32,
    /// The GPU's or MIG instance's UUID: what `CUDA_VISIBLE_DEVICES` takes.
    pub uuid: String,
}

/// A job whose own processes hold more GPU memory than its kind declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overrun {
    /// What its processes hold, MiB.
    pub used_mb: u64,
    /// Its kind's `vram_mb` when it was admitted.
    pub declared_mb: u64,
    /// The kind's `on_vram_overrun`.
    pub action: OverrunAction,
}

/// The slot arbiter. Shared as `Arc<Arbiter>`; permits point back to it.
#[derive(Debug)]
pub struct Arbiter {
    state: Mutex<State>,
    /// Notified when the queue answers waiting jobs.
    answered: Notify,
    version: watch::Sender<u64>,
}

/// A job in the wait queue. Dropping it (its `admit` future was dropped)
/// takes the job out of the queue, and frees a slot it was given but never
/// took.
struct Waiting<'a> {
    arbiter: &'a Arc<Arbiter>,
    kind: &'a JobKind,
    id: u64,
}

impl Waiting<'_> {
    /// The queue's answer, or at `deadline` what an arrival would get then.
    async fn answer(&self, deadline: Instant) -> Result<Permit, Refusal> {
        loop {
            let answered = self.arbiter.answered.notified();
            tokio::pin!(answered);
            answered.as_mut().enable();
            let answer = self.arbiter.lock().take_answer(self.id);
            if let Some(answer) = answer {
                return answer.map(|admission| self.arbiter.permit(admission));
            }
            if tokio::time::timeout_at(deadline, answered).await.is_err() {
                let now = Instant::now();
                let mut state = self.arbiter.lock();
                let answer = state.expire(self.id, self.kind, now);
                self.arbiter.changed(state, now);
                return answer.map(|admission| self.arbiter.permit(admission));
            }
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut state = self.arbiter.lock();
        if state.leave(self.id) {
            self.arbiter.changed(state, Instant::now());
        }
    }
}

impl Arbiter {
    /// An arbiter with these limits and no readings yet (a GPU node admits
    /// nothing until its first reading arrives).
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                limits,
                gpus: Vec::new(),
                reading_taken: None,
                unavailable: None,
                admitted: HashMap::new(),
                running: BTreeMap::new(),
                hot: HashSet::new(),
                draining: false,
                next_id: 0,
                overruns: BTreeMap::new(),
                waiting: BTreeMap::new(),
                held: None,
                fallback: BTreeMap::new(),
            }),
            answered: Notify::new(),
            version: watch::channel(0).0,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No critical section can panic half-way through an update, so the
        // state behind a poisoned lock is consistent.
        lock(&self.state)
    }

    /// After any change: serves the wait queue (under the same lock, so
    /// that no arrival slips in before it), then wakes the waiters it
    /// answered and whoever watches free slots.
    fn changed(&self, mut state: MutexGuard<'_, State>, now: Instant) {
        let answered = state.serve(now);
        drop(state);
        self.version.send_modify(|v| *v = v.wrapping_add(1));
        if answered {
            self.answered.notify_waiters();
        }
    }

    fn permit(self: &Arc<Self>, admission: Admission) -> Permit {
        Permit {
            arbiter: Arc::clone(self),
            id: admission.id,
            fallback: false,
            placement: admission.placement,
            kind: admission.kind,
            overrun: admission.overrun,
        }
    }

    /// Bumped on every change that can change free slots.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Admits a job of `kind` now, or says why not. It may not take the
    /// room held for the head of the wait queue unless it outranks it.
    pub fn try_admit(self: &Arc<Self>, kind: &JobKind) -> Result<Permit, Refusal> {
        self.try_admit_at(kind, Instant::now())
    }

    /// [`Arbiter::try_admit`] at a given time (tests drive the clock).
    pub fn try_admit_at(self: &Arc<Self>, kind: &JobKind, now: Instant) -> Result<Permit, Refusal> {
        let mut state = self.lock();
        let admission = state.admit(kind, now)?;
        self.changed(state, now);
        Ok(self.permit(admission))
    }

    /// Admits a job, or queues it until the queue gives it a slot (see the
    /// module doc for the order), for up to its kind's `queue_wait` and
    /// never past `until`. Kinds without a wait are answered at once, and
    /// so are an unknown kind and a draining node. Dropping the future
    /// takes the job out of the queue.
    pub async fn admit(
        self: &Arc<Self>,
        kind: &JobKind,
        until: Instant,
    ) -> Result<Permit, Refusal> {
        let now = Instant::now();
        let (waiting, wait) = {
            let mut state = self.lock();
            let refusal = match state.admit(kind, now) {
                Ok(admission) => {
                    self.changed(state, now);
                    return Ok(self.permit(admission));
                }
                Err(refusal) => refusal,
            };
            let wait = state
                .limits
                .kinds
                .get(kind)
                .map_or(Duration::ZERO, |k| k.queue_wait);
            let until = now.checked_add(wait).map_or(until, |end| end.min(until));
            let full = state.waiting.len() >= MAX_WAITING;
            if until <= now
                || full
                || matches!(refusal, Refusal::UnknownKind(_) | Refusal::Draining)
            {
                return Err(refusal);
            }
            let waiting = Waiting {
                arbiter: self,
                kind,
                id: state.enqueue(kind),
            };
            // A job that outranks the head becomes the head: the held room
            // moves.
            self.changed(state, now);
            (waiting, until)
        };
        waiting.answer(wait).await
    }

    fn release(&self, id: u64) {
        let mut state = self.lock();
        state.release(id);
        self.changed(state, Instant::now());
    }

    /// Takes a new reading of the GPUs, taken at `taken`.
    pub fn update(&self, gpus: Vec<GpuSnapshot>, taken: Instant) {
        let mut state = self.lock();
        let pressure = state.limits.pressure;
        let mut hot = HashSet::new();
        for gpu in gpus.iter().filter(|g| g.healthy) {
            let load = load_pct(gpu);
            let was_hot = state.hot.contains(&gpu.uuid);
            let now_hot = if was_hot {
                load > pressure.exit_pct
            } else {
                load >= pressure.enter_pct
            };
            if now_hot != was_hot {
                if now_hot {
                    tracing::info!(gpu = %gpu.uuid, load_pct = load, "gpu pressure: admitting high-priority kinds only on this gpu");
                } else {
                    tracing::info!(gpu = %gpu.uuid, load_pct = load, "gpu pressure over");
                }
            }
            if now_hot {
                hot.insert(gpu.uuid.clone());
            }
        }
        if state.unavailable.take().is_some() {
            tracing::info!(gpus = gpus.len(), "gpus readable again");
        }
        state.hot = hot;
        state.gpus = gpus;
        state.reading_taken = Some(taken);
        state.attribute();
        self.changed(state, Instant::now());
    }

    /// Records that the GPUs cannot be read (taken at `taken`): nothing is
    /// admitted until a reading arrives, and `health` says why.
    pub fn update_unavailable(&self, reason: String, taken: Instant) {
        let mut state = self.lock();
        state.gpus.clear();
        state.hot.clear();
        state.attribute();
        state.unavailable = Some(reason);
        state.reading_taken = Some(taken);
        self.changed(state, Instant::now());
    }

    /// Takes one sample of the sampler.
    pub fn publish(&self, reading: crate::gpu::Reading, taken: Instant) {
        match reading {
            Ok(gpus) => self.update(gpus, taken),
            Err(reason) => self.update_unavailable(reason, taken),
        }
    }

    /// Why this node's GPUs admit nothing as a whole, if they do not: NVML
    /// unavailable, or a reading too old.
    pub fn health(&self) -> Option<String> {
        self.lock()
            .readings_problem(Instant::now())
            .map(|problem| problem.to_string())
    }

    /// True while the last reading is recent (the sampler makes progress).
    pub fn fresh(&self) -> bool {
        let state = self.lock();
        state.reading_taken.is_some_and(|t| {
            Instant::now().saturating_duration_since(t) <= state.limits.stale_after
        })
    }

    /// Stops (or resumes) admitting jobs. Draining answers every waiting
    /// job with [`Refusal::Draining`].
    pub fn set_draining(&self, draining: bool) {
        let mut state = self.lock();
        state.draining = draining;
        self.changed(state, Instant::now());
    }

    /// Applies new limits (SIGHUP). Running jobs keep the VRAM they were
    /// admitted with.
    pub fn reconfigure(&self, limits: Limits) {
        let mut state = self.lock();
        state.limits = limits;
        self.changed(state, Instant::now());
    }

    /// How many more jobs of each kind could be admitted now (each count
    /// as if only that kind were admitted).
    pub fn free_slots(&self) -> BTreeMap<JobKind, u32> {
        let state = self.lock();
        let now = Instant::now();
        state
            .limits
            .kinds
            .keys()
            .map(|kind| (kind.clone(), state.free_slots(kind, now)))
            .collect()
    }

    /// The room for new jobs that every kind shares: per healthy GPU, the
    /// VRAM free (less the room held for the head of the queue), and each
    /// kind's `vram_mb`. None without GPUs, or while the readings admit
    /// nothing.
    pub fn room(&self) -> Option<Room> {
        let state = self.lock();
        if !state.limits.uses_gpus || state.readings_problem(Instant::now()).is_some() {
            return None;
        }
        let devices_mb = (0..state.gpus.len())
            .filter(|&g| state.gpus[g].healthy)
            .map(|g| state.room_mb(g, state.held))
            .collect();
        let vram_mb = state
            .limits
            .kinds
            .iter()
            .map(|(kind, limits)| (kind.clone(), limits.vram_mb))
            .collect();
        Some(Room {
            devices_mb,
            vram_mb,
        })
    }

    /// Jobs whose processes held more than their kind's `vram_mb`, per
    /// kind, since start (every kind served, zeros included).
    pub fn vram_overruns(&self) -> BTreeMap<JobKind, u64> {
        let state = self.lock();
        state
            .limits
            .kinds
            .keys()
            .map(|kind| {
                let count = state.overruns.get(kind).copied().unwrap_or(0);
                (kind.clone(), count)
            })
            .collect()
    }

    /// Jobs waiting in the queue, per kind (every kind served, zeros
    /// included).
    pub fn waiting(&self) -> BTreeMap<JobKind, u32> {
        self.lock().waiting_per_kind()
    }

    /// Jobs running now, on GPUs and on fallback executors.
    pub fn running(&self) -> u32 {
        let state = self.lock();
        state.running.values().sum::<u32>() + state.fallback.values().sum::<u32>()
    }

    /// The last GPU reading.
    pub fn gpus(&self) -> Vec<GpuSnapshot> {
        self.lock().gpus.clone()
    }

    /// True while any GPU is under utilisation pressure.
    pub fn under_pressure(&self) -> bool {
        !self.lock().hot.is_empty()
    }

    /// The GPUs (by UUID) under utilisation pressure.
    pub fn hot_gpus(&self) -> Vec<String> {
        let mut hot: Vec<String> = self.lock().hot.iter().cloned().collect();
        hot.sort();
        hot
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::VecDeque;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll, Waker};

    use proptest::prelude::*;

    use super::*;
    use crate::config::{Pressure, SimulatedGpus as SimConfig};
    use crate::gpu::{SimulatedAllocation, SimulatedGpus};

    const TOTAL: u64 = 10_000;
    const RESERVE: u64 = 1_000;

    pub(crate) fn kind(name: &str) -> JobKind {
        JobKind::new(name).unwrap()
    }

    /// A deadline no test reaches: only the kind's `queue_wait` bounds
    /// the wait.
    fn forever() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    /// Limits of `kinds`: (name, VRAM MiB, priority, most at once, queue
    /// wait ms).
    pub(crate) fn limits(kinds: &[(&str, u64, u8, u32, u64)]) -> Limits {
        Limits {
            uses_gpus: true,
            reserve_mb: RESERVE,
            pressure: Pressure {
                enter_pct: 85,
                exit_pct: 78,
                min_priority: 70,
            },
            settle: Duration::from_millis(100),
            stale_after: Duration::from_secs(2),
            kinds: kinds
                .iter()
                .map(|&(name, vram_mb, priority, max_concurrent, wait_ms)| {
                    (
                        kind(name),
                        KindLimits {
                            vram_mb,
                            priority,
                            max_concurrent,
                            queue_wait: Duration::from_millis(wait_ms),
                            fallback: None,
                            load_time: Duration::ZERO,
                            on_overrun: OverrunAction::Warn,
                        },
                    )
                })
                .collect(),
        }
    }

    /// GPU 0, with `used` MiB in use and `util` % busy.
    pub(crate) fn gpu(used: u64, util: u8) -> GpuSnapshot {
        gpu_at(0, used, util)
    }

    fn gpu_at(index: u32, used: u64, util: u8) -> GpuSnapshot {
        GpuSnapshot {
            index,
            uuid: format!("GPU-{index}"),
            name: "test".into(),
            memory_total_mb: TOTAL,
            memory_used_mb: used,
            utilization_pct: Some(util),
            temperature_c: None,
            healthy: true,
            reason: None,
            parent_uuid: None,
            processes: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn admits_until_memory_runs_out_and_frees_on_drop() {
        let arbiter = Arbiter::new(limits(&[("asr", 3000, 50, 10, 0)]));
        assert!(
            matches!(arbiter.try_admit(&kind("asr")), Err(Refusal::Memory { .. })),
            "no reading yet"
        );
        arbiter.update(vec![gpu(0, 0)], Instant::now());
        assert_eq!(arbiter.free_slots()[&kind("asr")], 3);
        let permits: Vec<Permit> = (0..3)
            .map(|_| arbiter.try_admit(&kind("asr")).unwrap())
            .collect();
        assert!(matches!(
            arbiter.try_admit(&kind("asr")),
            Err(Refusal::Memory { .. })
        ));
        assert_eq!(arbiter.free_slots()[&kind("asr")], 0);
        drop(permits);
        assert_eq!(arbiter.running(), 0);
        assert_eq!(arbiter.free_slots()[&kind("asr")], 3);
    }

    #[tokio::test(start_paused = true)]
    async fn the_room_lists_what_each_healthy_gpu_has_left_and_what_each_kind_takes() {
        let arbiter = Arbiter::new(limits(&[("asr", 3000, 90, 10, 0), ("mt", 1000, 50, 10, 0)]));
        let unread = arbiter.room().unwrap();
        assert_eq!(unread.devices_mb, [] as [u64; 0], "no reading yet: no room");
        let mut sick = gpu_at(1, 0, 0);
        sick.healthy = false;
        arbiter.update(vec![gpu_at(0, 500, 0), sick], Instant::now());
        let _asr = arbiter.try_admit(&kind("asr")).unwrap();
        let room = arbiter.room().unwrap();
        assert_eq!(room.devices_mb, [TOTAL - RESERVE - 500 - 3000]);
        assert_eq!(room.vram_mb[&kind("asr")], 3000);
        assert_eq!(room.vram_mb[&kind("mt")], 1000);
        assert_eq!(
            room.fits(&kind("mt")),
            Some(u64::from(arbiter.free_slots()[&kind("mt")])),
            "the room and the per-kind count agree on one kind alone"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn memory_of_other_processes_shrinks_capacity_once_measured() {
        let arbiter = Arbiter::new(limits(&[("asr", 2000, 50, 10, 0)]));
        arbiter.update(vec![gpu(5000, 0)], Instant::now());
        assert_eq!(arbiter.free_slots()[&kind("asr")], 2);
        let _one = arbiter.try_admit(&kind("asr")).unwrap();
        // The job's memory has not shown yet: it is counted on top.
        assert_eq!(arbiter.free_slots()[&kind("asr")], 1);
        tokio::time::advance(Duration::from_millis(200)).await;
        // A later reading shows it (5000 + 2000) and another tenant's 2000.
        arbiter.update(vec![gpu(9000, 0)], Instant::now());
        assert_eq!(arbiter.free_slots()[&kind("asr")], 0);
        assert!(arbiter.try_admit(&kind("asr")).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn max_concurrent_caps_each_kind() {
        let arbiter = Arbiter::new(limits(&[("tts", 100, 50, 2, 0), ("asr", 100, 50, 5, 0)]));
        arbiter.update(vec![gpu(0, 0)], Instant::now());
        let _a = arbiter.try_admit(&kind("tts")).unwrap();
        let _b = arbiter.try_admit(&kind("tts")).unwrap();
        assert_eq!(
            arbiter.try_admit(&kind("tts")).unwrap_err(),
            Refusal::Concurrency {
                kind: kind("tts"),
                max: 2
            }
        );
        assert!(arbiter.try_admit(&kind("asr")).is_ok());
        assert!(matches!(
            arbiter.try_admit(&kind("mt")),
            Err(Refusal::UnknownKind(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn pressure_has_hysteresis_and_favours_high_priority() {
        let arbiter = Arbiter::new(limits(&[
            ("asr", 100, 90, 10, 0),
            ("repair", 100, 20, 10, 0),
        ]));
        for (util, pressure) in [
            (50, false),
            (84, false),
            (85, true),
            (80, true),
            (79, true),
            (78, false),
            (84, false),
        ] {
            arbiter.update(vec![gpu(0, util)], Instant::now());
            assert_eq!(arbiter.under_pressure(), pressure, "at {util}%");
            assert_eq!(
                arbiter.try_admit(&kind("repair")).is_ok(),
                !pressure,
                "low priority at {util}%"
            );
            assert!(
                arbiter.try_admit(&kind("asr")).is_ok(),
                "high priority at {util}%"
            );
        }
        arbiter.update(vec![gpu(0, 95)], Instant::now());
        assert_eq!(arbiter.free_slots()[&kind("repair")], 0);
        assert!(arbiter.free_slots()[&kind("asr")] > 0);
    }

    #[tokio::test(start_paused = true)]
    async fn queue_wait_admits_when_a_slot_frees_in_time() {
        let arbiter = Arbiter::new(limits(&[("asr", 100, 90, 1, 500), ("mt", 100, 50, 1, 0)]));
        arbiter.update(vec![gpu(0, 0)], Instant::now());
        let held = arbiter.try_admit(&kind("asr")).unwrap();
        let waiter = tokio::spawn({
            let arbiter = Arc::clone(&arbiter);
            async move {
                arbiter
                    .admit(&kind("asr"), forever())
                    .await
                    .map(|p| p.kind().clone())
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(held);
        assert_eq!(waiter.await.unwrap(), Ok(kind("asr")));

        // No slot frees within the wait: refused when it runs out.
        let _held = arbiter.try_admit(&kind("asr")).unwrap();
        let started = Instant::now();
        assert!(matches!(
            arbiter.admit(&kind("asr"), forever()).await,
            Err(Refusal::Concurrency { .. })
        ));
        assert_eq!(started.elapsed(), Duration::from_millis(500));
        // A kind without a wait is refused at once.
        let _mt = arbiter.try_admit(&kind("mt")).unwrap();
        let started = Instant::now();
        assert!(arbiter.admit(&kind("mt"), forever()).await.is_err());
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn draining_and_unhealthy_gpus_admit_nothing() {
        let arbiter = Arbiter::new(limits(&[("asr", 100, 50, 10, 1000)]));
        let mut sick = gpu(0, 0);
        sick.healthy = false;
        arbiter.update(vec![sick, gpu_at(1, 0, 0)], Instant::now());
        let permit = arbiter.try_admit(&kind("asr")).unwrap();
        assert_eq!(permit.gpu(), Some(1), "placed on the healthy GPU");
        arbiter.set_draining(true);
        assert_eq!(arbiter.free_slots()[&kind("asr")], 0);
        assert_eq!(
            arbiter.admit(&kind("asr"), forever()).await.unwrap_err(),
            Refusal::Draining
        );
    }

    /// A kind that declares no memory is placed on a healthy GPU, never on
    /// one out of admission (best fit took the unhealthy one's zero room
    /// for the tightest fit), and not at all when none is healthy.
    #[tokio::test(start_paused = true)]
    async fn a_kind_taking_no_memory_is_never_placed_on_an_unhealthy_gpu() {
        let arbiter = Arbiter::new(limits(&[("probe", 0, 50, 10, 0)]));
        let mut sick = gpu(0, 0);
        sick.healthy = false;
        arbiter.update(vec![sick.clone(), gpu_at(1, 0, 0)], Instant::now());
        let permit = arbiter.try_admit(&kind("probe")).unwrap();
        assert_eq!(permit.gpu(), Some(1), "placed on the healthy GPU");
        drop(permit);
        arbiter.update(vec![sick], Instant::now());
        assert_eq!(arbiter.free_slots()[&kind("probe")], 0);
        assert!(
            arbiter.try_admit(&kind("probe")).is_err(),
            "no healthy GPU: refused"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn best_fit_fills_the_fullest_gpu_that_still_fits() {
        let arbiter = Arbiter::new(limits(&[("asr", 1000, 50, 10, 0)]));
        arbiter.update(vec![gpu_at(0, 4000, 0), gpu_at(1, 0, 0)], Instant::now());
        let first = arbiter.try_admit(&kind("asr")).unwrap();
        assert_eq!(
            first.placement(),
            Some(&Placement {
                index: 0,
                uuid: "GPU-0".into()
            }),
            "the fuller GPU that fits"
        );
        let held: Vec<Permit> = (0..4)
            .map(|_| arbiter.try_admit(&kind("asr")).unwrap())
            .collect();
        // GPU 0 had room for 5 (9000 - 4000): all five land there first.
        assert!(held.iter().all(|p| p.gpu() == Some(0)));
        assert_eq!(arbiter.try_admit(&kind("asr")).unwrap().gpu(), Some(1));
    }

    /// The fragmentation case: four 1,000 MiB translate jobs on four GPUs
    /// with 3,000 MiB of budget each; a 3,000 MiB ASR job must still fit.
    /// Worst-fit put one translate job on every GPU and refused the ASR job
    /// with 8,000 MiB free in total.
    #[tokio::test(start_paused = true)]
    async fn best_fit_keeps_a_whole_gpu_for_a_large_job() {
        let arbiter = Arbiter::new(limits(&[
            ("translate", 1000, 50, 10, 0),
            ("asr", 3000, 50, 10, 0),
        ]));
        // Total 10,000 - reserve 1,000 - 6,000 held by others: 3,000 each.
        let gpus = (0..4).map(|i| gpu_at(i, 6000, 0)).collect();
        arbiter.update(gpus, Instant::now());
        let translate: Vec<Permit> = (0..4)
            .map(|_| arbiter.try_admit(&kind("translate")).unwrap())
            .collect();
        let on: Vec<Option<u32>> = translate.iter().map(Permit::gpu).collect();
        assert_eq!(
            on,
            [Some(0), Some(0), Some(0), Some(1)],
            "packed, not spread"
        );
        let asr = arbiter
            .try_admit(&kind("asr"))
            .expect("a whole GPU is left");
        assert_eq!(asr.gpu(), Some(2));
        assert_eq!(arbiter.free_slots()[&kind("asr")], 1);
    }

    #[tokio::test(start_paused = true)]
    async fn pressure_holds_back_low_priority_on_the_hot_gpu_only() {
        let arbiter = Arbiter::new(limits(&[
            ("asr", 100, 90, 10, 0),
            ("repair", 100, 20, 1000, 0),
        ]));
        arbiter.update(vec![gpu_at(0, 0, 95), gpu_at(1, 9000, 10)], Instant::now());
        assert_eq!(arbiter.hot_gpus(), ["GPU-0"]);
        // GPU 1 has room for 0 jobs: the low-priority kind is held back.
        assert!(matches!(
            arbiter.try_admit(&kind("repair")),
            Err(Refusal::Pressure { .. })
        ));
        arbiter.update(vec![gpu_at(0, 0, 95), gpu_at(1, 0, 10)], Instant::now());
        let repair = arbiter.try_admit(&kind("repair")).unwrap();
        assert_eq!(repair.gpu(), Some(1), "placed on the idle GPU");
        assert_eq!(arbiter.free_slots()[&kind("repair")], 89);
        // High priority may use the hot GPU too.
        assert_eq!(arbiter.free_slots()[&kind("asr")], 10);
        // Without utilisation (MIG) memory use stands in for it.
        let mut mig = gpu_at(2, 9000, 0);
        mig.utilization_pct = None;
        arbiter.update(vec![mig], Instant::now());
        assert_eq!(arbiter.hot_gpus(), ["GPU-2"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stale_reading_or_unreadable_gpus_admit_nothing_and_say_why() {
        let arbiter = Arbiter::new(limits(&[("asr", 1000, 50, 10, 0)]));
        arbiter.update(vec![gpu(0, 0)], Instant::now());
        assert!(arbiter.fresh());
        assert_eq!(arbiter.health(), None);
        tokio::time::advance(Duration::from_millis(2001)).await;
        assert!(!arbiter.fresh());
        assert_eq!(
            arbiter.try_admit(&kind("asr")).unwrap_err(),
            Refusal::Stale { age_ms: 2001 }
        );
        assert_eq!(arbiter.free_slots()[&kind("asr")], 0);
        assert!(arbiter.health().unwrap().contains("2001 ms old"));
        arbiter.publish(Err("NVML: Driver Not Loaded".into()), Instant::now());
        assert!(arbiter.fresh(), "the sampler still makes progress");
        assert!(matches!(
            arbiter.try_admit(&kind("asr")),
            Err(Refusal::Unavailable(reason)) if reason.contains("Driver Not Loaded")
        ));
        arbiter.publish(Ok(vec![gpu(0, 0)]), Instant::now());
        assert_eq!(arbiter.health(), None);
        assert!(arbiter.try_admit(&kind("asr")).is_ok());
    }

    /// Polls a future once, as its task would when first scheduled.
    fn poll_once<F: Future + Unpin>(future: &mut F) -> Poll<F::Output> {
        Pin::new(future).poll(&mut Context::from_waker(Waker::noop()))
    }

    /// An `admit` future, polled by hand.
    type Queued<'a> = Pin<Box<dyn Future<Output = Result<Permit, Refusal>> + 'a>>;

    /// Polls each queued job once, as the wake-up of its task would, and
    /// returns those answered (in the order given), which leave `queued`.
    fn answered<'a>(
        queued: &mut Vec<(&'a str, Queued<'_>)>,
    ) -> Vec<(&'a str, Result<Permit, Refusal>)> {
        let mut answered = Vec::new();
        queued.retain_mut(|(label, job)| match poll_once(job) {
            Poll::Pending => true,
            Poll::Ready(answer) => {
                answered.push((*label, answer));
                false
            }
        });
        answered
    }

    fn counts(pairs: &[(&str, u32)]) -> BTreeMap<JobKind, u32> {
        pairs.iter().map(|&(name, n)| (kind(name), n)).collect()
    }

    /// Translate jobs (3,000 MiB) keep arriving, and each one that finishes
    /// frees just enough for the next; an ASR job (6,000 MiB) waiting for
    /// memory must still get in, whether it outranks them or only arrived
    /// first. Room is held for it: translate arrivals are refused until a
    /// second translate job has finished. Without the held room each arrival
    /// took the 3,000 MiB freed and the ASR job waited out its queue_wait.
    #[tokio::test(start_paused = true)]
    async fn a_waiting_large_job_is_not_starved_by_a_stream_of_small_ones() {
        for asr_priority in [90, 50] {
            let arbiter = Arbiter::new(limits(&[
                ("asr", 6000, asr_priority, 10, 60_000),
                ("translate", 3000, 50, 10, 60_000),
            ]));
            arbiter.update(vec![gpu(0, 0)], Instant::now());
            let (asr_kind, translate) = (kind("asr"), kind("translate"));
            let mut running: VecDeque<Permit> = (0..3)
                .map(|_| arbiter.try_admit(&translate).unwrap())
                .collect();
            let mut asr = Box::pin(arbiter.admit(&asr_kind, forever()));
            assert!(poll_once(&mut asr).is_pending(), "9,000 of 9,000 MiB taken");
            running.pop_front();
            assert!(
                matches!(arbiter.try_admit(&translate), Err(Refusal::Memory { .. })),
                "the 3,000 MiB freed are held for asr (priority {asr_priority})"
            );
            let mut queued = Box::pin(arbiter.admit(&translate, forever()));
            assert!(poll_once(&mut queued).is_pending(), "queued behind asr");
            assert!(poll_once(&mut asr).is_pending(), "3,000 of 6,000 MiB free");
            running.pop_front();
            let Poll::Ready(Ok(asr)) = poll_once(&mut asr) else {
                panic!("asr is admitted once 6,000 MiB are free");
            };
            assert_eq!(asr.kind(), &asr_kind);
            assert!(
                poll_once(&mut queued).is_pending(),
                "9,000 of 9,000 MiB taken"
            );
            drop(asr);
            assert!(matches!(poll_once(&mut queued), Poll::Ready(Ok(_))));
            assert!(arbiter.try_admit(&translate).is_ok(), "3,000 MiB left");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_jobs_are_admitted_by_priority_then_arrival() {
        let arbiter = Arbiter::new(limits(&[
            ("asr", 3000, 90, 10, 60_000),
            ("tts", 3000, 50, 10, 60_000),
            ("repair", 3000, 20, 10, 60_000),
        ]));
        arbiter.update(vec![gpu(0, 0)], Instant::now());
        let (asr, tts, repair) = (kind("asr"), kind("tts"), kind("repair"));
        let mut running: VecDeque<Permit> =
            (0..3).map(|_| arbiter.try_admit(&tts).unwrap()).collect();
        // Polled in this order: they arrive in this order.
        let mut queued: Vec<(&str, Queued<'_>)> = vec![
            ("repair 1", Box::pin(arbiter.admit(&repair, forever()))),
            ("tts 1", Box::pin(arbiter.admit(&tts, forever()))),
            ("asr 1", Box::pin(arbiter.admit(&asr, forever()))),
            ("repair 2", Box::pin(arbiter.admit(&repair, forever()))),
            ("asr 2", Box::pin(arbiter.admit(&asr, forever()))),
        ];
        assert!(answered(&mut queued).is_empty());
        assert_eq!(
            arbiter.waiting(),
            counts(&[("asr", 2), ("repair", 2), ("tts", 1)])
        );
        let mut order = Vec::new();
        while !queued.is_empty() {
            running.pop_front();
            let admitted = answered(&mut queued);
            assert_eq!(admitted.len(), 1, "3,000 MiB freed: one job admitted");
            for (label, answer) in admitted {
                order.push(label);
                running.push_back(answer.unwrap());
            }
        }
        assert_eq!(order, ["asr 1", "asr 2", "tts 1", "repair 1", "repair 2"]);
        assert_eq!(
            arbiter.waiting(),
            counts(&[("asr", 0), ("repair", 0), ("tts", 0)])
        );
    }

    /// The head (ASR, 6,000 MiB) has room held on GPU 1, which has the most
    /// room; a translate job behind it that fits on GPU 0 is admitted there,
    /// while GPU 1 takes nothing else until the head fits.
    #[tokio::test(start_paused = true)]
    async fn a_job_behind_the_head_is_admitted_where_it_leaves_the_held_room_alone() {
        let arbiter = Arbiter::new(limits(&[
            ("asr", 6000, 90, 10, 60_000),
            ("translate", 3000, 50, 10, 60_000),
        ]));
        arbiter.update(vec![gpu_at(0, 0, 0), gpu_at(1, 0, 0)], Instant::now());
        let (asr, translate) = (kind("asr"), kind("translate"));
        let mut on_gpu_0: VecDeque<Permit> = (0..3)
            .map(|_| arbiter.try_admit(&translate).unwrap())
            .collect();
        assert!(on_gpu_0.iter().all(|p| p.gpu() == Some(0)));
        // Another tenant takes 5,000 MiB of GPU 1.
        arbiter.update(vec![gpu_at(0, 0, 0), gpu_at(1, 5000, 0)], Instant::now());
        // GPU 0: 0 MiB free; GPU 1: 4,000 MiB free, held for asr.
        let mut queued: Vec<(&str, Queued<'_>)> = vec![
            ("asr", Box::pin(arbiter.admit(&asr, forever()))),
            ("translate", Box::pin(arbiter.admit(&translate, forever()))),
        ];
        assert!(answered(&mut queued).is_empty());
        assert!(matches!(
            arbiter.try_admit(&translate),
            Err(Refusal::Memory { .. })
        ));
        on_gpu_0.pop_front();
        let admitted = answered(&mut queued);
        let [("translate", Ok(backfilled))] = admitted.as_slice() else {
            panic!("translate is admitted beside the held room: {admitted:?}");
        };
        assert_eq!(backfilled.gpu(), Some(0));
        assert!(arbiter.try_admit(&translate).is_err(), "GPU 1 is held");
        // The other tenant on GPU 1 shrinks: 7,000 MiB free, asr fits.
        arbiter.update(vec![gpu_at(0, 0, 0), gpu_at(1, 2000, 0)], Instant::now());
        let admitted = answered(&mut queued);
        let [("asr", Ok(head))] = admitted.as_slice() else {
            panic!("asr is admitted once GPU 1 has room: {admitted:?}");
        };
        assert_eq!(head.gpu(), Some(1));
    }

    /// A head waiting for its kind's `max_concurrent` waits for a job of its
    /// own kind, which frees memory as it ends: it holds none meanwhile.
    #[tokio::test(start_paused = true)]
    async fn a_head_waiting_for_its_kinds_slot_holds_no_memory() {
        let arbiter = Arbiter::new(limits(&[
            ("asr", 3000, 90, 1, 60_000),
            ("translate", 3000, 50, 10, 60_000),
        ]));
        arbiter.update(vec![gpu(0, 0)], Instant::now());
        let (asr, translate) = (kind("asr"), kind("translate"));
        let running = arbiter.try_admit(&asr).unwrap();
        let mut queued: Vec<(&str, Queued<'_>)> =
            vec![("asr", Box::pin(arbiter.admit(&asr, forever())))];
        assert!(answered(&mut queued).is_empty());
        let _first = arbiter.try_admit(&translate).unwrap();
        let _second = arbiter.try_admit(&translate).unwrap();
        drop(running);
        assert!(matches!(answered(&mut queued).as_slice(), [("asr", Ok(_))]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_that_runs_out_leaves_the_queue_with_the_refusal_of_now() {
        let arbiter = Arbiter::new(limits(&[
            ("asr", 6000, 90, 10, 500),
            ("translate", 3000, 50, 10, 0),
        ]));
        arbiter.update(vec![gpu(0, 0)], Instant::now());
        let (asr, translate) = (kind("asr"), kind("translate"));
        let mut running: VecDeque<Permit> = (0..3)
            .map(|_| arbiter.try_admit(&translate).unwrap())
            .collect();
        let mut queued: Vec<(&str, Queued<'_>)> =
            vec![("asr", Box::pin(arbiter.admit(&asr, forever())))];
        assert!(answered(&mut queued).is_empty());
        running.pop_front();
        assert!(arbiter.try_admit(&translate).is_err(), "held for asr");
        tokio::time::advance(Duration::from_millis(500)).await;
        let expired = answered(&mut queued);
        assert!(
            matches!(expired.as_slice(), [("asr", Err(Refusal::Memory { .. }))]),
            "{expired:?}"
        );
        assert_eq!(arbiter.waiting()[&asr], 0);
        assert!(
            arbiter.try_admit(&translate).is_ok(),
            "no room is held for a job that left"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_waiter_leaves_the_queue_and_any_slot_it_was_given() {
        let arbiter = Arbiter::new(limits(&[
            ("asr", 6000, 90, 10, 60_000),
            ("translate", 3000, 50, 10, 0),
        ]));
        arbiter.update(vec![gpu(0, 0)], Instant::now());
        let (asr, translate) = (kind("asr"), kind("translate"));
        let mut running: VecDeque<Permit> = (0..3)
            .map(|_| arbiter.try_admit(&translate).unwrap())
            .collect();
        // Dropped while it waits: out of the queue, and its room with it.
        let mut waiter = Box::pin(arbiter.admit(&asr, forever()));
        assert!(poll_once(&mut waiter).is_pending());
        running.pop_front();
        assert!(arbiter.try_admit(&translate).is_err(), "held for asr");
        drop(waiter);
        assert_eq!(arbiter.waiting()[&asr], 0);
        running.push_back(arbiter.try_admit(&translate).unwrap());

        // Dropped after the queue gave it a slot, before its task took it:
        // the slot is freed, not leaked.
        let mut waiter = Box::pin(arbiter.admit(&asr, forever()));
        assert!(poll_once(&mut waiter).is_pending());
        running.pop_front();
        running.pop_front();
        assert_eq!(arbiter.running(), 2, "one translate job, and asr admitted");
        assert_eq!(arbiter.waiting()[&asr], 0);
        drop(waiter);
        assert_eq!(arbiter.running(), 1);
        assert_eq!(arbiter.lock().waiting.len(), 0);
        assert_eq!(arbiter.free_slots()[&translate], 2);
    }

    /// At most `MAX_WAITING` jobs wait at once: one more is answered at
    /// once, with the refusal of now, whatever its kind's wait. Before, a
    /// coordinator sending more than the node has room for grew the queue
    /// without bound (each waiter holding its job's payload).
    #[tokio::test(start_paused = true)]
    async fn at_most_max_waiting_jobs_wait_at_once() {
        let arbiter = Arbiter::new(limits(&[("asr", 100, 90, 1, 60_000)]));
        arbiter.update(vec![gpu(0, 0)], Instant::now());
        let asr = kind("asr");
        let _running = arbiter.try_admit(&asr).unwrap();
        let mut waiters: Vec<Queued<'_>> = (0..MAX_WAITING)
            .map(|_| Box::pin(arbiter.admit(&asr, forever())) as Queued<'_>)
            .collect();
        for waiter in &mut waiters {
            assert!(poll_once(waiter).is_pending());
        }
        let started = Instant::now();
        assert!(matches!(
            arbiter.admit(&asr, forever()).await,
            Err(Refusal::Concurrency { .. })
        ));
        assert_eq!(started.elapsed(), Duration::ZERO, "answered at once");
        drop(waiters);
        assert_eq!(arbiter.waiting()[&asr], 0);
    }

    #[tokio::test(start_paused = true)]
    async fn draining_answers_every_waiting_job() {
        let arbiter = Arbiter::new(limits(&[
            ("asr", 6000, 90, 1, 60_000),
            ("translate", 3000, 50, 10, 60_000),
        ]));
        arbiter.update(vec![gpu(0, 0)], Instant::now());
        let (asr, translate) = (kind("asr"), kind("translate"));
        let _asr = arbiter.try_admit(&asr).unwrap();
        let _translate = arbiter.try_admit(&translate).unwrap();
        let mut queued: Vec<(&str, Queued<'_>)> = vec![
            ("asr", Box::pin(arbiter.admit(&asr, forever()))),
            ("translate", Box::pin(arbiter.admit(&translate, forever()))),
        ];
        assert!(answered(&mut queued).is_empty());
        assert_eq!(arbiter.waiting(), counts(&[("asr", 1), ("translate", 1)]));
        arbiter.set_draining(true);
        let drained = answered(&mut queued);
        assert!(
            matches!(
                drained.as_slice(),
                [
                    ("asr", Err(Refusal::Draining)),
                    ("translate", Err(Refusal::Draining))
                ]
            ),
            "{drained:?}"
        );
        assert_eq!(arbiter.waiting(), counts(&[("asr", 0), ("translate", 0)]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_reorders_the_queue_and_answers_kinds_no_longer_served() {
        let arbiter = Arbiter::new(limits(&[
            ("asr", 3000, 90, 10, 60_000),
            ("tts", 3000, 50, 10, 60_000),
            ("repair", 3000, 20, 10, 60_000),
        ]));
        arbiter.update(vec![gpu(0, 0)], Instant::now());
        let (asr, tts, repair) = (kind("asr"), kind("tts"), kind("repair"));
        let mut running: VecDeque<Permit> =
            (0..3).map(|_| arbiter.try_admit(&tts).unwrap()).collect();
        let mut queued: Vec<(&str, Queued<'_>)> = vec![
            ("asr", Box::pin(arbiter.admit(&asr, forever()))),
            ("tts", Box::pin(arbiter.admit(&tts, forever()))),
            ("repair", Box::pin(arbiter.admit(&repair, forever()))),
        ];
        assert!(answered(&mut queued).is_empty());
        // asr is no longer served; repair now outranks tts.
        arbiter.reconfigure(limits(&[
            ("tts", 3000, 50, 10, 60_000),
            ("repair", 3000, 80, 10, 60_000),
        ]));
        let gone = answered(&mut queued);
        assert!(
            matches!(gone.as_slice(), [("asr", Err(Refusal::UnknownKind(_)))]),
            "{gone:?}"
        );
        running.pop_front();
        let first = answered(&mut queued);
        assert!(matches!(first.as_slice(), [("repair", Ok(_))]), "{first:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_without_gpus_admits_by_count_alone() {
        let mut no_gpu = limits(&[("mt", 50_000, 50, 2, 0)]);
        no_gpu.uses_gpus = false;
        let arbiter = Arbiter::new(no_gpu);
        let a = arbiter.try_admit(&kind("mt")).unwrap();
        assert_eq!(a.gpu(), None);
        let _b = arbiter.try_admit(&kind("mt")).unwrap();
        assert!(arbiter.try_admit(&kind("mt")).is_err());
        assert_eq!(arbiter.free_slots()[&kind("mt")], 0);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Submit(usize),
        Finish(usize),
        External(u64),
        Tick(u64),
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        prop::collection::vec(
            prop_oneof![
                4 => (0usize..3).prop_map(Op::Submit),
                3 => any::<usize>().prop_map(Op::Finish),
                1 => (0u64..6000).prop_map(Op::External),
                2 => (1u64..300).prop_map(Op::Tick),
            ],
            1..120,
        )
    }

    /// Kinds: (name, estimate, actual footprint as a share of it in %).
    fn kind_table() -> impl Strategy<Value = Vec<(u64, u64, u32)>> {
        prop::collection::vec((100u64..3000, 50u64..=100, 1u32..8), 3)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// Random job streams, kinds and external-memory changes on the
        /// simulated backend, with a sampler reading every 100 ms of model
        /// time: no admission takes simulated used memory over total -
        /// reserve (another process may still grab memory on its own; the
        /// arbiter then admits nothing until usage drops), and a job is never
        /// refused when memory and limits clearly allow it (room even if
        /// every running job were counted twice, and jobs finished since
        /// the last reading still held their memory).
        #[test]
        fn never_overcommits_and_never_refuses_clear_room(kinds in kind_table(), ops in ops()) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
            runtime.block_on(async move {
                let names = ["asr", "mt", "tts"];
                let table: Vec<(&str, u64, u8, u32, u64)> = names
                    .iter()
                    .zip(&kinds)
                    .map(|(name, &(vram, _, max))| (*name, vram, 50, max, 0))
                    .collect();
                let arbiter = Arbiter::new(limits(&table));
                let sim = SimulatedGpus::new(&SimConfig { count: 1, memory_mb: TOTAL, external_used_mb: 0 });
                let mut finished_unseen = 0u64;
                let read = |arbiter: &Arbiter, finished_unseen: &mut u64| {
                    arbiter.update(sim.snapshot(), Instant::now());
                    *finished_unseen = 0;
                };
                read(&arbiter, &mut finished_unseen);
                let mut running: Vec<(Permit, SimulatedAllocation, u64)> = Vec::new();
                let mut since_reading = Duration::ZERO;
                for op in ops {
                    match op {
                        Op::Submit(k) => {
                            let (vram, share, max) = kinds[k];
                            let name = kind(names[k]);
                            let same_kind = running.iter().filter(|(p, _, _)| p.kind() == &name).count() as u32;
                            let external = sim.snapshot()[0].memory_used_mb - running.iter().map(|r| r.2).sum::<u64>();
                            let doubled: u64 = running.iter().map(|(p, _, _)| 2 * table.iter().find(|t| t.0 == p.kind().as_str()).unwrap().1).sum();
                            let clearly_fits = same_kind < max && external + doubled + finished_unseen + vram <= TOTAL - RESERVE;
                            match arbiter.try_admit(&name) {
                                Ok(permit) => {
                                    let actual = vram * share / 100;
                                    let alloc = sim.allocate(0, actual, 0);
                                    running.push((permit, alloc, actual));
                                    let used = sim.snapshot()[0].memory_used_mb;
                                    prop_assert!(used <= TOTAL - RESERVE, "admitting {name} took usage to {used} MiB");
                                }
                                Err(refusal) => prop_assert!(!clearly_fits, "refused with clear room: {refusal}"),
                            }
                        }
                        Op::Finish(i) => {
                            if !running.is_empty() {
                                let (_, _, actual) = running.swap_remove(i % running.len());
                                finished_unseen += actual;
                            }
                        }
                        Op::External(mb) => {
                            sim.set_external(0, mb);
                            // The sampler sees it before the next admission
                            // (the arbiter cannot know of memory it has not
                            // measured).
                            read(&arbiter, &mut finished_unseen);
                        }
                        Op::Tick(ms) => {
                            tokio::time::advance(Duration::from_millis(ms)).await;
                            since_reading += Duration::from_millis(ms);
                            if since_reading >= Duration::from_millis(100) {
                                read(&arbiter, &mut finished_unseen);
                                since_reading = Duration::ZERO;
                            }
                        }
                    }
                }
                Ok(())
            })?;
        }
    }

    #[derive(Debug, Clone)]
    enum SlowOp {
        /// Submit a job of kind k that allocates after this many ms.
        Submit(usize, u64),
        Finish(usize),
        /// Another tenant's memory changes and a reading shows it.
        External(u64),
        /// Another tenant grows by this much between two readings.
        TenantGrows(u64),
        Tick(u64),
    }

    /// The most a job waits before allocating: the kinds' `load_time`.
    const LOAD_MS: u64 = 1_000;

    fn slow_ops() -> impl Strategy<Value = Vec<SlowOp>> {
        prop::collection::vec(
            prop_oneof![
                4 => (0usize..3, 0u64..=LOAD_MS).prop_map(|(k, d)| SlowOp::Submit(k, d)),
                2 => any::<usize>().prop_map(SlowOp::Finish),
                1 => (0u64..5000).prop_map(SlowOp::External),
                1 => (0u64..1500).prop_map(SlowOp::TenantGrows),
                3 => (1u64..400).prop_map(SlowOp::Tick),
            ],
            1..150,
        )
    }

    /// A job in the slow-load model.
    struct Loading {
        permit: Permit,
        declared: u64,
        actual: u64,
        allocate_at: Instant,
        held: Option<SimulatedAllocation>,
        /// A reading was taken since it allocated.
        seen: bool,
    }

    impl Loading {
        /// What it will hold once loaded, as far as anyone can know: its
        /// real footprint, except an under-declared job nobody has seen
        /// allocate yet, which counts as declared.
        fn footprint(&self) -> u64 {
            if self.actual <= self.declared || self.seen {
                self.actual
            } else {
                self.declared
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// Jobs that allocate up to `load_time` after admission (a model
        /// load), that use less or more than they declare (50-150 %), and
        /// another tenant that grows between readings: after every
        /// admission, the tenant's memory last read plus what every running
        /// job will hold once loaded stays within total - reserve.
        #[test]
        fn never_overcommits_with_slow_loads_wrong_estimates_and_a_growing_tenant(
            kinds in prop::collection::vec((500u64..3000, 50u64..=150, 1u32..8), 3),
            ops in slow_ops(),
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
            runtime.block_on(async move {
                let names = ["asr", "mt", "tts"];
                let table: Vec<(&str, u64, u8, u32, u64)> = names
                    .iter()
                    .zip(&kinds)
                    .map(|(name, &(vram, _, max))| (*name, vram, 50, max, 0))
                    .collect();
                let mut limits = limits(&table);
                for kind in limits.kinds.values_mut() {
                    kind.load_time = Duration::from_millis(LOAD_MS);
                }
                let arbiter = Arbiter::new(limits);
                let sim = SimulatedGpus::new(&SimConfig { count: 1, memory_mb: TOTAL, external_used_mb: 0 });
                let mut tenant_read = 0u64;
                let mut tenant = 0u64;
                let mut running: Vec<Loading> = Vec::new();
                let mut since_reading = Duration::ZERO;
                arbiter.update(sim.snapshot(), Instant::now());
                for op in ops {
                    match op {
                        SlowOp::Submit(k, delay) => {
                            let (declared, share, _) = kinds[k];
                            if let Ok(permit) = arbiter.try_admit(&kind(names[k])) {
                                running.push(Loading {
                                    permit,
                                    declared,
                                    actual: declared * share / 100,
                                    allocate_at: Instant::now() + Duration::from_millis(delay),
                                    held: None,
                                    seen: false,
                                });
                                let committed = tenant_read + running.iter().map(Loading::footprint).sum::<u64>();
                                prop_assert!(
                                    committed <= TOTAL - RESERVE,
                                    "admitting {} commits {committed} MiB: tenant {tenant_read}, jobs {:?}",
                                    names[k],
                                    running.iter().map(|j| (j.permit.kind().to_string(), j.declared, j.actual, j.held.is_some())).collect::<Vec<_>>()
                                );
                            }
                        }
                        SlowOp::Finish(i) => {
                            if !running.is_empty() {
                                running.swap_remove(i % running.len());
                            }
                        }
                        SlowOp::External(mb) => {
                            tenant = mb;
                            sim.set_external(0, tenant);
                            arbiter.update(sim.snapshot(), Instant::now());
                            tenant_read = tenant;
                            for job in running.iter_mut().filter(|j| j.held.is_some()) {
                                job.seen = true;
                            }
                        }
                        SlowOp::TenantGrows(mb) => {
                            tenant += mb;
                            sim.set_external(0, tenant);
                        }
                        SlowOp::Tick(ms) => {
                            tokio::time::advance(Duration::from_millis(ms)).await;
                            let now = Instant::now();
                            for job in running.iter_mut().filter(|j| j.held.is_none() && j.allocate_at <= now) {
                                job.held = Some(sim.allocate(0, job.actual, 0));
                            }
                            since_reading += Duration::from_millis(ms);
                            if since_reading >= Duration::from_millis(100) {
                                arbiter.update(sim.snapshot(), now);
                                tenant_read = tenant;
                                for job in running.iter_mut().filter(|j| j.held.is_some()) {
                                    job.seen = true;
                                }
                                since_reading = Duration::ZERO;
                            }
                        }
                    }
                }
                Ok(())
            })?;
        }
    }
}
