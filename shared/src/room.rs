//! The room a node has for new jobs, as one pool of memory that every
//! kind shares: what the agent reports (protocol version 2) and what the
//! coordinator's routing hints are computed from. `lua/route_pick.lua`
//! mirrors [`Room::fits`] and [`Room::take`]; docs/ARBITER.md works
//! through an example.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::bounded::{MAX_REPORTED_DEVICES, MAX_REPORTED_KINDS, at_most};
use crate::ids::JobKind;

/// VRAM free for new jobs on each device, and what one job of each kind
/// takes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Room {
    /// MiB free for new jobs on each healthy GPU or MIG instance (after
    /// the node's reserve and what its jobs hold or are loading).
    #[serde(deserialize_with = "at_most::<MAX_REPORTED_DEVICES, _, _>")]
    pub devices_mb: Vec<u64>,
    /// MiB one job of each kind takes (`vram_mb`; 0 for kinds that take
    /// none).
    #[serde(deserialize_with = "at_most::<MAX_REPORTED_KINDS, _, _>")]
    pub vram_mb: BTreeMap<JobKind, u64>,
}

impl Room {
    /// How many jobs of `kind` fit by memory alone, each device on its own
    /// (a job does not span devices); `None` when memory does not limit
    /// the kind (it takes none, or the node did not say).
    pub fn fits(&self, kind: &JobKind) -> Option<u64> {
        let size = self.vram_mb.get(kind).copied().filter(|&mb| mb > 0)?;
        Some(
            self.devices_mb
                .iter()
                .fold(0u64, |fits, free| fits.saturating_add(free / size)),
        )
    }

    /// Takes the memory of one job of `kind` where the node's arbiter
    /// would place it: the device with the least room that still fits it
    /// (best-fit). False when it fits nowhere (nothing is taken).
    pub fn take(&mut self, kind: &JobKind) -> bool {
        let Some(size) = self.vram_mb.get(kind).copied().filter(|&mb| mb > 0) else {
            return true;
        };
        let best = self
            .devices_mb
            .iter_mut()
            .filter(|free| **free >= size)
            .min_by_key(|free| **free);
        match best {
            Some(free) => {
                *free -= size;
                true
            }
            None => false,
        }
    }

    /// The routing hint for `kind`: the node's own count (`free`, which
    /// also holds its concurrency caps and pressure), no more than what
    /// fits in the memory left.
    pub fn hint(&self, kind: &JobKind, free: u32) -> u32 {
        self.fits(kind).map_or(free, |fits| {
            free.min(u32::try_from(fits).unwrap_or(u32::MAX))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(name: &str) -> JobKind {
        JobKind::new(name).unwrap()
    }

    fn room(devices: &[u64]) -> Room {
        Room {
            devices_mb: devices.to_vec(),
            vram_mb: [
                (kind("asr"), 6000),
                (kind("translate"), 3000),
                (kind("vad"), 0),
            ]
            .into_iter()
            .collect(),
        }
    }

    #[test]
    fn every_kind_shrinks_when_any_kind_takes_memory() {
        let mut room = room(&[16_000]);
        assert_eq!(room.fits(&kind("asr")), Some(2));
        assert_eq!(room.fits(&kind("translate")), Some(5));
        assert!(room.take(&kind("asr")));
        assert_eq!(room.fits(&kind("translate")), Some(3));
        assert!(room.take(&kind("asr")));
        assert_eq!(room.fits(&kind("translate")), Some(1));
        assert_eq!(room.fits(&kind("asr")), Some(0));
        assert!(!room.take(&kind("asr")), "nothing left that fits");
        assert_eq!(room.devices_mb, [4000]);
    }

    #[test]
    fn placement_is_best_fit_and_jobs_do_not_span_devices() {
        let mut room = room(&[7000, 4000, 5000]);
        assert_eq!(room.fits(&kind("translate")), Some(4));
        assert!(room.take(&kind("translate")));
        assert_eq!(room.devices_mb, [7000, 1000, 5000]);
        assert_eq!(room.fits(&kind("asr")), Some(1));
    }

    #[test]
    fn kinds_without_memory_follow_the_nodes_count() {
        let mut room = room(&[1000]);
        assert_eq!(room.fits(&kind("vad")), None);
        assert_eq!(room.fits(&kind("unknown")), None);
        assert!(room.take(&kind("vad")));
        assert_eq!(room.hint(&kind("vad"), 7), 7);
        assert_eq!(room.hint(&kind("translate"), 7), 0);
        assert_eq!(room.hint(&kind("translate"), 0), 0);
    }
}
