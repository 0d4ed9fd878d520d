//! The guard's side of the state: which limit files the kernel's guard map protects, and how,
//! as the pipeline asked it to; and which cgroups trusted writers with cgroup globs may write
//! from. Changes come out as [`GuardChange`]s for the executor. Bounded without eviction: an
//! entry pushed out would stay in the kernel's map, untracked, so a full state refuses new
//! protections instead (counted as `guard_files` evictions).

use std::collections::HashMap;

use agent_common::LimitFile;

use crate::model::{
    cache::{Cache, Evictions},
    guard::{GuardChange, Guarded},
};

/// Protected files and trust cgroups, as the kernel's maps hold them.
#[derive(Debug)]
pub struct GuardedFiles {
    files: HashMap<(u64, LimitFile), Guarded>,
    cgroups: HashMap<u64, u64>,
    cap: usize,
    evictions: Evictions,
}

impl GuardedFiles {
    /// At most `cap` protected files (the kernel map's size) and as many trust cgroups.
    #[must_use]
    pub fn new(cap: usize, evictions: &Evictions) -> Self {
        Self {
            files: HashMap::new(),
            cgroups: HashMap::new(),
            cap,
            evictions: evictions.clone(),
        }
    }

    /// How `limit` of cgroup `id` is protected.
    #[must_use]
    pub fn get(&self, id: u64, limit: LimitFile) -> Option<&Guarded> {
        self.files.get(&(id, limit))
    }

    /// Protected files.
    #[cfg(test)]
    #[must_use]
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Makes `limit` of cgroup `id` protected as `want` (`None`: not at all); the change for
    /// the kernel's map, if there is one.
    pub fn set(&mut self, id: u64, limit: LimitFile, want: Option<Guarded>) -> Option<GuardChange> {
        let key = (id, limit);
        match want {
            None => self.files.remove(&key).map(|_| GuardChange::Release {
                cgroup_id: id,
                limit,
            }),
            Some(want) => {
                let enforce = want.enforce;
                let full = self.files.len() >= self.cap;
                match self.files.get_mut(&key) {
                    Some(have) if have.enforce == enforce => {
                        // Only the rule's name changed: nothing for the kernel.
                        *have = want;
                        return None;
                    }
                    Some(have) => *have = want,
                    None if full => {
                        self.evictions.add(Cache::GuardFiles, 1);
                        return None;
                    }
                    None => {
                        self.files.insert(key, want);
                    }
                }
                Some(GuardChange::Protect {
                    cgroup_id: id,
                    limit,
                    enforce,
                })
            }
        }
    }

    /// Makes trusted writers with cgroup globs allowed in cgroup `id` as `mask` says (0: none
    /// of them); the change for the kernel's map, if there is one.
    pub fn set_cgroup(&mut self, id: u64, mask: u64) -> Option<GuardChange> {
        if mask == 0 {
            return self
                .cgroups
                .remove(&id)
                .map(|_| GuardChange::TrustCgroup { id, mask: None });
        }
        if self.cgroups.get(&id) == Some(&mask) {
            return None;
        }
        if !self.cgroups.contains_key(&id) && self.cgroups.len() >= self.cap {
            self.evictions.add(Cache::GuardFiles, 1);
            return None;
        }
        self.cgroups.insert(id, mask);
        Some(GuardChange::TrustCgroup {
            id,
            mask: Some(mask),
        })
    }

    /// Cgroup `id` is gone: everything about it goes.
    pub fn forget(&mut self, id: u64) -> Vec<GuardChange> {
        let mut out: Vec<GuardChange> = LimitFile::ALL
            .into_iter()
            .filter_map(|l| self.set(id, l, None))
            .collect();
        out.extend(self.set_cgroup(id, 0));
        out
    }

    /// Forgets everything (the kernel's maps are being emptied).
    pub fn clear(&mut self) {
        self.files.clear();
        self.cgroups.clear();
    }

    /// Every cgroup this state knows of.
    #[must_use]
    pub fn cgroups(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.files.keys().map(|(id, _)| *id).collect();
        ids.extend(self.cgroups.keys());
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[expect(clippy::unnecessary_wraps, reason = "reads as the value `set` takes")]
    fn guarded(rule: &str, enforce: bool) -> Option<Guarded> {
        Some(Guarded {
            rule: rule.into(),
            enforce,
        })
    }

    #[test]
    fn changes_only_what_the_kernel_must_know_and_never_grows_past_its_cap() {
        let e = Evictions::default();
        let mut g = GuardedFiles::new(2, &e);
        let m = LimitFile::MemoryMax;
        assert_eq!(
            g.set(1, m, guarded("r", true)),
            Some(GuardChange::Protect {
                cgroup_id: 1,
                limit: m,
                enforce: true
            })
        );
        assert_eq!(g.set(1, m, guarded("r", true)), None, "no change");
        assert_eq!(g.set(1, m, guarded("renamed", true)), None, "a name only");
        assert_eq!(g.get(1, m).map(|g| g.rule.as_str()), Some("renamed"));
        assert!(matches!(
            g.set(1, m, guarded("r", false)),
            Some(GuardChange::Protect { enforce: false, .. })
        ));
        assert!(g.set(2, m, guarded("r", true)).is_some());
        assert_eq!(g.set(3, m, guarded("r", true)), None, "full");
        assert_eq!(e.get(Cache::GuardFiles), 1);
        assert_eq!(g.len(), 2);
        assert_eq!(
            g.set_cgroup(2, 0b10),
            Some(GuardChange::TrustCgroup {
                id: 2,
                mask: Some(0b10)
            })
        );
        assert_eq!(g.set_cgroup(2, 0b10), None);
        assert_eq!(g.cgroups(), [1, 2]);
        assert_eq!(
            g.forget(2),
            [
                GuardChange::Release {
                    cgroup_id: 2,
                    limit: m
                },
                GuardChange::TrustCgroup { id: 2, mask: None }
            ]
        );
        assert_eq!(
            g.set(1, m, None),
            Some(GuardChange::Release {
                cgroup_id: 1,
                limit: m
            })
        );
        assert_eq!(g.set(1, m, None), None);
        assert_eq!(g.len(), 0);
    }
}
