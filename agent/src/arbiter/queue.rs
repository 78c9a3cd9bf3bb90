//! The wait queue's decisions: which waiting job gets a slot when capacity
//! changes (kind priority, higher first, then arrival), and the room held
//! for the head so that jobs behind it, or arriving after it, cannot take
//! the memory it waits for. Pure, like state.rs: the arbiter calls `serve`
//! after every change and wakes the jobs it answered.

use std::cmp::Reverse;

use super::state::{Admission, State};
use super::*;

/// A job waiting in `admit`, and the queue's answer once it has one (kept
/// until the job takes it, or freed if it never does).
#[derive(Debug)]
pub(super) struct Waiter {
    pub(super) kind: JobKind,
    pub(super) answer: Option<Result<Admission, Refusal>>,
}

/// Memory held on one GPU for the head of the queue: other jobs are placed
/// as if it were taken, unless they outrank the head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Held {
    /// The GPU, by its place in the last reading.
    pub(super) gpu: usize,
    /// The head's `vram_mb`.
    pub(super) vram_mb: u64,
    /// The head's priority.
    pub(super) priority: u8,
}

impl State {
    fn priority(&self, kind: &JobKind) -> u8 {
        self.limits.kinds.get(kind).map_or(0, |k| k.priority)
    }

    /// Admits a job arriving now. The room held for the head of the queue
    /// counts as taken unless the job outranks the head: an arrival of the
    /// same priority queues behind it.
    pub(super) fn admit(&mut self, kind: &JobKind, now: Instant) -> Result<Admission, Refusal> {
        let priority = self.priority(kind);
        let held = self.held.filter(|h| priority <= h.priority);
        self.admit_beside(kind, now, held)
    }

    /// Puts a job that `admit` refused into the queue; returns its id.
    pub(super) fn enqueue(&mut self, kind: &JobKind) -> u64 {
        self.next_id += 1;
        let waiter = Waiter {
            kind: kind.clone(),
            answer: None,
        };
        self.waiting.insert(self.next_id, waiter);
        self.next_id
    }

    /// Answers what the queue can answer now, in order: a job that fits
    /// beside the room held so far is admitted, an unknown kind or a
    /// draining node is refused, and the first job that waits for memory
    /// some GPU could give it becomes the head and has room held for it. A
    /// job waiting for its kind's `max_concurrent` holds none: the job it
    /// waits for frees its own memory as it ends, and the queue is served
    /// then, before any arrival. True if any job was answered.
    pub(super) fn serve(&mut self, now: Instant) -> bool {
        let mut held = None;
        let mut answered = false;
        for (id, kind) in self.in_order() {
            let answer = match self.admit_beside(&kind, now, held) {
                Ok(admission) => Ok(admission),
                Err(refusal @ (Refusal::UnknownKind(_) | Refusal::Draining)) => Err(refusal),
                Err(Refusal::Memory { .. } | Refusal::Pressure { .. }) => {
                    held = held.or_else(|| self.room_for(&kind));
                    continue;
                }
                Err(_) => continue,
            };
            if let Some(waiter) = self.waiting.get_mut(&id) {
                waiter.answer = Some(answer);
                answered = true;
            }
        }
        self.held = held;
        answered
    }

    /// The jobs waiting without an answer, in the order they are served.
    /// Priorities are read now: a reload that changes one reorders the
    /// queue.
    fn in_order(&self) -> Vec<(u64, JobKind)> {
        let mut order: Vec<(u64, JobKind)> = self
            .waiting
            .iter()
            .filter(|(_, waiter)| waiter.answer.is_none())
            .map(|(&id, waiter)| (id, waiter.kind.clone()))
            .collect();
        order.sort_by_key(|(id, kind)| (Reverse(self.priority(kind)), *id));
        order
    }

    /// The room to hold for a head of `kind`: its `vram_mb` on the GPU it
    /// will go to as memory frees, taken to be the healthy GPU that may
    /// run it (pressure) and could ever fit it with the most room now,
    /// which needs the least to free. `None` where no GPU ever could.
    fn room_for(&self, kind: &JobKind) -> Option<Held> {
        let limits = self.limits.kinds.get(kind)?;
        let budget = |g: usize| {
            self.gpus[g]
                .memory_total_mb
                .saturating_sub(self.limits.reserve_mb)
        };
        let gpu = (0..self.gpus.len())
            .filter(|&g| self.gpus[g].healthy && self.allowed_on(g, limits.priority))
            .filter(|&g| budget(g) >= limits.vram_mb)
            .max_by_key(|&g| (self.headroom_mb(g), Reverse(g)))?;
        Some(Held {
            gpu,
            vram_mb: limits.vram_mb,
            priority: limits.priority,
        })
    }

    /// Takes job `id` out of the queue with its answer, if it has one.
    pub(super) fn take_answer(&mut self, id: u64) -> Option<Result<Admission, Refusal>> {
        let answer = self.waiting.get_mut(&id)?.answer.take()?;
        self.waiting.remove(&id);
        Some(answer)
    }

    /// Takes job `id` out of the queue at the end of its wait: with its
    /// answer if it has one by now, or else what an arrival of its kind
    /// gets, once the room it may have held is let go.
    pub(super) fn expire(
        &mut self,
        id: u64,
        kind: &JobKind,
        now: Instant,
    ) -> Result<Admission, Refusal> {
        if let Some(answer) = self.take_answer(id) {
            return answer;
        }
        self.waiting.remove(&id);
        self.serve(now);
        self.admit(kind, now)
    }

    /// Takes job `id` out of the queue without an answer (its future was
    /// dropped), freeing the slot it was given if it has one. True if it
    /// was still there.
    pub(super) fn leave(&mut self, id: u64) -> bool {
        let Some(waiter) = self.waiting.remove(&id) else {
            return false;
        };
        if let Some(Ok(admission)) = waiter.answer {
            self.release(admission.id);
        }
        true
    }

    /// Jobs waiting without an answer, per kind (every kind served, zeros
    /// included).
    pub(super) fn waiting_per_kind(&self) -> BTreeMap<JobKind, u32> {
        let mut counts: BTreeMap<JobKind, u32> =
            self.limits.kinds.keys().map(|k| (k.clone(), 0)).collect();
        for waiter in self.waiting.values().filter(|w| w.answer.is_none()) {
            if let Some(count) = counts.get_mut(&waiter.kind) {
                *count += 1;
            }
        }
        counts
    }
}
