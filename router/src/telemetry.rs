//! Logs and traces. Every span is an OpenTelemetry span (W3C trace context); with
//! `--otlp-endpoint` they are exported over OTLP/gRPC in batches, otherwise they only give the
//! JSON log lines their `trace_id`. The trace context crosses to the shards in each call's gRPC
//! metadata (`traceparent`), and an HTTP request's `traceparent` header parents its span.

use axum::http::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{SpanExporter, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::runtime::Tokio;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use std::sync::atomic::{AtomicBool, Ordering};
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Whether spans leave the process (`--otlp-endpoint` with a working exporter). Without it, spans
/// only label log lines, so the per-step links to every request are not worth building.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The tracer provider; `shutdown` flushes the spans not exported yet.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    pub fn shutdown(self) {
        if let Err(err) = self.provider.shutdown() {
            eprintln!("trace export did not shut down cleanly: {err}");
        }
    }
}

/// Installs the global subscriber: `RUST_LOG` filter (default info), text or JSON log lines,
/// and the OpenTelemetry layer. Must run inside the Tokio runtime (the exporter uses it).
pub fn init(service: &'static str, json: bool, otlp_endpoint: Option<&str>) -> Telemetry {
    let mut builder = SdkTracerProvider::builder()
        .with_resource(Resource::builder().with_service_name(service).build());
    let mut export_error = None;
    if let Some(endpoint) = otlp_endpoint {
        match SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
        {
            Ok(exporter) => {
                builder = builder
                    .with_span_processor(BatchSpanProcessor::builder(exporter, Tokio).build());
                EXPORTING.store(true, Ordering::Relaxed);
            }
            Err(err) => export_error = Some(err.to_string()),
        }
    }
    let provider = builder.build();
    let tracer = provider.tracer(service);
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = if json {
        tracing_subscriber::fmt::layer().json().boxed()
    } else {
        tracing_subscriber::fmt::layer().boxed()
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(tracing_opentelemetry::layer().with_tracer(tracer))
        .init();
    match (otlp_endpoint, export_error) {
        (Some(endpoint), None) => tracing::info!("exporting traces to {endpoint}"),
        (Some(endpoint), Some(err)) => {
            tracing::error!("cannot export traces to {endpoint}: {err}")
        }
        (None, _) => {}
    }
    Telemetry { provider }
}

/// Sets `span`'s parent from an HTTP request's `traceparent` header (when it has one), then
/// records its trace id in its `trace_id` field.
pub fn continue_from(span: &Span, headers: &HeaderMap) {
    let parent = TraceContextPropagator::new().extract(&HeaderCarrier(headers));
    if parent.span().span_context().is_valid() {
        span.set_parent(parent);
    }
    record_trace_id(span);
}

/// Fills the span's `trace_id` field, so that JSON log lines written inside it carry the id.
pub fn record_trace_id(span: &Span) {
    let context = span.context();
    let span_context = context.span().span_context().clone();
    if span_context.is_valid() {
        span.record("trace_id", span_context.trace_id().to_string());
    }
}

/// Links `span` to another span (a batch step to the requests it serves).
pub fn link(span: &Span, to: &Span) {
    let context = to.context();
    let target = context.span().span_context().clone();
    if target.is_valid() {
        span.add_link_with_attributes(target, vec![KeyValue::new("lorax.link", "request")]);
    }
}

/// Writes the current span's context into outgoing gRPC metadata (`traceparent`).
pub fn inject_current(metadata: &mut MetadataMap) {
    let context: Context = Span::current().context();
    TraceContextPropagator::new().inject_context(&context, &mut MetadataCarrier(metadata));
}

struct HeaderCarrier<'a>(&'a HeaderMap);

impl Extractor for HeaderCarrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct MetadataCarrier<'a>(&'a mut MetadataMap);

impl Injector for MetadataCarrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) else {
            return;
        };
        self.0.insert(key, value);
    }
}
