//! Self-healing in the pipeline: each change to a watched limit (a write, or a difference a scan
//! found) goes through the rules against its desired value and the guardrails; decisions go
//! out as updates for the executor. Desired values move with trusted writes and are kept for
//! the state file.

use agent_common::LimitFile;

use super::Pipeline;
use crate::{
    model::{
        cache::{Bounded, Cache, Evictions},
        heal::{Desired, DesiredSource, KeptIndex, Mode, Reason, StateFile, Verdict, Writer},
        limit::LimitValue,
        pods::PodChange,
        record::{self, K8s, Process, Trigger},
        trust::TrustSet,
        update::{ResyncReason, Update},
    },
    rules::{self, Change, Facts, Ruleset, Target, file::WATCHABLE},
    state::{
        desired::DesiredState,
        guarded::GuardedFiles,
        guards::{GuardSettings, Guards},
    },
};

/// Decisions about a fight going on are recorded at most this often per limit (the rest are
/// counted into the next one).
const REPEAT_EVERY_NS: u64 = 10_000_000_000;
/// How often the desired values are offered to the state file, at most.
const SNAPSHOT_EVERY_NS: u64 = 5_000_000_000;
/// Retries pending at most (cooldowns running).
const MAX_RETRIES: usize = 65_536;

/// How the self-healing half runs.
#[derive(Debug, Clone)]
pub struct HealSettings {
    pub mode: Mode,
    pub rules: Ruleset,
    pub trust: TrustSet,
    pub guards: GuardSettings,
    /// A new cgroup's first moments (ns): any writer's values are its first-seen ones.
    pub creation_grace_ns: u64,
    /// The boot the state file belongs to.
    pub boot_id: String,
    /// Desired values kept by the agent that ran before (same boot).
    pub kept: Option<StateFile>,
    /// Whether desired values are offered for a state file.
    pub keep: bool,
    /// Whether the guard's program is attached: protect rules then fill its maps.
    pub guard_active: bool,
    /// Limit files the guard protects at most (its kernel map's size).
    pub guard_max_files: usize,
}

/// The self-healing state the pipeline keeps.
#[derive(Debug)]
pub struct Heal {
    pub(super) mode: Mode,
    pub(super) rules: Ruleset,
    pub(super) trust: TrustSet,
    pub(super) guard_active: bool,
    pub(super) guarded: GuardedFiles,
    desired: DesiredState,
    guards: Guards,
    creation_grace_ns: u64,
    boot_id: String,
    keep: bool,
    /// Kept values not yet taken up (until the start-up scan).
    kept: Option<KeptIndex>,
    /// Limits to look at again when their cooldown ends (monotonic ns).
    retries: Bounded<(u64, LimitFile), (u64, Writer)>,
    /// Per limit: when a repeated decision was last recorded, and how many since.
    repeats: Bounded<(u64, LimitFile, Reason), (u64, u64)>,
    /// Events were lost at this time (monotonic ns) and no scan started since.
    lost_at: Option<u64>,
    last_snapshot_ns: u64,
}

impl Heal {
    #[must_use]
    pub fn new(settings: HealSettings, evictions: &Evictions) -> Self {
        Self {
            mode: settings.mode,
            rules: settings.rules,
            trust: settings.trust,
            guard_active: settings.guard_active,
            guarded: GuardedFiles::new(settings.guard_max_files, evictions),
            desired: DesiredState::new(evictions),
            guards: Guards::new(settings.guards, evictions),
            creation_grace_ns: settings.creation_grace_ns,
            boot_id: settings.boot_id.clone(),
            keep: settings.keep,
            kept: settings
                .kept
                .filter(|k| k.boot_id == settings.boot_id)
                .map(|k| k.index()),
            retries: Bounded::new(Cache::Guards, MAX_RETRIES, evictions.clone()),
            repeats: Bounded::new(Cache::Guards, MAX_RETRIES, evictions.clone()),
            lost_at: None,
            last_snapshot_ns: 0,
        }
    }
}

/// A change to look at.
struct Looked<'a> {
    id: u64,
    path: &'a str,
    k8s: Option<&'a K8s>,
    limit: LimitFile,
    value: LimitValue,
    writer: Writer,
    process: Option<&'a Process>,
    trigger: Trigger,
    changed_ns: u64,
    incident: Option<String>,
}

/// What a write the probes saw adds to a change.
pub(super) struct Written<'a> {
    pub process: &'a Process,
    pub at_ns: u64,
    pub incident: Option<String>,
}

