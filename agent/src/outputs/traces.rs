//! OpenTelemetry traces: one span per event, and one trace per OOM incident whose kills are its
//! children.
//!
//! Traces go over OTLP/HTTP (protobuf) when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set; otherwise no exporter runs and spans cost nothing.

use std::time::{Duration, SystemTime};

use std::hash::{Hash as _, Hasher as _};

use opentelemetry::{
    Context, KeyValue,
    trace::{
        Span as _, SpanContext, SpanId, SpanKind, TraceContextExt as _, TraceFlags, TraceId,
        TraceState, Tracer as _, TracerProvider as _,
    },
};
use opentelemetry_sdk::{
    Resource,
    trace::{SdkTracerProvider, Tracer},
};

use crate::model::{
    contention::Episode,
    record::{
        Decision, GoFatal, GuardDenial, K8s, LimitWrite, OomIncident, OomKill, OomLimit, Process,
    },
};

/// The trace and span ids of a limit write's span, from what both its record and a decision
/// about it carry: the decision's span becomes its child without anything passed between the
/// threads. A write that caused an OOM incident is in the incident's trace.
fn write_ids(
    cgroup: &str,
    limit: &str,
    time_unix_nano: u64,
    incident: Option<&str>,
) -> (TraceId, SpanId) {
    let hash = |salt: u8| {
        let mut h = std::hash::DefaultHasher::new();
        (salt, cgroup, limit, time_unix_nano).hash(&mut h);
        h.finish()
    };
    let trace = incident
        .and_then(|i| TraceId::from_hex(i).ok())
        .unwrap_or_else(|| {
            TraceId::from_bytes(((u128::from(hash(1)) << 64) | u128::from(hash(2))).to_be_bytes())
        });
    (trace, SpanId::from_bytes(hash(3).to_be_bytes()))
}

/// The root span of an incident's trace while the incident is open (nothing without an
/// exporter).
#[derive(Debug)]
pub struct IncidentTrace {
    span: Option<opentelemetry_sdk::trace::Span>,
}

/// The trace pipeline, or nothing when no endpoint is configured. Clones share it.
#[derive(Debug, Clone)]
pub struct Traces {
    provider: Option<SdkTracerProvider>,
    tracer: Option<Tracer>,
}

/// Whether the environment names an OTLP endpoint.
fn endpoint_configured() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()))
}

