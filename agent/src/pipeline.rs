//! From decoded events to outputs: enrich with cgroup paths, then count and trace.

use std::{
    path::Path,
    time::{Duration, SystemTime},
};

use crate::{
    cgroups::{self, CgroupResolver},
    events::{self, CgroupChange, Event, LimitWrite, OomKill},
    inotify::Observed,
    kubelet::KubeletNames,
    limits,
    metrics::Metrics,
    outputs::Outputs,
    record::{self, K8s, Process, Record},
    state::LimitState,
};

/// Label value for a cgroup whose path could not be found.
const UNKNOWN_CGROUP: &str = "unknown";

/// `CLOCK_MONOTONIC` now, in nanoseconds (the kernel's timestamps use the same clock).
fn monotonic_now() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes a valid timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Converts the kernel's `CLOCK_MONOTONIC` timestamps to wall-clock time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// Wall-clock time at monotonic zero.
    boot: SystemTime,
}

impl Clock {
    #[must_use]
    pub fn now() -> Self {
        Self {
            boot: SystemTime::now()
                .checked_sub(Duration::from_nanos(monotonic_now()))
                .unwrap_or(SystemTime::UNIX_EPOCH),
        }
    }

    #[must_use]
    pub fn wall(&self, monotonic_ns: u64) -> SystemTime {
        self.boot + Duration::from_nanos(monotonic_ns)
    }

    /// Nanoseconds since the Unix epoch for a kernel timestamp.
    #[must_use]
    pub fn unix_nano(&self, monotonic_ns: u64) -> u64 {
        self.wall(monotonic_ns)
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }
}

/// Enriches decoded events into records (cgroup paths, Kubernetes identity, previous values)
/// and hands them to the outputs. Owns the cgroup map and the limit state.
#[derive(Debug)]
pub struct Pipeline<'a> {
    /// How limit writes are seen (`fexit`, `kprobe`, `syscalls`, `inotify`).
    limit_mode: &'static str,
    resolver: CgroupResolver,
    kubelet: KubeletNames,
    limits: LimitState,
    metrics: Metrics,
    outputs: Outputs<'a>,
    clock: Clock,
}

impl<'a> Pipeline<'a> {
    /// A pipeline whose limit state and gauges start from every cgroup's current limit files.
    pub fn new(
        resolver: CgroupResolver,
        mut kubelet: KubeletNames,
        outputs: Outputs<'a>,
        limit_mode: &'static str,
    ) -> Self {
        let metrics = outputs.metrics.clone();
        let mut limits = LimitState::new();
        if let Some(root) = resolver.root() {
            for (id, path) in resolver.entries() {
                let dir = root.join(path.trim_start_matches('/'));
                let who = K8s::who(path, K8s::from_path(path, &mut kubelet).as_ref());
                for (limit, value) in limits.seed_from_dir(id, &dir) {
                    metrics.set_limit(&who, limit, value);
                }
            }
        }
        Self {
            limit_mode,
            resolver,
            kubelet,
            limits,
            metrics,
            outputs,
            clock: Clock::now(),
        }
    }

    /// Handles one ring buffer record; a bad record is counted and logged, never fatal.
    pub fn handle(&mut self, raw: &[u8]) {
        let record = match events::decode(raw) {
            Ok(Event::LimitWrite(w)) => self.limit_write(&w),
            Ok(Event::OomKill(k)) => self.oom_kill(&k),
            Ok(Event::Cgroup(c)) => self.cgroup_change(c),
            Err(e) => {
                self.metrics.decode_errors.inc();
                tracing::warn!("dropped a kernel event: {e}");
                return;
            }
        };
        self.outputs.emit(&record);
    }

    /// A limit file seen modified without BPF (inotify), or found changed by a poll; reported
    /// when its value differs from the one known.
    pub fn observed(&mut self, o: &Observed, seen_by: &'static str) {
        let Ok(value) = limits::parse(o.limit, &o.value) else {
            tracing::warn!(cgroup = %o.path, limit = o.limit.file_name(), "unparsable value {:?}", o.value);
            return;
        };
        // Without the writer's syscall only changes can be told apart: a cgroup not known yet
        // is new, so it starts from the kernel's defaults.
        if self.limits.get(o.id, o.limit).is_none() {
            self.limits.seed_defaults(o.id);
        }
        if self.limits.get(o.id, o.limit) == Some(value) {
            return;
        }
        let k8s = K8s::from_path(&o.path, &mut self.kubelet);
        let (old, now) = self.limits.record(o.id, o.limit, value);
        self.metrics
            .set_limit(&K8s::who(&o.path, k8s.as_ref()), o.limit, now);
        let record = Record::LimitWrite(record::LimitWrite {
            time_unix_nano: self.clock.unix_nano(monotonic_now()),
            cgroup: o.path.clone(),
            k8s,
            limit: o.limit.file_name().to_owned(),
            value: o.value.clone(),
            old: old.map(|v| v.to_string()),
            new: Some(now.to_string()),
            result: "ok".to_owned(),
            writer: None,
            seen_by: seen_by.to_owned(),
        });
        self.outputs.emit(&record);
    }

