//! From decoded events to outputs: enrich with cgroup paths, then count and trace.

use std::{
    collections::HashMap,
    path::Path,
    time::{Duration, SystemTime},
};

use crate::{
    cgroups::{self, CgroupResolver},
    events::{self, CgroupChange, Constraint, Event, LimitWrite, OomKill},
    inotify::Observed,
    kubelet::KubeletNames,
    limits,
    metrics::Metrics,
    oom,
    outputs::Outputs,
    record::{self, K8s, Process, Record},
    state::LimitState,
    telemetry::IncidentTrace,
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

/// Enriches decoded events into records (cgroup paths, Kubernetes identity, previous values,
/// OOM incidents) and hands them to the outputs. Owns the cgroup map and the limit state.
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
    /// Baselines for OOM limits derived in userspace.
    memory_events: oom::MemoryEvents,
    incidents: oom::Incidents<OpenIncident>,
    /// Removed cgroups' paths and when (monotonic ns): their series go after `deleted_ttl`.
    removed: HashMap<String, u64>,
    deleted_ttl: Duration,
    page_size: u64,
    /// Processes that exec'd since the last [`Self::take_execs`].
    execs: Vec<u32>,
    /// Go processes already reported dying, and when (one crash, one event).
    go_crashed: HashMap<u32, u64>,
}

impl<'a> Pipeline<'a> {
    /// A pipeline whose limit state and gauges start from every cgroup's current limit files.
    pub fn new(
        resolver: CgroupResolver,
        mut kubelet: KubeletNames,
        outputs: Outputs<'a>,
        limit_mode: &'static str,
        deleted_ttl: Duration,
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
        let memory_events =
            oom::MemoryEvents::new(resolver.root(), resolver.entries().map(|(_, p)| p));
        // SAFETY: sysconf has no preconditions.
        let page_size = u64::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        Self {
            limit_mode,
            resolver,
            kubelet,
            limits,
            metrics,
            outputs,
            clock: Clock::now(),
            memory_events,
            incidents: oom::Incidents::default(),
            removed: HashMap::new(),
            deleted_ttl,
            page_size,
            execs: Vec::new(),
            go_crashed: HashMap::new(),
        }
    }