impl Traces {
    /// Builds the OTLP exporter from the standard environment variables. Must be called outside
    /// an async context: the HTTP client it makes is a blocking one.
    pub fn init() -> Result<Self, opentelemetry_otlp::ExporterBuildError> {
        if !endpoint_configured() {
            tracing::info!("traces: OTEL_EXPORTER_OTLP_ENDPOINT not set, no spans exported");
            return Ok(Self {
                provider: None,
                tracer: None,
            });
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(Resource::builder().with_service_name("nodewarden").build())
            .build();
        let tracer = provider.tracer("nodewarden");
        tracing::info!("traces: exporting spans over OTLP/HTTP");
        Ok(Self {
            provider: Some(provider),
            tracer: Some(tracer),
        })
    }

    /// No exporter: spans cost nothing (tests).
    #[cfg(test)]
    #[must_use]
    pub fn disabled() -> Self {
        Self {
            provider: None,
            tracer: None,
        }
    }

    /// Records an instantaneous span: a kernel event that happened at `at`.
    fn event_span(&self, name: &'static str, at: SystemTime, attributes: Vec<KeyValue>) {
        let Some(tracer) = &self.tracer else {
            return;
        };
        let mut span = tracer
            .span_builder(name)
            .with_kind(SpanKind::Internal)
            .with_start_time(at)
            .with_attributes(attributes)
            .start(tracer);
        span.end_with_timestamp(at);
    }

    /// Starts the root span of a trace whose id is `trace_id` (32 hex digits): an incident,
    /// whose events become its children, and which ends when the incident does.
    fn start_trace(
        &self,
        name: &'static str,
        trace_id: &str,
        at: SystemTime,
        attributes: Vec<KeyValue>,
    ) -> IncidentTrace {
        let Some(tracer) = &self.tracer else {
            return IncidentTrace { span: None };
        };
        let mut builder = tracer
            .span_builder(name)
            .with_kind(SpanKind::Internal)
            .with_start_time(at)
            .with_attributes(attributes);
        if let Ok(id) = TraceId::from_hex(trace_id) {
            builder = builder.with_trace_id(id);
        }
        IncidentTrace {
            span: Some(builder.start(tracer)),
        }
    }

    /// An instantaneous span at `at`, a child of `trace`'s root span.
    fn child_span(
        &self,
        trace: &IncidentTrace,
        name: &'static str,
        at: SystemTime,
        attributes: Vec<KeyValue>,
    ) {
        let (Some(tracer), Some(root)) = (&self.tracer, &trace.span) else {
            return;
        };
        let parent = Context::new().with_remote_span_context(root.span_context().clone());
        let mut span = tracer.build_with_context(
            tracer
                .span_builder(name)
                .with_kind(SpanKind::Internal)
                .with_start_time(at)
                .with_attributes(attributes),
            &parent,
        );
        span.end_with_timestamp(at);
    }

    /// Ends `trace`'s root span at `at`, with attributes known only at the end.
    fn end_trace(trace: Option<IncidentTrace>, at: SystemTime, attributes: Vec<KeyValue>) {
        if let Some(mut span) = trace.and_then(|t| t.span) {
            span.set_attributes(attributes);
            span.end_with_timestamp(at);
        }
    }

    /// Exports what is buffered and stops, waiting at most `timeout`. Blocking: call it outside
    /// the async runtime.
    pub fn shutdown(&self, timeout: Duration) {
        if let Some(provider) = &self.provider
            && let Err(e) = provider.shutdown_with_timeout(timeout)
        {
            tracing::warn!("traces: flushing at shutdown: {e}");
        }
    }
}

/// Wall-clock time of a record's timestamp.
fn at(unix_nano: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_nanos(unix_nano)
}

/// A span attribute from a count (saturating into OpenTelemetry's i64).
fn int(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Traces {
    /// A limit write: a span whose ids decisions about it find again; in its incident's trace
    /// (a child of its root) when it caused one.
    pub fn limit_write(&self, r: &LimitWrite, incident: Option<&IncidentTrace>) {
        let Some(tracer) = &self.tracer else {
            return;
        };
        let unknown = || "unknown".to_owned();
        let mut a = vec![
            KeyValue::new("cgroup.path", r.cgroup.clone()),
            KeyValue::new("cgroup.limit", r.limit.file_name()),
            KeyValue::new("cgroup.limit.value", r.value.clone()),
            KeyValue::new("cgroup.limit.old", r.old.clone().unwrap_or_else(unknown)),
            KeyValue::new("cgroup.limit.new", r.new.clone().unwrap_or_else(unknown)),
            KeyValue::new("cgroup.limit.result", r.result.clone()),
            KeyValue::new("cgroup.limit.seen_by", r.seen_by.as_str()),
        ];
        if let Some(w) = &r.writer {
            a.extend(process_attributes("process", w));
        }
        if let Some(i) = &r.incident {
            a.push(KeyValue::new("oom.incident.id", i.clone()));
        }
        a.extend(k8s_attributes(r.k8s.as_ref()));
        let (trace_id, span_id) = write_ids(
            &r.cgroup,
            r.limit.file_name(),
            r.time_unix_nano,
            r.incident.as_deref(),
        );
        let when = at(r.time_unix_nano);
        let builder = tracer
            .span_builder("cgroup.limit_write")
            .with_kind(SpanKind::Internal)
            .with_start_time(when)
            .with_trace_id(trace_id)
            .with_span_id(span_id)
            .with_attributes(a);
        let parent = incident
            .and_then(|t| t.span.as_ref())
            .map_or_else(Context::new, |root| {
                Context::new().with_remote_span_context(root.span_context().clone())
            });
        let mut span = tracer.build_with_context(builder, &parent);
        span.end_with_timestamp(when);
    }

    /// A decision about a watched limit: a child of the write's span when a write led to it
    /// (and so in its incident's trace), else a span of its own.
    pub fn decision(&self, d: &Decision) {
        let Some(tracer) = &self.tracer else {
            return;
        };
        let mut a = vec![
            KeyValue::new("cgroup.path", d.cgroup.clone()),
            KeyValue::new("cgroup.limit", d.limit.file_name()),
            KeyValue::new("cgroup.limit.value", d.value.clone()),
            KeyValue::new("remediation.rule", d.rule.clone()),
            KeyValue::new("remediation.mode", d.mode.as_str()),
            KeyValue::new("remediation.verdict", d.verdict.as_str()),
        ];
        if let Some(r) = d.reason {
            a.push(KeyValue::new("remediation.reason", r.as_str()));
        }
        if let (Some(v), Some(s)) = (&d.desired, d.desired_source) {
            a.push(KeyValue::new("remediation.desired", v.clone()));
            a.push(KeyValue::new("remediation.desired_source", s.as_str()));
        }
        if let Some(o) = &d.outcome {
            a.push(KeyValue::new("remediation.result", o.label()));
            match o {
                crate::model::heal::Outcome::Restored {
                    read_back,
                    latency_seconds,
                } => {
                    a.push(KeyValue::new("remediation.read_back", read_back.clone()));
                    a.push(KeyValue::new(
                        "remediation.latency_seconds",
                        *latency_seconds,
                    ));
                }
                crate::model::heal::Outcome::Failed { error } => {
                    a.push(KeyValue::new("remediation.error", error.clone()));
                }
                _ => {}
            }
        }
        if let Some(i) = &d.incident {
            a.push(KeyValue::new("oom.incident.id", i.clone()));
        }
        a.extend(k8s_attributes(d.k8s.as_ref()));
        let start = at(d.time_unix_nano);
        let builder = tracer
            .span_builder("cgroup.limit_remediation")
            .with_kind(SpanKind::Internal)
            .with_start_time(start)
            .with_attributes(a);
        let parent = d.write_time_unix_nano.map_or_else(Context::new, |t| {
            let (trace_id, span_id) =
                write_ids(&d.cgroup, d.limit.file_name(), t, d.incident.as_deref());
            Context::new().with_remote_span_context(SpanContext::new(
                trace_id,
                span_id,
                TraceFlags::SAMPLED,
                true,
                TraceState::default(),
            ))
        });
        let mut span = tracer.build_with_context(builder, &parent);
        span.end_with_timestamp(SystemTime::now());
    }

    /// A guard denial (or would-deny): a span of its own, the opener's attributes on it.
    pub fn guard_denial(&self, d: &GuardDenial) {
        let mut a = vec![
            KeyValue::new("cgroup.path", d.cgroup.clone()),
            KeyValue::new("cgroup.limit", d.limit.file_name()),
            KeyValue::new("remediation.rule", d.rule.clone()),
            KeyValue::new("guard.result", d.result.as_str()),
        ];
        a.extend(process_attributes("process", &d.writer));
        a.extend(k8s_attributes(d.k8s.as_ref()));
        self.event_span("cgroup.guard_denial", at(d.time_unix_nano), a);
    }

    pub fn go_fatal(&self, r: &GoFatal) {
        let mut a = vec![
            KeyValue::new("cgroup.path", r.cgroup.clone()),
            KeyValue::new("go.fatal.reason", r.reason.clone()),
            KeyValue::new("go.fatal.function", r.function.clone()),
        ];
        a.extend(process_attributes("process", &r.process));
        a.extend(k8s_attributes(r.k8s.as_ref()));
        self.event_span("go.fatal_error", at(r.time_unix_nano), a);
    }

    /// The root span of an incident opened by kill `r` (its trace id is the incident's id).
    pub fn incident_opened(&self, r: &OomKill) -> IncidentTrace {
        let mut a = limit_attributes(&r.limit);
        a.push(KeyValue::new("oom.incident.id", r.incident.clone()));
        a.extend(process_attributes("oom.trigger", &r.trigger));
        self.start_trace("oom.incident", &r.incident, at(r.time_unix_nano), a)
    }

    /// A kill: a span in its incident's trace (or of its own without one).
    pub fn oom_kill(&self, r: &OomKill, trace: Option<&IncidentTrace>) {
        let mut a = vec![
            KeyValue::new("cgroup.path", r.cgroup.clone()),
            KeyValue::new("oom.incident.id", r.incident.clone()),
            KeyValue::new("oom.victim.pid", i64::from(r.victim.pid)),
            KeyValue::new("oom.victim.command", r.victim.comm.clone()),
            KeyValue::new("oom.victim.cgroup_source", r.victim.cgroup_source.as_str()),
        ];
        if let Some(m) = r.victim.memory {
            for (key, bytes) in [
                ("oom.victim.anon_rss_bytes", m.anon_rss_bytes),
                ("oom.victim.file_rss_bytes", m.file_rss_bytes),
                ("oom.victim.shmem_rss_bytes", m.shmem_rss_bytes),
                ("oom.victim.swap_bytes", m.swap_bytes),
                ("oom.victim.total_vm_bytes", m.total_vm_bytes),
            ] {
                a.push(KeyValue::new(key, int(bytes)));
            }
            a.push(KeyValue::new(
                "oom.victim.oom_score_adj",
                i64::from(m.oom_score_adj),
            ));
        }
        a.extend(limit_attributes(&r.limit));
        a.extend(process_attributes("oom.trigger", &r.trigger));
        a.extend(k8s_attributes(r.k8s.as_ref()));
        match trace {
            Some(t) => self.child_span(t, "oom.kill", at(r.time_unix_nano), a),
            None => self.event_span("oom.kill", at(r.time_unix_nano), a),
        }
    }

    /// An incident ended: its root span ends at its last kill.
    pub fn incident_closed(r: &OomIncident, trace: Option<IncidentTrace>) {
        let victims = i64::try_from(r.victims.len()).unwrap_or(i64::MAX);
        Self::end_trace(
            trace,
            at(r.end_unix_nano),
            vec![KeyValue::new("oom.incident.victims", victims)],
        );
    }

    /// A futex word with a new long wait: a span with its symbolized stack.
    pub fn contention(&self, e: &Episode) {
        let l = &e.lock;
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
        self.event_span("futex.contention", SystemTime::now(), a);
    }
}

/// Span attributes for the limit an OOM kill hit.
fn limit_attributes(l: &OomLimit) -> Vec<KeyValue> {
    let mut a = vec![
        KeyValue::new("oom.limit.cgroup", l.cgroup.clone()),
        KeyValue::new("oom.limit.scope", l.scope.as_str()),
        KeyValue::new("oom.limit.constraint", l.constraint.kernel_name()),
        KeyValue::new("oom.limit.found_by", l.found_by.as_str()),
    ];
    for (key, bytes) in [
        ("oom.limit.usage_bytes", l.usage_bytes),
        ("oom.limit.limit_bytes", l.limit_bytes),
    ] {
        if let Some(b) = bytes {
            a.push(KeyValue::new(key, int(b)));
        }
    }
    a
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
        KeyValue::new("k8s.pod.qos_class", k.qos.as_str()),
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
