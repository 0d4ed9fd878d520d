//! Where records go: Prometheus counters, the log, OpenTelemetry spans, and the live event feed.

use std::time::{Duration, SystemTime};

use opentelemetry::KeyValue;

use crate::{
    contention::Episode,
    feed::Feed,
    metrics::{Metrics, labelled},
    record::{K8s, OomIncident, OomKill, OomLimit, Process, Record},
    telemetry::{IncidentTrace, Traces},
};

#[derive(Debug)]
pub struct Outputs<'a> {
    pub metrics: Metrics,
    pub traces: &'a Traces,
    pub feed: Feed,
}

impl Outputs<'_> {
    pub fn emit(&self, record: &Record) {
        self.feed.publish(record);
        let at = SystemTime::UNIX_EPOCH + Duration::from_nanos(record.time_unix_nano());
        match record {
            Record::LimitWrite(r) => {
                let who = K8s::who(&r.cgroup, r.k8s.as_ref());
                let [cgroup, namespace, pod, container] = who.labels();
                let writer = r.writer.as_ref().map_or("unknown", |w| w.comm.as_str());
                let values = [
                    cgroup, namespace, pod, container, &r.limit, writer, &r.result,
                ];
                if let Some(c) = labelled(&self.metrics.limit_writes, &values) {
                    c.inc();
                }
                tracing::info!(
                    cgroup = %r.cgroup,
                    limit = %r.limit,
                    value = %r.value,
                    old = r.old.as_deref().unwrap_or("unknown"),
                    new = r.new.as_deref().unwrap_or("unknown"),
                    writer = writer,
                    writer_pid = r.writer.as_ref().map_or(0, |w| w.pid),
                    seen_by = %r.seen_by,
                    result = %r.result,
                    "cgroup limit write"
                );
                let mut a = vec![
                    KeyValue::new("cgroup.path", r.cgroup.clone()),
                    KeyValue::new("cgroup.limit", r.limit.clone()),
                    KeyValue::new("cgroup.limit.value", r.value.clone()),
                    KeyValue::new("cgroup.limit.old", r.old.clone().unwrap_or_else(unknown)),
                    KeyValue::new("cgroup.limit.new", r.new.clone().unwrap_or_else(unknown)),
                    KeyValue::new("cgroup.limit.result", r.result.clone()),
                ];
                a.push(KeyValue::new("cgroup.limit.seen_by", r.seen_by.clone()));
                if let Some(w) = &r.writer {
                    a.extend(process_attributes("process", w));
                }
                a.extend(k8s_attributes(r.k8s.as_ref()));
                self.traces.event_span("cgroup.limit_write", at, a);
            }
            Record::OomKill(r) => self.kill_outputs(r, None),
            Record::OomIncident(r) => Self::incident_end_outputs(r, None),
            Record::GoFatal(r) => {
                let who = K8s::who(&r.cgroup, r.k8s.as_ref());
                let [cgroup, namespace, pod, container] = who.labels();
                if let Some(c) = labelled(
                    &self.metrics.go_fatal_errors,
                    &[cgroup, namespace, pod, container, &r.reason],
                ) {
                    c.inc();
                }
                tracing::warn!(
                    pid = r.process.pid,
                    comm = %r.process.comm,
                    cgroup = %r.cgroup,
                    reason = %r.reason,
                    function = %r.function,
                    "Go fatal error"
                );
                let mut a = vec![
                    KeyValue::new("cgroup.path", r.cgroup.clone()),
                    KeyValue::new("go.fatal.reason", r.reason.clone()),
                    KeyValue::new("go.fatal.function", r.function.clone()),
                ];
                a.extend(process_attributes("process", &r.process));
                a.extend(k8s_attributes(r.k8s.as_ref()));
                self.traces.event_span("go.fatal_error", at, a);
            }
            Record::CgroupCreated(r) | Record::CgroupRemoved(r) => {
                tracing::debug!(cgroup = %r.cgroup, kind = record.kind(), "cgroup change");
            }
        }
    }
}

