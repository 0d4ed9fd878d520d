//! Off-CPU time of a few watched processes, read from the `sched_switch` program's aggregates:
//! how long their threads slept blocked on a lock, against the CPU time they used meanwhile. A
//! Go process whose goroutines park on a lock shows here as lost CPU, with the lock's call site,
//! although its on-CPU samples barely show the lock.
//!
//! A sleep is a lock's when the stack at the switch-out is in a lock slow path: a C thread in
//! `__lll_lock_wait`, or a Go thread that, after parking a goroutine on a lock, found nothing
//! else to run (on x86_64 the scheduler's frames chain on to the parked goroutine's). Go 1.19
//! on arm64 restarts the frame pointer chain on the scheduler's stack, so there a Go lock's
//! lost CPU goes unnamed (counted in `total_seconds` only).
//!
//! Which processes: those named by `contention.select` (when it names any) and those the CPU
//! samples show in lock slow paths or the Go map runtime, up to the kernel map's size; a stack at
//! every switch-out is affordable for a few processes, not for the node.

use std::collections::{HashMap, HashSet};

use agent_common::{FUTEX_WAIT_SLOTS, LossKind, OffCpu, SampleKey, maps};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, StackTraceMap};

use super::{
    classify::Classifier,
    symbols::Symbols,
    windows::{stack_missing, take_counts},
};
use crate::{
    enrich::procfs::{self, cpu_seconds},
    kernel::loader::{LoadError, take_map},
    model::{
        cache::Evictions,
        contention::{OffCpuFigures, ProcessCpu},
        loss::Losses,
    },
};

/// A process is watched once its samples show at least this share in lock slow paths...
const WATCH_LOCK_SHARE: f64 = 0.02;
/// ...or at least this share in the Go map runtime...
const WATCH_MAP_SHARE: f64 = 0.05;
/// ...out of at least this many samples (a second of one CPU at the default rate).
const WATCH_MIN_SAMPLES: u64 = 49;

/// The off-CPU maps, taken out of the loaded object (see `contention::FutexMaps`).
pub struct OffCpuMaps {
    offcpu: BpfHashMap<MapData, SampleKey, OffCpu>,
    stacks: StackTraceMap<MapData>,
    watch: Array<MapData, u32>,
}

impl std::fmt::Debug for OffCpuMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OffCpuMaps").finish_non_exhaustive()
    }
}

impl OffCpuMaps {
    pub fn take(ebpf: &mut aya::Ebpf) -> Result<Self, LoadError> {
        Ok(Self {
            offcpu: take_map(ebpf, maps::OFFCPU)?,
            stacks: take_map(ebpf, maps::OFFCPU_STACKS)?,
            watch: take_map(ebpf, maps::OFFCPU_WATCH)?,
        })
    }
}

/// A watched process: when it was first watched, its CPU time then, and its time asleep since.
#[derive(Debug, Clone)]
struct Watched {
    since: std::time::Instant,
    cpu_seconds: f64,
    /// Nanoseconds asleep, for any reason.
    all_ns: u64,
    /// Nanoseconds asleep blocked on a lock, and by call site.
    lock_ns: u64,
    sites: HashMap<String, u64>,
}

/// Reads the off-CPU maps and keeps the watch list; owns the maps.
pub struct OffCpuReader {
    maps: OffCpuMaps,
    /// How many processes the kernel map holds.
    capacity: usize,
    classes: Classifier,
    watched: HashMap<u32, Watched>,
    losses: Losses,
    /// Read windows so far.
    windows: u32,
}

/// Read windows (2 s each) between two clearings of the stack map.
const CLEAR_STACKS_EVERY: u32 = 150;

impl std::fmt::Debug for OffCpuReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OffCpuReader")
            .field("watched", &self.watched.len())
            .finish_non_exhaustive()
    }
}

impl OffCpuReader {
    #[must_use]
    pub fn new(maps: OffCpuMaps, capacity: u32, evictions: &Evictions, losses: Losses) -> Self {
        Self {
            maps,
            capacity: usize::try_from(capacity).unwrap_or(usize::MAX),
            classes: Classifier::new(evictions),
            watched: HashMap::new(),
            losses,
            windows: 0,
        }
    }

