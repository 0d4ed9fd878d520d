//! Lock contention figures: what the contention readers publish, the metrics are made from,
//! and the event socket's `contention` request serves to `nodewarden top`.

use agent_common::{FUTEX_BUCKETS, OUTCOMES};
use serde::{Deserialize, Serialize};

use super::cgroup::Who;

/// Outcome label values, by `agent_common::OUTCOME_*` index.
pub const OUTCOME_NAMES: [&str; OUTCOMES] = ["woken", "timeout", "eagain", "interrupted", "error"];

/// Labels of a futex series: the process's comm and its cgroup's identity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FutexLabels {
    pub comm: String,
    pub who: Who,
}

/// Futex wait counts of one series (or one process), as the kernel aggregates them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FutexCounts {
    /// Woken waits by log2 of the ns waited: bucket i holds [2^i, 2^(i+1)) ns.
    pub buckets: [u64; FUTEX_BUCKETS],
    /// Waits by outcome (see [`OUTCOME_NAMES`]).
    pub outcomes: [u64; OUTCOMES],
    /// Total ns of the woken waits.
    pub woken_ns: u64,
}

impl Default for FutexCounts {
    fn default() -> Self {
        Self {
            buckets: [0; FUTEX_BUCKETS],
            outcomes: [0; OUTCOMES],
            woken_ns: 0,
        }
    }
}

impl FutexCounts {
    /// Adds `o`, saturating: the figures come from kernel memory, never trusted to be sane.
    pub fn add(&mut self, o: &Self) {
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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
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

/// A word whose longest wait grew past the stack threshold since the last read: a span.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Episode {
    pub lock: HotLock,
    /// Waits and wait time since the last read.
    pub new_waits: u64,
    pub new_wait_ns: u64,
}

/// A live process's futex waits, for `nodewarden top`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProcessWaits {
    pub pid: u32,
    pub comm: String,
    pub cgroup: String,
    pub woken: u64,
    pub wait_seconds: f64,
    pub eagain: u64,
    pub timeouts: u64,
}

/// A watched process's off-CPU figures since it was first watched.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
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

/// A process's CPU, by samples over the recent windows.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
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
    /// Off CPU, when the process is watched.
    #[serde(default)]
    pub off_cpu: Option<OffCpuFigures>,
    /// Share of the process's thread time (on CPU, or asleep blocked on a lock) that went to
    /// locks: the on-CPU share when the process is not watched off CPU. Ranks processes by
    /// contention.
    #[serde(default)]
    pub contention: f64,
}

impl ProcessCpu {
    /// A process with no samples yet.
    #[must_use]
    pub fn empty(pid: u32, comm: String, cgroup: String) -> Self {
        Self {
            pid,
            comm,
            cgroup,
            samples: 0,
            lock_share: 0.0,
            map_share: 0.0,
            lock_call_site: None,
            off_cpu: None,
            contention: 0.0,
        }
    }
}

/// What the event socket's `contention` request serves.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    /// Most wait time first.
    pub processes: Vec<ProcessWaits>,
    pub hot: Vec<HotLock>,
    /// From the CPU samples: most contention first.
    #[serde(default)]
    pub cpu: Vec<ProcessCpu>,
}

/// Everything the contention readers publish at each read: the futex series (monotonic), the
/// snapshot, and whether each part is measured at all.
#[derive(Debug, Clone, Default)]
pub struct Published {
    /// Futex waits by series, counts never going backwards.
    pub futex: Vec<(FutexLabels, FutexCounts)>,
    pub snapshot: Snapshot,
}
