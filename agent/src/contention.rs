//! Futex contention from the kernel's per-process aggregates: read every few seconds, kept
//! monotonic across process exits (an exited process's counts move to its labels' retired
//! totals), served as Prometheus histograms, and the processes to watch selected when the
//! configuration names them.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt::Write as _,
    path::Path,
    sync::{Arc, Mutex},
};

use agent_common::{FUTEX_BUCKETS, FutexLock, FutexLockKey, FutexProcess, OUTCOMES, maps};
use aya::maps::{HashMap as BpfHashMap, MapData, StackTraceMap};

use crate::metrics::Who;

/// The histogram's bucket bounds are 2^k ns for k in this range (1 µs to 34 s); shorter waits
/// fall in the first bucket, longer ones only in `+Inf`.
const LE_EXPONENTS: std::ops::RangeInclusive<usize> = 10..=35;

/// Outcome label values, by `OUTCOME_*` index.
pub const OUTCOME_NAMES: [&str; OUTCOMES] = ["woken", "timeout", "eagain", "interrupted", "error"];

/// Labels of a series: the process's comm and its cgroup's identity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Labels {
    pub comm: String,
    pub who: [String; 4],
}

/// Counts of one series (or one process).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub buckets: [u64; FUTEX_BUCKETS],
    pub outcomes: [u64; OUTCOMES],
    pub woken_ns: u64,
}

impl Default for Counts {
    fn default() -> Self {
        Self {
            buckets: [0; FUTEX_BUCKETS],
            outcomes: [0; OUTCOMES],
            woken_ns: 0,
        }
    }
}

impl Counts {
    fn of(p: &FutexProcess) -> Self {
        Self {
            buckets: p.buckets,
            outcomes: p.outcomes,
            woken_ns: p.woken_ns,
        }
    }

    fn add(&mut self, o: &Self) {
        // Saturating: the figures come from kernel memory, never trusted to be sane.
        for (a, b) in self.buckets.iter_mut().zip(o.buckets) {
            *a = a.saturating_add(b);
        }
        for (a, b) in self.outcomes.iter_mut().zip(o.outcomes) {
            *a = a.saturating_add(b);
        }
        self.woken_ns = self.woken_ns.saturating_add(o.woken_ns);
    }
}

/// A contended futex word, for `nodewarden top` and the spans.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct HotLock {
    pub pid: u32,
    pub comm: String,
    pub cgroup: String,
    pub uaddr: u64,
    pub waits: u64,
    pub total_ns: u64,
    pub max_ns: u64,
    /// The user stack of its longest wait over the threshold, innermost first, symbolized
    /// (`function+0x1f`, or the address when unknown).
    pub stack: Vec<String>,
}

/// A live process's futex waits, for `nodewarden top`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct ProcessWaits {
    pub pid: u32,
    pub comm: String,
    pub cgroup: String,
    pub woken: u64,
    pub wait_seconds: f64,
    pub eagain: u64,
    pub timeouts: u64,
}

/// What `GET /contention` serves.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Snapshot {
    /// Most wait time first.
    pub processes: Vec<ProcessWaits>,
    pub hot: Vec<HotLock>,
    /// From the CPU samples: most lock share first.
    #[serde(default)]
    pub cpu: Vec<crate::sampling::ProcessCpu>,
}

/// What the readers publish: the exposition text of their metrics, and the snapshot.
#[derive(Debug, Default)]
pub struct Published {
    pub text: String,
    /// The CPU share gauges' text.
    pub cpu_text: String,
    pub snapshot: Snapshot,
}

/// A word whose longest wait grew past the stack threshold since the last read: a span.
#[derive(Debug, Clone)]
pub struct Episode {
    pub lock: HotLock,
    /// Waits and wait time since the last read.
    pub new_waits: u64,
    pub new_wait_ns: u64,
}

