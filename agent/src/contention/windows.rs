//! Counts read by windows. The sampling and off-CPU programs count into the window userspace
//! names (bit 0 of map `WINDOW`, kept in the keys' stack ids as `WINDOW_BIT`); the reader flips
//! it, lets the programs in flight finish, then takes the previous window's counts, which no
//! program adds to any more. Counts are exact, and shares describe the recent past. The CPU
//! samples' reader then frees the stacks only those counts used; the off-CPU reader clears its
//! stacks every few minutes instead (a sleeping thread's stack is in use until it wakes).

use std::collections::HashSet;

use agent_common::{LossKind, LossReason, SampleKey, WINDOW_BIT, maps};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, StackTraceMap};

use crate::{
    kernel::loader::{LoadError, take_map},
    model::loss::Losses,
};

/// How long programs that read the old window may still be running: they run for
/// microseconds.
const SETTLE: std::time::Duration = std::time::Duration::from_millis(5);

/// The window programs count into.
pub struct Window {
    map: Array<MapData, u32>,
    current: u32,
}

impl std::fmt::Debug for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Window")
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

impl Window {
    pub fn take(ebpf: &mut aya::Ebpf) -> Result<Self, LoadError> {
        Ok(Self {
            map: take_map(ebpf, maps::WINDOW)?,
            current: 0,
        })
    }

    /// Starts the next window; returns the previous one's bit, whose counts are then complete.
    pub fn flip(&mut self) -> u32 {
        let previous = self.current;
        self.current ^= 1;
        if let Err(e) = self.map.set(0, self.current, 0) {
            // The programs keep counting into the previous window: read it again next time.
            tracing::warn!("flipping the contention read window: {e}");
            self.current = previous;
        }
        std::thread::sleep(SETTLE);
        if previous == 0 { 0 } else { WINDOW_BIT }
    }
}

/// Removes and returns the counts of the window `bit` from `map`, keyed without the bit.
pub fn take_counts<V: aya::Pod>(
    map: &mut BpfHashMap<MapData, SampleKey, V>,
    bit: u32,
) -> Vec<(SampleKey, V)> {
    let entries: Vec<(SampleKey, V)> = map
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, _)| k.stack_id & WINDOW_BIT == bit)
        .collect();
    for (k, _) in &entries {
        let _ = map.remove(k);
    }
    entries
        .into_iter()
        .map(|(k, v)| {
            (
                SampleKey {
                    tgid: k.tgid,
                    stack_id: k.stack_id & !WINDOW_BIT,
                },
                v,
            )
        })
        .collect()
}

/// Frees the stacks `taken` used, but those the counts still in `map` (the current window)
/// use. A program may take one of them again between this look and the removal: its count's
/// stack is then missing when read, which is counted as a loss.
pub fn free_stacks<V: aya::Pod>(
    stacks: &mut StackTraceMap<MapData>,
    map: &BpfHashMap<MapData, SampleKey, V>,
    taken: impl Iterator<Item = u32>,
) {
    let in_use: HashSet<u32> = map
        .keys()
        .filter_map(Result::ok)
        .map(|k| k.stack_id & !WINDOW_BIT)
        .collect();
    let free: HashSet<u32> = taken.filter(|id| !in_use.contains(id)).collect();
    for id in free {
        let _ = stacks.remove(&id);
    }
}

/// Counts a count whose stack was gone when read.
pub fn stack_missing(losses: &Losses, kind: LossKind, n: u64) {
    losses.add(kind, LossReason::StackMissing, n);
}
