//! Cgroup ids to paths. Kept current by the kernel's mkdir events and the resync scans; an id
//! met for the first time is asked of the kernel (one open by handle, not a scan), and an id
//! that names no cgroup is remembered a while, so a stream of events about it costs one look.

use super::Cgroups;
use crate::model::cache::{Bounded, Cache, Evictions};

/// Cgroups whose paths are kept (a node has a few thousand; removed ones stay until pushed
/// out, so late events about them still resolve).
const MAX_PATHS: usize = 65_536;
/// Ids found to name no cgroup, kept for [`UNKNOWN_TTL_NS`].
const MAX_UNKNOWN: usize = 4096;
const UNKNOWN_TTL_NS: u64 = 10_000_000_000;

/// What an id names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    Path(String),
    /// No cgroup, found just now (a scan may find one whose creation went unseen).
    NewlyUnknown,
    /// No cgroup, as found a moment ago.
    Unknown,
}

#[derive(Debug)]
pub struct CgroupPaths {
    known: Bounded<u64, String>,
    /// Ids that named nothing, and when that was found.
    unknown: Bounded<u64, u64>,
}

impl CgroupPaths {
    #[must_use]
    pub fn new(evictions: &Evictions) -> Self {
        Self {
            known: Bounded::new(Cache::CgroupPaths, MAX_PATHS, evictions.clone()),
            unknown: Bounded::new(Cache::UnknownCgroups, MAX_UNKNOWN, evictions.clone()),
        }
    }

    /// The path of cgroup `id`, asking `cgroups` for an id not known. An id that names no
    /// cgroup (or not any more, and was not known before) is asked again only after a while.
    pub fn path(&mut self, id: u64, cgroups: &dyn Cgroups, now_ns: u64) -> Resolved {
        if id == 0 {
            return Resolved::Unknown;
        }
        if let Some(p) = self.known.get(&id) {
            return Resolved::Path(p.clone());
        }
        if self
            .unknown
            .peek(&id)
            .is_some_and(|at| now_ns.saturating_sub(*at) < UNKNOWN_TTL_NS)
        {
            return Resolved::Unknown;
        }
        if let Some(p) = cgroups.path_of(id) {
            self.unknown.remove(&id);
            self.known.put(id, p.clone());
            Resolved::Path(p)
        } else {
            self.unknown.put(id, now_ns);
            Resolved::NewlyUnknown
        }
    }

    /// The path of cgroup `id` if known, without asking.
    #[must_use]
    pub fn known(&self, id: u64) -> Option<&str> {
        self.known.peek(&id).map(String::as_str)
    }

    /// A cgroup exists at `path` (created, or found by a scan).
    pub fn insert(&mut self, id: u64, path: String) {
        self.unknown.remove(&id);
        self.known.put(id, path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hierarchy of two cgroups.
    struct Two;

    impl Cgroups for Two {
        fn path_of(&self, id: u64) -> Option<String> {
            match id {
                1 => Some("/".into()),
                7 => Some("/a".into()),
                _ => None,
            }
        }
        fn oom_count(&self, _: &str) -> Option<u64> {
            None
        }
        fn usage_and_limit(&self, _: &str) -> (Option<u64>, Option<u64>) {
            (None, None)
        }
    }

    /// Counts how often it is asked.
    struct Counting(std::cell::Cell<u32>);

    impl Cgroups for Counting {
        fn path_of(&self, _: u64) -> Option<String> {
            self.0.set(self.0.get() + 1);
            None
        }
        fn oom_count(&self, _: &str) -> Option<u64> {
            None
        }
        fn usage_and_limit(&self, _: &str) -> (Option<u64>, Option<u64>) {
            (None, None)
        }
    }

    #[test]
    fn asks_once_and_remembers_both_answers() {
        let path = |s: &str| Resolved::Path(s.to_owned());
        let mut p = CgroupPaths::new(&Evictions::default());
        assert_eq!(p.path(7, &Two, 0), path("/a"));
        assert_eq!(p.known(7), Some("/a"));
        assert_eq!(p.path(0, &Two, 0), Resolved::Unknown);
        let asked = Counting(std::cell::Cell::new(0));
        assert_eq!(p.path(9, &asked, 0), Resolved::NewlyUnknown);
        assert_eq!(p.path(9, &asked, UNKNOWN_TTL_NS - 1), Resolved::Unknown);
        assert_eq!(asked.0.get(), 1, "an unknown id is asked once per while");
        assert_eq!(p.path(9, &asked, UNKNOWN_TTL_NS), Resolved::NewlyUnknown);
        assert_eq!(asked.0.get(), 2, "and again after it");
        // Known ones are never asked again: a removed cgroup keeps its path.
        assert_eq!(p.path(7, &asked, 0), path("/a"));
        p.insert(9, "/b".into());
        assert_eq!(p.path(9, &asked, 0), path("/b"));
        assert_eq!(asked.0.get(), 2);
    }
}
