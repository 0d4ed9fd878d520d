//! What the CPU samples say about each process: the share of its sampled CPU time spent in lock
//! slow paths (Go's `sync` and runtime locks, the C library's lock waits) and in the Go map
//! runtime, and the call site that takes the lock most. Stacks are symbolized once each.

use std::collections::{BTreeMap, HashMap, HashSet};

use agent_common::{SampleKey, maps};
use aya::maps::{HashMap as BpfHashMap, MapData, StackTraceMap};

use crate::{
    contention::{escape, symbolize},
    metrics::Who,
};

/// Functions whose presence in a stack means the sample is spent taking (or waiting on) a lock.
/// Not `runtime.semacquire1` on its own: `sync.WaitGroup` and `sync.Cond` wait through it too.
/// Go 1.24 moved `sync.Mutex` into `internal/sync`.
const LOCK_FUNCTIONS: [&str; 20] = [
    "sync.(*Mutex).lockSlow",
    "sync.(*Mutex).Lock",
    "sync.(*Mutex).unlockSlow",
    "sync.(*RWMutex).Lock",
    "sync.(*RWMutex).RLock",
    "sync.(*RWMutex).rUnlockSlow",
    "sync.runtime_SemacquireMutex",
    "sync.runtime_SemacquireRWMutex",
    "sync.runtime_SemacquireRWMutexR",
    "sync.runtime_Semrelease",
    "internal/sync.(*Mutex).lockSlow",
    "internal/sync.(*Mutex).Lock",
    "internal/sync.(*Mutex).unlockSlow",
    "internal/sync.runtime_SemacquireMutex",
    "internal/sync.runtime_Semrelease",
    "runtime.lock2",
    "runtime.unlock2",
    "__lll_lock_wait",
    "pthread_mutex_lock",
    "pthread_rwlock_wrlock",
];

/// Function name prefixes of the Go map runtime (and `sync.Map`).
const MAP_PREFIXES: [&str; 7] = [
    "runtime.mapaccess",
    "runtime.mapassign",
    "runtime.mapdelete",
    "runtime.mapiter",
    "runtime.mapclear",
    "internal/runtime/maps.",
    "sync.(*Map).",
];

/// What one stack says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Class {
    pub lock: bool,
    pub map: bool,
    /// For a lock stack, the innermost frame of the program's own code (not the runtime's, not
    /// `sync`'s): the call site that takes the lock.
    pub call_site: Option<String>,
}

/// A process's CPU, by samples.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ProcessCpu {
    pub pid: u32,
    pub comm: String,
    pub cgroup: String,
    pub samples: u64,
    /// Share of the samples in lock slow paths.
    pub lock_share: f64,
    /// Share of the samples in the Go map runtime.
    pub map_share: f64,
    /// The call site with the most lock samples.
    pub lock_call_site: Option<String>,
    /// Off CPU, when the process is watched (see `offcpu`).
    #[serde(default)]
    pub off_cpu: Option<crate::offcpu::OffCpuFigures>,
    /// Share of the process's thread time (on CPU, or asleep blocked on a lock) that went to
    /// locks: the on-CPU share when the process is not watched off CPU. Ranks processes by
    /// contention.
    #[serde(default)]
    pub contention: f64,
}

/// Stack classes by (pid, stack id), each stack symbolized once: a stack id names one stack
/// for its map's life. Shared by the samples' and the off-CPU readers.
pub struct Classifier {
    symbolizer: blazesym::symbolize::Symbolizer,
    classes: HashMap<(u32, u32), Class>,
}

impl std::fmt::Debug for Classifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Classifier")
            .field("stacks", &self.classes.len())
            .finish_non_exhaustive()
    }
}

impl Classifier {
    #[must_use]
    pub fn new() -> Self {
        Self {
            symbolizer: blazesym::symbolize::Symbolizer::new(),
            classes: HashMap::new(),
        }
    }

    /// The class of stack `id` (in `stacks`) of `pid`.
    pub fn class(&mut self, stacks: &StackTraceMap<MapData>, pid: u32, id: u32) -> Class {
        if let Some(c) = self.classes.get(&(pid, id)) {
            return c.clone();
        }
        let Ok(trace) = stacks.get(&id, 0) else {
            return Class::default();
        };
        let addrs: Vec<u64> = trace.frames().iter().map(|f| f.ip).collect();
        let names: Vec<String> = symbolize(&self.symbolizer, pid, &addrs)
            .into_iter()
            .map(|s| s.map(|(name, _)| name).unwrap_or_default())
            .collect();
        let c = classify(&names);
        tracing::trace!(pid, id, ?c, stack = names.join(" < "), "stack class");
        self.classes.insert((pid, id), c.clone());
        c
    }