    /// Reads every known cgroup's limit files; each that differs from the state is reported
    /// (seen by `poll`). The backstop of the inotify mode.
    pub fn poll(&mut self) {
        let Some(root) = self.resolver.root().map(Path::to_path_buf) else {
            return;
        };
        let cgroups: Vec<(u64, String)> = self
            .resolver
            .entries()
            .map(|(id, p)| (id, p.to_owned()))
            .collect();
        for (id, path) in cgroups {
            let dir = root.join(path.trim_start_matches('/'));
            for (limit, value) in limits::read_files(&dir) {
                let Ok(v) = limits::parse(limit, &value) else {
                    continue;
                };
                if self.limits.get(id, limit).is_some_and(|known| known != v) {
                    let o = Observed {
                        id,
                        path: path.clone(),
                        limit,
                        value,
                    };
                    self.observed(&o, "poll");
                }
            }
        }
    }

    fn cgroup_label(&mut self, id: u64) -> String {
        self.resolver
            .path(id)
            .unwrap_or_else(|| UNKNOWN_CGROUP.to_owned())
    }

    fn cgroup_change(&mut self, c: CgroupChange) -> Record {
        let change = record::CgroupChange {
            time_unix_nano: self.clock.unix_nano(c.timestamp_ns),
            cgroup: c.path.clone(),
        };
        if c.created {
            let who = K8s::who(&c.path, K8s::from_path(&c.path, &mut self.kubelet).as_ref());
            for (limit, value) in self.limits.seed_defaults(c.id) {
                self.metrics.set_limit(&who, limit, value);
            }
            self.resolver.created(c.id, c.path);
            Record::CgroupCreated(change)
        } else {
            self.limits.forget(c.id);
            self.metrics.forget_cgroup(&c.path);
            self.resolver.removed(c.id);
            Record::CgroupRemoved(change)
        }
    }

    fn process(&mut self, t: &events::Task) -> Process {
        Process {
            pid: t.tgid,
            tid: t.pid,
            comm: t.comm.clone(),
            // The writer may be gone already (a shell's `echo`): then the path is unknown.
            exe: std::fs::read_link(format!("/proc/{}/exe", t.tgid))
                .ok()
                .map(|p| p.display().to_string()),
            cgroup: self.cgroup_label(t.cgroup_id),
        }
    }

    fn limit_write(&mut self, w: &LimitWrite) -> Record {
        let cgroup = self.cgroup_label(w.target_cgroup_id);
        let result = match w.result {
            Ok(_) => "ok".to_owned(),
            Err(errno) => errno_name(errno),
        };
        let k8s = K8s::from_path(&cgroup, &mut self.kubelet);
        // A write the kernel refused leaves the limit as it was.
        let (old, new) = match (w.result, limits::parse(w.limit, &w.value)) {
            (Ok(_), Ok(v)) => {
                let (old, now) = self.limits.record(w.target_cgroup_id, w.limit, v);
                self.metrics
                    .set_limit(&K8s::who(&cgroup, k8s.as_ref()), w.limit, now);
                (old, Some(now))
            }
            _ => (self.limits.get(w.target_cgroup_id, w.limit), None),
        };
        Record::LimitWrite(record::LimitWrite {
            time_unix_nano: self.clock.unix_nano(w.timestamp_ns),
            k8s,
            cgroup,
            limit: w.limit.file_name().to_owned(),
            value: w.value.clone(),
            old: old.map(|v| v.to_string()),
            new: new.map(|v| v.to_string()),
            result,
            writer: Some(self.process(&w.writer)),
            seen_by: self.limit_mode.to_owned(),
        })
    }

    fn oom_kill(&mut self, k: &OomKill) -> Record {
        // The victim's cgroup comes from its task in the kernel; failing that, from /proc while
        // the victim is still there (it can be gone already: then the cgroup is unknown).
        let (cgroup, comm, tgid, source) = match &k.victim {
            Some(v) => (
                self.cgroup_label(v.cgroup_id),
                v.comm.clone(),
                Some(v.tgid),
                "kernel",
            ),
            None => (
                cgroups::path_of_pid(k.victim_pid).unwrap_or_else(|| UNKNOWN_CGROUP.to_owned()),
                std::fs::read_to_string(format!("/proc/{}/comm", k.victim_pid))
                    .map(|c| c.trim().to_owned())
                    .unwrap_or_default(),
                None,
                "procfs",
            ),
        };
        Record::OomKill(record::OomKill {
            time_unix_nano: self.clock.unix_nano(k.timestamp_ns),
            k8s: K8s::from_path(&cgroup, &mut self.kubelet),
            cgroup,
            victim: record::Victim {
                pid: k.victim_pid,
                tgid,
                comm,
                cgroup_source: source.to_owned(),
            },
            trigger: self.process(&k.trigger),
        })
    }
}

/// The symbolic name of an errno ("EINVAL"), or its number when it has none here.
#[must_use]
pub fn errno_name(errno: i32) -> String {
    let name = match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EBUSY => "EBUSY",
        libc::EINVAL => "EINVAL",
        libc::ENOSPC => "ENOSPC",
        libc::ERANGE => "ERANGE",
        libc::EACCES => "EACCES",
        libc::ENOMEM => "ENOMEM",
        libc::EAGAIN => "EAGAIN",
        libc::ENODEV => "ENODEV",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        _ => return format!("errno{errno}"),
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_names() {
        assert_eq!(errno_name(22), "EINVAL");
        assert_eq!(errno_name(4095), "errno4095");
    }

    #[test]
    fn monotonic_zero_is_in_the_past() {
        let c = Clock::now();
        assert!(c.wall(0) <= SystemTime::now());
    }
}
