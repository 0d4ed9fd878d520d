//! The `oom` counts of `memory.events.local` by cgroup path: a memory cgroup's count goes up
//! each time its own limit puts it in OOM (the `.local` file does not count descendants), so
//! the one that went up since last look is the one whose limit a kill is about. Used when no
//! probe saw the `out_of_memory` call.

use std::collections::HashMap;

use crate::enrich::Cgroups;

#[derive(Debug, Default)]
pub struct MemoryEvents {
    oom: HashMap<String, u64>,
}

impl MemoryEvents {
    /// The count of `path` as a scan read it: later kills compare against it.
    pub fn seed(&mut self, path: &str, count: u64) {
        self.oom.insert(path.to_owned(), count);
    }

    /// A new cgroup: its count starts at zero (reading it could already include an OOM).
    pub fn created(&mut self, path: &str) {
        self.oom.insert(path.to_owned(), 0);
    }

    pub fn removed(&mut self, path: &str) {
        self.oom.remove(path);
    }

    /// The limit a kill of a task in `victim_cgroup` hit: the deepest of it and its ancestors
    /// whose `oom` count rose since last look, or `None` when none did (a global OOM). Every
    /// count read is remembered, so the next kill compares against it.
    pub fn limit_of(&mut self, victim_cgroup: &str, cgroups: &dyn Cgroups) -> Option<String> {
        let mut found = None;
        for path in ancestors(victim_cgroup) {
            let Some(now) = cgroups.oom_count(&path) else {
                continue;
            };
            // A cgroup not seen before (created while the agent missed it) counts from now.
            let before = self.oom.insert(path.clone(), now).unwrap_or(now);
            if now > before && found.is_none() {
                found = Some(path);
            }
        }
        found
    }
}

/// `/a/b/c`, `/a/b`, `/a`: a path and its ancestors below the root, deepest first.
fn ancestors(path: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut p = path.trim_end_matches('/');
    while !p.is_empty() {
        out.push(p.to_owned());
        p = p.rsplit_once('/').map_or("", |(parent, _)| parent);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, collections::HashMap};

    use super::*;

    /// `memory.events.local` counts by path.
    #[derive(Default)]
    struct Counts(RefCell<HashMap<&'static str, u64>>);

    impl Cgroups for Counts {
        fn path_of(&self, _: u64) -> Option<String> {
            None
        }
        fn oom_count(&self, path: &str) -> Option<u64> {
            self.0.borrow().get(path).copied()
        }
        fn usage_and_limit(&self, _: &str) -> (Option<u64>, Option<u64>) {
            (None, None)
        }
    }

    #[test]
    fn ancestors_deepest_first() {
        assert_eq!(ancestors("/a/b/c"), ["/a/b/c", "/a/b", "/a"]);
        assert!(ancestors("/").is_empty());
    }

    #[test]
    fn derives_the_deepest_cgroup_whose_oom_count_rose() {
        let fs = Counts::default();
        let set = |p: &'static str, n: u64| fs.0.borrow_mut().insert(p, n);
        set("/pod", 1);
        set("/pod/ctr", 0);
        let mut m = MemoryEvents::default();
        m.seed("/pod", 1);
        m.seed("/pod/ctr", 0);
        // Nothing rose: a global OOM.
        assert_eq!(m.limit_of("/pod/ctr", &fs), None);
        set("/pod", 2);
        assert_eq!(m.limit_of("/pod/ctr", &fs).as_deref(), Some("/pod"));
        // Counted once: the next kill of the same incident finds no new rise.
        assert_eq!(m.limit_of("/pod/ctr", &fs), None);
        set("/pod/ctr", 1);
        set("/pod", 3);
        assert_eq!(m.limit_of("/pod/ctr", &fs).as_deref(), Some("/pod/ctr"));
        // A cgroup created while the agent runs counts from zero.
        m.created("/new");
        set("/new", 1);
        assert_eq!(m.limit_of("/new", &fs).as_deref(), Some("/new"));
    }
}
