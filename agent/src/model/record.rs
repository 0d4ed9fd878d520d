//! The enriched form of each event: what the outputs (metrics, logs, spans, the event feed)
//! are made from, and what `nodewarden events` reads back. One JSON object per event.

use agent_common::LimitFile;
use serde::{Deserialize, Serialize};

use super::{
    cgroup::{Qos, Scope, Who},
    event::Constraint,
    guard::GuardResult,
    heal::{DesiredSource, Mode, Outcome, Reason, Verdict},
};

/// A process as seen by a probe.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    /// Process id (the kernel's tgid).
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    pub comm: String,
    /// Executable path, when the process was still there to ask.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exe: Option<String>,
    /// The process's own cgroup.
    pub cgroup: String,
}

/// Kubernetes identity of a cgroup: from its path, named where the node knows the pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct K8s {
    pub pod_uid: String,
    pub qos: Qos,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// Names, when kubelet's directories on this node know the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

impl K8s {
    /// The identity a cgroup path says (pod UID, QoS class, container ID), without names;
    /// `None` outside Kubernetes' pod hierarchy.
    #[must_use]
    pub fn unnamed(path: &str) -> Option<Self> {
        let id = super::cgroup::parse(path)?;
        Some(Self {
            pod_uid: id.pod_uid,
            qos: id.qos,
            container_id: id.container.map(|c| c.id),
            namespace: None,
            pod: None,
            container: None,
        })
    }
}

impl Who {
    /// The identity labels of `cgroup`, with the names `k8s` knows.
    #[must_use]
    pub fn of(cgroup: &str, k8s: Option<&K8s>) -> Self {
        let name =
            |f: fn(&K8s) -> &Option<String>| k8s.and_then(|k| f(k).clone()).unwrap_or_default();
        Self {
            cgroup: cgroup.to_owned(),
            namespace: name(|k| &k.namespace),
            pod: name(|k| &k.pod),
            container: name(|k| &k.container),
        }
    }
}

/// How a limit write was seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeenBy {
    /// fexit on the kernel's write handler.
    Fexit,
    /// kprobe/kretprobe on the write handler.
    Kprobe,
    /// Tracepoints on the write syscalls.
    Syscalls,
    /// inotify on the cgroup directory: the new value, without the writer.
    Inotify,
    /// The periodic poll of the limit files found it changed.
    Poll,
    /// The rescan after events were lost found it changed.
    Resync,
}

impl SeenBy {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Fexit => "fexit",
            Self::Kprobe => "kprobe",
            Self::Syscalls => "syscalls",
            Self::Inotify => "inotify",
            Self::Poll => "poll",
            Self::Resync => "resync",
        }
    }
}

/// `memory.max` and the other limit files, as their file names in JSON.
mod limit_file {
    use agent_common::LimitFile;
    use serde::{Deserialize as _, Deserializer, Serializer};