    /// Empties the stack map, every few minutes. Unlike a sample's, a sleep's stack is taken
    /// when the thread goes to sleep and counted only when it wakes, so the stacks a window's
    /// counts used cannot be freed with them: a thread asleep meanwhile still needs its own.
    /// Cleared at once instead, the map never fills with stacks of processes no longer
    /// watched; a thread asleep across the clearing loses its stack, counted
    /// (`off_cpu`/`stack_missing`).
    fn clear_stacks(&mut self) {
        let ids: Vec<u32> = self
            .maps
            .stacks
            .stack_ids()
            .filter_map(Result::ok)
            .collect();
        for id in ids {
            let _ = self.maps.stacks.remove(&id);
        }
    }

    /// Takes the window `bit`'s sleeps into the watched processes' figures, updates the watch
    /// list from the samples (`cpu`) and the configured selection (`selected`), then fills in
    /// the watched processes' figures in `cpu` (adding those the samples do not have: sampling
    /// may be off) and reorders it by contention. `cgroup` names a process's cgroup.
    pub fn refresh(
        &mut self,
        bit: u32,
        symbols: &mut Symbols,
        cpu: &mut Vec<ProcessCpu>,
        selected: &HashSet<u32>,
        mut cgroup: impl FnMut(u32) -> String,
    ) {
        let taken: Vec<(SampleKey, OffCpu)> = take_counts(&mut self.maps.offcpu, bit);
        for (key, v) in &taken {
            // Counted before the process was dropped from the watch list: not its figures.
            let Some(w) = self.watched.get_mut(&key.tgid) else {
                continue;
            };
            let Some(class) =
                self.classes
                    .class(symbols, &self.maps.stacks, key.tgid, key.stack_id)
            else {
                stack_missing(&self.losses, LossKind::OffCpu, v.sleeps);
                continue;
            };
            w.all_ns = w.all_ns.saturating_add(v.ns);
            if class.lock {
                w.lock_ns = w.lock_ns.saturating_add(v.ns);
                if let Some(site) = class.call_site {
                    let s = w.sites.entry(site).or_default();
                    *s = s.saturating_add(v.ns);
                }
            }
        }
        self.windows += 1;
        if self.windows.is_multiple_of(CLEAR_STACKS_EVERY) {
            self.clear_stacks();
        }
        self.watch(cpu, selected);
        for pid in self.watched.keys() {
            if !cpu.iter().any(|p| p.pid == *pid) {
                cpu.push(ProcessCpu::empty(
                    *pid,
                    procfs::comm(*pid).unwrap_or_default(),
                    cgroup(*pid),
                ));
            }
        }
        for p in cpu.iter_mut() {
            let Some(w) = self.watched.get(&p.pid) else {
                continue;
            };
            let (all, lock) = (w.all_ns, w.lock_ns);
            let used = cpu_seconds(p.pid).unwrap_or(w.cpu_seconds);
            #[expect(clippy::cast_precision_loss, reason = "figures for people")]
            let (cpu_seconds, lock_seconds, total_seconds) = (
                (used - w.cpu_seconds).max(0.0),
                lock as f64 / 1e9,
                all as f64 / 1e9,
            );
            let (lock_share, contention) = shares(p.lock_share, cpu_seconds, lock_seconds);
            p.contention = contention;
            p.off_cpu = Some(OffCpuFigures {
                watched_seconds: w.since.elapsed().as_secs_f64(),
                cpu_seconds,
                lock_seconds,
                total_seconds,
                lock_share,
                lock_call_site: w
                    .sites
                    .iter()
                    .max_by_key(|(_, n)| **n)
                    .map(|(s, _)| s.clone()),
            });
        }
        cpu.sort_by(|a, b| b.contention.total_cmp(&a.contention));
    }

