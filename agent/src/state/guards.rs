//! The executor's guardrails, per limit of each cgroup: restores too close together (cooldown),
//! too many in a window (cap), and fights: another writer putting its value back again and
//! again after restores, after which the agent leaves the cgroup alone for a while.

use std::collections::VecDeque;

use agent_common::LimitFile;

use crate::{
    model::{
        cache::{Bounded, Cache, Evictions},
        heal::{Reason, Verdict},
    },
    rules::{Decision, GuardView},
};

/// Limits with guard state, at most.
const MAX_GUARDS: usize = 65_536;

/// The guardrails' settings (ns and counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardSettings {
    pub cooldown_ns: u64,
    pub window_ns: u64,
    pub max_restores: u32,
    pub fight_rewrites: u32,
    pub fight_within_ns: u64,
    pub fight_backoff_ns: u64,
}

#[derive(Debug, Default)]
struct LimitGuard {
    /// Restores (and would-be restores) in the window, oldest first.
    restores: VecDeque<u64>,
    /// Bad rewrites, each within `fight_within_ns` of a restore, since the last fight.
    rewrites: u32,
}

/// Guard state of every limit, and the cgroups in a fight.
#[derive(Debug)]
pub struct Guards {
    settings: GuardSettings,
    limits: Bounded<(u64, LimitFile), LimitGuard>,
    /// Cgroups the agent leaves alone, until when (monotonic ns).
    fights: Bounded<u64, u64>,
}

impl Guards {
    #[must_use]
    pub fn new(settings: GuardSettings, evictions: &Evictions) -> Self {
        Self {
            settings,
            limits: Bounded::new(Cache::Guards, MAX_GUARDS, evictions.clone()),
            fights: Bounded::new(Cache::Guards, MAX_GUARDS, evictions.clone()),
        }
    }

    /// The guardrails of `limit` of cgroup `id` at `now`, for a change that is a write (`true`)
    /// or found by a scan or a retry.
    #[must_use]
    pub fn view(&self, id: u64, limit: LimitFile, now: u64, write: bool) -> GuardView {
        let s = &self.settings;
        let fighting = self.fights.peek(&id).is_some_and(|until| now < *until);
        let Some(g) = self.limits.peek(&(id, limit)) else {
            return GuardView {
                fighting,
                ..GuardView::default()
            };
        };
        let last = g.restores.back().copied();
        let since_last = last.map(|t| now.saturating_sub(t));
        let in_window = g
            .restores
            .iter()
            .filter(|t| now.saturating_sub(**t) < s.window_ns)
            .count();
        GuardView {
            cooling: since_last.is_some_and(|d| d < s.cooldown_ns),
            capped: in_window >= s.max_restores as usize,
            fighting,
            fight_starts: !fighting
                && write
                && since_last.is_some_and(|d| d < s.fight_within_ns)
                && g.rewrites + 1 >= s.fight_rewrites,
        }
    }

    /// Takes in `decision` about a change to `limit` of cgroup `id` at `now` (a write, or
    /// found otherwise).
    pub fn record(
        &mut self,
        id: u64,
        limit: LimitFile,
        now: u64,
        write: bool,
        decision: &Decision,
    ) {
        let s = self.settings;
        let restored = matches!(decision.verdict, Verdict::Restore | Verdict::WouldRestore);
        let bad = restored
            || matches!(
                decision.reason,
                Some(Reason::Cooldown | Reason::CapReached | Reason::Fight)
            );
        if decision.verdict == Verdict::Alert && decision.reason == Some(Reason::Fight) {
            self.fights.put(id, now.saturating_add(s.fight_backoff_ns));
        }
        if !bad && !self.limits.contains(&(id, limit)) {
            return;
        }
        if self.limits.get(&(id, limit)).is_none() {
            self.limits.put((id, limit), LimitGuard::default());
        }
        let Some(g) = self.limits.get_mut(&(id, limit)) else {
            return;
        };
        while g
            .restores
            .front()
            .is_some_and(|t| now.saturating_sub(*t) >= s.window_ns)
        {
            g.restores.pop_front();
        }
        let last = g.restores.back().copied();
        if decision.reason == Some(Reason::Fight) {
            g.rewrites = 0;
        } else if bad && write {
            if last.is_some_and(|t| now.saturating_sub(t) < s.fight_within_ns) {
                g.rewrites += 1;
            } else {
                g.rewrites = 0;
            }
        }
        if restored {
            g.restores.push_back(now);
        }
    }

