//! What a user stack says: whether it is in a lock slow path (Go's `sync` and runtime locks,
//! the C library's lock waits) or in the Go map runtime, and the call site that takes the
//! lock. Each distinct stack of a process is symbolized once.

use aya::maps::{MapData, StackTraceMap};

use super::symbols::{self, Symbols};
use crate::model::cache::{Bounded, Cache, Evictions};

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

/// Stacks classified at most (a few thousand cover the busy processes).
const MAX_STACKS: usize = 16_384;

/// Stack classes by (pid, stack): each distinct stack symbolized once.
#[derive(Debug)]
pub struct Classifier {
    classes: Bounded<(u32, u64), Class>,
}

impl Classifier {
    #[must_use]
    pub fn new(evictions: &Evictions) -> Self {
        Self {
            classes: Bounded::new(Cache::Stacks, MAX_STACKS, evictions.clone()),
        }
    }

    /// The class of stack `id` (in `stacks`) of `pid`; `None` when the map no longer has it.
    pub fn class(
        &mut self,
        symbols: &mut Symbols,
        stacks: &StackTraceMap<MapData>,
        pid: u32,
        id: u32,
    ) -> Option<Class> {
        let stack = symbols::read(stacks, id)?;
        if let Some(c) = self.classes.get(&(pid, stack.hash)) {
            return Some(c.clone());
        }
        let names: Vec<String> = symbols
            .symbolize(pid, &stack.addrs)
            .into_iter()
            .map(|s| s.map(|(name, _)| name).unwrap_or_default())
            .collect();
        let c = classify(&names);
        tracing::trace!(pid, id, ?c, stack = names.join(" < "), "stack class");
        self.classes.put((pid, stack.hash), c.clone());
        Some(c)
    }

    /// Forgets the stacks of the processes `gone` says are.
    pub fn forget(&mut self, gone: impl Fn(u32) -> bool) {
        self.classes.retain(|(pid, _), _| !gone(*pid));
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
