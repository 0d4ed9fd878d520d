//! The self-healing half's plain types: how active the agent may be, who wrote a limit, what
//! value a limit should have and why, and what was decided about a change.

use agent_common::LimitFile;
use serde::{Deserialize, Serialize};

use super::limit::LimitValue;

/// How active the agent is, globally (the configuration's `mode`) or for one rule (never more
/// active than the global one). Ordered from the least active.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Watch, count and trace; never write a cgroup.
    #[default]
    Observe,
    /// Decide, log, count and trace what would be restored; never write a cgroup.
    DryRun,
    /// Restore.
    Enforce,
}

impl Mode {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Observe => "observe",
            Self::DryRun => "dry-run",
            Self::Enforce => "enforce",
        }
    }
}

/// Who made a change, as far as trust goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Writer {
    /// This agent (its restores come back as writes).
    Agent,
    /// A trusted writer, by the name of the entry that matched.
    Trusted(String),
    /// A process that matched no trusted writer.
    Untrusted,
    /// Nobody seen: a difference found by a scan (the reconciler) or by inotify.
    Unseen,
}

/// Where a desired value comes from, strongest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DesiredSource {
    /// Pinned by the rule.
    Pinned,
    /// The pod's spec (and status, during a resize).
    Kubernetes,
    /// The last value a trusted writer wrote.
    TrustedWriter,
    /// The value when the agent first saw the cgroup: at its start-up, or when the cgroup was
    /// created (the values written in its first moments).
    FirstSeen,
}

impl DesiredSource {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pinned => "pinned",
            Self::Kubernetes => "kubernetes",
            Self::TrustedWriter => "trusted_writer",
            Self::FirstSeen => "first_seen",
        }
    }
}

/// The value a limit should have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desired {
    pub value: LimitValue,
    pub source: DesiredSource,
    /// Another value that is legitimate too: the old one while a pod resize is pending or in
    /// progress.
    pub also: Option<LimitValue>,
}

impl Desired {
    #[must_use]
    pub const fn new(value: LimitValue, source: DesiredSource) -> Self {
        Self {
            value,
            source,
            also: None,
        }
    }
}

/// What a rule does about a match.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Put the desired value back (as the mode allows).
    Restore,
    /// Record and alert only.
    Alert,
}

/// What was decided about a change to a watched limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Write the desired value back (mode enforce).
    Restore,
    /// Would write it back, but the mode is dry-run or observe.
    WouldRestore,
    /// Recorded and alerted, not written ([`Reason`] says why).
    Alert,
    /// Nothing to do ([`Reason`] says why).
    Skip,
    /// A trusted writer's change: the desired value moves to it.
    Accept,
}

impl Verdict {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Restore => "restore",
            Self::WouldRestore => "would_restore",
            Self::Alert => "alert",
            Self::Skip => "skip",
            Self::Accept => "accept",
        }
    }
}

/// Why a change was not simply restored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The rule's action is to alert.
    RuleAlerts,
    /// The writer is trusted.
    TrustedWriter,
    /// The value is not below the desired one (or the usage margin).
    NotLowered,
    /// No desired value is known for this limit.
    NoDesiredValue,
    /// Events were lost: nothing is done until the limits were read again.
    AwaitingResync,
    /// Restored too recently; looked at again when the cooldown ends.
    Cooldown,
    /// The cap of restores per window is reached.
    CapReached,
    /// Another writer keeps rewriting the limit: the agent stopped acting on this cgroup.
    Fight,
    /// The cgroup2 root, `init.scope`, the kubepods root or a QoS-level cgroup: never touched.
    Protected,
    /// A systemd unit's cgroup: systemd would undo a repair on its next reload.
    SystemdUnit,
    /// The cgroup is gone, or is not the one decided about.
    Stale,
    /// A delegated subtree (owned by a user other than root).
    Delegated,
    /// The value is back to the desired one already.
    AlreadyRestored,
    /// Queued for the executor, which had no room.
    QueueFull,
}

impl Reason {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::RuleAlerts => "rule_alerts",
            Self::TrustedWriter => "trusted_writer",
            Self::NotLowered => "not_lowered",
            Self::NoDesiredValue => "no_desired_value",
            Self::AwaitingResync => "awaiting_resync",
            Self::Cooldown => "cooldown",
            Self::CapReached => "cap_reached",
            Self::Fight => "fight",
            Self::Protected => "protected",
            Self::SystemdUnit => "systemd_unit",
            Self::Stale => "stale",
            Self::Delegated => "delegated",
            Self::AlreadyRestored => "already_restored",
            Self::QueueFull => "queue_full",
        }
    }
}

/// Why a cgroup is never written, whatever the rules say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protection {
    /// The hierarchy's root.
    Root,
    /// systemd's `init.scope` (PID 1).
    InitScope,
    /// `kubepods` or a QoS level below it: kubelet rewrites them every minute.
    KubepodsLevel,
    /// A systemd unit (`.service`, `.scope`, `.slice`...) that is not a pod or container: a
    /// rule may name it (`systemd_units = true`), and then it is written.
    SystemdUnit,
}

