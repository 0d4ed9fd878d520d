//! Current limit values per cgroup: seeded from cgroupfs at start-up and from kernel defaults
//! when a cgroup is created, then moved by every successful write the probes see. It gives each
//! write its previous value and keeps the limit gauges current.

use std::{collections::HashMap, path::Path};

use agent_common::LimitFile;

use crate::limits::{self, LimitValue};

/// Limit values by (cgroup id, file).
#[derive(Debug, Default)]
pub struct LimitState {
    values: HashMap<(u64, LimitFile), LimitValue>,
    page_size: u64,
}

impl LimitState {
    #[must_use]
    pub fn new() -> Self {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        Self {
            values: HashMap::new(),
            page_size: u64::try_from(page).unwrap_or(4096).max(1),
        }
    }

    /// Reads the limit files of the cgroup directory `dir` (those its controllers provide) and
    /// records them; returns what was read.
    pub fn seed_from_dir(&mut self, id: u64, dir: &Path) -> Vec<(LimitFile, LimitValue)> {
        let mut seen = Vec::new();
        for (limit, text) in limits::read_files(dir) {
            if let Ok(v) = limits::parse(limit, &text) {
                self.values.insert((id, limit), v);
                seen.push((limit, v));
            }
        }
        seen
    }

    /// A new cgroup starts with the kernel's defaults: no limits, no protection. Limits already
    /// known are kept (inotify can report a new cgroup's write before the mkdir event arrives);
    /// returns the defaults recorded.
    pub fn seed_defaults(&mut self, id: u64) -> Vec<(LimitFile, LimitValue)> {
        let defaults = [
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
                    period_us: limits::DEFAULT_CPU_PERIOD_US,
                },
            ),
        ];
        let mut seeded = Vec::new();
        for (limit, v) in defaults {
            if let std::collections::hash_map::Entry::Vacant(e) = self.values.entry((id, limit)) {
                e.insert(v);
                seeded.push((limit, v));
            }
        }
        seeded
    }

    /// Records a successful write of `written`; returns the previous value (if known) and the
    /// value the kernel now holds (memory limits are kept in whole pages).
    pub fn record(
        &mut self,
        id: u64,
        limit: LimitFile,
        written: LimitValue,
    ) -> (Option<LimitValue>, LimitValue) {
        let stored = match (limit, written) {
            (LimitFile::PidsMax | LimitFile::CpuMax, v) | (_, v @ LimitValue::Max) => v,
            (_, LimitValue::Bytes(n)) => LimitValue::Bytes(n / self.page_size * self.page_size),
            (_, v) => v,
        };
        (self.values.insert((id, limit), stored), stored)
    }

    /// The value last known for a cgroup's limit.
    #[must_use]
    pub fn get(&self, id: u64, limit: LimitFile) -> Option<LimitValue> {
        self.values.get(&(id, limit)).copied()
    }

    /// Forgets a removed cgroup.
    pub fn forget(&mut self, id: u64) {
        self.values.retain(|(cg, _), _| *cg != id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_move_values_and_report_the_previous_one() {
        let mut s = LimitState::new();
        assert_eq!(s.seed_defaults(7).len(), 7);
        let (old, now) = s.record(7, LimitFile::MemoryMax, LimitValue::Bytes(64 << 20));
        assert_eq!(old, Some(LimitValue::Max));
        assert_eq!(now, LimitValue::Bytes(64 << 20));
        let (old, now) = s.record(7, LimitFile::MemoryMax, LimitValue::Bytes(5000));
        assert_eq!(old, Some(LimitValue::Bytes(64 << 20)));
        assert_eq!(now, LimitValue::Bytes(5000 / s.page_size * s.page_size));
        assert_eq!(
            s.record(8, LimitFile::PidsMax, LimitValue::Count(3)).0,
            None
        );
        // A late mkdir event keeps what is already known.
        assert_eq!(s.seed_defaults(8).len(), 6);
        assert_eq!(s.get(8, LimitFile::PidsMax), Some(LimitValue::Count(3)));
        s.forget(7);
        assert_eq!(s.get(7, LimitFile::MemoryMax), None);
        assert_eq!(s.get(8, LimitFile::PidsMax), Some(LimitValue::Count(3)));
    }

    /// A directory stands in for a cgroup (the real files are read in the VM tests).
    #[test]
    fn seeds_from_the_files_present() {
        let dir = std::env::temp_dir().join(format!("nw-state-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("memory.max"), "67108864\n").expect("write");
        std::fs::write(dir.join("cpu.max"), "max 100000\n").expect("write");
        let mut s = LimitState::new();
        let seen = s.seed_from_dir(1, &dir);
        std::fs::remove_dir_all(&dir).expect("rm");
        assert_eq!(seen.len(), 2);
        assert_eq!(
            s.get(1, LimitFile::MemoryMax),
            Some(LimitValue::Bytes(67_108_864))
        );
        assert_eq!(s.get(1, LimitFile::MemoryHigh), None);
    }
}
