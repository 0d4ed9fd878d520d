//! What the CPU samples say about each process over the last minute: the share of its sampled
//! CPU time spent in lock slow paths and in the Go map runtime, and the call site that takes
//! the lock most.

use std::collections::{HashMap, VecDeque};

use agent_common::{LossKind, SampleKey, maps};
use aya::maps::{HashMap as BpfHashMap, MapData, StackTraceMap};

use super::{
    classify::Classifier,
    symbols::Symbols,
    windows::{free_stacks, stack_missing, take_counts},
};
use crate::{
    enrich::procfs,
    kernel::loader::{LoadError, take_map},
    model::{
        cache::{Bounded, Cache, Evictions},
        contention::ProcessCpu,
        loss::Losses,
    },
};

/// Windows the shares are computed over (each a read, every 2 s: a minute).
pub const WINDOWS: usize = 30;

/// Call sites kept per process per window (the most sampled).
const MAX_SITES: usize = 16;

/// Processes whose labels are kept.
const MAX_LABELS: usize = 4096;

/// The sampling maps, taken out of the loaded object (they move to the readers' thread).
pub struct SampleMaps {
    samples: BpfHashMap<MapData, SampleKey, u64>,
    stacks: StackTraceMap<MapData>,
}

impl std::fmt::Debug for SampleMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SampleMaps").finish_non_exhaustive()
    }
}

impl SampleMaps {
    pub fn take(ebpf: &mut aya::Ebpf) -> Result<Self, LoadError> {
        Ok(Self {
            samples: take_map(ebpf, maps::CPU_SAMPLES)?,
            stacks: take_map(ebpf, maps::SAMPLE_STACKS)?,
        })
    }
}

/// One process's samples in one window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Tally {
    samples: u64,
    lock: u64,
    map: u64,
    /// Lock samples by call site.
    sites: HashMap<String, u64>,
}

impl Tally {
    fn add(&mut self, o: &Self) {
        self.samples = self.samples.saturating_add(o.samples);
        self.lock = self.lock.saturating_add(o.lock);
        self.map = self.map.saturating_add(o.map);
        for (site, n) in &o.sites {
            let s = self.sites.entry(site.clone()).or_default();
            *s = s.saturating_add(*n);
        }
    }

    /// Keeps the [`MAX_SITES`] call sites with the most samples.
    fn trim(&mut self) {
        if self.sites.len() > MAX_SITES {
            let mut sites: Vec<(String, u64)> = self.sites.drain().collect();
            sites.sort_by_key(|s| std::cmp::Reverse(s.1));
            sites.truncate(MAX_SITES);
            self.sites = sites.into_iter().collect();
        }
    }
}

/// Reads the sample counts by windows; owns the maps.
#[derive(Debug)]
pub struct Sampler {
    maps: SampleMaps,
    classes: Classifier,
    /// The last [`WINDOWS`] windows' tallies by process, newest last.
    windows: VecDeque<HashMap<u32, Tally>>,
    labels: Bounded<u32, (String, String)>,
    losses: Losses,
}

impl Sampler {
    #[must_use]
    pub fn new(maps: SampleMaps, evictions: &Evictions, losses: Losses) -> Self {
        Self {
            maps,
            classes: Classifier::new(evictions),
            windows: VecDeque::new(),
            labels: Bounded::new(Cache::ProcessLabels, MAX_LABELS, evictions.clone()),
            losses,
        }
    }

    /// Takes the counts of the window `bit` (just ended), and returns each live process's
    /// figures over the last windows, most lock samples first. `cgroup` names a process's
    /// cgroup.
    pub fn refresh(
        &mut self,
        bit: u32,
        symbols: &mut Symbols,
        mut cgroup: impl FnMut(u32) -> String,
    ) -> Vec<ProcessCpu> {
        let taken = take_counts(&mut self.maps.samples, bit);
        let mut window: HashMap<u32, Tally> = HashMap::new();
        let mut alive: HashMap<u32, bool> = HashMap::new();
        for (key, n) in &taken {
            // A process gone has no stacks to read symbols for, and no figures to show.
            if !*alive
                .entry(key.tgid)
                .or_insert_with(|| procfs::alive(key.tgid))
            {
                continue;
            }
            let Some(class) =
                self.classes
                    .class(symbols, &self.maps.stacks, key.tgid, key.stack_id)
            else {
                stack_missing(&self.losses, LossKind::CpuSample, *n);
                continue;
            };
            let t = window.entry(key.tgid).or_default();
            t.samples = t.samples.saturating_add(*n);
            if class.lock {
                t.lock = t.lock.saturating_add(*n);
                if let Some(site) = class.call_site {
                    let s = t.sites.entry(site).or_default();
                    *s = s.saturating_add(*n);
                }
            }
            if class.map {
                t.map = t.map.saturating_add(*n);
            }
        }
        for t in window.values_mut() {
            t.trim();
        }
        free_stacks(
            &mut self.maps.stacks,
            &self.maps.samples,
            taken.iter().map(|(k, _)| k.stack_id),
        );
        self.windows.push_back(window);
        while self.windows.len() > WINDOWS {
            self.windows.pop_front();
        }
        let mut per: HashMap<u32, Tally> = HashMap::new();
        for w in &self.windows {
            for (pid, t) in w {
                per.entry(*pid).or_default().add(t);
            }
        }
        // Gone processes leave the figures (their windows age out by themselves).
        per.retain(|pid, _| procfs::alive(*pid));
        self.classes.forget(|pid| !per.contains_key(&pid));
        self.labels.retain(|pid, _| per.contains_key(pid));
        let mut out: Vec<ProcessCpu> = per
            .into_iter()
            .filter(|(_, t)| t.samples > 0)
            .map(|(pid, t)| {
                let (comm, cgroup) = if let Some(l) = self.labels.get(&pid) {
                    l.clone()
                } else {
                    let l = (procfs::comm(pid).unwrap_or_default(), cgroup(pid));
                    self.labels.put(pid, l.clone());
                    l
                };
                #[expect(clippy::cast_precision_loss, reason = "sample counts")]
                let share = |n: u64| n as f64 / t.samples as f64;
                ProcessCpu {
                    pid,
                    comm,
                    cgroup,
                    samples: t.samples,
                    lock_share: share(t.lock),
                    map_share: share(t.map),
                    lock_call_site: t.sites.into_iter().max_by_key(|(_, n)| *n).map(|(s, _)| s),
                    off_cpu: None,
                    contention: share(t.lock),
                }
            })
            .collect();
        out.sort_by(|a, b| b.lock_share.total_cmp(&a.lock_share));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_add_and_keep_the_busiest_call_sites() {
        let mut a = Tally {
            samples: 10,
            lock: 4,
            map: 1,
            sites: (0..20).map(|i| (format!("f{i}"), i)).collect(),
        };
        a.trim();
        assert_eq!(a.sites.len(), MAX_SITES);
        assert!(a.sites.contains_key("f19") && !a.sites.contains_key("f0"));
        let mut b = Tally::default();
        b.add(&a);
        b.add(&a);
        assert_eq!((b.samples, b.lock, b.map), (20, 8, 2));
        assert_eq!(b.sites["f19"], 38);
    }
}
