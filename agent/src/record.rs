//! The enriched form of each event: what the outputs (metrics, logs, spans, the event feed)
//! are made from, and what `nodewarden events` reads back. One JSON object per event.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

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

/// Kubernetes identity from a cgroup path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct K8s {
    pub pod_uid: String,
    pub qos: String,
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
    /// The identity in a cgroup path, named through `kubelet`'s directories where possible.
    pub fn from_path(path: &str, kubelet: &mut crate::kubelet::KubeletNames) -> Option<Self> {
        let id = crate::k8s::parse(path)?;
        let container_id = id.container.map(|c| c.id);
        let names = kubelet.names(&id.pod_uid, container_id.as_deref());
        let some = |s: String| (!s.is_empty()).then_some(s);
        let (namespace, pod, container) = match names {
            Some(n) => (some(n.namespace), some(n.pod), some(n.container)),
            None => (None, None, None),
        };
        Some(Self {
            pod_uid: id.pod_uid,
            qos: id.qos.as_str().to_owned(),
            container_id,
            namespace,
            pod,
            container,
        })
    }

    /// The metrics' identity labels for a cgroup with this identity.
    #[must_use]
    pub fn who(cgroup: &str, k8s: Option<&Self>) -> crate::metrics::Who {
        let name =
            |f: fn(&Self) -> &Option<String>| k8s.and_then(|k| f(k).clone()).unwrap_or_default();
        crate::metrics::Who {
            cgroup: cgroup.to_owned(),
            namespace: name(|k| &k.namespace),
            pod: name(|k| &k.pod),
            container: name(|k| &k.container),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitWrite {
    pub time_unix_nano: u64,
    /// The cgroup whose limit was written.
    pub cgroup: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s: Option<K8s>,
    /// The limit file (`memory.max`...).
    pub limit: String,
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
    /// Who wrote; unknown when the write was seen without BPF (`seen_by` inotify or poll).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer: Option<Process>,
    /// How the write was seen: `fexit`, `kprobe`, `syscalls`, `inotify` or `poll`.
    pub seen_by: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Victim {
    pub pid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tgid: Option<u32>,
    pub comm: String,
    /// How the victim's cgroup was found: `kernel` (its task) or `procfs`.
    pub cgroup_source: String,
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

/// The limit an OOM kill hit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OomLimit {
    /// The memory cgroup whose limit was hit; `/` for the node (a global OOM).
    pub cgroup: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s: Option<K8s>,
    /// `container`, `pod` or `node` (see `oom::scope`).
    pub scope: String,
    /// The kernel's name for it: `CONSTRAINT_MEMCG`, `CONSTRAINT_NONE` (global)...
    pub constraint: String,
    /// How the limit was found: `kernel` (the `out_of_memory` call was seen) or
    /// `memory.events` (derived from the cgroups' counters after the kill).
    pub found_by: String,
    /// Memory in use, in bytes: at the moment of the kill when `found_by` is `kernel`,
    /// else read after the kill.
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

/// One event, tagged by `kind`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    // Boxed: these are many times the size of a cgroup change.
    LimitWrite(Box<LimitWrite>),
    OomKill(Box<OomKill>),
    OomIncident(Box<OomIncident>),
    GoFatal(Box<GoFatal>),
    CgroupCreated(CgroupChange),
    CgroupRemoved(CgroupChange),
}

/// Every `kind`, for `nodewarden events --kind`.
pub const KINDS: [&str; 6] = [
    "limit_write",
    "oom_kill",
    "oom_incident",
    "cgroup_created",
    "cgroup_removed",
    "go_fatal",
];

impl Record {
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Self::LimitWrite(_) => KINDS[0],
            Self::OomKill(_) => KINDS[1],
            Self::OomIncident(_) => KINDS[2],
            Self::CgroupCreated(_) => KINDS[3],
            Self::CgroupRemoved(_) => KINDS[4],
            Self::GoFatal(_) => KINDS[5],
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
        }
    }

    #[must_use]
    pub fn time_unix_nano(&self) -> u64 {
        match self {
            Self::LimitWrite(r) => r.time_unix_nano,
            Self::OomKill(r) => r.time_unix_nano,
            Self::OomIncident(r) => r.time_unix_nano,
            Self::GoFatal(r) => r.time_unix_nano,
            Self::CgroupCreated(r) | Self::CgroupRemoved(r) => r.time_unix_nano,
        }
    }

    /// One readable line.
    #[must_use]
    pub fn human(&self) -> String {
        let mut s = format!(
            "{} {:<14} {}",
            utc(self.time_unix_nano()),
            self.kind(),
            self.cgroup()
        );
        match self {
            Self::LimitWrite(r) => {
                let _ = write!(s, " {} = {:?}", r.limit, r.value);
                if let (Some(old), Some(new)) = (&r.old, &r.new) {
                    let _ = write!(s, " ({old} -> {new})");
                }
                match &r.writer {
                    Some(w) => {
                        let _ = write!(s, " {} by {}", r.result, process(w));
                    }
                    None => {
                        let _ = write!(
                            s,
                            " {} by an unknown writer (seen by {})",
                            r.result, r.seen_by
                        );
                    }
                }
            }
            Self::OomKill(r) => {
                let _ = write!(
                    s,
                    " victim {}[{}] (cgroup from {})",
                    r.victim.comm, r.victim.pid, r.victim.cgroup_source,
                );
                if let Some(m) = &r.victim.memory {
                    let _ = write!(
                        s,
                        " anon-rss {} file-rss {} shmem-rss {} oom_score_adj {}",
                        mib(m.anon_rss_bytes),
                        mib(m.file_rss_bytes),
                        mib(m.shmem_rss_bytes),
                        m.oom_score_adj
                    );
                }
                let _ = write!(
                    s,
                    ", triggered by {}; {}, incident {}",
                    process(&r.trigger),
                    limit(&r.limit),
                    r.incident
                );
            }
            Self::OomIncident(r) => {
                let _ = write!(
                    s,
                    " {}, incident {}, triggered by {}; {} killed:",
                    limit(&r.limit),
                    r.id,
                    process(&r.trigger),
                    r.victims.len()
                );
                for v in &r.victims {
                    let _ = write!(s, " {}[{}] in {};", v.comm, v.pid, v.cgroup);
                }
                s.pop();
            }
            Self::GoFatal(r) => {
                let _ = write!(
                    s,
                    " fatal error: {} ({}) in {}",
                    r.reason,
                    r.function,
                    process(&r.process)
                );
            }
            Self::CgroupCreated(_) | Self::CgroupRemoved(_) => {}
        }
        if let Some(k) = match self {
            Self::LimitWrite(r) => r.k8s.as_ref(),
            Self::OomKill(r) => r.k8s.as_ref(),
            Self::OomIncident(r) => r.limit.k8s.as_ref(),
            Self::GoFatal(r) => r.k8s.as_ref(),
            _ => None,
        } {
            match (&k.namespace, &k.pod) {
                (Some(ns), Some(pod)) => {
                    let _ = write!(s, " [pod {ns}/{pod} {}", k.qos);
                }
                _ => {
                    let _ = write!(s, " [pod {} {}", k.pod_uid, k.qos);
                }
            }
            if let Some(c) = &k.container {
                let _ = write!(s, " container {c}");
            }
            if let (None, Some(c)) = (&k.container, &k.container_id) {
                let _ = write!(s, " container {}", &c[..c.len().min(12)]);
            }
            s.push(']');
        }
        s
    }
}

/// `limit of /a hit (scope container, CONSTRAINT_MEMCG, 64.0 MiB of 64.0 MiB, found by kernel)`.
fn limit(l: &OomLimit) -> String {
    let figure = |b: Option<u64>| b.map_or_else(|| "?".to_owned(), mib);
    format!(
        "limit of {} hit (scope {}, {}, {} of {}, found by {})",
        l.cgroup,
        l.scope,
        l.constraint,
        figure(l.usage_bytes),
        figure(l.limit_bytes),
        l.found_by
    )
}

/// Bytes as MiB with one decimal.
#[expect(clippy::cast_precision_loss, reason = "a figure for people")]
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1_048_576.0)
}