impl Pipeline {
    /// New rules (a reload): they apply from the next change on; the guard's protected files
    /// follow them at the scan this asks for.
    pub fn set_rules(&mut self, rules: Ruleset) {
        self.heal.rules = rules;
        if self.heal.guard_active {
            self.resync.get_or_insert(ResyncReason::Reconcile);
        }
    }

    /// What the API server said about the pods of this node. Their desired values apply from
    /// the next change on (and are offered to the state file).
    pub fn pods(&mut self, change: PodChange) {
        self.pods.apply(change);
        self.heal.desired.touch();
    }

    /// The desired value of `limit` of the cgroup `id`: the pod's spec where the API
    /// server knows it, else what the state keeps. A trusted writer's last value stays
    /// legitimate beside the spec's (a trusted write is never reverted).
    fn desired_of(&self, id: u64, k8s: Option<&K8s>, limit: LimitFile) -> Option<Desired> {
        let kept = self.heal.desired.get(id, limit);
        let Some(mut d) = k8s
            .and_then(|k| Some((self.pods.get(&k.pod_uid)?, k.container_id.as_deref())))
            .and_then(|(pod, container)| pod.desired(container, limit, self.settings.page_size))
        else {
            return kept;
        };
        if let Some(t) =
            kept.filter(|t| t.source == DesiredSource::TrustedWriter && t.value != d.value)
        {
            d.also = Some(match d.also {
                Some(a) if rules::below(a, t.value) => a,
                _ => t.value,
            });
        }
        Some(d)
    }

    /// The trusted writers, resolved again (executables upgraded): the guard's tables follow
    /// at once, the cgroups of writers with cgroup globs at the next scan.
    pub fn set_trust(&mut self, trust: TrustSet, out: &mut Vec<Update>) {
        self.heal.trust = trust;
        self.guard_trust(out);
        if self.heal.guard_active && self.heal.trust.writers.iter().any(|w| w.cgroups.is_some()) {
            self.resync.get_or_insert(ResyncReason::Reconcile);
        }
    }

    /// The trusted writers as they stand (to resolve again, keeping the keys they had).
    #[must_use]
    pub fn trust(&self) -> &TrustSet {
        &self.heal.trust
    }

    /// Who the writer of `w` is.
    pub(super) fn writer_of(
        &self,
        tgid: u32,
        w: &crate::model::event::Identity,
        cgroup: &str,
    ) -> Writer {
        self.heal.trust.classify(tgid, w, Some(cgroup))
    }

    /// A successful write of `value` to `limit` of cgroup `id`, by `writer`.
    #[expect(clippy::too_many_arguments, reason = "one change, its parts")]
    pub(super) fn heal_write(
        &mut self,
        id: u64,
        path: &str,
        k8s: Option<&K8s>,
        limit: LimitFile,
        value: LimitValue,
        writer: Writer,
        written: Written<'_>,
        out: &mut Vec<Update>,
    ) {
        if !WATCHABLE.contains(&limit) {
            return;
        }
        let now = self.sources.clock.monotonic_ns();
        let h = &mut self.heal;
        match &writer {
            Writer::Agent => return,
            Writer::Trusted(_) => {
                h.desired
                    .set(id, limit, Desired::new(value, DesiredSource::TrustedWriter));
            }
            Writer::Untrusted | Writer::Unseen if h.desired.is_new(id, now) => {
                // A new cgroup's runtime sets its limits right after creating it.
                h.desired
                    .set(id, limit, Desired::new(value, DesiredSource::FirstSeen));
                return;
            }
            Writer::Untrusted | Writer::Unseen => {}
        }
        self.look(
            Looked {
                id,
                path,
                k8s,
                limit,
                value,
                writer,
                process: Some(written.process),
                trigger: Trigger::Write,
                changed_ns: written.at_ns,
                incident: written.incident,
            },
            out,
        );
    }

    /// The OOM incident the writer `tid` triggered during its write (the kernel runs the OOM
    /// killer inside a write that lowers memory.max below usage).
    pub(super) fn incident_of(&self, tid: u32, write_ns: u64) -> Option<String> {
        self.incidents
            .iter()
            .find(|o| {
                o.data.trigger.tid == tid
                    && o.last_ns <= write_ns
                    && write_ns - o.last_ns < crate::state::incidents::QUIET_NS
            })
            .map(|o| o.id.clone())
    }

