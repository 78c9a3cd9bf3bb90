//! Slots of the kinds' fallback executors (`busy = "fallback"`): no GPU,
//! no memory, only each fallback's own `max_concurrent`.

use super::*;

impl Arbiter {
    /// A slot of `kind`'s fallback executor (`busy = "fallback"`): no GPU,
    /// no memory, only the fallback's own `max_concurrent`. Refused while
    /// draining, and for kinds without a fallback.
    pub fn try_fallback(self: &Arc<Self>, kind: &JobKind) -> Result<Permit, Refusal> {
        let mut state = self.lock();
        if state.draining {
            return Err(Refusal::Draining);
        }
        let max = state
            .limits
            .kinds
            .get(kind)
            .ok_or_else(|| Refusal::UnknownKind(kind.clone()))?
            .fallback
            .ok_or_else(|| Refusal::Fallback {
                kind: kind.clone(),
                max: 0,
            })?;
        let running = state.fallback.entry(kind.clone()).or_default();
        if *running >= max {
            return Err(Refusal::Fallback {
                kind: kind.clone(),
                max,
            });
        }
        *running += 1;
        self.changed(state, Instant::now());
        Ok(Permit {
            arbiter: Arc::clone(self),
            id: 0,
            fallback: true,
            placement: None,
            kind: kind.clone(),
            overrun: watch::channel(None).1,
        })
    }

    pub(super) fn release_fallback(&self, kind: &JobKind) {
        let mut state = self.lock();
        if let Some(running) = state.fallback.get_mut(kind) {
            *running = running.saturating_sub(1);
        }
        self.changed(state, Instant::now());
    }

    /// How many more jobs each kind with a fallback executor could run on
    /// it now (none while draining).
    pub fn fallback_slots(&self) -> BTreeMap<JobKind, u32> {
        let state = self.lock();
        state
            .limits
            .kinds
            .iter()
            .filter_map(|(kind, limits)| {
                let max = limits.fallback?;
                let running = state.fallback.get(kind).copied().unwrap_or(0);
                let free = if state.draining {
                    0
                } else {
                    max.saturating_sub(running)
                };
                Some((kind.clone(), free))
            })
            .collect()
    }
}
