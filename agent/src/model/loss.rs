//! Events the agent lost, by what and why: counted in the kernel (per CPU, summed when read)
//! and in userspace, exported together as `nodewarden_events_lost_total{kind,reason}`.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use agent_common::{LOSS_KINDS, LOSS_REASONS, LOSS_SLOTS, LossCounts, LossKind, LossReason};

const SLOTS: usize = LOSS_KINDS * LOSS_REASONS;

#[derive(Debug)]
struct Counts {
    /// The kernel's totals as last read.
    kernel: [AtomicU64; SLOTS],
    /// Userspace's own.
    user: [AtomicU64; SLOTS],
}

/// Loss counts shared by those who count and the metrics.
#[derive(Debug, Clone)]
pub struct Losses(Arc<Counts>);

impl Default for Losses {
    fn default() -> Self {
        Self(Arc::new(Counts {
            kernel: std::array::from_fn(|_| AtomicU64::new(0)),
            user: std::array::from_fn(|_| AtomicU64::new(0)),
        }))
    }
}

impl Losses {
    /// A loss in userspace.
    pub fn add(&self, kind: LossKind, reason: LossReason, n: u64) {
        self.0.user[LossCounts::index(kind, reason)].fetch_add(n, Ordering::Relaxed);
    }

    /// The kernel's totals, summed over CPUs; returns the kinds that lost more since the last
    /// call.
    pub fn set_kernel(&self, totals: &[u64; LOSS_SLOTS]) -> Vec<LossKind> {
        let mut more = Vec::new();
        for (i, (slot, total)) in self.0.kernel.iter().zip(totals).enumerate() {
            let before = slot.swap(*total, Ordering::Relaxed);
            if *total > before {
                let kind = LossKind::ALL[i / LOSS_REASONS];
                if !more.contains(&kind) {
                    more.push(kind);
                }
            }
        }
        more
    }

    /// Losses of `kind` for `reason` so far, kernel and userspace together.
    #[must_use]
    pub fn get(&self, kind: LossKind, reason: LossReason) -> u64 {
        let i = LossCounts::index(kind, reason);
        self.0.kernel[i].load(Ordering::Relaxed) + self.0.user[i].load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_totals_and_userspace_counts_add_up() {
        let l = Losses::default();
        let mut totals = [0; LOSS_SLOTS];
        totals[LossCounts::index(LossKind::LimitWrite, LossReason::RingFull)] = 3;
        assert_eq!(l.set_kernel(&totals), [LossKind::LimitWrite]);
        assert!(l.set_kernel(&totals).is_empty(), "no more since");
        l.add(LossKind::LimitWrite, LossReason::RingFull, 2);
        assert_eq!(l.get(LossKind::LimitWrite, LossReason::RingFull), 5);
        assert_eq!(l.get(LossKind::Exec, LossReason::RingFull), 0);
    }
}
