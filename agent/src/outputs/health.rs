//! What `/healthz` and `/readyz` answer, for a kubelet's liveness and readiness probes.
//!
//! Live: the event loop turned within [`STALE_AFTER`]. It turns every 250 ms, so a loop that
//! has not turned for that long is stuck (on a stalled log reader, or a bug), and a restart is
//! what cures it; the endpoint itself runs on other threads and still answers. Ready: live, and
//! the probes are attached and the first resync of the hierarchy is done, so the figures served
//! are the node's.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

/// The event loop is taken for stuck after this long without a turn.
pub const STALE_AFTER: Duration = Duration::from_secs(30);

/// The agent's health, shared by the event loop (which marks its turns) and the endpoint.
#[derive(Debug, Clone)]
pub struct Health(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    /// What the turns are counted from.
    since: Instant,
    /// Milliseconds after `since` of the event loop's last turn.
    last_turn_ms: AtomicU64,
    ready: AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        Self(Arc::new(Inner {
            since: Instant::now(),
            last_turn_ms: AtomicU64::new(0),
            ready: AtomicBool::new(false),
        }))
    }
}

impl Health {
    /// The event loop turned at `now`.
    pub fn turned(&self, now: Instant) {
        let ms = u64::try_from(now.saturating_duration_since(self.0.since).as_millis())
            .unwrap_or(u64::MAX);
        self.0.last_turn_ms.store(ms, Ordering::Relaxed);
    }

    /// The probes are attached and the first resync is done (at `now`, which counts as a turn:
    /// the event loop starts right after).
    pub fn ready(&self, now: Instant) {
        self.turned(now);
        self.0.ready.store(true, Ordering::Relaxed);
    }

    /// `Ok` when the event loop turned within [`STALE_AFTER`] of `now`, else why not.
    pub fn live(&self, now: Instant) -> Result<(), String> {
        let last =
            self.0.since + Duration::from_millis(self.0.last_turn_ms.load(Ordering::Relaxed));
        let quiet = now.saturating_duration_since(last);
        if quiet > STALE_AFTER {
            return Err(format!(
                "the event loop has not turned for {} s (it turns every 250 ms)",
                quiet.as_secs()
            ));
        }
        Ok(())
    }

    /// `Ok` once ready and while live, else why not.
    pub fn is_ready(&self, now: Instant) -> Result<(), String> {
        if !self.0.ready.load(Ordering::Relaxed) {
            return Err("the probes are attaching or the first resync is running".to_owned());
        }
        self.live(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_while_the_event_loop_turns_and_ready_after_start_up() {
        let h = Health::default();
        let start = h.0.since;
        assert!(h.is_ready(start).is_err(), "not ready before start-up ends");
        h.ready(start + Duration::from_secs(5));
        assert_eq!(h.is_ready(start + Duration::from_secs(6)), Ok(()));
        h.turned(start + Duration::from_secs(20));
        assert_eq!(h.live(start + Duration::from_secs(49)), Ok(()));
        let stuck = start + Duration::from_secs(51);
        let why = h.live(stuck).expect_err("no turn for 31 s");
        assert!(why.contains("31 s"), "{why}");
        assert!(
            h.is_ready(stuck).is_err(),
            "a stuck agent is not ready either"
        );
        h.turned(stuck);
        assert_eq!(h.is_ready(stuck), Ok(()));
    }
}