    #[expect(
        clippy::trivially_copy_pass_by_ref,
        reason = "the signature serde's `with` calls"
    )]
    pub fn serialize<S: Serializer>(limit: &LimitFile, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(limit.file_name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<LimitFile, D::Error> {
        let name = std::borrow::Cow::<str>::deserialize(d)?;
        LimitFile::from_file_name(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("{name:?} is not a limit file")))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitWrite {
    pub time_unix_nano: u64,
    /// The cgroup whose limit was written.
    pub cgroup: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s: Option<K8s>,
    /// The limit file.
    #[serde(with = "limit_file")]
    pub limit: LimitFile,
    /// The value as written (whitespace trimmed).
    pub value: String,
    /// The value before the write, if known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old: Option<String>,
    /// The value the kernel holds after a successful write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new: Option<String>,
    /// `ok`, or the errno name the kernel returned.
    pub result: String,
    /// Who wrote; unknown when the write was seen without BPF (`seen_by` inotify, poll, resync).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<Process>,
    pub seen_by: SeenBy,
    /// The OOM incident the write caused: lowered below usage, the kernel killed inside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incident: Option<String>,
}

/// How an OOM victim's cgroup was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CgroupSource {
    /// Read from its task in the kernel.
    Kernel,
    /// From `/proc/<pid>/cgroup`, while the victim was still there.
    Procfs,
}

impl CgroupSource {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::Procfs => "procfs",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Victim {
    pub pid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tgid: Option<u32>,
    pub comm: String,
    pub cgroup_source: CgroupSource,
    /// Its memory when it was killed (the figures of the kernel's own OOM report), when its
    /// task could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<VictimMemory>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VictimMemory {
    pub anon_rss_bytes: u64,
    pub file_rss_bytes: u64,
    pub shmem_rss_bytes: u64,
    pub swap_bytes: u64,
    pub total_vm_bytes: u64,
    pub oom_score_adj: i32,
}

/// How the limit an OOM kill hit was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FoundBy {
    /// The `out_of_memory` call was seen.
    #[serde(rename = "kernel")]
    Kernel,
    /// Derived from the cgroups' counters after the kill.
    #[serde(rename = "memory.events")]
    MemoryEvents,
}

impl FoundBy {
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::MemoryEvents => "memory.events",
        }
    }
}

/// A constraint as the kernel names it in JSON (`CONSTRAINT_MEMCG`).
mod constraint {
    use serde::{Deserialize as _, Deserializer, Serializer};

    use crate::model::event::Constraint;

    #[expect(
        clippy::trivially_copy_pass_by_ref,
        reason = "the signature serde's `with` calls"
    )]
    pub fn serialize<S: Serializer>(c: &Constraint, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&c.kernel_name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Constraint, D::Error> {
        let name = std::borrow::Cow::<str>::deserialize(d)?;
        Constraint::from_kernel_name(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("{name:?} is not a constraint")))
    }
}

/// The limit an OOM kill hit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OomLimit {
    /// The memory cgroup whose limit was hit; `/` for the node (a global OOM).
    pub cgroup: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s: Option<K8s>,
    pub scope: Scope,
    #[serde(with = "constraint")]
    pub constraint: Constraint,
    pub found_by: FoundBy,
    /// Memory in use, in bytes: at the moment of the kill when found by the kernel, else read
    /// after the kill.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_bytes: Option<u64>,
    /// The limit in bytes (`memory.max`; for the node, RAM and swap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_bytes: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OomKill {
    pub time_unix_nano: u64,
    /// The victim's cgroup.
    pub cgroup: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s: Option<K8s>,
    pub victim: Victim,
    /// The task whose allocation triggered the kill.
    pub trigger: Process,
    /// The incident (limit hit) this kill belongs to; also its trace id.
    pub incident: String,
    /// Whether this kill opened its incident (the first victim of the limit hit).
    #[serde(default)]
    pub opens_incident: bool,
    pub limit: OomLimit,
}

/// One limit hit and every process killed for it, reported once the kills stopped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OomIncident {
    /// The first kill.
    pub time_unix_nano: u64,
    /// The last kill.
    pub end_unix_nano: u64,
    /// Also the incident's trace id.
    pub id: String,
    pub limit: OomLimit,
    pub trigger: Process,
    pub victims: Vec<IncidentVictim>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IncidentVictim {
    pub pid: u32,
    pub comm: String,
    pub cgroup: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupChange {
    pub time_unix_nano: u64,
    pub cgroup: String,
}

/// A Go program's fatal error: it is about to exit with "fatal error: <reason>".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GoFatal {
    pub time_unix_nano: u64,
    /// The process's cgroup.
    pub cgroup: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s: Option<K8s>,
    pub process: Process,
    /// The runtime's message: `concurrent map writes`...
    pub reason: String,
    /// `runtime.fatal` or `runtime.throw`.
    pub function: String,
}

