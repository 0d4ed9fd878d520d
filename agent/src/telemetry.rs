//! Logs (tracing, with aya-log's and other `log` records bridged in) and OpenTelemetry traces.
//!
//! Traces go over OTLP/HTTP (protobuf) when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set; otherwise no exporter runs and spans cost nothing.

use std::time::{Duration, SystemTime};

use opentelemetry::{
    Context, KeyValue,
    trace::{Span as _, SpanKind, TraceContextExt as _, TraceId, Tracer as _, TracerProvider as _},
};
use opentelemetry_sdk::{
    Resource,
    trace::{SdkTracerProvider, Tracer},
};
use tracing_subscriber::EnvFilter;

/// Installs the log subscriber: `RUST_LOG` filters (default `info`), output to stderr.
pub fn init_logs() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // try_init: a second call (tests) keeps the first subscriber.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The root span of an incident's trace while the incident is open (nothing without an
/// exporter).
#[derive(Debug)]
pub struct IncidentTrace {
    span: Option<opentelemetry_sdk::trace::Span>,
}

/// The trace pipeline, or nothing when no endpoint is configured.
#[derive(Debug)]
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

    /// Records an instantaneous span: a kernel event that happened at `at`.
    pub fn event_span(&self, name: &'static str, at: SystemTime, attributes: Vec<KeyValue>) {
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
    pub fn start_trace(
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
    pub fn child_span(
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
    pub fn end_trace(trace: Option<IncidentTrace>, at: SystemTime, attributes: Vec<KeyValue>) {
        if let Some(mut span) = trace.and_then(|t| t.span) {
            span.set_attributes(attributes);
            span.end_with_timestamp(at);
        }
    }

    /// Exports what is buffered and stops, waiting at most `timeout`. Blocking: call it outside
    /// the async runtime.
    pub fn shutdown(self, timeout: Duration) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown_with_timeout(timeout)
        {
            tracing::warn!("traces: flushing at shutdown: {e}");
        }
    }
}
