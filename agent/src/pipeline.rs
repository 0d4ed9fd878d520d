//! From decoded events to outputs: enrich with cgroup paths, then count and trace.

use std::time::{Duration, SystemTime};

use opentelemetry::KeyValue;

use crate::{
    cgroups::{self, CgroupResolver},
    events::{self, CgroupChange, Event, LimitWrite, OomKill},
    k8s,
    limits::{self, LimitValue},
    metrics::Metrics,
    state::LimitState,
    telemetry::Traces,
};

/// Label value for a cgroup whose path could not be found.
const UNKNOWN_CGROUP: &str = "unknown";

/// Converts the kernel's `CLOCK_MONOTONIC` timestamps to wall-clock time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// Wall-clock time at monotonic zero.
    boot: SystemTime,
}

impl Clock {
    #[must_use]
    pub fn now() -> Self {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes a valid timespec; CLOCK_MONOTONIC always exists on Linux.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
        let mono = Duration::new(
            u64::try_from(ts.tv_sec).unwrap_or(0),
            u32::try_from(ts.tv_nsec).unwrap_or(0),
        );
        Self {
            boot: SystemTime::now()
                .checked_sub(mono)
                .unwrap_or(SystemTime::UNIX_EPOCH),
        }
    }

    #[must_use]
    pub fn wall(&self, monotonic_ns: u64) -> SystemTime {
        self.boot + Duration::from_nanos(monotonic_ns)
    }
}

/// Enriches events and feeds metrics, spans and logs. One instance owns the cgroup map and the
/// limit state.
#[derive(Debug)]
pub struct Pipeline<'a> {
    resolver: CgroupResolver,
    limits: LimitState,
    metrics: Metrics,
    traces: &'a Traces,
    clock: Clock,
}

impl<'a> Pipeline<'a> {
    /// A pipeline whose limit state and gauges start from every cgroup's current limit files.
    pub fn new(resolver: CgroupResolver, metrics: Metrics, traces: &'a Traces) -> Self {
        let mut limits = LimitState::new();
        if let Some(root) = resolver.root() {
            for (id, path) in resolver.entries() {
                let dir = root.join(path.trim_start_matches('/'));
                for (limit, value) in limits.seed_from_dir(id, &dir) {
                    metrics.set_limit(path, limit, value);
                }
            }
        }
        Self {
            resolver,
            limits,
            metrics,
            traces,
            clock: Clock::now(),
        }
    }

    /// Handles one ring buffer record; a bad record is counted and logged, never fatal.
    pub fn handle(&mut self, record: &[u8]) {
        match events::decode(record) {
            Ok(Event::LimitWrite(w)) => self.limit_write(&w),
            Ok(Event::OomKill(k)) => self.oom_kill(&k),
            Ok(Event::Cgroup(c)) => self.cgroup_change(c),
            Err(e) => {
                self.metrics.decode_errors.inc();
                tracing::warn!("dropped a kernel event: {e}");
            }
        }
    }

    fn cgroup_label(&mut self, id: u64) -> String {
        self.resolver
            .path(id)
            .unwrap_or_else(|| UNKNOWN_CGROUP.to_owned())
    }

    fn cgroup_change(&mut self, c: CgroupChange) {
        tracing::debug!(id = c.id, path = %c.path, created = c.created, "cgroup change");
        if c.created {
            for (limit, value) in self.limits.seed_defaults(c.id) {
                self.metrics.set_limit(&c.path, limit, value);
            }
            self.resolver.created(c.id, c.path);
        } else {
            self.limits.forget(c.id);
            self.metrics.forget_cgroup(&c.path);
            self.resolver.removed(c.id);
        }
    }