    /// Handles one ring buffer record; a bad record is counted and logged, never fatal.
    pub fn handle(&mut self, raw: &[u8]) {
        let record = match events::decode(raw) {
            Ok(Event::LimitWrite(w)) => self.limit_write(&w),
            Ok(Event::OomKill(k)) => {
                self.oom_kill(&k);
                return;
            }
            Ok(Event::Cgroup(c)) => self.cgroup_change(c),
            Ok(Event::GoFatal(g)) => {
                let Some(r) = self.go_fatal(&g) else { return };
                r
            }
            Ok(Event::Exec(t)) => {
                self.execs.push(t.tgid);
                return;
            }
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
        let record = Record::LimitWrite(Box::new(record::LimitWrite {
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
        }));
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

    /// A futex word with a new long wait (see `contention`).
    pub fn contention_episode(&self, e: &crate::contention::Episode) {
        self.outputs.contention_episode(e);
    }

    /// The processes that exec'd since the last call.
    pub fn take_execs(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.execs)
    }

    /// A Go fatal error; `None` for the same process's second one (several goroutines can hit
    /// the same race; the process dies once).
    fn go_fatal(&mut self, g: &events::GoFatal) -> Option<Record> {
        let now = g.timestamp_ns;
        self.go_crashed
            .retain(|_, at| now.saturating_sub(*at) < GO_CRASH_MEMORY_NS);
        if self.go_crashed.insert(g.task.tgid, now).is_some() {
            return None;
        }
        let process = self.process(&g.task);
        let cgroup = process.cgroup.clone();
        // The reason is a label: cut, so a long message cannot make a long series.
        let reason: String = g.message.chars().take(80).collect();
        Some(Record::GoFatal(Box::new(record::GoFatal {
            time_unix_nano: self.clock.unix_nano(g.timestamp_ns),
            k8s: K8s::from_path(&cgroup, &mut self.kubelet),
            cgroup,
            process,
            reason,
            function: g.function.to_owned(),
        })))
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
            self.memory_events.created(&c.path);
            // A new cgroup at the path of a removed one continues its series.
            self.removed.remove(&c.path);
            self.resolver.created(c.id, c.path);
            Record::CgroupCreated(change)
        } else {
            self.limits.forget(c.id);
            self.metrics.forget_cgroup(&c.path);
            self.memory_events.removed(&c.path);
            self.removed.insert(c.path.clone(), monotonic_now());
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
        Record::LimitWrite(Box::new(record::LimitWrite {
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
        }))
    }

    fn oom_kill(&mut self, k: &OomKill) {
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
        let page = self.page_size;
        let victim = record::Victim {
            pid: k.victim_pid,
            tgid,
            comm,
            cgroup_source: source.to_owned(),
            memory: k.memory.map(|m| record::VictimMemory {
                anon_rss_bytes: m.anon_rss_pages.saturating_mul(page),
                file_rss_bytes: m.file_rss_pages.saturating_mul(page),
                shmem_rss_bytes: m.shmem_rss_pages.saturating_mul(page),
                swap_bytes: m.swap_pages.saturating_mul(page),
                total_vm_bytes: m.total_vm_pages.saturating_mul(page),
                oom_score_adj: m.oom_score_adj,
            }),
        };
        let trigger = self.process(&k.trigger);
        let key = key_of(k);
        let seen = record::IncidentVictim {
            pid: victim.pid,
            comm: victim.comm.clone(),
            cgroup: cgroup.clone(),
        };
        let at = self.clock.unix_nano(k.timestamp_ns);
        let (incident, limit) = if let Some(open) = self.incidents.find(&key, k.timestamp_ns) {
            open.last_ns = k.timestamp_ns;
            open.data.record.end_unix_nano = at;
            open.data.record.victims.push(seen);
            (open.id.clone(), open.data.record.limit.clone())
        } else {
            let limit = self.oom_limit(k, &cgroup);
            let record = record::OomIncident {
                time_unix_nano: at,
                end_unix_nano: at,
                id: String::new(),
                limit: limit.clone(),
                trigger: trigger.clone(),
                victims: vec![seen],
            };
            let open = self.incidents.open(
                key.clone(),
                k.timestamp_ns,
                OpenIncident {
                    record,
                    trace: None,
                },
            );
            open.data.record.id.clone_from(&open.id);
            open.data.trace = Some(self.outputs.oom_incident_opened(&open.data.record));
            (open.id.clone(), limit)
        };
        if k.control.is_some() {
            // The kernel said which limit it was: the counts move on without a derivation.
            let _ = self.memory_events.limit_of(&cgroup);
        }
        let record = record::OomKill {
            time_unix_nano: at,
            k8s: K8s::from_path(&cgroup, &mut self.kubelet),
            cgroup,
            victim,
            trigger,
            incident,
            limit,
        };
        let trace = self
            .incidents
            .find(&key, k.timestamp_ns)
            .and_then(|o| o.data.trace.as_ref());
        self.outputs.oom_kill(&record, trace);
    }

    /// The limit a kill hit: as the kernel's `out_of_memory` call said, or derived from the
    /// cgroups' `memory.events.local` counts when the call was not seen.
    fn oom_limit(&mut self, k: &OomKill, victim_cgroup: &str) -> record::OomLimit {
        let page = self.page_size;
        let (cgroup, constraint, found_by, usage, limit) = if let Some(c) = &k.control {
            let cgroup = c.limit_cgroup_id.map(|id| self.cgroup_label(id));
            let (usage, limit) = match cgroup {
                Some(_) => (
                    Some(c.usage_pages.saturating_mul(page)),
                    Some(c.max_pages.saturating_mul(page)),
                ),
                None => (
                    oom::node_memory().0,
                    Some(c.total_pages.saturating_mul(page)),
                ),
            };
            (cgroup, c.constraint.kernel_name(), "kernel", usage, limit)
        } else {
            let cgroup = self.memory_events.limit_of(victim_cgroup);
            let (usage, limit) = match &cgroup {
                Some(p) => oom::usage_and_limit(self.resolver.root(), p),
                None => oom::node_memory(),
            };
            // Derived, the kernel's cpuset and mempolicy constraints cannot be told apart
            // from a global OOM.
            let constraint = if cgroup.is_some() {
                Constraint::Memcg
            } else {
                Constraint::None
            };
            (
                cgroup,
                constraint.kernel_name(),
                "memory.events",
                usage,
                limit,
            )
        };
        let scope = oom::scope(cgroup.as_deref(), victim_cgroup);
        let cgroup = cgroup.unwrap_or_else(|| "/".to_owned());
        record::OomLimit {
            k8s: K8s::from_path(&cgroup, &mut self.kubelet),
            cgroup,
            scope: scope.to_owned(),
            constraint,
            found_by: found_by.to_owned(),
            usage_bytes: usage,
            limit_bytes: limit,
        }
    }

    /// Time-driven work: incidents whose kills stopped are reported, and the series of cgroups
    /// removed longer ago than the configured time are dropped. Call it every few hundred ms.
    pub fn tick(&mut self) {
        let now = monotonic_now();
        for done in self.incidents.close_quiet(now) {
            // A limit hit can count more OOMs than kills (a charge failing again while the
            // victim exits): take them in now, so the next derivation does not see them.
            for v in &done.data.record.victims {
                let _ = self.memory_events.limit_of(&v.cgroup);
            }
            self.outputs
                .oom_incident_closed(&done.data.record, done.data.trace);
        }
        let ttl = u64::try_from(self.deleted_ttl.as_nanos()).unwrap_or(u64::MAX);
        let expired: Vec<String> = self
            .removed
            .iter()
            .filter(|(_, at)| now.saturating_sub(**at) >= ttl)
            .map(|(p, _)| p.clone())
            .collect();
        for path in expired {
            self.removed.remove(&path);
            self.metrics.forget_cgroup_counters(&path);
        }
    }

    /// At shutdown: reports the incidents still open.
    pub fn finish(&mut self) {
        for done in self.incidents.close_all() {
            self.outputs
                .oom_incident_closed(&done.data.record, done.data.trace);
        }
    }
}

/// How long a crashed Go process is remembered (its other goroutines' fatal errors are the
/// same crash).
const GO_CRASH_MEMORY_NS: u64 = 10_000_000_000;

/// The incident key of a kill (see [`oom::Key`]).
fn key_of(k: &OomKill) -> oom::Key {
    match &k.control {
        Some(c) => oom::Key::Kernel {
            trigger_tid: k.trigger.pid,
            entered_ns: c.incident_ns,
        },
        None => oom::Key::Derived {
            trigger_tid: k.trigger.pid,
        },
    }
}

/// What the pipeline keeps of an incident while it takes victims.
#[derive(Debug)]
pub struct OpenIncident {
    record: record::OomIncident,
    trace: Option<IncidentTrace>,
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