/// What led to a decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// A limit write the probes saw.
    Write,
    /// A scan of the hierarchy (start-up, reconcile pass, resync after lost events) or inotify
    /// found the value.
    Scan,
    /// Looked at again when a cooldown ended.
    Retry,
}

/// A decision about a change to a watched limit, and what the executor made of it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub time_unix_nano: u64,
    pub cgroup: String,
    /// The cgroup's id (its directory's inode): the executor writes this cgroup and no other.
    pub cgroup_id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s: Option<K8s>,
    #[serde(with = "limit_file")]
    pub limit: LimitFile,
    pub rule: String,
    /// The mode the decision was taken in (the rule's, capped by the global one).
    pub mode: Mode,
    pub verdict: Verdict,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// The value the change left.
    pub value: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_source: Option<DesiredSource>,
    /// Who made the change (a write the probes saw).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<Process>,
    /// The trusted writer entry it matched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trusted_writer: Option<String>,
    pub trigger: Trigger,
    /// When the change happened (`CLOCK_MONOTONIC` ns; the kernel's timestamp of a write):
    /// restore latency counts from here.
    pub changed_ns: u64,
    /// The OOM incident the write caused (kills inside the write itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incident: Option<String>,
    /// The write's `time_unix_nano` (its `limit_write` record's): ties the decision to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_time_unix_nano: Option<u64>,
    /// What the executor did; absent until it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
    /// Identical decisions (a fight going on) counted but not recorded since the last one.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub repeated: u64,
}

#[expect(
    clippy::trivially_copy_pass_by_ref,
    reason = "the signature serde calls"
)]
const fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One event, tagged by `kind`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    // Boxed: these are many times the size of a cgroup change.
    LimitWrite(Box<LimitWrite>),
    OomKill(Box<OomKill>),
    OomIncident(Box<OomIncident>),
    GoFatal(Box<GoFatal>),
    CgroupCreated(CgroupChange),
    CgroupRemoved(CgroupChange),
    Decision(Box<Decision>),
    GuardDenial(Box<GuardDenial>),
}

/// The guard refused an untrusted open of a protected limit file for writing (enforce), or
/// let it through and records that it would have (dry-run).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuardDenial {
    pub time_unix_nano: u64,
    pub cgroup: String,
    pub cgroup_id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s: Option<K8s>,
    #[serde(with = "limit_file")]
    pub limit: LimitFile,
    /// The rule that protects the file ("unknown" when the agent no longer knows it).
    pub rule: String,
    pub result: GuardResult,
    /// Who opened the file.
    pub writer: Process,
}

/// The kinds of [`Record`], as `nodewarden events --kind` names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum RecordKind {
    LimitWrite,
    OomKill,
    OomIncident,
    GoFatal,
    CgroupCreated,
    CgroupRemoved,
    Decision,
    GuardDenial,
}

impl RecordKind {
    /// The `kind` field's value.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::LimitWrite => "limit_write",
            Self::OomKill => "oom_kill",
            Self::OomIncident => "oom_incident",
            Self::GoFatal => "go_fatal",
            Self::CgroupCreated => "cgroup_created",
            Self::CgroupRemoved => "cgroup_removed",
            Self::Decision => "decision",
            Self::GuardDenial => "guard_denial",
        }
    }
}

impl Record {
    #[must_use]
    pub fn kind(&self) -> RecordKind {
        match self {
            Self::LimitWrite(_) => RecordKind::LimitWrite,
            Self::OomKill(_) => RecordKind::OomKill,
            Self::OomIncident(_) => RecordKind::OomIncident,
            Self::GoFatal(_) => RecordKind::GoFatal,
            Self::CgroupCreated(_) => RecordKind::CgroupCreated,
            Self::CgroupRemoved(_) => RecordKind::CgroupRemoved,
            Self::Decision(_) => RecordKind::Decision,
            Self::GuardDenial(_) => RecordKind::GuardDenial,
        }
    }