    /// Forgets the stacks of the processes `gone` says are.
    pub fn forget(&mut self, gone: impl Fn(u32) -> bool) {
        self.classes.retain(|(pid, _), _| !gone(*pid));
    }
}

/// Reads the sample counts; owns the maps.
#[derive(Debug)]
pub struct Sampler {
    samples: BpfHashMap<MapData, SampleKey, u64>,
    stacks: StackTraceMap<MapData>,
    classes: Classifier,
    labels: HashMap<u32, (String, String)>,
}

/// The sampling maps, taken out of the loaded object (see `contention::FutexMaps`).
#[derive(Debug)]
pub struct SampleMaps {
    samples: BpfHashMap<MapData, SampleKey, u64>,
    stacks: StackTraceMap<MapData>,
}

impl SampleMaps {
    pub fn take(ebpf: &mut aya::Ebpf) -> anyhow::Result<Self> {
        let mut take = |name: &str| crate::probes::take_map(ebpf, name);
        Ok(Self {
            samples: BpfHashMap::try_from(take(maps::CPU_SAMPLES)?)?,
            stacks: StackTraceMap::try_from(take(maps::SAMPLE_STACKS)?)?,
        })
    }
}

impl Sampler {
    #[must_use]
    pub fn new(m: SampleMaps) -> Self {
        Self {
            samples: m.samples,
            stacks: m.stacks,
            classes: Classifier::new(),
            labels: HashMap::new(),
        }
    }

    /// Reads the counts of live processes (removing those of exited ones) and returns each
    /// process's figures, most lock samples first. `who` names a process's cgroup.
    pub fn refresh(&mut self, mut who: impl FnMut(u32) -> Who) -> Vec<ProcessCpu> {
        let entries: Vec<(SampleKey, u64)> = self.samples.iter().filter_map(Result::ok).collect();
        let mut per: BTreeMap<u32, (u64, u64, u64, HashMap<String, u64>)> = BTreeMap::new();
        let mut gone = HashSet::new();
        for (key, n) in entries {
            if !std::path::Path::new(&format!("/proc/{}", key.tgid)).exists() {
                gone.insert(key.tgid);
                let _ = self.samples.remove(&key);
                continue;
            }
            let class = self.classes.class(&self.stacks, key.tgid, key.stack_id);
            let e = per.entry(key.tgid).or_default();
            e.0 = e.0.saturating_add(n);
            if class.lock {
                e.1 = e.1.saturating_add(n);
                if let Some(site) = class.call_site {
                    let s = e.3.entry(site).or_default();
                    *s = s.saturating_add(n);
                }
            }
            if class.map {
                e.2 = e.2.saturating_add(n);
            }
        }
        self.classes.forget(|pid| gone.contains(&pid));
        self.labels.retain(|pid, _| !gone.contains(pid));
        let mut out: Vec<ProcessCpu> = per
            .into_iter()
            .map(|(pid, (samples, lock, map, sites))| {
                let (comm, cgroup) = self
                    .labels
                    .entry(pid)
                    .or_insert_with(|| {
                        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                            .map(|c| c.trim_end().to_owned())
                            .unwrap_or_default();
                        (comm, who(pid).cgroup)
                    })
                    .clone();
                #[expect(clippy::cast_precision_loss, reason = "sample counts")]
                let share = |n: u64| n as f64 / samples as f64;
                ProcessCpu {
                    pid,
                    comm,
                    cgroup,
                    samples,
                    lock_share: share(lock),
                    map_share: share(map),
                    lock_call_site: sites.into_iter().max_by_key(|(_, n)| *n).map(|(s, _)| s),
                    off_cpu: None,
                    contention: share(lock),
                }
            })
            .collect();
        out.sort_by(|a, b| b.lock_share.total_cmp(&a.lock_share));
        out
    }
}

