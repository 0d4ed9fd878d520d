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

use agent_common::{FUTEX_WAIT_SLOTS, OffCpu, SampleKey, maps};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, StackTraceMap};

use crate::sampling::{Classifier, ProcessCpu};

/// A process is watched once its samples show at least this share in lock slow paths...
const WATCH_LOCK_SHARE: f64 = 0.02;
/// ...or at least this share in the Go map runtime...
const WATCH_MAP_SHARE: f64 = 0.05;
/// ...out of at least this many samples (a second of one CPU at the default rate).
const WATCH_MIN_SAMPLES: u64 = 49;

/// A watched process's off-CPU figures since it was first watched.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct OffCpuFigures {
    /// Seconds watched.
    pub watched_seconds: f64,
    /// CPU seconds the process used meanwhile (its /proc stat).
    pub cpu_seconds: f64,
    /// Thread seconds asleep after blocking on a lock.
    pub lock_seconds: f64,
    /// Thread seconds asleep for any reason.
    pub total_seconds: f64,
    /// `lock_seconds / (lock_seconds + cpu_seconds)`: of the time its threads either ran or
    /// waited for a lock, the share they waited.
    pub lock_share: f64,
    /// The call site with the most lock sleep.
    pub lock_call_site: Option<String>,
}

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
    pub fn take(ebpf: &mut aya::Ebpf) -> anyhow::Result<Self> {
        let mut take = |name: &str| crate::probes::take_map(ebpf, name);
        Ok(Self {
            offcpu: BpfHashMap::try_from(take(maps::OFFCPU)?)?,
            stacks: StackTraceMap::try_from(take(maps::OFFCPU_STACKS)?)?,
            watch: Array::try_from(take(maps::OFFCPU_WATCH)?)?,
        })
    }
}

/// When a process was first watched, and its CPU time then.
#[derive(Debug, Clone, Copy)]
struct Watched {
    since: std::time::Instant,
    cpu_seconds: f64,
}

/// Reads the off-CPU maps and keeps the watch list; owns the maps.
pub struct OffCpuReader {
    maps: OffCpuMaps,
    /// How many processes the kernel map holds.
    capacity: usize,
    classes: Classifier,
    watched: HashMap<u32, Watched>,
}

impl std::fmt::Debug for OffCpuReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OffCpuReader")
            .field("watched", &self.watched.len())
            .finish_non_exhaustive()
    }
}

impl OffCpuReader {
    #[must_use]
    pub fn new(maps: OffCpuMaps, capacity: u32) -> Self {
        Self {
            maps,
            capacity: usize::try_from(capacity).unwrap_or(usize::MAX),
            classes: Classifier::new(),
            watched: HashMap::new(),
        }
    }

    /// Updates the watch list from the samples (`cpu`) and the configured selection
    /// (`selected`), then fills in the watched processes' figures in `cpu` (adding those the
    /// samples do not have: sampling may be off) and reorders it by contention.
    pub fn refresh(&mut self, cpu: &mut Vec<ProcessCpu>, selected: &HashSet<u32>) {
        self.watch(cpu, selected);
        for pid in self.watched.keys() {
            if !cpu.iter().any(|p| p.pid == *pid) {
                cpu.push(ProcessCpu {
                    pid: *pid,
                    comm: std::fs::read_to_string(format!("/proc/{pid}/comm"))
                        .map(|c| c.trim_end().to_owned())
                        .unwrap_or_default(),
                    cgroup: crate::cgroups::path_of_pid(*pid).unwrap_or_default(),
                    samples: 0,
                    lock_share: 0.0,
                    map_share: 0.0,
                    lock_call_site: None,
                    off_cpu: None,
                    contention: 0.0,
                });
            }
        }
        let entries: Vec<(SampleKey, OffCpu)> =
            self.maps.offcpu.iter().filter_map(Result::ok).collect();
        // Per process: (all ns, lock ns, lock ns by call site).
        let mut per: HashMap<u32, (u64, u64, HashMap<String, u64>)> = HashMap::new();
        for (key, v) in entries {
            if !self.watched.contains_key(&key.tgid) {
                let _ = self.maps.offcpu.remove(&key);
                continue;
            }
            let class = self
                .classes
                .class(&self.maps.stacks, key.tgid, key.stack_id);
            let e = per.entry(key.tgid).or_default();
            e.0 = e.0.saturating_add(v.ns);
            if class.lock {
                e.1 = e.1.saturating_add(v.ns);
                if let Some(site) = class.call_site {
                    let s = e.2.entry(site).or_default();
                    *s = s.saturating_add(v.ns);
                }
            }
        }
        for p in cpu.iter_mut() {
            let Some(w) = self.watched.get(&p.pid) else {
                continue;
            };
            let (all, lock, sites) = per.remove(&p.pid).unwrap_or_default();
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
                lock_call_site: sites.into_iter().max_by_key(|(_, n)| *n).map(|(s, _)| s),
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
            let _ = self.maps.watch.set(slot_of(pid), 0, 0);
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

/// A process's user and system CPU seconds so far; `None` once it has exited.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    #[expect(clippy::cast_precision_loss, reason = "CPU seconds")]
    Some(parse_cpu_ticks(&stat)? as f64 / per_second as f64)
}

/// utime + stime (fields 14 and 15) of a /proc/PID/stat line. The comm (field 2) may hold
/// spaces and parentheses, so fields are counted after its last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime.saturating_add(stime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_read_after_the_comm() {
        let stat = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 31 0 0 20 0 9 0 \
                    123 456 789";
        assert_eq!(parse_cpu_ticks(stat), Some(281));
        assert_eq!(parse_cpu_ticks("4242 (x) S 1"), None);
        assert_eq!(parse_cpu_ticks("garbage"), None);
    }

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

    #[test]
    fn reads_this_process() {
        assert!(cpu_seconds(std::process::id()).is_some_and(|s| s >= 0.0));
        assert_eq!(cpu_seconds(u32::MAX), None);
    }
}