impl Outputs<'_> {
    /// A new incident (limit hit): counted once, here, and its trace started.
    pub fn oom_incident_opened(&self, r: &OomIncident) -> IncidentTrace {
        let who = K8s::who(&r.limit.cgroup, r.limit.k8s.as_ref());
        let [cgroup, namespace, pod, container] = who.labels();
        if let Some(c) = labelled(
            &self.metrics.oom_incidents,
            &[cgroup, namespace, pod, container, &r.limit.scope],
        ) {
            c.inc();
        }
        let at = SystemTime::UNIX_EPOCH + Duration::from_nanos(r.time_unix_nano);
        let mut a = limit_attributes(&r.limit);
        a.push(KeyValue::new("oom.incident.id", r.id.clone()));
        a.extend(process_attributes("oom.trigger", &r.trigger));
        self.traces.start_trace("oom.incident", &r.id, at, a)
    }

    /// One process killed: fed, counted, logged, and a span in its incident's trace.
    pub fn oom_kill(&self, r: &OomKill, trace: Option<&IncidentTrace>) {
        self.feed.publish(&Record::OomKill(Box::new(r.clone())));
        self.kill_outputs(r, trace);
    }

    /// An incident whose kills stopped: fed and logged with its victims, its trace ended.
    pub fn oom_incident_closed(&self, r: &OomIncident, trace: Option<IncidentTrace>) {
        self.feed.publish(&Record::OomIncident(Box::new(r.clone())));
        Self::incident_end_outputs(r, trace);
    }

    /// A kill's count, log line and span (a span of its own without an incident trace).
    fn kill_outputs(&self, r: &OomKill, trace: Option<&IncidentTrace>) {
        let who = K8s::who(&r.cgroup, r.k8s.as_ref());
        let [cgroup, namespace, pod, container] = who.labels();
        if let Some(c) = labelled(
            &self.metrics.oom_kills,
            &[cgroup, namespace, pod, container, &r.limit.scope],
        ) {
            c.inc();
        }
        let memory = r.victim.memory;
        tracing::warn!(
            victim_pid = r.victim.pid,
            victim_comm = %r.victim.comm,
            victim_cgroup = %r.cgroup,
            victim_cgroup_from = %r.victim.cgroup_source,
            victim_anon_rss_bytes = memory.map(|m| m.anon_rss_bytes),
            victim_oom_score_adj = memory.map(|m| m.oom_score_adj),
            trigger = %r.trigger.comm,
            trigger_pid = r.trigger.pid,
            trigger_cgroup = %r.trigger.cgroup,
            limit_cgroup = %r.limit.cgroup,
            scope = %r.limit.scope,
            constraint = %r.limit.constraint,
            limit_found_by = %r.limit.found_by,
            incident = %r.incident,
            "OOM kill"
        );
        let mut a = vec![
            KeyValue::new("cgroup.path", r.cgroup.clone()),
            KeyValue::new("oom.incident.id", r.incident.clone()),
            KeyValue::new("oom.victim.pid", i64::from(r.victim.pid)),
            KeyValue::new("oom.victim.command", r.victim.comm.clone()),
            KeyValue::new("oom.victim.cgroup_source", r.victim.cgroup_source.clone()),
        ];
        if let Some(m) = memory {
            for (key, bytes) in [
                ("oom.victim.anon_rss_bytes", m.anon_rss_bytes),
                ("oom.victim.file_rss_bytes", m.file_rss_bytes),
                ("oom.victim.shmem_rss_bytes", m.shmem_rss_bytes),
                ("oom.victim.swap_bytes", m.swap_bytes),
                ("oom.victim.total_vm_bytes", m.total_vm_bytes),
            ] {
                a.push(KeyValue::new(key, i64::try_from(bytes).unwrap_or(i64::MAX)));
            }
            a.push(KeyValue::new(
                "oom.victim.oom_score_adj",
                i64::from(m.oom_score_adj),
            ));
        }
        a.extend(limit_attributes(&r.limit));
        a.extend(process_attributes("oom.trigger", &r.trigger));
        a.extend(k8s_attributes(r.k8s.as_ref()));
        let at = SystemTime::UNIX_EPOCH + Duration::from_nanos(r.time_unix_nano);
        match trace {
            Some(t) => self.traces.child_span(t, "oom.kill", at, a),
            None => self.traces.event_span("oom.kill", at, a),
        }
    }

    /// An ended incident's log line; its trace ends.
    fn incident_end_outputs(r: &OomIncident, trace: Option<IncidentTrace>) {
        tracing::warn!(
            incident = %r.id,
            limit_cgroup = %r.limit.cgroup,
            scope = %r.limit.scope,
            constraint = %r.limit.constraint,
            victims = r.victims.len(),
            "OOM incident"
        );
        let end = SystemTime::UNIX_EPOCH + Duration::from_nanos(r.end_unix_nano);
        let victims = i64::try_from(r.victims.len()).unwrap_or(i64::MAX);
        Traces::end_trace(
            trace,
            end,
            vec![KeyValue::new("oom.incident.victims", victims)],
        );
    }
}