    /// When the cooldown of `limit` of cgroup `id` ends (monotonic ns), if it runs.
    #[must_use]
    pub fn cooldown_ends(&self, id: u64, limit: LimitFile) -> Option<u64> {
        let last = *self.limits.peek(&(id, limit))?.restores.back()?;
        Some(last.saturating_add(self.settings.cooldown_ns))
    }

    /// Forgets a removed cgroup.
    pub fn forget(&mut self, id: u64) {
        self.fights.remove(&id);
        self.limits.retain(|(cg, _), _| *cg != id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::heal::Mode;

    const MS: u64 = 1_000_000;

    fn settings() -> GuardSettings {
        GuardSettings {
            cooldown_ns: 1000 * MS,
            window_ns: 600_000 * MS,
            max_restores: 5,
            fight_rewrites: 3,
            fight_within_ns: 2000 * MS,
            fight_backoff_ns: 600_000 * MS,
        }
    }

    fn decision(verdict: Verdict, reason: Option<Reason>) -> Decision {
        Decision {
            rule: "r".into(),
            verdict,
            reason,
            desired: None,
            mode: Mode::Enforce,
        }
    }

    /// What the guards say about a write at `now`, and records the verdict the decision
    /// function would give (the order of its checks).
    fn write(g: &mut Guards, now: u64) -> GuardView {
        let view = g.view(1, LimitFile::MemoryMax, now, true);
        let d = if view.fight_starts {
            decision(Verdict::Alert, Some(Reason::Fight))
        } else if view.fighting {
            decision(Verdict::Skip, Some(Reason::Fight))
        } else if view.capped {
            decision(Verdict::Skip, Some(Reason::CapReached))
        } else if view.cooling {
            decision(Verdict::Skip, Some(Reason::Cooldown))
        } else {
            decision(Verdict::Restore, None)
        };
        g.record(1, LimitFile::MemoryMax, now, true, &d);
        view
    }

    #[test]
    fn a_loop_rewriting_every_10ms_is_a_fight_at_its_third_rewrite() {
        let mut g = Guards::new(settings(), &Evictions::default());
        assert_eq!(write(&mut g, 0), GuardView::default(), "restored");
        assert!(write(&mut g, 10 * MS).cooling);
        assert!(write(&mut g, 20 * MS).cooling);
        let v = write(&mut g, 30 * MS);
        assert!(v.fight_starts, "{v:?}");
        let v = write(&mut g, 40 * MS);
        assert!(v.fighting && !v.fight_starts, "{v:?}");
        // Another limit of the same cgroup is left alone too.
        assert!(g.view(1, LimitFile::PidsMax, 50 * MS, true).fighting);
        assert!(!g.view(1, LimitFile::MemoryMax, 600_031 * MS, true).fighting);
    }

    #[test]
    fn spaced_restores_hit_the_cap_not_a_fight() {
        let mut g = Guards::new(settings(), &Evictions::default());
        for i in 0..5 {
            let v = write(&mut g, i * 10_000 * MS);
            assert_eq!(v, GuardView::default(), "restore {i}");
        }
        assert!(write(&mut g, 50_000 * MS).capped);
        assert_eq!(
            g.view(1, LimitFile::MemoryMax, 600_001 * MS, true),
            GuardView::default(),
            "the window moved on"
        );
        assert_eq!(g.cooldown_ends(1, LimitFile::MemoryMax), Some(41_000 * MS));
        g.forget(1);
        assert_eq!(g.cooldown_ends(1, LimitFile::MemoryMax), None);
    }
}