impl Protection {
    /// The protection of the cgroup at `path` (relative to the mount, leading `/`), if any.
    #[must_use]
    pub fn of(path: &str) -> Option<Self> {
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let Some(last) = parts.last() else {
            return Some(Self::Root);
        };
        if parts.len() == 1 && *last == "init.scope" {
            return Some(Self::InitScope);
        }
        let k8s = super::cgroup::parse(path);
        if k8s.is_none() && parts.iter().any(|p| is_kubepods_part(p)) {
            return Some(Self::KubepodsLevel);
        }
        if k8s.is_none() && parts.iter().any(|p| is_systemd_unit(p)) {
            return Some(Self::SystemdUnit);
        }
        None
    }
}

/// `kubepods`, its QoS levels (`burstable`, `besteffort`) and their systemd slices.
fn is_kubepods_part(part: &str) -> bool {
    part == "kubepods" || part.starts_with("kubepods-") || part.starts_with("kubepods.")
}

/// A systemd unit's cgroup name.
fn is_systemd_unit(part: &str) -> bool {
    [".service", ".scope", ".slice", ".socket", ".mount", ".swap"]
        .iter()
        .any(|s| part.ends_with(s))
}

/// One desired value as the state file keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kept {
    pub id: u64,
    pub path: String,
    pub limit: String,
    pub value: String,
    pub source: DesiredSource,
}

/// The state file: desired values of one boot (cgroup ids do not outlive it).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateFile {
    pub boot_id: String,
    pub values: Vec<Kept>,
}

/// Kept desired values by (cgroup id, limit), with the cgroup's path then.
pub type KeptIndex = std::collections::HashMap<(u64, LimitFile), (String, Desired)>;

impl StateFile {
    /// The values by cgroup and limit (entries that do not parse are left out).
    #[must_use]
    pub fn index(&self) -> KeptIndex {
        self.values
            .iter()
            .filter_map(|k| {
                let limit = LimitFile::from_file_name(&k.limit)?;
                let value = super::limit::parse(limit, &k.value).ok()?;
                Some((
                    (k.id, limit),
                    (k.path.clone(), Desired::new(value, k.source)),
                ))
            })
            .collect()
    }
}

/// What happened when a decision reached the executor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "result")]
pub enum Outcome {
    /// Written and read back as the desired value.
    Restored {
        /// What the file said after the write.
        read_back: String,
        /// From the bad write's kernel timestamp to the read-back, in seconds.
        latency_seconds: f64,
    },
    /// The write or the read-back failed.
    Failed {
        /// The errno's name, or what did not match.
        error: String,
    },
    /// Not written: dry-run checks passed (the target is the cgroup decided about).
    Checked,
    /// Not written, and why.
    NotWritten { reason: Reason },
    /// Not given to the executor: the mode or the verdict did not call for it.
    Recorded,
}

impl Outcome {
    /// The `result` label.
    #[must_use]
    pub const fn label(&self) -> &'static str {
        match self {
            Self::Restored { .. } => "restored",
            Self::Failed { .. } => "failed",
            Self::Checked => "checked",
            Self::NotWritten { .. } => "not_written",
            Self::Recorded => "recorded",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protected_cgroups() {
        let p = Protection::of;
        assert_eq!(p("/"), Some(Protection::Root));
        assert_eq!(p(""), Some(Protection::Root));
        assert_eq!(p("/init.scope"), Some(Protection::InitScope));
        assert_eq!(p("/kubepods"), Some(Protection::KubepodsLevel));
        assert_eq!(p("/kubepods/burstable"), Some(Protection::KubepodsLevel));
        assert_eq!(p("/kubepods.slice"), Some(Protection::KubepodsLevel));
        assert_eq!(
            p("/kubepods.slice/kubepods-besteffort.slice"),
            Some(Protection::KubepodsLevel)
        );
        assert_eq!(
            p("/system.slice/containerd.service"),
            Some(Protection::SystemdUnit)
        );
        assert_eq!(p("/user.slice"), Some(Protection::SystemdUnit));
        // Pods and containers, under either driver, are not protected.
        assert_eq!(
            p("/kubepods/burstable/pod1b2a9f0e-0a1b-4c3d-8e9f-001122334455"),
            None
        );
        assert_eq!(
            p("/kubepods/pod1b2a9f0e-0a1b-4c3d-8e9f-001122334455/abc123"),
            None
        );
        assert_eq!(
            p(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b2a9f0e_0a1b_4c3d_8e9f_001122334455.slice/cri-containerd-abc.scope"
            ),
            None
        );
        assert_eq!(p("/workloads/app"), None);
    }

    #[test]
    fn modes_are_ordered_by_activity() {
        assert!(Mode::Observe < Mode::DryRun && Mode::DryRun < Mode::Enforce);
        assert_eq!(Mode::Enforce.min(Mode::DryRun), Mode::DryRun);
    }
}
