//! The guard in the pipeline: which limit files the kernel's guard refuses untrusted openers
//! of (each cgroup's limits through the rules, again on every change to the cgroup, the rules
//! or the trusted writers), and the guard's denials, enriched into records.

use super::Pipeline;
use crate::{
    model::{
        event,
        guard::{GuardChange, GuardResult, TrustTables, cgroup_mask},
        record::{self, K8s},
        update::Update,
    },
    rules::{self, Target, file::WATCHABLE},
};

impl Pipeline {
    /// Protects the watchable limits of cgroup `id` at `path` as the rules say (and lets the
    /// trusted writers with cgroup globs that match it write from there).
    pub(super) fn guard_cgroup(
        &mut self,
        id: u64,
        path: &str,
        k8s: Option<&K8s>,
        out: &mut Vec<Update>,
    ) {
        if !self.heal.guard_active {
            return;
        }
        let target = Target { path, k8s };
        for limit in WATCHABLE {
            let want = rules::guard(&self.heal.rules, self.heal.mode, target, limit);
            if let Some(c) = self.heal.guarded.set(id, limit, want) {
                out.push(Update::Guard(c));
            }
        }
        let mask = cgroup_mask(&self.heal.trust, path);
        if let Some(c) = self.heal.guarded.set_cgroup(id, mask) {
            out.push(Update::Guard(c));
        }
    }

    /// Cgroup `id` is gone: nothing of it stays in the guard's maps.
    pub(super) fn guard_removed(&mut self, id: u64, out: &mut Vec<Update>) {
        out.extend(self.heal.guarded.forget(id).into_iter().map(Update::Guard));
    }

    /// After a scan that saw the cgroups `seen`: the guard forgets the others.
    pub(super) fn guard_scanned(
        &mut self,
        seen: &std::collections::HashSet<u64>,
        out: &mut Vec<Update>,
    ) {
        for id in self.heal.guarded.cgroups() {
            if !seen.contains(&id) {
                self.guard_removed(id, out);
            }
        }
    }

    /// The trusted writers as the kernel checks them.
    pub(super) fn guard_trust(&self, out: &mut Vec<Update>) {
        if self.heal.guard_active {
            out.push(Update::Guard(GuardChange::Trust(Box::new(
                TrustTables::of(&self.heal.trust),
            ))));
        }
    }

    /// A change to the guard's maps was lost on its way to the executor: they are emptied, the
    /// trust tables sent again, and the scan this asks for protects every file again.
    pub fn guard_lost(&mut self, out: &mut Vec<Update>) {
        if !self.heal.guard_active {
            return;
        }
        self.heal.guarded.clear();
        out.push(Update::Guard(GuardChange::Reset));
        self.guard_trust(out);
        self.resync
            .get_or_insert(crate::model::update::ResyncReason::EventsLost);
    }

    /// A denial (or would-deny) by the guard, with the rule that protects the file.
    pub(super) fn guard_denial(&mut self, d: &event::GuardDenial, out: &mut Vec<Update>) {
        let cgroup = self.cgroup_label(d.target_cgroup_id);
        let k8s = self.k8s(&cgroup);
        let writer = self.process_as(&d.task, &d.identity);
        let rule = self
            .heal
            .guarded
            .get(d.target_cgroup_id, d.limit)
            .map_or_else(|| "unknown".to_owned(), |g| g.rule.clone());
        out.push(Update::Denial(Box::new(record::GuardDenial {
            time_unix_nano: self.sources.clock.unix_nano(d.timestamp_ns),
            cgroup,
            cgroup_id: d.target_cgroup_id,
            k8s,
            limit: d.limit,
            rule,
            result: if d.enforced {
                GuardResult::Denied
            } else {
                GuardResult::WouldDeny
            },
            writer,
        })));
    }

    /// How `limit` of cgroup `id` is protected (tests).
    #[cfg(test)]
    #[must_use]
    pub fn guarded(
        &self,
        id: u64,
        limit: agent_common::LimitFile,
    ) -> Option<&crate::model::guard::Guarded> {
        self.heal.guarded.get(id, limit)
    }
}