    /// A value a scan (or inotify) found: compared with the desired one.
    #[expect(clippy::too_many_arguments, reason = "one change, its parts")]
    pub(super) fn heal_found(
        &mut self,
        id: u64,
        path: &str,
        k8s: Option<&K8s>,
        limit: LimitFile,
        value: LimitValue,
        found_ns: u64,
        out: &mut Vec<Update>,
    ) {
        if !WATCHABLE.contains(&limit) {
            return;
        }
        self.look(
            Looked {
                id,
                path,
                k8s,
                limit,
                value,
                writer: Writer::Unseen,
                process: None,
                trigger: Trigger::Scan,
                changed_ns: found_ns,
                incident: None,
            },
            out,
        );
    }

    /// A scan's value of a limit, at start-up or for a cgroup not seen before: its desired
    /// value, unless one is known (kept by the agent that ran before, at start-up).
    pub(super) fn heal_first_seen(
        &mut self,
        id: u64,
        path: &str,
        limit: LimitFile,
        value: LimitValue,
    ) {
        let h = &mut self.heal;
        if let Some((kept_path, d)) = h.kept.as_ref().and_then(|k| k.get(&(id, limit)))
            && kept_path == path
        {
            h.desired.set(id, limit, *d);
            return;
        }
        h.desired.first_seen(id, limit, value);
    }

    /// A scan that started at `since` is applied: if events were lost before it started, it
    /// is the resync, and decisions may be taken again.
    pub(super) fn heal_scan_applies(&mut self, since: u64) {
        if self.heal.lost_at.is_some_and(|at| since >= at) {
            self.heal.lost_at = None;
        }
    }

    /// A scan was applied: values the previous agent kept are taken up (or never will be).
    pub(super) fn heal_scanned(&mut self) {
        self.heal.kept = None;
    }

    /// Whether events were lost since the files were last read, or values the agent before
    /// kept wait for the first read: the values known are not the files'.
    pub(super) fn heal_stale(&self) -> bool {
        self.heal.lost_at.is_some() || self.heal.kept.is_some()
    }

    /// Events were lost at `now`: no restore until a scan started after it ends.
    pub(super) fn heal_lost(&mut self, now: u64) {
        self.heal.lost_at.get_or_insert(now);
    }

    /// A new cgroup: its kernel defaults are its first-seen values, and its first moments
    /// begin.
    pub(super) fn heal_created(&mut self, id: u64, at_ns: u64) {
        let h = &mut self.heal;
        h.desired
            .created(id, at_ns.saturating_add(h.creation_grace_ns));
        for (limit, value) in crate::state::limits::DEFAULTS {
            h.desired.first_seen(id, limit, value);
        }
    }

    /// A removed cgroup.
    pub(super) fn heal_removed(&mut self, id: u64) {
        self.heal.desired.forget(id);
        self.heal.guards.forget(id);
        self.heal.retries.retain(|(cg, _), _| *cg != id);
    }

    /// Time-driven work: limits whose cooldown ended are looked at again; the desired values
    /// are offered to the state file when they changed.
    pub(super) fn heal_tick(&mut self, out: &mut Vec<Update>) {
        let now = self.sources.clock.monotonic_ns();
        let due: Vec<((u64, LimitFile), Writer)> = self
            .heal
            .retries
            .iter()
            .filter(|(_, (at, _))| *at <= now)
            .map(|(k, (_, w))| (*k, w.clone()))
            .collect();
        for ((id, limit), writer) in due {
            self.heal.retries.remove(&(id, limit));
            let (Some(path), Some(value)) = (
                self.paths.known(id).map(str::to_owned),
                self.limits.get(id, limit),
            ) else {
                continue;
            };
            let k8s = self.k8s(&path);
            self.look(
                Looked {
                    id,
                    path: &path,
                    k8s: k8s.as_ref(),
                    limit,
                    value,
                    writer,
                    process: None,
                    trigger: Trigger::Retry,
                    changed_ns: now,
                    incident: None,
                },
                out,
            );
        }
        if now.saturating_sub(self.heal.last_snapshot_ns) >= SNAPSHOT_EVERY_NS {
            self.heal.last_snapshot_ns = now;
            self.heal_keep(out);
        }
    }

    /// When [`Self::heal_tick`] has work next (monotonic ns): a limit to look at again, or
    /// desired values to offer.
    pub(super) fn heal_due_ns(&self) -> Option<u64> {
        let retry = self.heal.retries.iter().map(|(_, (at, _))| *at).min();
        let snapshot = (self.heal.keep && self.heal.desired.changed())
            .then(|| self.heal.last_snapshot_ns.saturating_add(SNAPSHOT_EVERY_NS));
        retry.into_iter().chain(snapshot).min()
    }

