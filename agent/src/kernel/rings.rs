//! The programs' ring buffers and loss counts, taken out of the loaded object for the event
//! loop.

use agent_common::{LOSS_SLOTS, LossCounts, maps};
use aya::maps::{MapData, PerCpuArray, RingBuf};

use super::loader::{LoadError, take_map};

/// The two rings: the events that must not be missed, and the execs.
pub struct Rings {
    pub events: RingBuf<MapData>,
    pub execs: RingBuf<MapData>,
}

impl std::fmt::Debug for Rings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rings").finish_non_exhaustive()
    }
}

impl Rings {
    pub fn take(ebpf: &mut aya::Ebpf) -> Result<Self, LoadError> {
        Ok(Self {
            events: take_map(ebpf, maps::EVENTS)?,
            execs: take_map(ebpf, maps::EXECS)?,
        })
    }
}

/// The per-CPU loss counts the programs keep.
pub struct LossMap(PerCpuArray<MapData, LossCounts>);

impl std::fmt::Debug for LossMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LossMap").finish_non_exhaustive()
    }
}

impl LossMap {
    pub fn take(ebpf: &mut aya::Ebpf) -> Result<Self, LoadError> {
        take_map(ebpf, maps::LOST).map(Self)
    }

    /// The counts summed over CPUs (one syscall); `None` when the map cannot be read.
    #[must_use]
    pub fn totals(&self) -> Option<[u64; LOSS_SLOTS]> {
        let per_cpu = self.0.get(&0, 0).ok()?;
        let mut totals = [0u64; LOSS_SLOTS];
        for cpu in per_cpu.iter() {
            for (t, c) in totals.iter_mut().zip(cpu.counts) {
                *t = t.saturating_add(c);
            }
        }
        Some(totals)
    }
}
