//! Futex contention from the kernel's per-process aggregates: read every few seconds, kept
//! monotonic across process exits (an exited process's counts move to its labels' retired
//! totals), and the processes to watch selected when the configuration names them.

use std::collections::{HashMap, HashSet};

use agent_common::{FutexLock, FutexLockKey, FutexProcess, LossKind, LossReason, maps};
use aya::maps::{HashMap as BpfHashMap, MapData, StackTraceMap};

use super::symbols::{self, Symbols};
use crate::{
    enrich::procfs,
    kernel::loader::{LoadError, take_map},
    model::{
        cache::{Bounded, Cache, Evictions},
        cgroup::Who,
        contention::{Episode, FutexCounts, FutexLabels, HotLock, ProcessWaits},
        label::{Bound, Folded, Label},
        loss::Losses,
    },
};

/// How many hot words are kept for `nodewarden top`.
const HOT_LOCKS: usize = 50;

/// Series of exited processes kept (by comm and cgroup: a restarted process continues its
/// series); the least recently updated go first.
const MAX_RETIRED: usize = 4096;

/// Futex words whose symbolized stacks are kept.
const MAX_FRAMES: usize = 4096;

/// The futex maps, taken out of the loaded object (they move to the readers' thread).
pub struct FutexMaps {
    processes: BpfHashMap<MapData, u32, FutexProcess>,
    locks: BpfHashMap<MapData, FutexLockKey, FutexLock>,
    stacks: StackTraceMap<MapData>,
    selected: BpfHashMap<MapData, u32, u8>,
}

impl std::fmt::Debug for FutexMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FutexMaps").finish_non_exhaustive()
    }
}

impl FutexMaps {
    pub fn take(ebpf: &mut aya::Ebpf) -> Result<Self, LoadError> {
        Ok(Self {
            processes: take_map(ebpf, maps::FUTEX_PROCESSES)?,
            locks: take_map(ebpf, maps::FUTEX_LOCKS)?,
            stacks: take_map(ebpf, maps::FUTEX_STACKS)?,
            selected: take_map(ebpf, maps::FUTEX_SELECTED)?,
        })
    }
}

/// The symbolized stack of a word's longest wait, with what it was read for.
#[derive(Debug, Clone)]
struct Frames {
    stack_id: i64,
    max_ns: u64,
    names: Vec<String>,
}

/// What one read found.
#[derive(Debug, Default)]
pub struct Read {
    /// Every series, retired ones included.
    pub series: Vec<(FutexLabels, FutexCounts)>,
    /// Live processes, most wait time first.
    pub processes: Vec<ProcessWaits>,
    pub hot: Vec<HotLock>,
    /// Words with a new long wait.
    pub episodes: Vec<Episode>,
}

/// Reads the futex maps; owns them.
pub struct FutexReader {
    maps: FutexMaps,
    /// Counts of processes gone, by labels: series never go backwards.
    retired: Bounded<FutexLabels, FutexCounts>,
    /// Labels of the live processes, fixed at first sight (as many as the kernel map holds).
    live: HashMap<u32, FutexLabels>,
    /// The comms the series keep (anyone names a process as they like).
    comms: Bound,
    /// Symbolized stacks by word.
    frames: Bounded<FutexLockKey, Frames>,
    /// Each word's figures at the last read, for the episodes.
    last: HashMap<FutexLockKey, FutexLock>,
    losses: Losses,
}

impl std::fmt::Debug for FutexReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FutexReader")
            .field("live", &self.live.len())
            .field("retired", &self.retired.len())
            .finish_non_exhaustive()
    }
}

impl FutexReader {
    #[must_use]
    pub fn new(maps: FutexMaps, evictions: &Evictions, losses: Losses, folded: Folded) -> Self {
        Self {
            maps,
            retired: Bounded::new(Cache::FutexSeries, MAX_RETIRED, evictions.clone()),
            live: HashMap::new(),
            comms: Bound::new(Label::FutexComm, folded),
            frames: Bounded::new(Cache::Stacks, MAX_FRAMES, evictions.clone()),
            last: HashMap::new(),
            losses,
        }
    }

    /// Reads the aggregates and retires exited processes. `who` names a process's cgroup.
    pub fn refresh(&mut self, symbols: &mut Symbols, mut who: impl FnMut(u32) -> Who) -> Read {
        let mut series: HashMap<FutexLabels, FutexCounts> =
            self.retired.iter().map(|(l, c)| (l.clone(), *c)).collect();
        let mut gone = Vec::new();
        let mut processes = Vec::new();
        let entries: Vec<(u32, FutexProcess)> =
            self.maps.processes.iter().filter_map(Result::ok).collect();
        for (tgid, p) in &entries {
            let labels = self
                .live
                .entry(*tgid)
                .or_insert_with(|| {
                    let comm = crate::kernel::decode::comm(&p.comm);
                    FutexLabels {
                        comm: self.comms.value(&comm).to_owned(),
                        who: who(*tgid),
                    }
                })
                .clone();
            let counts = FutexCounts {
                buckets: p.buckets,
                outcomes: p.outcomes,
                woken_ns: p.woken_ns,
            };
            series.entry(labels.clone()).or_default().add(&counts);
            if procfs::alive(*tgid) {
                #[expect(clippy::cast_precision_loss, reason = "a figure for people")]
                processes.push(ProcessWaits {
                    pid: *tgid,
                    // Its own name here: the label may be folded.
                    comm: crate::kernel::decode::comm(&p.comm),
                    cgroup: labels.who.cgroup.clone(),
                    woken: counts.outcomes[agent_common::OUTCOME_WOKEN],
                    wait_seconds: counts.woken_ns as f64 / 1e9,
                    eagain: counts.outcomes[agent_common::OUTCOME_EAGAIN],
                    timeouts: counts.outcomes[agent_common::OUTCOME_TIMEOUT],
                });
            } else {
                gone.push((*tgid, labels, counts));
            }
        }
        processes.sort_by(|a, b| b.wait_seconds.total_cmp(&a.wait_seconds));
        processes.truncate(HOT_LOCKS);
        // A process gone: its counts stay in its series, its kernel entries go (they are the
        // cap's room for new processes).
        for (tgid, labels, counts) in gone {
            let mut total = self.retired.peek(&labels).copied().unwrap_or_default();
            total.add(&counts);
            self.retired.put(labels, total);
            self.live.remove(&tgid);
            let _ = self.maps.processes.remove(&tgid);
        }
        let live: HashSet<u32> = self.live.keys().copied().collect();
        let (hot, episodes) = self.hot_locks(symbols, &live);
        let mut series: Vec<(FutexLabels, FutexCounts)> = series.into_iter().collect();
        series.sort_by(|a, b| a.0.cmp(&b.0));
        Read {
            series,
            processes,
            hot,
            episodes,
        }
    }

