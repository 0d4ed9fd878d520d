//! Go processes already reported dying: several goroutines can hit the same race, and the
//! process dies once, so it is one crash.

use crate::model::cache::{Bounded, Cache, Evictions};

/// How long a crashed process is remembered (its other goroutines' fatal errors are the same
/// crash, reported within microseconds).
const REMEMBER_NS: u64 = 10_000_000_000;
/// Processes remembered at once (a crash storm beyond this reports a process twice at worst).
const MAX_CRASHES: usize = 4096;

#[derive(Debug)]
pub struct GoCrashes {
    seen: Bounded<u32, u64>,
}

impl GoCrashes {
    #[must_use]
    pub fn new(evictions: &Evictions) -> Self {
        Self {
            seen: Bounded::new(Cache::GoCrashes, MAX_CRASHES, evictions.clone()),
        }
    }

    /// Whether a fatal error of process `tgid` at `now_ns` is its first (a new crash).
    pub fn first(&mut self, tgid: u32, now_ns: u64) -> bool {
        let repeat = self
            .seen
            .peek(&tgid)
            .is_some_and(|at| now_ns.saturating_sub(*at) < REMEMBER_NS);
        if !repeat {
            self.seen.put(tgid, now_ns);
        }
        !repeat
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_crash_per_process_while_remembered() {
        let mut c = GoCrashes::new(&Evictions::default());
        assert!(c.first(10, 1_000));
        assert!(!c.first(10, 2_000), "another goroutine of the same crash");
        assert!(c.first(11, 2_000));
        // A pid reused long after is a new crash.
        assert!(c.first(10, 1_000 + REMEMBER_NS));
    }
}