    /// The cgroup the event is about.
    #[must_use]
    pub fn cgroup(&self) -> &str {
        match self {
            Self::LimitWrite(r) => &r.cgroup,
            Self::OomKill(r) => &r.cgroup,
            Self::OomIncident(r) => &r.limit.cgroup,
            Self::GoFatal(r) => &r.cgroup,
            Self::CgroupCreated(r) | Self::CgroupRemoved(r) => &r.cgroup,
            Self::Decision(r) => &r.cgroup,
            Self::GuardDenial(r) => &r.cgroup,
        }
    }

    /// The Kubernetes identity of that cgroup, where it has one.
    #[must_use]
    pub fn k8s(&self) -> Option<&K8s> {
        match self {
            Self::LimitWrite(r) => r.k8s.as_ref(),
            Self::OomKill(r) => r.k8s.as_ref(),
            Self::OomIncident(r) => r.limit.k8s.as_ref(),
            Self::GoFatal(r) => r.k8s.as_ref(),
            Self::Decision(r) => r.k8s.as_ref(),
            Self::GuardDenial(r) => r.k8s.as_ref(),
            Self::CgroupCreated(_) | Self::CgroupRemoved(_) => None,
        }
    }

    #[must_use]
    pub fn time_unix_nano(&self) -> u64 {
        match self {
            Self::LimitWrite(r) => r.time_unix_nano,
            Self::OomKill(r) => r.time_unix_nano,
            Self::OomIncident(r) => r.time_unix_nano,
            Self::GoFatal(r) => r.time_unix_nano,
            Self::Decision(r) => r.time_unix_nano,
            Self::GuardDenial(r) => r.time_unix_nano,
            Self::CgroupCreated(r) | Self::CgroupRemoved(r) => r.time_unix_nano,
        }
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A write of 64M to `/a`'s memory.max by `sh`, for the tests of whatever shows records.
    pub fn limit_write_example() -> Record {
        Record::LimitWrite(Box::new(LimitWrite {
            time_unix_nano: 0,
            cgroup: "/a".into(),
            k8s: None,
            limit: LimitFile::MemoryMax,
            value: "64M".into(),
            old: Some("max".into()),
            new: Some("67108864".into()),
            result: "ok".into(),
            writer: Some(Process {
                pid: 1,
                tid: 2,
                comm: "sh".into(),
                exe: Some("/bin/dash".into()),
                cgroup: "/".into(),
            }),
            seen_by: SeenBy::Fexit,
            incident: None,
        }))
    }

    #[test]
    fn round_trips_as_json_with_a_kind_tag() {
        let r = limit_write_example();
        let json = serde_json::to_string(&r).expect("serialize");
        assert!(json.starts_with("{\"kind\":\"limit_write\""), "{json}");
        assert!(json.contains("\"limit\":\"memory.max\""), "{json}");
        assert!(json.contains("\"seen_by\":\"fexit\""), "{json}");
        assert_eq!(serde_json::from_str::<Record>(&json).expect("parse"), r);
        assert_eq!(r.kind().as_str(), "limit_write");
    }

    #[test]
    fn oom_limits_serialize_with_the_kernels_names() {
        let l = OomLimit {
            cgroup: "/p".into(),
            k8s: None,
            scope: Scope::Pod,
            constraint: Constraint::Memcg,
            found_by: FoundBy::MemoryEvents,
            usage_bytes: None,
            limit_bytes: Some(1),
        };
        let json = serde_json::to_string(&l).expect("serialize");
        assert!(
            json.contains(
                r#""scope":"pod","constraint":"CONSTRAINT_MEMCG","found_by":"memory.events""#
            ),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<OomLimit>(&json).expect("parse"), l);
        let odd = json.replace("CONSTRAINT_MEMCG", "CONSTRAINT_9");
        let parsed: OomLimit = serde_json::from_str(&odd).expect("parse");
        assert_eq!(parsed.constraint, Constraint::Other(9));
    }
}
