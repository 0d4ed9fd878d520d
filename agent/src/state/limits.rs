//! Current limit values per cgroup: from the scans of cgroupfs and the kernel's defaults when a
//! cgroup is created, moved by every successful write the probes see. It gives each write its
//! previous value and the gauges their values.
//!
//! Every value carries the time it was known to be true (the kernel's timestamp of a write, or
//! the start of the scan that read it), and only a newer one replaces it: a scan does not undo
//! a write made while it ran, and a write still queued in a ring when a scan read its result
//! does not undo the scan.

use std::collections::{HashMap, hash_map::Entry};

use agent_common::LimitFile;

use crate::model::{
    cache::{Cache, Evictions},
    limit::{self, LimitValue},
};

/// Cgroups tracked at most; beyond, new cgroups have no limit state (counted as evictions).
pub const MAX_CGROUPS: usize = 65_536;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Known {
    value: LimitValue,
    /// When it was true (`CLOCK_MONOTONIC` ns).
    at_ns: u64,
}

/// Limit values by (cgroup id, file).
#[derive(Debug)]
pub struct LimitState {
    values: HashMap<u64, HashMap<LimitFile, Known>>,
    page_size: u64,
    evictions: Evictions,
}

/// The kernel's defaults for a new cgroup: no limits, no protection.
pub const DEFAULTS: [(LimitFile, LimitValue); 7] = [
    (LimitFile::MemoryMax, LimitValue::Max),
    (LimitFile::MemoryHigh, LimitValue::Max),
    (LimitFile::MemoryLow, LimitValue::Bytes(0)),
    (LimitFile::MemoryMin, LimitValue::Bytes(0)),
    (LimitFile::MemorySwapMax, LimitValue::Max),
    (LimitFile::PidsMax, LimitValue::Max),
    (
        LimitFile::CpuMax,
        LimitValue::Cpu {
            quota_us: None,
            period_us: limit::DEFAULT_CPU_PERIOD_US,
        },
    ),
];

/// What a write did to the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// The state moved to `now` from `old` (if it was known).
    Moved {
        old: Option<LimitValue>,
        now: LimitValue,
    },
    /// A newer value was known already (the write is older than a scan's read): unchanged.
    Older,
}

impl LimitState {
    /// Memory limits are kept in whole pages of `page_size` bytes, as the kernel keeps them.
    #[must_use]
    pub fn new(page_size: u64, evictions: &Evictions) -> Self {
        Self {
            values: HashMap::new(),
            page_size: page_size.max(1),
            evictions: evictions.clone(),
        }
    }

    /// Whether cgroup `id` has limit state.
    #[must_use]
    pub fn knows(&self, id: u64) -> bool {
        self.values.contains_key(&id)
    }