/// The exposition text of the CPU share gauges, one series per process (labels as the futex
/// histograms': comm and cgroup).
#[must_use]
pub fn render(cpu: &[ProcessCpu]) -> String {
    let mut s = String::new();
    for (name, help, share) in [
        (
            "nodewarden_lock_slowpath_cpu_share",
            "Share of a process's sampled on-CPU time spent in lock slow paths (Go sync and runtime locks, C library lock waits).",
            (|p: &ProcessCpu| p.lock_share) as fn(&ProcessCpu) -> f64,
        ),
        (
            "nodewarden_go_map_cpu_share",
            "Share of a process's sampled on-CPU time spent in the Go map runtime (and sync.Map).",
            |p: &ProcessCpu| p.map_share,
        ),
    ] {
        gauge(&mut s, name, help, cpu.iter().map(|p| (p, share(p))));
    }
    gauge(
        &mut s,
        "nodewarden_lock_offcpu_share",
        "Of the time a watched process's threads ran or slept blocked on a lock, the share they slept (lost CPU); only processes watched off CPU.",
        cpu.iter()
            .filter_map(|p| p.off_cpu.as_ref().map(|o| (p, o.lock_share))),
    );
    s
}

/// One gauge's help, type and a series per process.
fn gauge<'a>(
    s: &mut String,
    name: &str,
    help: &str,
    values: impl Iterator<Item = (&'a ProcessCpu, f64)>,
) {
    use std::fmt::Write as _;
    let _ = writeln!(s, "# HELP {name} {help}");
    let _ = writeln!(s, "# TYPE {name} gauge");
    for (p, v) in values {
        let _ = writeln!(
            s,
            "{name}{{comm=\"{}\",cgroup=\"{}\",pid=\"{}\"}} {v}",
            escape(&p.comm),
            escape(&p.cgroup),
            p.pid,
        );
    }
}

/// A stack's class from its function names, innermost first.
pub fn classify(names: &[String]) -> Class {
    let lock_at = names
        .iter()
        .rposition(|n| LOCK_FUNCTIONS.contains(&n.as_str()));
    let map = names
        .iter()
        .any(|n| MAP_PREFIXES.iter().any(|p| n.starts_with(p)));
    let call_site = lock_at.and_then(|i| {
        names[i + 1..]
            .iter()
            .find(|n| !n.is_empty() && !is_runtime(n))
            .cloned()
    });
    Class {
        lock: lock_at.is_some(),
        map,
        call_site,
    }
}

/// The Go runtime's, `sync`'s, and the C library's own functions.
pub fn is_runtime(name: &str) -> bool {
    [
        "runtime.",
        "sync.",
        "internal/",
        "__",
        "pthread_",
        "start_thread",
        "clone",
    ]
    .iter()
    .any(|p| name.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn classifies_lock_and_map_stacks() {
        let lock = classify(&names(&[
            "runtime.futex",
            "runtime.semacquire1",
            "sync.runtime_SemacquireMutex",
            "sync.(*RWMutex).Lock",
            "main.main.func1",
            "runtime.goexit",
        ]));
        assert!(lock.lock && !lock.map);
        assert_eq!(lock.call_site.as_deref(), Some("main.main.func1"));
        let map = classify(&names(&["runtime.mapaccess2_fast64", "main.main.func1"]));
        assert!(map.map && !map.lock && map.call_site.is_none());
        let neither = classify(&names(&["main.work", "runtime.goexit"]));
        assert_eq!(neither, Class::default());
        // A WaitGroup waits through the same semaphore as a mutex; it is not a lock.
        let wait_group = classify(&names(&[
            "runtime.semacquire1",
            "sync.runtime_Semacquire",
            "sync.(*WaitGroup).Wait",
            "main.main",
        ]));
        assert!(!wait_group.lock);
        // Go 1.24's mutex, and a Go thread asleep after parking a goroutine on a lock (x86_64:
        // the scheduler's frames chain on to the goroutine's).
        let parked = classify(&names(&[
            "runtime.futex",
            "runtime.futexsleep",
            "runtime.notesleep",
            "runtime.stopm",
            "runtime.findRunnable",
            "runtime.schedule",
            "runtime.park_m",
            "runtime.mcall",
            "runtime.semacquire1",
            "internal/sync.runtime_SemacquireMutex",
            "internal/sync.(*Mutex).lockSlow",
            "main.(*cache).get",
            "main.worker",
        ]));
        assert!(parked.lock);
        assert_eq!(parked.call_site.as_deref(), Some("main.(*cache).get"));
    }
}
