//! The rule engine: which changes to which limits are bad, and what to do about them. Pure:
//! a change, the facts the state holds about it, and the rules give a decision; the executor
//! carries it out.

pub mod file;

use agent_common::LimitFile;
use schemars::JsonSchema;
use serde::Deserialize;

use crate::model::{
    cgroup::Qos,
    heal::{Action, Desired, DesiredSource, Mode, Protection, Reason, Verdict, Writer},
    limit::LimitValue,
    pattern::Pattern,
    record::K8s,
};

/// Which Kubernetes cgroups a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Kubernetes {
    /// A pod's cgroup.
    Pod,
    /// A container's cgroup.
    Container,
}

/// When a change is bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    /// The value is below the desired one.
    LoweredByUntrusted,
    /// The value is below current usage plus `margin` (bytes, or tasks for pids.max).
    BelowUsage { margin: u64 },
}

/// Which cgroups a rule is about; an absent matcher matches any.
#[derive(Debug, Clone, Default)]
pub struct Matcher {
    pub cgroups: Option<Vec<Pattern>>,
    pub kubernetes: Option<Vec<Kubernetes>>,
    pub namespaces: Option<Vec<Pattern>>,
    pub pods: Option<Vec<Pattern>>,
    pub containers: Option<Vec<Pattern>>,
    pub qos: Option<Vec<Qos>>,
}

/// Whether any of `patterns` matches `value` (absent patterns match anything; an unknown
/// value matches only absent patterns).
fn any(patterns: Option<&Vec<Pattern>>, value: Option<&str>) -> bool {
    match (patterns, value) {
        (None, _) => true,
        (Some(p), Some(v)) => p.iter().any(|p| p.matches(v)),
        (Some(_), None) => false,
    }
}

impl Matcher {
    /// Whether the cgroup at `path`, with Kubernetes identity `k8s`, is one of this rule's.
    #[must_use]
    pub fn matches(&self, path: &str, k8s: Option<&K8s>) -> bool {
        let level = k8s.map(|k| {
            if k.container_id.is_some() {
                Kubernetes::Container
            } else {
                Kubernetes::Pod
            }
        });
        any(self.cgroups.as_ref(), Some(path))
            && self
                .kubernetes
                .as_ref()
                .is_none_or(|l| level.is_some_and(|level| l.contains(&level)))
            && self
                .qos
                .as_ref()
                .is_none_or(|q| k8s.is_some_and(|k| q.contains(&k.qos)))
            && any(
                self.namespaces.as_ref(),
                k8s.and_then(|k| k.namespace.as_deref()),
            )
            && any(self.pods.as_ref(), k8s.and_then(|k| k.pod.as_deref()))
            && any(
                self.containers.as_ref(),
                k8s.and_then(|k| k.container.as_deref()),
            )
    }
}

/// A validated rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub limits: Vec<LimitFile>,
    pub when: Condition,
    pub action: Action,
    pub mode: Option<Mode>,
    /// Pinned desired values, one per limit of the rule when `pin` is set.
    pub pins: Vec<(LimitFile, LimitValue)>,
    /// Untrusted opens of the limit files for writing are refused in the kernel (the guard).
    pub protect: bool,
    pub systemd_units: bool,
    pub matcher: Matcher,
}

/// The rules, in order.
#[derive(Debug, Clone, Default)]
pub struct Ruleset {
    pub rules: Vec<Rule>,
}

impl Ruleset {
    /// The first rule about `limit` of the cgroup at `path`.
    #[must_use]
    pub fn find(&self, limit: LimitFile, path: &str, k8s: Option<&K8s>) -> Option<&Rule> {
        self.rules
            .iter()
            .find(|r| r.limits.contains(&limit) && r.matcher.matches(path, k8s))
    }
}

/// Whether `a` restricts more than `b` (a lower limit; `max` is no limit). Values of
/// different kinds never compare.
#[must_use]
pub fn below(a: LimitValue, b: LimitValue) -> bool {
    use LimitValue as V;
    match (a, b) {
        (V::Bytes(x), V::Bytes(y)) | (V::Count(x), V::Count(y)) => x < y,
        (V::Bytes(_) | V::Count(_), V::Max) => true,
        (
            V::Cpu {
                quota_us: Some(q),
                period_us: p,
            },
            V::Cpu {
                quota_us: qb,
                period_us: pb,
            },
        ) => qb.is_none_or(|qb| u128::from(q) * u128::from(pb) < u128::from(qb) * u128::from(p)),
        _ => false,
    }
}

/// The cgroup a change is about.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub path: &'a str,
    pub k8s: Option<&'a K8s>,
}

/// A change to a limit: its value now, and who made it.
#[derive(Debug, Clone)]
pub struct Change {
    pub limit: LimitFile,
    pub value: LimitValue,
    pub writer: Writer,
}

/// What the state knows that bears on a decision.
#[derive(Debug, Clone, Copy, Default)]
pub struct Facts {
    /// The desired value from the state (the rule's pin overrides it).
    pub desired: Option<Desired>,
    /// Current usage, for `below-usage` rules.
    pub usage: Option<u64>,
    /// Events were lost and the limits not read again since.
    pub stale: bool,
    pub guard: GuardView,
}