fn process(p: &Process) -> String {
    let exe = p
        .exe
        .as_deref()
        .map(|e| format!(" {e}"))
        .unwrap_or_default();
    format!("{}[{}]{exe} in {}", p.comm, p.pid, p.cgroup)
}

/// `2026-11-26T06:50:01.123Z` for nanoseconds since the epoch (days to a civil date per
/// Howard Hinnant's algorithm, to need no date crate for one format).
#[must_use]
pub fn utc(unix_nano: u64) -> String {
    let secs = unix_nano / 1_000_000_000;
    let millis = (unix_nano / 1_000_000) % 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    /// Expected values from `date -u -d @SECONDS`.
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(951_782_400_000_000_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(utc(1_795_000_000_123_000_000), "2026-11-18T11:06:40.123Z");
    }

    #[test]
    fn an_incident_reads_as_one_line_with_its_victims() {
        let trigger = Process {
            pid: 9,
            tid: 9,
            comm: "tail".into(),
            exe: None,
            cgroup: "/p/c".into(),
        };
        let r = Record::OomIncident(Box::new(OomIncident {
            time_unix_nano: 0,
            end_unix_nano: 0,
            id: "ab".repeat(16),
            limit: OomLimit {
                cgroup: "/p".into(),
                k8s: None,
                scope: "pod".into(),
                constraint: "CONSTRAINT_MEMCG".into(),
                found_by: "kernel".into(),
                usage_bytes: Some(48 << 20),
                limit_bytes: Some(48 << 20),
            },
            trigger,
            victims: vec![
                IncidentVictim {
                    pid: 9,
                    comm: "tail".into(),
                    cgroup: "/p/c".into(),
                },
                IncidentVictim {
                    pid: 8,
                    comm: "sleep".into(),
                    cgroup: "/p/c".into(),
                },
            ],
        }));
        assert_eq!(r.cgroup(), "/p");
        assert_eq!(
            r.human(),
            format!(
                "1970-01-01T00:00:00.000Z oom_incident   /p limit of /p hit (scope pod, CONSTRAINT_MEMCG, 48.0 MiB of 48.0 MiB, found by kernel), incident {}, triggered by tail[9] in /p/c; 2 killed: tail[9] in /p/c; sleep[8] in /p/c",
                "ab".repeat(16)
            )
        );
        let json = serde_json::to_string(&r).expect("serialize");
        assert!(json.starts_with("{\"kind\":\"oom_incident\""), "{json}");
        assert_eq!(serde_json::from_str::<Record>(&json).expect("parse"), r);
    }

    #[test]
    fn round_trips_as_json_with_a_kind_tag() {
        let r = Record::LimitWrite(Box::new(LimitWrite {
            time_unix_nano: 0,
            cgroup: "/a".into(),
            k8s: None,
            limit: "memory.max".into(),
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
            seen_by: "fexit".into(),
        }));
        let json = serde_json::to_string(&r).expect("serialize");
        assert!(json.starts_with("{\"kind\":\"limit_write\""), "{json}");
        assert_eq!(serde_json::from_str::<Record>(&json).expect("parse"), r);
        assert_eq!(
            r.human(),
            "1970-01-01T00:00:00.000Z limit_write    /a memory.max = \"64M\" (max -> 67108864) ok by sh[1] /bin/dash in /"
        );
    }
}