    fn limit_write(&mut self, w: &LimitWrite) {
        let cgroup = self.cgroup_label(w.target_cgroup_id);
        let writer_cgroup = self.cgroup_label(w.writer.cgroup_id);
        let limit = w.limit.file_name();
        let result = match w.result {
            Ok(_) => "ok".to_owned(),
            Err(errno) => errno_name(errno),
        };
        let parsed = limits::parse(w.limit, &w.value);
        // A write the kernel refused leaves the limit as it was.
        let (old, new) = match (w.result, parsed) {
            (Ok(_), Ok(v)) => {
                let (old, now) = self.limits.record(w.target_cgroup_id, w.limit, v);
                self.metrics.set_limit(&cgroup, w.limit, now);
                (old, Some(now))
            }
            _ => (self.limits.get(w.target_cgroup_id, w.limit), None),
        };
        let show =
            |v: Option<LimitValue>| v.map_or_else(|| "unknown".to_owned(), |v| v.to_string());
        let identity = k8s::parse(&cgroup);
        self.metrics
            .limit_writes
            .with_label_values(&[
                cgroup.as_str(),
                limit,
                w.writer.comm.as_str(),
                result.as_str(),
            ])
            .inc();
        tracing::info!(
            cgroup = %cgroup,
            limit,
            value = %w.value,
            old = %show(old),
            new = %show(new),
            writer = %w.writer.comm,
            writer_pid = w.writer.tgid,
            writer_cgroup = %writer_cgroup,
            result = %result,
            "cgroup limit write"
        );
        let mut attributes = vec![
            KeyValue::new("cgroup.path", cgroup),
            KeyValue::new("cgroup.limit", limit),
            KeyValue::new("cgroup.limit.value", w.value.clone()),
            KeyValue::new("cgroup.limit.old", show(old)),
            KeyValue::new("cgroup.limit.new", show(new)),
            KeyValue::new("cgroup.limit.result", result),
            KeyValue::new("process.pid", i64::from(w.writer.tgid)),
            KeyValue::new("thread.id", i64::from(w.writer.pid)),
            KeyValue::new("process.command", w.writer.comm.clone()),
            KeyValue::new("process.cgroup", writer_cgroup),
        ];
        if let Some(id) = identity {
            attributes.extend(k8s_attributes(&id));
        }
        self.traces.event_span(
            "cgroup.limit_write",
            self.clock.wall(w.timestamp_ns),
            attributes,
        );
    }

    fn oom_kill(&mut self, k: &OomKill) {
        // The victim's cgroup comes from its task in the kernel; failing that, from /proc while
        // the victim is still there (it can be gone already: then the cgroup is unknown).
        let (victim_cgroup, victim_comm, source) = match &k.victim {
            Some(v) => (self.cgroup_label(v.cgroup_id), v.comm.clone(), "kernel"),
            None => (
                cgroups::path_of_pid(k.victim_pid).unwrap_or_else(|| UNKNOWN_CGROUP.to_owned()),
                std::fs::read_to_string(format!("/proc/{}/comm", k.victim_pid))
                    .map(|c| c.trim().to_owned())
                    .unwrap_or_default(),
                "procfs",
            ),
        };
        let trigger_cgroup = self.cgroup_label(k.trigger.cgroup_id);
        self.metrics
            .oom_kills
            .with_label_values(&[victim_cgroup.as_str()])
            .inc();
        tracing::warn!(
            victim_pid = k.victim_pid,
            victim_comm = %victim_comm,
            victim_cgroup = %victim_cgroup,
            victim_cgroup_from = source,
            trigger = %k.trigger.comm,
            trigger_pid = k.trigger.tgid,
            trigger_cgroup = %trigger_cgroup,
            "OOM kill"
        );
        self.traces.event_span(
            "oom.kill",
            self.clock.wall(k.timestamp_ns),
            vec![
                KeyValue::new("cgroup.path", victim_cgroup),
                KeyValue::new("oom.victim.pid", i64::from(k.victim_pid)),
                KeyValue::new("oom.victim.command", victim_comm),
                KeyValue::new("oom.victim.cgroup_source", source),
                KeyValue::new("oom.trigger.pid", i64::from(k.trigger.tgid)),
                KeyValue::new("oom.trigger.command", k.trigger.comm.clone()),
                KeyValue::new("oom.trigger.cgroup", trigger_cgroup),
            ],
        );
    }
}

/// Span attributes for a Kubernetes identity (OpenTelemetry semantic conventions where they exist).
fn k8s_attributes(id: &k8s::Identity) -> Vec<KeyValue> {
    let mut a = vec![
        KeyValue::new("k8s.pod.uid", id.pod_uid.clone()),
        KeyValue::new("k8s.pod.qos_class", id.qos.as_str()),
    ];
    if let Some(c) = &id.container {
        a.push(KeyValue::new("container.id", c.id.clone()));
    }
    a
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