/// The executor's guardrails for one limit of one cgroup, as they stand.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent states, each decided on"
)]
pub struct GuardView {
    /// Restored less than the cooldown ago.
    pub cooling: bool,
    /// The cap of restores in the window is reached.
    pub capped: bool,
    /// A fight with another writer: the agent does not act on this cgroup.
    pub fighting: bool,
    /// This change makes a fight (it is one rewrite too many after restores).
    pub fight_starts: bool,
}

/// A decision, before it is recorded and carried out.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub rule: String,
    pub verdict: Verdict,
    pub reason: Option<Reason>,
    /// The desired value the decision was taken against.
    pub desired: Option<Desired>,
    /// The mode the decision was taken in (the rule's, capped by the global one).
    pub mode: Mode,
}

/// Decides about `change` to the cgroup `target`, under `rules` and the global `mode`. `None`
/// when no rule is about it, or when the change is the agent's own.
#[must_use]
pub fn decide(
    rules: &Ruleset,
    mode: Mode,
    target: Target<'_>,
    change: &Change,
    facts: &Facts,
) -> Option<Decision> {
    if change.writer == Writer::Agent {
        return None;
    }
    let rule = rules.find(change.limit, target.path, target.k8s)?;
    let mode = rule.mode.map_or(mode, |m| m.min(mode));
    let desired = rule
        .pins
        .iter()
        .find(|(l, _)| *l == change.limit)
        .map(|(_, v)| Desired::new(*v, DesiredSource::Pinned))
        .or(facts.desired);
    let decision = |verdict, reason| {
        Some(Decision {
            rule: rule.name.clone(),
            verdict,
            reason,
            desired,
            mode,
        })
    };
    if let Writer::Trusted(_) = change.writer {
        return decision(Verdict::Accept, Some(Reason::TrustedWriter));
    }
    let Some(want) = desired else {
        return decision(Verdict::Skip, Some(Reason::NoDesiredValue));
    };
    let bad = below(change.value, want.value)
        && want.also.is_none_or(|also| below(change.value, also))
        && match rule.when {
            Condition::LoweredByUntrusted => true,
            Condition::BelowUsage { margin } => facts
                .usage
                .is_some_and(|u| below_usage(change.value, u.saturating_add(margin))),
        };
    if !bad {
        return decision(Verdict::Skip, Some(Reason::NotLowered));
    }
    match Protection::of(target.path) {
        Some(Protection::Root | Protection::InitScope | Protection::KubepodsLevel) => {
            return decision(Verdict::Skip, Some(Reason::Protected));
        }
        Some(Protection::SystemdUnit) if !rule.systemd_units => {
            return decision(Verdict::Alert, Some(Reason::SystemdUnit));
        }
        Some(Protection::SystemdUnit) | None => {}
    }
    if rule.action == Action::Alert {
        return decision(Verdict::Alert, Some(Reason::RuleAlerts));
    }
    if facts.stale {
        return decision(Verdict::Skip, Some(Reason::AwaitingResync));
    }
    let g = facts.guard;
    if g.fight_starts {
        return decision(Verdict::Alert, Some(Reason::Fight));
    }
    if g.fighting {
        return decision(Verdict::Skip, Some(Reason::Fight));
    }
    if g.capped {
        return decision(Verdict::Skip, Some(Reason::CapReached));
    }
    if g.cooling {
        return decision(Verdict::Skip, Some(Reason::Cooldown));
    }
    if mode == Mode::Enforce {
        decision(Verdict::Restore, None)
    } else {
        decision(Verdict::WouldRestore, None)
    }
}

/// How the guard protects `limit` of the cgroup at `path`: by the first rule about it, when
/// that rule protects, in the rule's mode capped by the global `mode`. Never in observe, and
/// never the cgroups the agent would not write (the root, init.scope, the kubepods levels, and
/// systemd units unless the rule names them): the guard refuses only where a restore could go.
#[must_use]
pub fn guard(
    rules: &Ruleset,
    mode: Mode,
    target: Target<'_>,
    limit: LimitFile,
) -> Option<crate::model::guard::Guarded> {
    let rule = rules.find(limit, target.path, target.k8s)?;
    if !rule.protect {
        return None;
    }
    let mode = rule.mode.map_or(mode, |m| m.min(mode));
    if mode == Mode::Observe {
        return None;
    }
    match Protection::of(target.path) {
        Some(Protection::Root | Protection::InitScope | Protection::KubepodsLevel) => None,
        Some(Protection::SystemdUnit) if !rule.systemd_units => None,
        Some(Protection::SystemdUnit) | None => Some(crate::model::guard::Guarded {
            rule: rule.name.clone(),
            enforce: mode == Mode::Enforce,
        }),
    }
}

/// Whether `value` is below `floor` (bytes or tasks); `max` never is.
fn below_usage(value: LimitValue, floor: u64) -> bool {
    match value {
        LimitValue::Bytes(n) | LimitValue::Count(n) => n < floor,
        LimitValue::Max | LimitValue::Cpu { .. } => false,
    }
}

#[cfg(test)]
mod tests;
