//! An admitted job's slot: where it runs, what its processes may hold;
//! freed when dropped.

use std::sync::Arc;

use lingua_shared::JobKind;
use tokio::sync::watch;

use super::{Arbiter, Overrun, Placement};

/// An admitted job's slot. Dropping it frees the slot.
#[derive(Debug)]
pub struct Permit {
    pub(super) arbiter: Arc<Arbiter>,
    pub(super) id: u64,
    /// A slot of the kind's fallback executor: no GPU, no memory.
    pub(super) fallback: bool,
    pub(super) placement: Option<Placement>,
    pub(super) kind: JobKind,
    pub(super) overrun: watch::Receiver<Option<Overrun>>,
}

impl Permit {
    /// The GPU's index the job was placed on (`None` on a node without
    /// GPUs).
    pub fn gpu(&self) -> Option<u32> {
        self.placement.as_ref().map(|p| p.index)
    }

    /// The GPU or MIG instance the job was placed on.
    pub fn placement(&self) -> Option<&Placement> {
        self.placement.as_ref()
    }

    /// The job's kind.
    pub fn kind(&self) -> &JobKind {
        &self.kind
    }

    /// True for a slot of the kind's fallback executor.
    pub fn is_fallback(&self) -> bool {
        self.fallback
    }

    /// Tells the arbiter the job's process group, so that readings listing
    /// GPU processes attribute their memory to it.
    pub fn watch_process_group(&self, group: u32) {
        if let Some(job) = self.arbiter.lock().admitted.get_mut(&self.id) {
            job.group = Some(group);
        }
    }

    /// Resolves at the first reading in which the job's processes hold more
    /// than its kind's `vram_mb`; never, where that cannot be seen.
    pub async fn overrun(&self) -> Overrun {
        let mut seen = self.overrun.clone();
        if let Ok(overrun) = seen.wait_for(Option::is_some).await
            && let Some(overrun) = *overrun
        {
            return overrun;
        }
        std::future::pending().await
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.fallback {
            self.arbiter.release_fallback(&self.kind);
        } else {
            self.arbiter.release(self.id);
        }
    }
}
