//! The arbiter's state behind its lock: the last readings, the jobs
//! admitted and what they hold, the jobs waiting, and the decisions made
//! from them (room per GPU, placement, pressure, attribution of memory to
//! jobs; the queue's own decisions are in queue.rs). Pure: no IO, no clock
//! of its own.

use super::queue::{Held, Waiter};
use super::*;

#[derive(Debug)]
pub(super) struct Admitted {
    pub(super) kind: JobKind,
    pub(super) gpu: Option<String>,
    pub(super) vram_mb: u64,
    pub(super) load_time: Duration,
    pub(super) at: Instant,
    /// The job's process group (`command` jobs, once started).
    pub(super) group: Option<u32>,
    /// What its processes hold in the last reading, where NVML lists
    /// processes on its GPU.
    pub(super) attributed_mb: Option<u64>,
    /// Set once, at the first reading that shows an overrun.
    pub(super) overrun: watch::Sender<Option<Overrun>>,
}

/// A job just admitted, for the arbiter to wrap in a [`Permit`].
#[derive(Debug)]
pub(super) struct Admission {
    pub(super) id: u64,
    pub(super) kind: JobKind,
    pub(super) placement: Option<Placement>,
    pub(super) overrun: watch::Receiver<Option<Overrun>>,
}

#[derive(Debug)]
pub(super) struct State {
    pub(super) limits: Limits,
    pub(super) gpus: Vec<GpuSnapshot>,
    pub(super) reading_taken: Option<Instant>,
    pub(super) unavailable: Option<String>,
    pub(super) admitted: HashMap<u64, Admitted>,
    pub(super) running: BTreeMap<JobKind, u32>,
    pub(super) hot: HashSet<String>,
    pub(super) draining: bool,
    /// The last id given to an admitted or a waiting job: ids grow in
    /// order of arrival.
    pub(super) next_id: u64,
    /// Overruns seen since start, per kind.
    pub(super) overruns: BTreeMap<JobKind, u64>,
    /// Jobs waiting in `admit`, by id, with their answer once the queue
    /// has one for them.
    pub(super) waiting: BTreeMap<u64, Waiter>,
    /// The room held for the head of the queue, as of the last time the
    /// queue was served.
    pub(super) held: Option<Held>,
    /// Jobs running on their kind's fallback executor, per kind.
    pub(super) fallback: BTreeMap<JobKind, u32>,
}

/// The load a GPU's pressure is judged by: utilisation, or where it is not
/// measured (MIG), the share of memory in use.
pub(super) fn load_pct(gpu: &GpuSnapshot) -> u8 {
    gpu.utilization_pct.unwrap_or_else(|| {
        (gpu.memory_used_mb * 100)
            .checked_div(gpu.memory_total_mb)
            .map_or(0, |pct| pct.min(100) as u8)
    })
}

impl State {
    /// Memory of GPU `g` that counts as used, by the stricter of the two
    /// views.
    pub(super) fn committed_mb(&self, g: usize) -> u64 {
        let measured = self.gpus[g].memory_used_mb;
        let uuid = self.gpus[g].uuid.as_str();
        let (mut pending, mut reserved) = (0, 0);
        for job in self.admitted.values() {
            if job.gpu.as_deref() != Some(uuid) {
                continue;
            }
            reserved += job.vram_mb;
            let shows_by = job.at + self.limits.settle.max(job.load_time);
            if self.reading_taken.is_none_or(|taken| taken <= shows_by) {
                // What its own processes already hold is in the measurement.
                pending += job.vram_mb.saturating_sub(job.attributed_mb.unwrap_or(0));
            }
        }
        (measured + pending).max(reserved)
    }

    /// VRAM still free on GPU `g` for new jobs.
    pub(super) fn headroom_mb(&self, g: usize) -> u64 {
        let gpu = &self.gpus[g];
        if !gpu.healthy {
            return 0;
        }
        gpu.memory_total_mb
            .saturating_sub(self.limits.reserve_mb)
            .saturating_sub(self.committed_mb(g))
    }

    /// Whether a kind of this priority may be placed on GPU `g` now.
    pub(super) fn allowed_on(&self, g: usize, priority: u8) -> bool {
        priority >= self.limits.pressure.min_priority || !self.hot.contains(&self.gpus[g].uuid)
    }

    /// Why the readings cannot be trusted now, if they cannot.
    pub(super) fn readings_problem(&self, now: Instant) -> Option<Refusal> {
        if !self.limits.uses_gpus {
            return None;
        }
        if let Some(reason) = &self.unavailable {
            return Some(Refusal::Unavailable(reason.clone()));
        }
        let age = now.saturating_duration_since(self.reading_taken?);
        (age > self.limits.stale_after).then(|| Refusal::Stale {
            age_ms: u64::try_from(age.as_millis()).unwrap_or(u64::MAX),
        })
    }

    pub(super) fn check_kind(&self, kind: &JobKind, now: Instant) -> Result<&KindLimits, Refusal> {
        let limits = self
            .limits
            .kinds
            .get(kind)
            .ok_or_else(|| Refusal::UnknownKind(kind.clone()))?;
        if self.draining {
            return Err(Refusal::Draining);
        }
        if self.running.get(kind).copied().unwrap_or(0) >= limits.max_concurrent {
            return Err(Refusal::Concurrency {
                kind: kind.clone(),
                max: limits.max_concurrent,
            });
        }
        if let Some(problem) = self.readings_problem(now) {
            return Err(problem);
        }
        Ok(limits)
    }