    /// Keeps the watched processes that are still alive and still qualify, then adds the most
    /// telling new ones while there is room: the selected first, then by lock and map share.
    fn watch(&mut self, cpu: &[ProcessCpu], selected: &HashSet<u32>) {
        let qualifies = |p: &ProcessCpu| {
            selected.contains(&p.pid)
                || (p.samples >= WATCH_MIN_SAMPLES
                    && (p.lock_share >= WATCH_LOCK_SHARE || p.map_share >= WATCH_MAP_SHARE))
        };
        let mut want: Vec<(u32, f64)> = cpu
            .iter()
            .filter(|p| qualifies(p))
            .map(|p| {
                let rank = if selected.contains(&p.pid) {
                    f64::INFINITY
                } else {
                    p.lock_share + p.map_share
                };
                (p.pid, rank)
            })
            .collect();
        // Selected processes without samples yet (idle, or just started).
        for pid in selected {
            if !want.iter().any(|(p, _)| p == pid) {
                want.push((*pid, f64::INFINITY));
            }
        }
        let keep: HashSet<u32> = want
            .iter()
            .map(|(p, _)| *p)
            .filter(|p| self.watched.contains_key(p) && cpu_seconds(*p).is_some())
            .collect();
        let dropped: Vec<u32> = self
            .watched
            .keys()
            .filter(|p| !keep.contains(p))
            .copied()
            .collect();
        for pid in dropped {
            self.watched.remove(&pid);
            // A watch that stays set measures a process no longer reported: said, not silent.
            if let Err(e) = self.maps.watch.set(slot_of(pid), 0, 0) {
                tracing::warn!(pid, "unwatching off CPU: {e}");
            }
            self.classes.forget(|p| p == pid);
        }
        want.sort_by(|a, b| b.1.total_cmp(&a.1));
        for (pid, _) in want {
            if self.watched.len() >= self.capacity {
                break;
            }
            if self.watched.contains_key(&pid) {
                continue;
            }
            let Some(cpu_seconds) = cpu_seconds(pid) else {
                continue;
            };
            // One process per slot: another watched one with the same slot keeps it.
            if self.watched.keys().any(|w| slot_of(*w) == slot_of(pid)) {
                tracing::debug!(pid, "not watched off CPU: its slot is taken");
                continue;
            }
            if self.maps.watch.set(slot_of(pid), pid, 0).is_ok() {
                tracing::info!(pid, "watching off-CPU time");
                self.watched.insert(
                    pid,
                    Watched {
                        since: std::time::Instant::now(),
                        cpu_seconds,
                        all_ns: 0,
                        lock_ns: 0,
                        sites: HashMap::new(),
                    },
                );
            }
        }
    }
}

/// (off-CPU lock share, contention) of a process whose samples put `on_cpu_lock_share` of its
/// `cpu_seconds` in lock slow paths and whose threads slept `lock_seconds` blocked on locks: of
/// the time its threads ran or waited for a lock, the share they waited, and the share that
/// went to locks either way.
fn shares(on_cpu_lock_share: f64, cpu_seconds: f64, lock_seconds: f64) -> (f64, f64) {
    let ran_or_waited = cpu_seconds + lock_seconds;
    if ran_or_waited <= 0.0 {
        return (0.0, on_cpu_lock_share);
    }
    (
        lock_seconds / ran_or_waited,
        (on_cpu_lock_share * cpu_seconds + lock_seconds) / ran_or_waited,
    )
}

/// A process's slot in `OFFCPU_WATCH`.
fn slot_of(pid: u32) -> u32 {
    pid % FUTEX_WAIT_SLOTS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_of_running_and_lock_waiting_time() {
        // 2 CPU-seconds, a tenth of them in lock slow paths, and 2 s asleep on a lock.
        let (off, contention) = shares(0.1, 2.0, 2.0);
        assert!((off - 0.5).abs() < 1e-9, "{off}");
        assert!((contention - 0.55).abs() < 1e-9, "{contention}");
        // No lock sleep: the on-CPU share alone.
        assert_eq!(shares(0.25, 4.0, 0.0), (0.0, 0.25));
        // Nothing measured yet.
        assert_eq!(shares(0.3, 0.0, 0.0), (0.0, 0.3));
    }
}