/// Reads the futex maps; owns them.
pub struct FutexReader {
    processes: BpfHashMap<MapData, u32, FutexProcess>,
    locks: BpfHashMap<MapData, FutexLockKey, FutexLock>,
    stacks: StackTraceMap<MapData>,
    selected: BpfHashMap<MapData, u32, u8>,
    /// Counts of processes gone, by labels: series never go backwards.
    retired: BTreeMap<Labels, Counts>,
    /// Labels of the live processes, fixed at first sight.
    live: HashMap<u32, Labels>,
    published: Arc<Mutex<Published>>,
    symbolizer: blazesym::symbolize::Symbolizer,
    /// Symbolized stacks by (pid, stack id): a stack id names one stack for the map's life.
    frames: HashMap<(u32, i64), Vec<String>>,
    /// Each word's figures at the last read, for the episodes.
    last: HashMap<FutexLockKey, FutexLock>,
}

impl std::fmt::Debug for FutexReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FutexReader")
            .field("live", &self.live.len())
            .field("retired", &self.retired.len())
            .finish_non_exhaustive()
    }
}

/// The futex maps, taken out of the loaded object (they can move to the readers' thread; the
/// symbolizer cannot, so the reader is made there).
#[derive(Debug)]
pub struct FutexMaps {
    processes: BpfHashMap<MapData, u32, FutexProcess>,
    locks: BpfHashMap<MapData, FutexLockKey, FutexLock>,
    stacks: StackTraceMap<MapData>,
    selected: BpfHashMap<MapData, u32, u8>,
}

impl FutexMaps {
    pub fn take(ebpf: &mut aya::Ebpf) -> anyhow::Result<Self> {
        let mut take = |name: &str| crate::probes::take_map(ebpf, name);
        Ok(Self {
            processes: BpfHashMap::try_from(take(maps::FUTEX_PROCESSES)?)?,
            locks: BpfHashMap::try_from(take(maps::FUTEX_LOCKS)?)?,
            stacks: StackTraceMap::try_from(take(maps::FUTEX_STACKS)?)?,
            selected: BpfHashMap::try_from(take(maps::FUTEX_SELECTED)?)?,
        })
    }
}

impl FutexReader {
    pub fn new(m: FutexMaps, published: Arc<Mutex<Published>>) -> Self {
        Self {
            processes: m.processes,
            locks: m.locks,
            stacks: m.stacks,
            selected: m.selected,
            retired: BTreeMap::new(),
            live: HashMap::new(),
            published,
            symbolizer: blazesym::symbolize::Symbolizer::new(),
            frames: HashMap::new(),
            last: HashMap::new(),
        }
    }

