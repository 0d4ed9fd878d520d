//! Desired values of limits: what a restore puts back. Pinned values come from the rules and
//! Kubernetes' from the pod specs; this keeps the others: the last value a trusted writer
//! wrote, or the value when the agent first saw the cgroup (at its start-up, kept across
//! restarts in the state file, or in a new cgroup's first moments, when its runtime sets it).

use agent_common::LimitFile;

use crate::{
    model::{
        cache::{Bounded, Cache, Evictions},
        heal::{Desired, DesiredSource, Kept},
        limit::LimitValue,
    },
    rules::file::WATCHABLE,
};

/// Limits whose desired values are kept, at most (a few thousand cgroups, five files each).
const MAX_VALUES: usize = 5 * 65_536;
/// New cgroups whose first moments are remembered.
const MAX_NEW: usize = 4096;

/// Desired values by (cgroup id, limit).
#[derive(Debug)]
pub struct DesiredState {
    values: Bounded<(u64, LimitFile), Desired>,
    /// New cgroups, and when their first moments end (monotonic ns).
    new: Bounded<u64, u64>,
    /// Changed since the last snapshot.
    dirty: bool,
}

impl DesiredState {
    #[must_use]
    pub fn new(evictions: &Evictions) -> Self {
        Self {
            values: Bounded::new(Cache::DesiredValues, MAX_VALUES, evictions.clone()),
            new: Bounded::new(Cache::DesiredValues, MAX_NEW, evictions.clone()),
            dirty: false,
        }
    }

    #[must_use]
    pub fn get(&self, id: u64, limit: LimitFile) -> Option<Desired> {
        self.values.peek(&(id, limit)).copied()
    }

    /// Sets the desired value; `true` when it changed.
    pub fn set(&mut self, id: u64, limit: LimitFile, desired: Desired) -> bool {
        if !WATCHABLE.contains(&limit) || self.get(id, limit) == Some(desired) {
            return false;
        }
        self.values.put((id, limit), desired);
        self.dirty = true;
        true
    }

    /// The value first seen, unless a desired value is known already.
    pub fn first_seen(&mut self, id: u64, limit: LimitFile, value: LimitValue) {
        if self.get(id, limit).is_none() {
            self.set(id, limit, Desired::new(value, DesiredSource::FirstSeen));
        }
    }

    /// Cgroup `id` was created; its first moments last until `until` (monotonic ns).
    pub fn created(&mut self, id: u64, until: u64) {
        self.new.put(id, until);
    }

    /// Whether cgroup `id` is in its first moments at `now`.
    pub fn is_new(&mut self, id: u64, now: u64) -> bool {
        match self.new.peek(&id) {
            Some(until) if now < *until => true,
            Some(_) => {
                self.new.remove(&id);
                false
            }
            None => false,
        }
    }

    /// Another source of desired values changed: the next snapshot is taken.
    pub fn touch(&mut self) {
        self.dirty = true;
    }

    /// Forgets a removed cgroup.
    pub fn forget(&mut self, id: u64) {
        for limit in WATCHABLE {
            if self.values.remove(&(id, limit)).is_some() {
                self.dirty = true;
            }
        }
        self.new.remove(&id);
    }

    /// Whether a value changed since the last [`Self::snapshot`].
    #[must_use]
    pub fn changed(&self) -> bool {
        self.dirty
    }

    /// Every desired value, once it changed since the last call: for the state file. `path`
    /// names a cgroup by id (values of cgroups without a path are left out).
    pub fn snapshot(&mut self, path: impl Fn(u64) -> Option<String>) -> Option<Vec<Kept>> {
        if !std::mem::take(&mut self.dirty) {
            return None;
        }
        let mut kept: Vec<Kept> = self
            .values
            .iter()
            .filter_map(|((id, limit), d)| {
                Some(Kept {
                    id: *id,
                    path: path(*id)?,
                    limit: limit.file_name().to_owned(),
                    value: d.value.to_string(),
                    source: d.source,
                })
            })
            .collect();
        kept.sort_by(|a, b| (&a.path, &a.limit).cmp(&(&b.path, &b.limit)));
        Some(kept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::heal::StateFile;

    #[test]
    fn values_sources_and_snapshots() {
        let mut d = DesiredState::new(&Evictions::default());
        d.first_seen(7, LimitFile::MemoryMax, LimitValue::Bytes(2 << 30));
        d.first_seen(7, LimitFile::MemoryMax, LimitValue::Bytes(1));
        assert_eq!(
            d.get(7, LimitFile::MemoryMax),
            Some(Desired::new(
                LimitValue::Bytes(2 << 30),
                DesiredSource::FirstSeen
            )),
            "the first value seen stays"
        );
        assert!(d.set(
            7,
            LimitFile::MemoryMax,
            Desired::new(LimitValue::Bytes(3 << 30), DesiredSource::TrustedWriter)
        ));
        assert!(!d.set(
            7,
            LimitFile::MemoryLow,
            Desired::new(LimitValue::Bytes(1), DesiredSource::TrustedWriter)
        ));
        let snap = d.snapshot(|id| Some(format!("/c{id}"))).expect("changed");
        assert_eq!(
            snap,
            [Kept {
                id: 7,
                path: "/c7".into(),
                limit: "memory.max".into(),
                value: (3u64 << 30).to_string(),
                source: DesiredSource::TrustedWriter,
            }]
        );
        assert_eq!(d.snapshot(|_| None), None, "unchanged since");
        let file = StateFile {
            boot_id: "b".into(),
            values: snap,
        };
        let index = file.index();
        assert_eq!(
            index.get(&(7, LimitFile::MemoryMax)),
            Some(&(
                "/c7".to_owned(),
                Desired::new(LimitValue::Bytes(3 << 30), DesiredSource::TrustedWriter)
            ))
        );
        d.forget(7);
        assert_eq!(d.get(7, LimitFile::MemoryMax), None);
        d.created(8, 100);
        assert!(d.is_new(8, 99));
        assert!(!d.is_new(8, 100));
    }
}
