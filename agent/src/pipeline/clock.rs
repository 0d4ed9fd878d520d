//! Time for the pipeline: the kernel's timestamps are `CLOCK_MONOTONIC`; records carry wall
//! time. A trait, so tests set the time.

use std::time::{Duration, SystemTime};

pub trait Clock {
    /// `CLOCK_MONOTONIC` now, in nanoseconds (the kernel's timestamps use the same clock).
    fn monotonic_ns(&self) -> u64;
    /// Nanoseconds since the Unix epoch for a monotonic timestamp.
    fn unix_nano(&self, monotonic_ns: u64) -> u64;
}

/// The system's clocks.
#[derive(Debug, Clone, Copy)]
pub struct SystemClock {
    /// Wall-clock time at monotonic zero.
    boot: SystemTime,
}

/// `CLOCK_MONOTONIC` now, in nanoseconds.
#[must_use]
pub fn monotonic_now() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes a valid timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

impl SystemClock {
    #[must_use]
    pub fn new() -> Self {
        Self {
            boot: SystemTime::now()
                .checked_sub(Duration::from_nanos(monotonic_now()))
                .unwrap_or(SystemTime::UNIX_EPOCH),
        }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn monotonic_ns(&self) -> u64 {
        monotonic_now()
    }

    fn unix_nano(&self, monotonic_ns: u64) -> u64 {
        (self.boot + Duration::from_nanos(monotonic_ns))
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_zero_is_in_the_past() {
        let c = SystemClock::new();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .expect("after 1970")
            .as_nanos();
        assert!(u128::from(c.unix_nano(0)) <= now);
        assert!(c.monotonic_ns() > 0);
    }
}
