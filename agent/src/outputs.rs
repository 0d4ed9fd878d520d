//! Where records go: Prometheus counters, the log, OpenTelemetry spans, and the live event feed.

use std::time::{Duration, SystemTime};

use opentelemetry::KeyValue;

use crate::{
    feed::Feed,
    metrics::{Metrics, labelled},
    record::{K8s, Process, Record},
    telemetry::Traces,
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
            Record::OomKill(r) => {
                let who = K8s::who(&r.cgroup, r.k8s.as_ref());
                if let Some(c) = labelled(&self.metrics.oom_kills, &who.labels()) {
                    c.inc();
                }
                tracing::warn!(
                    victim_pid = r.victim.pid,
                    victim_comm = %r.victim.comm,
                    victim_cgroup = %r.cgroup,
                    victim_cgroup_from = %r.victim.cgroup_source,
                    trigger = %r.trigger.comm,
                    trigger_pid = r.trigger.pid,
                    trigger_cgroup = %r.trigger.cgroup,
                    "OOM kill"
                );
                let mut a = vec![
                    KeyValue::new("cgroup.path", r.cgroup.clone()),
                    KeyValue::new("oom.victim.pid", i64::from(r.victim.pid)),
                    KeyValue::new("oom.victim.command", r.victim.comm.clone()),
                    KeyValue::new("oom.victim.cgroup_source", r.victim.cgroup_source.clone()),
                ];
                a.extend(process_attributes("oom.trigger", &r.trigger));
                a.extend(k8s_attributes(r.k8s.as_ref()));
                self.traces.event_span("oom.kill", at, a);
            }
            Record::CgroupCreated(r) | Record::CgroupRemoved(r) => {
                tracing::debug!(cgroup = %r.cgroup, kind = record.kind(), "cgroup change");
            }
        }
    }
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