    /// The words with the most wait time, with their stacks, and the words whose longest wait
    /// grew past the threshold since the last read; entries of gone processes are removed.
    fn hot_locks(
        &mut self,
        symbols: &mut Symbols,
        live: &HashSet<u32>,
    ) -> (Vec<HotLock>, Vec<Episode>) {
        let entries: Vec<(FutexLockKey, FutexLock)> =
            self.maps.locks.iter().filter_map(Result::ok).collect();
        let mut hot = Vec::new();
        let mut episodes = Vec::new();
        let mut last = HashMap::new();
        let mut read: HashMap<u32, Option<symbols::Stack>> = HashMap::new();
        self.frames.retain(|k, _| live.contains(&k.tgid));
        for (key, lock) in entries {
            if !live.contains(&key.tgid) {
                let _ = self.maps.locks.remove(&key);
                continue;
            }
            let before = self.last.get(&key).copied();
            last.insert(key, lock);
            let Some(labels) = self.live.get(&key.tgid).cloned() else {
                continue;
            };
            let stack = self.stack(symbols, &mut read, key, &lock);
            let h = HotLock {
                pid: key.tgid,
                comm: labels.comm.clone(),
                cgroup: labels.who.cgroup.clone(),
                uaddr: key.uaddr,
                waits: lock.waits,
                total_ns: lock.total_ns,
                max_ns: lock.max_ns,
                stack,
            };
            // A stack is recorded only for a wait over the threshold: a new one is an episode.
            if lock.stack_id >= 0 && before.is_none_or(|b| b.max_ns < lock.max_ns) {
                let (w, t) = before.map_or((0, 0), |b| (b.waits, b.total_ns));
                episodes.push(Episode {
                    lock: h.clone(),
                    new_waits: lock.waits.saturating_sub(w),
                    new_wait_ns: lock.total_ns.saturating_sub(t),
                });
            }
            hot.push(h);
        }
        // The stacks read are symbolized and kept by word: free their ids, so the map never
        // fills up with stacks nobody reads again.
        for id in read.keys() {
            let _ = self.maps.stacks.remove(id);
        }
        self.last = last;
        hot.sort_by_key(|h| std::cmp::Reverse(h.total_ns));
        hot.truncate(HOT_LOCKS);
        (hot, episodes)
    }

    /// The symbolized stack of `lock`'s longest wait: kept from an earlier read while the
    /// longest wait is the same, else read now (stacks read this round are in `read`).
    fn stack(
        &mut self,
        symbols: &mut Symbols,
        read: &mut HashMap<u32, Option<symbols::Stack>>,
        key: FutexLockKey,
        lock: &FutexLock,
    ) -> Vec<String> {
        if let Some(f) = self.frames.get(&key)
            && f.stack_id == lock.stack_id
            && f.max_ns == lock.max_ns
        {
            return f.names.clone();
        }
        let Ok(id) = u32::try_from(lock.stack_id) else {
            return Vec::new();
        };
        let stack = read
            .entry(id)
            .or_insert_with(|| symbols::read(&self.maps.stacks, id))
            .clone();
        let Some(stack) = stack else {
            self.losses
                .add(LossKind::FutexStack, LossReason::StackMissing, 1);
            return Vec::new();
        };
        let frames: Vec<String> = symbols
            .symbolize(key.tgid, &stack.addrs)
            .iter()
            .zip(&stack.addrs)
            .map(|(s, a)| match s {
                Some((name, offset)) => format!("{name}+{offset:#x}"),
                None => format!("{a:#x}"),
            })
            .collect();
        self.frames.put(
            key,
            Frames {
                stack_id: lock.stack_id,
                max_ns: lock.max_ns,
                names: frames.clone(),
            },
        );
        frames
    }

    /// Makes `want` the measured processes (when the configuration selects some, not all).
    pub fn select(&mut self, want: &HashSet<u32>) {
        let have: HashSet<u32> = self.maps.selected.keys().filter_map(Result::ok).collect();
        for tgid in have.difference(want) {
            let _ = self.maps.selected.remove(tgid);
        }
        for tgid in want.difference(&have) {
            // Full: more selected processes than the cap; the rest wait for room.
            if self.maps.selected.insert(*tgid, 1, 0).is_err() {
                tracing::debug!(tgid, "not measured yet: the selection is full");
            }
        }
    }
}