    /// Every cgroup with limit state.
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.values.keys().copied()
    }

    /// Whether [`MAX_CGROUPS`] are tracked: another cgroup's limits would not be.
    #[must_use]
    pub fn full(&self) -> bool {
        self.values.len() >= MAX_CGROUPS
    }

    /// The cgroup's entry; `None` when [`MAX_CGROUPS`] are tracked and it is not one of them.
    fn cgroup(&mut self, id: u64) -> Option<&mut HashMap<LimitFile, Known>> {
        if self.values.len() >= MAX_CGROUPS && !self.values.contains_key(&id) {
            self.evictions.add(Cache::CgroupLimits, 1);
            return None;
        }
        Some(self.values.entry(id).or_default())
    }

    /// A new cgroup, created at `at_ns`, starts with the kernel's defaults. Limits already
    /// known are kept (a write can be seen before the mkdir event); returns the defaults
    /// recorded.
    pub fn seed_defaults(&mut self, id: u64, at_ns: u64) -> Vec<(LimitFile, LimitValue)> {
        let Some(cgroup) = self.cgroup(id) else {
            return Vec::new();
        };
        DEFAULTS
            .into_iter()
            .filter(|(limit, value)| match cgroup.entry(*limit) {
                Entry::Vacant(e) => {
                    e.insert(Known {
                        value: *value,
                        at_ns,
                    });
                    true
                }
                Entry::Occupied(_) => false,
            })
            .collect()
    }

    /// Sets a value a scan that started at `read_ns` read from the cgroup's file, unless a
    /// newer one is known. Returns the previous value and whether the value changed; `None`
    /// when the known one is newer.
    pub fn set_read(
        &mut self,
        id: u64,
        limit: LimitFile,
        value: LimitValue,
        read_ns: u64,
    ) -> Option<(Option<LimitValue>, bool)> {
        let cgroup = self.cgroup(id)?;
        let old = cgroup.get(&limit).copied();
        if old.is_some_and(|k| k.at_ns > read_ns) {
            return None;
        }
        let changed = old.is_none_or(|k| k.value != value);
        cgroup.insert(
            limit,
            Known {
                value,
                at_ns: read_ns,
            },
        );
        Some((old.map(|k| k.value), changed))
    }

    /// The value the kernel holds after a successful write of `written` (memory limits in
    /// whole pages).
    #[must_use]
    pub fn stored(&self, limit: LimitFile, written: LimitValue) -> LimitValue {
        match (limit, written) {
            (LimitFile::PidsMax | LimitFile::CpuMax, v) | (_, v @ LimitValue::Max) => v,
            (_, LimitValue::Bytes(n)) => LimitValue::Bytes(n / self.page_size * self.page_size),
            (_, v) => v,
        }
    }

    /// Records a successful write of `written` at `at_ns`.
    pub fn record(
        &mut self,
        id: u64,
        limit: LimitFile,
        written: LimitValue,
        at_ns: u64,
    ) -> Recorded {
        let now = self.stored(limit, written);
        let Some(cgroup) = self.cgroup(id) else {
            return Recorded::Moved { old: None, now };
        };
        let old = cgroup.get(&limit).copied();
        if old.is_some_and(|k| k.at_ns > at_ns) {
            return Recorded::Older;
        }
        cgroup.insert(limit, Known { value: now, at_ns });
        Recorded::Moved {
            old: old.map(|k| k.value),
            now,
        }
    }

    /// The value last known for a cgroup's limit.
    #[must_use]
    pub fn get(&self, id: u64, limit: LimitFile) -> Option<LimitValue> {
        self.values.get(&id)?.get(&limit).map(|k| k.value)
    }

    /// Whether cgroup `id` changed after `ns`: created, or any of its values set.
    #[must_use]
    pub fn changed_since(&self, id: u64, ns: u64) -> bool {
        self.values
            .get(&id)
            .is_some_and(|c| c.values().any(|k| k.at_ns > ns))
    }

    /// Forgets a removed cgroup.
    pub fn forget(&mut self, id: u64) {
        self.values.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moved(r: Recorded) -> (Option<LimitValue>, LimitValue) {
        match r {
            Recorded::Moved { old, now } => (old, now),
            Recorded::Older => panic!("not recorded"),
        }
    }

    #[test]
    fn writes_move_values_and_report_the_previous_one() {
        let mut s = LimitState::new(4096, &Evictions::default());
        assert_eq!(s.seed_defaults(7, 1).len(), 7);
        let (old, now) = moved(s.record(7, LimitFile::MemoryMax, LimitValue::Bytes(64 << 20), 2));
        assert_eq!(old, Some(LimitValue::Max));
        assert_eq!(now, LimitValue::Bytes(64 << 20));
        let (old, now) = moved(s.record(7, LimitFile::MemoryMax, LimitValue::Bytes(5000), 3));
        assert_eq!(old, Some(LimitValue::Bytes(64 << 20)));
        assert_eq!(now, LimitValue::Bytes(4096), "kept in whole pages");
        assert_eq!(
            moved(s.record(8, LimitFile::PidsMax, LimitValue::Count(3), 4)).0,
            None
        );
        // A late mkdir event keeps what is already known.
        assert_eq!(s.seed_defaults(8, 1).len(), 6);
        assert_eq!(s.get(8, LimitFile::PidsMax), Some(LimitValue::Count(3)));
        s.forget(7);
        assert_eq!(s.get(7, LimitFile::MemoryMax), None);
        assert!(!s.knows(7) && s.knows(8));
    }

    #[test]
    fn only_a_newer_value_replaces_a_known_one() {
        let mut s = LimitState::new(4096, &Evictions::default());
        assert_eq!(
            s.set_read(1, LimitFile::MemoryMax, LimitValue::Max, 10),
            Some((None, true))
        );
        // A write while a second scan runs (it started at 20)...
        s.record(1, LimitFile::MemoryMax, LimitValue::Bytes(8192), 25);
        // ...wins over the scan's read.
        assert_eq!(
            s.set_read(1, LimitFile::MemoryMax, LimitValue::Max, 20),
            None
        );
        assert_eq!(
            s.get(1, LimitFile::MemoryMax),
            Some(LimitValue::Bytes(8192))
        );
        assert!(s.changed_since(1, 20));
        assert!(!s.changed_since(1, 25));
        // A scan after it reads the same: no change.
        assert_eq!(
            s.set_read(1, LimitFile::MemoryMax, LimitValue::Bytes(8192), 30),
            Some((Some(LimitValue::Bytes(8192)), false))
        );
        // A write older than that scan (it waited in a ring) does not undo it.
        assert_eq!(
            s.record(1, LimitFile::MemoryMax, LimitValue::Bytes(4096), 28),
            Recorded::Older
        );
        assert_eq!(
            s.get(1, LimitFile::MemoryMax),
            Some(LimitValue::Bytes(8192))
        );
    }
}