    /// VRAM of GPU `g` free for new jobs, where room `held` for the head
    /// of the queue counts as taken.
    pub(super) fn room_mb(&self, g: usize, held: Option<Held>) -> u64 {
        let held_mb = held.filter(|h| h.gpu == g).map_or(0, |h| h.vram_mb);
        self.headroom_mb(g).saturating_sub(held_mb)
    }

    /// Best fit: the GPU with the least room left that still fits, where
    /// room `held` for the head of the queue counts as taken.
    fn place(
        &self,
        kind: &JobKind,
        limits: &KindLimits,
        held: Option<Held>,
    ) -> Result<usize, Refusal> {
        let room = |g: usize| self.room_mb(g, held);
        // An unhealthy GPU has no room, which a kind taking none would fit.
        let fits = |g: &usize| self.gpus[*g].healthy && room(*g) >= limits.vram_mb;
        let best = (0..self.gpus.len())
            .filter(fits)
            .filter(|&g| self.allowed_on(g, limits.priority))
            .min_by_key(|&g| (room(g), g));
        if let Some(g) = best {
            return Ok(g);
        }
        if (0..self.gpus.len()).any(|g| fits(&g)) {
            return Err(Refusal::Pressure {
                kind: kind.clone(),
                priority: limits.priority,
                min: self.limits.pressure.min_priority,
            });
        }
        Err(Refusal::Memory {
            kind: kind.clone(),
            vram_mb: limits.vram_mb,
        })
    }

    /// Admits a job of `kind` now if every limit allows it, with the room
    /// `held` for the head of the queue counted as taken.
    pub(super) fn admit_beside(
        &mut self,
        kind: &JobKind,
        now: Instant,
        held: Option<Held>,
    ) -> Result<Admission, Refusal> {
        let limits = self.check_kind(kind, now)?.clone();
        let placement = if self.limits.uses_gpus {
            let gpu = &self.gpus[self.place(kind, &limits, held)?];
            Some(Placement {
                index: gpu.index,
                uuid: gpu.uuid.clone(),
            })
        } else {
            None
        };
        self.next_id += 1;
        let id = self.next_id;
        let (overrun_tx, overrun) = watch::channel(None);
        self.admitted.insert(
            id,
            Admitted {
                kind: kind.clone(),
                gpu: placement.as_ref().map(|p| p.uuid.clone()),
                vram_mb: limits.vram_mb,
                load_time: limits.load_time,
                at: now,
                group: None,
                attributed_mb: None,
                overrun: overrun_tx,
            },
        );
        *self.running.entry(kind.clone()).or_default() += 1;
        Ok(Admission {
            id,
            kind: kind.clone(),
            placement,
            overrun,
        })
    }

    /// Frees admitted job `id`'s slot.
    pub(super) fn release(&mut self, id: u64) {
        if let Some(job) = self.admitted.remove(&id)
            && let Some(count) = self.running.get_mut(&job.kind)
        {
            *count = count.saturating_sub(1);
        }
    }

    /// Attributes the last reading's per-process memory to the jobs whose
    /// process group holds it, and signals each job's first overrun.
    pub(super) fn attribute(&mut self) {
        let State {
            gpus,
            admitted,
            overruns,
            limits,
            ..
        } = self;
        for job in admitted.values_mut() {
            job.attributed_mb = job.group.and_then(|group| {
                let gpu = gpus.iter().find(|g| job.gpu.as_ref() == Some(&g.uuid))?;
                let held = gpu.processes.as_ref()?.iter();
                Some(
                    held.filter(|p| p.group == Some(group))
                        .map(|p| p.used_mb)
                        .sum(),
                )
            });
            let Some(used_mb) = job.attributed_mb else {
                continue;
            };
            if used_mb <= job.vram_mb || job.overrun.borrow().is_some() {
                continue;
            }
            *overruns.entry(job.kind.clone()).or_default() += 1;
            let action = limits
                .kinds
                .get(&job.kind)
                .map_or(OverrunAction::Warn, |k| k.on_overrun);
            job.overrun.send_replace(Some(Overrun {
                used_mb,
                declared_mb: job.vram_mb,
                action,
            }));
        }
    }

    pub(super) fn free_slots(&self, kind: &JobKind, now: Instant) -> u32 {
        let Ok(limits) = self.check_kind(kind, now) else {
            return 0;
        };
        let by_count = limits.max_concurrent - self.running.get(kind).copied().unwrap_or(0);
        if !self.limits.uses_gpus {
            return by_count;
        }
        let eligible = (0..self.gpus.len()).filter(|&g| self.allowed_on(g, limits.priority));
        if limits.vram_mb == 0 {
            let any = eligible.into_iter().any(|g| self.gpus[g].healthy);
            return if any { by_count } else { 0 };
        }
        let by_memory: u64 = eligible.map(|g| self.headroom_mb(g) / limits.vram_mb).sum();
        by_count.min(u32::try_from(by_memory).unwrap_or(u32::MAX))
    }
}