    /// Reads the aggregates, retires exited processes, and publishes; returns the words with a
    /// new long wait. `who` names a process's cgroup.
    pub fn refresh(&mut self, mut who: impl FnMut(u32) -> Who) -> Vec<Episode> {
        let mut series: BTreeMap<Labels, Counts> = self.retired.clone();
        let mut gone = Vec::new();
        let mut processes = Vec::new();
        let entries: Vec<(u32, FutexProcess)> =
            self.processes.iter().filter_map(Result::ok).collect();
        for (tgid, p) in &entries {
            let labels = self
                .live
                .entry(*tgid)
                .or_insert_with(|| {
                    let w = who(*tgid);
                    Labels {
                        comm: crate::events::comm(&p.comm),
                        who: [w.cgroup, w.namespace, w.pod, w.container],
                    }
                })
                .clone();
            let counts = Counts::of(p);
            series.entry(labels.clone()).or_default().add(&counts);
            if Path::new(&format!("/proc/{tgid}")).exists() {
                #[expect(clippy::cast_precision_loss, reason = "a figure for people")]
                processes.push(ProcessWaits {
                    pid: *tgid,
                    comm: labels.comm.clone(),
                    cgroup: labels.who[0].clone(),
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
        // A process gone: its counts stay in its series, its kernel entries go (they are the
        // cap's room for new processes).
        for (tgid, labels, counts) in gone {
            self.retired.entry(labels).or_default().add(&counts);
            self.live.remove(&tgid);
            let _ = self.processes.remove(&tgid);
        }
        let live_tgids: HashSet<u32> = self.live.keys().copied().collect();
        let (hot, episodes) = self.hot_locks(&live_tgids);
        let text = render(&series);
        processes.truncate(HOT_LOCKS);
        if let Ok(mut p) = self.published.lock() {
            p.text = text;
            p.snapshot.processes = processes;
            p.snapshot.hot = hot;
        }
        episodes
    }

    /// The words with the most wait time, with their stacks, and the words whose longest wait
    /// grew past the threshold since the last read; entries of gone processes are removed.
    fn hot_locks(&mut self, live: &HashSet<u32>) -> (Vec<HotLock>, Vec<Episode>) {
        let entries: Vec<(FutexLockKey, FutexLock)> =
            self.locks.iter().filter_map(Result::ok).collect();
        let mut hot = Vec::new();
        let mut episodes = Vec::new();
        let mut last = HashMap::new();
        self.frames.retain(|(pid, _), _| live.contains(pid));
        for (key, lock) in entries {
            if !live.contains(&key.tgid) {
                let _ = self.locks.remove(&key);
                continue;
            }
            let before = self.last.get(&key).copied();
            last.insert(key, lock);
            let Some(labels) = self.live.get(&key.tgid).cloned() else {
                continue;
            };
            let stack = self.stack(key.tgid, lock.stack_id);
            let h = HotLock {
                pid: key.tgid,
                comm: labels.comm.clone(),
                cgroup: labels.who[0].clone(),
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
        self.last = last;
        hot.sort_by_key(|h| std::cmp::Reverse(h.total_ns));
        hot.truncate(HOT_LOCKS);
        (hot, episodes)
    }

    /// The symbolized user stack `id` of process `pid` (empty when there is none).
    fn stack(&mut self, pid: u32, id: i64) -> Vec<String> {
        let Ok(key) = u32::try_from(id) else {
            return Vec::new();
        };
        if let Some(f) = self.frames.get(&(pid, id)) {
            return f.clone();
        }
        let Ok(trace) = self.stacks.get(&key, 0) else {
            return Vec::new();
        };
        let addrs: Vec<u64> = trace.frames().iter().map(|f| f.ip).collect();
        let names: Vec<String> = symbolize(&self.symbolizer, pid, &addrs)
            .iter()
            .zip(&addrs)
            .map(|(s, a)| match s {
                Some((name, offset)) => format!("{name}+{offset:#x}"),
                None => format!("{a:#x}"),
            })
            .collect();
        self.frames.insert((pid, id), names.clone());
        names
    }

    /// Makes `want` the measured processes (when the configuration selects some, not all).
    pub fn select(&mut self, want: &HashSet<u32>) {
        let have: HashSet<u32> = self.selected.keys().filter_map(Result::ok).collect();
        for tgid in have.difference(want) {
            let _ = self.selected.remove(tgid);
        }
        for tgid in want.difference(&have) {
            // Full: more selected processes than the cap; the rest wait for room.
            let _ = self.selected.insert(*tgid, 1, 0);
        }
    }
}

/// How many hot words are kept for `nodewarden top`.
const HOT_LOCKS: usize = 50;

/// The exposition text of `nodewarden_futex_wait_seconds` and `nodewarden_futex_waits_total`.
fn render(series: &BTreeMap<Labels, Counts>) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# HELP nodewarden_futex_wait_seconds Time threads waited in futex(2) until woken, by process (comm) and cgroup; measured in the kernel."
    );
    let _ = writeln!(s, "# TYPE nodewarden_futex_wait_seconds histogram");
    for (labels, c) in series {
        let base = label_text(labels);
        let mut cumulative = c.buckets[..*LE_EXPONENTS.start()].iter().sum::<u64>();
        for k in LE_EXPONENTS {
            cumulative += c.buckets[k];
            #[expect(clippy::cast_precision_loss, reason = "2^36 ns fits an f64 exactly")]
            let le = (1u64 << (k + 1)) as f64 / 1e9;
            let _ = writeln!(
                s,
                "nodewarden_futex_wait_seconds_bucket{{{base},le=\"{le:e}\"}} {cumulative}"
            );
        }
        let count = c.outcomes[agent_common::OUTCOME_WOKEN];
        let _ = writeln!(
            s,
            "nodewarden_futex_wait_seconds_bucket{{{base},le=\"+Inf\"}} {count}"
        );
        #[expect(clippy::cast_precision_loss, reason = "a sum in seconds")]
        let sum = c.woken_ns as f64 / 1e9;
        let _ = writeln!(s, "nodewarden_futex_wait_seconds_sum{{{base}}} {sum}");
        let _ = writeln!(s, "nodewarden_futex_wait_seconds_count{{{base}}} {count}");
    }
    let _ = writeln!(
        s,
        "# HELP nodewarden_futex_waits_total Futex waits by outcome: woken, timeout, eagain (the word had changed: no sleep), interrupted, error."
    );
    let _ = writeln!(s, "# TYPE nodewarden_futex_waits_total counter");
    for (labels, c) in series {
        let base = label_text(labels);
        for (name, n) in OUTCOME_NAMES.iter().zip(c.outcomes) {
            let _ = writeln!(
                s,
                "nodewarden_futex_waits_total{{{base},outcome=\"{name}\"}} {n}"
            );
        }
    }
    s
}

/// `comm="x",cgroup="/a"` and the Kubernetes names where set (empty labels are left out, as
/// in the other metrics).
fn label_text(l: &Labels) -> String {
    let mut s = format!("comm=\"{}\"", escape(&l.comm));
    for (name, value) in ["cgroup", "namespace", "pod", "container"]
        .iter()
        .zip(&l.who)
    {
        if !value.is_empty() {
            let _ = write!(s, ",{name}=\"{}\"", escape(value));
        }
    }
    s
}

/// The function (and offset in it) of each user address of process `pid`, from the
/// executables' symbol tables; `None` where unknown (or for all, when the process is gone).
pub fn symbolize(
    symbolizer: &blazesym::symbolize::Symbolizer,
    pid: u32,
    addrs: &[u64],
) -> Vec<Option<(String, usize)>> {
    let mut process = blazesym::symbolize::source::Process::new(blazesym::Pid::from(pid));
    // Symbol tables name every function needed here; DWARF would cost seconds and memory for
    // a large binary.
    process.debug_syms = false;
    let src = blazesym::symbolize::source::Source::Process(process);
    match symbolizer.symbolize(&src, blazesym::symbolize::Input::AbsAddr(addrs)) {
        Ok(syms) => syms
            .into_iter()
            .map(|s| match s {
                blazesym::symbolize::Symbolized::Sym(sym) => {
                    Some((sym.name.into_owned(), sym.offset))
                }
                blazesym::symbolize::Symbolized::Unknown(_) => None,
            })
            .collect(),
        Err(e) => {
            tracing::debug!(pid, "symbolizing a stack: {e}");
            vec![None; addrs.len()]
        }
    }
}

/// A label value escaped for the text exposition format.
pub fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_cumulative_buckets_sum_and_outcomes() {
        let mut c = Counts::default();
        c.buckets[3] = 2; // under 1 µs: counted in the first bucket
        c.buckets[12] = 5; // [4096, 8192) ns
        c.buckets[40] = 1; // over 34 s: only in +Inf
        c.outcomes = [8, 1, 100, 0, 0];
        c.woken_ns = 1_500_000_000;
        let labels = Labels {
            comm: "m\"x".into(),
            who: ["/a".into(), String::new(), String::new(), String::new()],
        };
        let text = render(&BTreeMap::from([(labels, c)]));
        let line = |prefix: &str| {
            text.lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix} in\n{text}"))
                .rsplit_once(' ')
                .map(|(_, v)| v.to_owned())
                .expect("value")
        };
        let b = "nodewarden_futex_wait_seconds_bucket{comm=\"m\\\"x\",cgroup=\"/a\",";
        assert_eq!(line(&format!("{b}le=\"2.048e-6\"}}")), "2");
        assert_eq!(line(&format!("{b}le=\"4.096e-6\"}}")), "2");
        assert_eq!(line(&format!("{b}le=\"8.192e-6\"}}")), "7");
        assert_eq!(line(&format!("{b}le=\"6.8719476736e1\"}}")), "7");
        assert_eq!(line(&format!("{b}le=\"+Inf\"}}")), "8");
        assert_eq!(
            line("nodewarden_futex_wait_seconds_sum{comm=\"m\\\"x\",cgroup=\"/a\"}"),
            "1.5"
        );
        assert_eq!(
            line("nodewarden_futex_waits_total{comm=\"m\\\"x\",cgroup=\"/a\",outcome=\"eagain\"}"),
            "100"
        );
    }
}