impl Outputs<'_> {
    /// A futex word with a new long wait: a span with its symbolized stack.
    pub fn contention_episode(&self, e: &Episode) {
        let l = &e.lock;
        let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let a = vec![
            KeyValue::new("process.pid", i64::from(l.pid)),
            KeyValue::new("process.command", l.comm.clone()),
            KeyValue::new("cgroup.path", l.cgroup.clone()),
            KeyValue::new("futex.address", format!("{:#x}", l.uaddr)),
            KeyValue::new("futex.waits", int(e.new_waits)),
            KeyValue::new("futex.wait_ns", int(e.new_wait_ns)),
            KeyValue::new("futex.max_wait_ns", int(l.max_ns)),
            KeyValue::new("code.stacktrace", l.stack.join("\n")),
        ];
        tracing::debug!(pid = l.pid, comm = %l.comm, max_wait_ns = l.max_ns, "futex contention");
        self.traces
            .event_span("futex.contention", SystemTime::now(), a);
    }
}

/// Span attributes for the limit an OOM kill hit.
fn limit_attributes(l: &OomLimit) -> Vec<KeyValue> {
    let mut a = vec![
        KeyValue::new("oom.limit.cgroup", l.cgroup.clone()),
        KeyValue::new("oom.limit.scope", l.scope.clone()),
        KeyValue::new("oom.limit.constraint", l.constraint.clone()),
        KeyValue::new("oom.limit.found_by", l.found_by.clone()),
    ];
    for (key, bytes) in [
        ("oom.limit.usage_bytes", l.usage_bytes),
        ("oom.limit.limit_bytes", l.limit_bytes),
    ] {
        if let Some(b) = bytes {
            a.push(KeyValue::new(key, i64::try_from(b).unwrap_or(i64::MAX)));
        }
    }
    a
}

fn unknown() -> String {
    "unknown".to_owned()
}

/// `process.*` (OpenTelemetry semantic conventions) or another prefix for a task.
fn process_attributes(prefix: &str, p: &Process) -> Vec<KeyValue> {
    let mut a = vec![
        KeyValue::new(format!("{prefix}.pid"), i64::from(p.pid)),
        KeyValue::new(format!("{prefix}.command"), p.comm.clone()),
        KeyValue::new(format!("{prefix}.cgroup"), p.cgroup.clone()),
    ];
    if prefix == "process" {
        a.push(KeyValue::new("thread.id", i64::from(p.tid)));
    }
    if let Some(exe) = &p.exe {
        a.push(KeyValue::new(
            format!("{prefix}.executable.path"),
            exe.clone(),
        ));
    }
    a
}

/// Span attributes for a Kubernetes identity (OpenTelemetry semantic conventions where they exist).
fn k8s_attributes(k: Option<&K8s>) -> Vec<KeyValue> {
    let Some(k) = k else {
        return Vec::new();
    };
    let mut a = vec![
        KeyValue::new("k8s.pod.uid", k.pod_uid.clone()),
        KeyValue::new("k8s.pod.qos_class", k.qos.clone()),
    ];
    if let Some(c) = &k.container_id {
        a.push(KeyValue::new("container.id", c.clone()));
    }
    for (key, v) in [
        ("k8s.namespace.name", &k.namespace),
        ("k8s.pod.name", &k.pod),
        ("k8s.container.name", &k.container),
    ] {
        if let Some(v) = v {
            a.push(KeyValue::new(key, v.clone()));
        }
    }
    a
}