    /// The desired values for the state file, if they changed since they were last offered.
    pub(super) fn heal_keep(&mut self, out: &mut Vec<Update>) {
        if !self.heal.keep {
            return;
        }
        let paths = &self.paths;
        if let Some(mut values) = self
            .heal
            .desired
            .snapshot(|id| paths.known(id).map(str::to_owned))
        {
            // What the rules see: the pods' specs over the values kept.
            for v in &mut values {
                let Some(limit) = LimitFile::from_file_name(&v.limit) else {
                    continue;
                };
                let k8s = K8s::unnamed(&v.path);
                if let Some(d) = self.desired_of(v.id, k8s.as_ref(), limit)
                    && d.source == DesiredSource::Kubernetes
                {
                    v.value = d.value.to_string();
                    v.source = d.source;
                }
            }
            out.push(Update::Desired(StateFile {
                boot_id: self.heal.boot_id.clone(),
                values,
            }));
        }
    }

    /// The desired value of `limit` of cgroup `id`, as the rules see it.
    #[cfg(test)]
    #[must_use]
    pub fn desired(&self, id: u64, limit: LimitFile) -> Option<Desired> {
        self.heal.desired.get(id, limit)
    }

    /// Decides about one change, and records the decision for the executor.
    fn look(&mut self, c: Looked<'_>, out: &mut Vec<Update>) {
        let now = self.sources.clock.monotonic_ns();
        let write = c.trigger == Trigger::Write;
        let h = &self.heal;
        let Some(rule) = h.rules.find(c.limit, c.path, c.k8s) else {
            return;
        };
        let usage = match rule.when {
            rules::Condition::BelowUsage { .. } => {
                rules::file::usage_file(c.limit).and_then(|f| self.sources.cgroups.usage(c.path, f))
            }
            rules::Condition::LoweredByUntrusted => None,
        };
        let facts = Facts {
            desired: self.desired_of(c.id, c.k8s, c.limit),
            usage,
            stale: h.lost_at.is_some(),
            guard: h.guards.view(c.id, c.limit, now, write),
        };
        let change = Change {
            limit: c.limit,
            value: c.value,
            writer: c.writer.clone(),
        };
        let Some(d) = rules::decide(
            &h.rules,
            h.mode,
            Target {
                path: c.path,
                k8s: c.k8s,
            },
            &change,
            &facts,
        ) else {
            return;
        };
        let h = &mut self.heal;
        h.guards.record(c.id, c.limit, now, write, &d);
        if d.reason == Some(Reason::Cooldown)
            && let Some(at) = h.guards.cooldown_ends(c.id, c.limit)
        {
            h.retries.put((c.id, c.limit), (at, c.writer.clone()));
        }
        // A scan or a retry finding nothing wrong is no news.
        if !write
            && d.verdict == Verdict::Skip
            && matches!(d.reason, Some(Reason::NotLowered | Reason::NoDesiredValue))
        {
            return;
        }
        // A fight, a cap or a wait for a resync repeats itself: recorded now and then.
        let mut repeated = 0;
        if d.verdict == Verdict::Skip
            && let Some(reason @ (Reason::Fight | Reason::CapReached | Reason::AwaitingResync)) =
                d.reason
        {
            let key = (c.id, c.limit, reason);
            match h.repeats.get_mut(&key) {
                Some((last, n)) if now.saturating_sub(*last) < REPEAT_EVERY_NS => {
                    *n += 1;
                    return;
                }
                Some((last, n)) => {
                    repeated = std::mem::take(n);
                    *last = now;
                }
                None => {
                    h.repeats.put(key, (now, 0));
                }
            }
        }
        let trusted_writer = match &c.writer {
            Writer::Trusted(name) => Some(name.clone()),
            _ => None,
        };
        out.push(Update::Decision(Box::new(record::Decision {
            time_unix_nano: self.sources.clock.unix_nano(now),
            cgroup: c.path.to_owned(),
            cgroup_id: c.id,
            k8s: c.k8s.cloned(),
            limit: c.limit,
            rule: d.rule,
            mode: d.mode,
            verdict: d.verdict,
            reason: d.reason,
            value: c.value.to_string(),
            desired: d.desired.map(|d| d.value.to_string()),
            desired_source: d.desired.map(|d| d.source),
            writer: c.process.cloned(),
            trusted_writer,
            trigger: c.trigger,
            changed_ns: c.changed_ns,
            write_time_unix_nano: write.then(|| self.sources.clock.unix_nano(c.changed_ns)),
            incident: c.incident,
            outcome: None,
            repeated,
        })));
    }
}
