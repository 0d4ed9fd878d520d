//! Bounded caches: every cache the agent keeps has a cap, and what it evicts is counted by name
//! (`nodewarden_cache_evictions_total{cache}`), so a cap that is too small shows.

use std::{
    hash::Hash,
    num::NonZeroUsize,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

/// The agent's caches, by the name their evictions are counted under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cache {
    /// Cgroup id to path.
    CgroupPaths,
    /// Cgroup ids recently found to name no cgroup.
    UnknownCgroups,
    /// Cgroups removed, kept a while for late events and their series.
    RemovedCgroups,
    /// Cgroups whose limits are tracked (a cgroup beyond the cap is not).
    CgroupLimits,
    /// Kubernetes names of pods and containers.
    KubeletNames,
    /// Executables already looked at for Go.
    Executables,
    /// Go processes reported crashing.
    GoCrashes,
    /// OOM incidents still taking victims, and their traces.
    OomIncidents,
    /// Futex series of exited processes, kept so counts never go backwards.
    FutexSeries,
    /// Symbolized or classified stacks.
    Stacks,
    /// Processes' labels (comm, cgroup) in the contention readers.
    ProcessLabels,
    /// Executables and symbol tables the symbolizer holds open.
    Symbolizer,
    /// Desired values of limits.
    DesiredValues,
    /// The executor's guardrails (restores, rewrites, fights) per limit.
    Guards,
    /// Pods of this node, from the API server.
    Pods,
    /// Limit files the guard protects: a full state refuses new ones (counted here).
    GuardFiles,
    /// Writers' executable paths, by process and the executable the kernel saw.
    WriterExes,
}

impl Cache {
    pub const ALL: [Self; 17] = [
        Self::CgroupPaths,
        Self::UnknownCgroups,
        Self::RemovedCgroups,
        Self::CgroupLimits,
        Self::KubeletNames,
        Self::Executables,
        Self::GoCrashes,
        Self::OomIncidents,
        Self::FutexSeries,
        Self::Stacks,
        Self::ProcessLabels,
        Self::Symbolizer,
        Self::DesiredValues,
        Self::Guards,
        Self::Pods,
        Self::GuardFiles,
        Self::WriterExes,
    ];

    /// The label value.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::CgroupPaths => "cgroup_paths",
            Self::UnknownCgroups => "unknown_cgroups",
            Self::RemovedCgroups => "removed_cgroups",
            Self::CgroupLimits => "cgroup_limits",
            Self::KubeletNames => "kubelet_names",
            Self::Executables => "executables",
            Self::GoCrashes => "go_crashes",
            Self::OomIncidents => "oom_incidents",
            Self::FutexSeries => "futex_series",
            Self::Stacks => "stacks",
            Self::ProcessLabels => "process_labels",
            Self::Symbolizer => "symbolizer",
            Self::DesiredValues => "desired_values",
            Self::Guards => "guards",
            Self::Pods => "pods",
            Self::GuardFiles => "guard_files",
            Self::WriterExes => "writer_exes",
        }
    }
}

/// Evictions of every cache, shared by the caches (which count) and the metrics (which read).
#[derive(Clone, Debug, Default)]
pub struct Evictions(Arc<[AtomicU64; Cache::ALL.len()]>);

impl Evictions {
    pub fn add(&self, cache: Cache, n: u64) {
        self.0[cache as usize].fetch_add(n, Ordering::Relaxed);
    }

    #[must_use]
    pub fn get(&self, cache: Cache) -> u64 {
        self.0[cache as usize].load(Ordering::Relaxed)
    }
}

/// A map of at most `cap` entries; the least recently used goes first, and is counted.
///
/// It grows with what it holds: `lru::LruCache::new` would reserve room for `cap` entries up
/// front, and the agent's caps (tens of thousands of entries, for the largest nodes) then took
/// over 20 MiB of an idle agent's heap.
#[derive(Debug)]
pub struct Bounded<K: Hash + Eq, V> {
    lru: lru::LruCache<K, V>,
    cap: NonZeroUsize,
    cache: Cache,
    evictions: Evictions,
}

impl<K: Hash + Eq, V> Bounded<K, V> {
    /// A cache of at most `cap` entries (at least one).
    #[must_use]
    pub fn new(cache: Cache, cap: usize, evictions: Evictions) -> Self {
        Self {
            lru: lru::LruCache::unbounded(),
            cap: NonZeroUsize::new(cap).unwrap_or(NonZeroUsize::MIN),
            cache,
            evictions,
        }
    }

    /// The value of `k`, marked as recently used.
    pub fn get(&mut self, k: &K) -> Option<&V> {
        self.lru.get(k)
    }

    /// The value of `k` to change, marked as recently used.
    pub fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        self.lru.get_mut(k)
    }

    /// The value of `k`, without marking it used.
    #[must_use]
    pub fn peek(&self, k: &K) -> Option<&V> {
        self.lru.peek(k)
    }

    #[must_use]
    pub fn contains(&self, k: &K) -> bool {
        self.lru.contains(k)
    }

    /// Inserts `v` for `k`, returning the value it replaces; a full cache evicts (and counts)
    /// its least recently used entry.
    pub fn put(&mut self, k: K, v: V) -> Option<V> {
        if self.lru.contains(&k) {
            return self.lru.put(k, v);
        }
        if self.lru.len() >= self.cap.get() && self.lru.pop_lru().is_some() {
            self.evictions.add(self.cache, 1);
        }
        self.lru.push(k, v);
        None
    }

    pub fn remove(&mut self, k: &K) -> Option<V> {
        self.lru.pop(k)
    }

    #[must_use]
    pub fn len(&self) -> usize {
        self.lru.len()
    }

    /// Entries, most recently used first.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.lru.iter()
    }

    /// Keeps the entries `keep` says to (not counted as evictions: they are gone, not pushed
    /// out).
    pub fn retain(&mut self, mut keep: impl FnMut(&K, &V) -> bool)
    where
        K: Clone,
    {
        let gone: Vec<K> = self
            .lru
            .iter()
            .filter(|(k, v)| !keep(k, v))
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            self.lru.pop(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_the_least_recently_used_and_counts_it() {
        let e = Evictions::default();
        let mut b = Bounded::new(Cache::Stacks, 2, e.clone());
        b.put(1, "a");
        b.put(2, "b");
        assert_eq!(b.get(&1), Some(&"a"));
        assert_eq!(
            b.put(1, "A"),
            Some("a"),
            "a replaced value is not an eviction"
        );
        b.put(3, "c");
        assert_eq!(b.len(), 2);
        assert!(
            b.contains(&1) && !b.contains(&2),
            "2 was the least recently used"
        );
        assert_eq!(e.get(Cache::Stacks), 1);
        b.retain(|k, _| *k != 1);
        assert_eq!(b.len(), 1);
        assert_eq!(e.get(Cache::Stacks), 1, "retain is not eviction");
        assert_eq!(e.get(Cache::Symbolizer), 0);
    }

    #[test]
    fn reserves_nothing_for_its_cap() {
        let mut b = Bounded::new(Cache::Stacks, 1 << 20, Evictions::default());
        assert!(
            b.lru.cap().get() > 1 << 20 && b.len() == 0,
            "the map grows as entries come"
        );
        for k in 0..3 {
            b.put(k, k);
        }
        assert_eq!(b.len(), 3);
    }
}
