//! Prometheus metrics (`GET /metrics`), through the `metrics` facade. Request metrics carry an
//! `adapter` label ("base" for the base model) so per-adapter views work once adapters land.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::OnceLock;
use std::time::Duration;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

const DURATION_BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const TOKEN_BUCKETS: [f64; 12] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0,
];

/// Installs the global recorder once per process and returns the handle that renders it.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("duration".into()), &DURATION_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("tokens".into()), &TOKEN_BUCKETS)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Suffix("length".into()), &TOKEN_BUCKETS)
                })
                .expect("valid buckets")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed");
            }
            describe();
            handle
        })
        .clone()
}

/// Periodically drains histogram storage (required when the recorder is built by hand).
pub fn spawn_upkeep(handle: PrometheusHandle) {
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_secs(5));
        loop {
            interval.tick().await;
            handle.run_upkeep();
        }
    });
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!("lorax_request_count", "Generation requests received");
    describe_counter!("lorax_request_success", "Generation requests answered");
    describe_counter!(
        "lorax_request_failure",
        "Generation requests failed, by error type"
    );
    describe_histogram!("lorax_request_duration", "End-to-end request time (s)");
    describe_histogram!("lorax_request_validation_duration", "Validation time (s)");
    describe_histogram!(
        "lorax_request_queue_duration",
        "Time waiting in the queue (s)"
    );
    describe_histogram!("lorax_request_inference_duration", "Time in a batch (s)");
    describe_histogram!(
        "lorax_request_mean_time_per_token_duration",
        "Inference time per generated token (s)"
    );
    describe_histogram!(
        "lorax_request_generated_tokens",
        "Tokens generated per request"
    );
    describe_histogram!("lorax_request_input_length", "Prompt tokens per request");
    describe_gauge!("lorax_queue_size", "Requests waiting in the queue");
    describe_gauge!("lorax_batch_current_size", "Requests in the running batch");
    describe_gauge!(
        "lorax_batch_current_max_tokens",
        "KV-cache tokens reserved by the running batch"
    );
    describe_counter!("lorax_batch_inference_count", "Prefill/decode calls");
    describe_counter!(
        "lorax_batch_inference_success",
        "Prefill/decode calls that succeeded"
    );
    describe_counter!(
        "lorax_batch_inference_failure",
        "Prefill/decode calls that failed"
    );
    describe_histogram!(
        "lorax_batch_inference_duration",
        "Prefill/decode call time (s)"
    );
}

/// The `adapter` label of a request.
pub fn adapter_label(adapter_id: Option<&str>) -> String {
    match adapter_id {
        Some(id) if !id.is_empty() => id.to_string(),
        _ => "base".to_string(),
    }
}

pub fn request_received(adapter: &str) {
    metrics::counter!("lorax_request_count", "adapter" => adapter.to_string()).increment(1);
}

pub fn request_failed(adapter: &str, error_type: &str) {
    metrics::counter!(
        "lorax_request_failure",
        "adapter" => adapter.to_string(),
        "err" => error_type.to_string()
    )
    .increment(1);
}

/// Timings of one answered request.
#[derive(Debug, Clone, Copy)]
pub struct RequestTimings {
    pub total: Duration,
    pub validation: Duration,
    pub queue: Duration,
    pub inference: Duration,
    pub prompt_tokens: u32,
    pub generated_tokens: u32,
}

impl RequestTimings {
    pub fn time_per_token(&self) -> Duration {
        self.inference / self.generated_tokens.max(1)
    }
}

pub fn request_succeeded(adapter: &str, t: &RequestTimings) {
    let a = adapter.to_string();
    metrics::counter!("lorax_request_success", "adapter" => a.clone()).increment(1);
    let seconds = [
        ("lorax_request_duration", t.total),
        ("lorax_request_validation_duration", t.validation),
        ("lorax_request_queue_duration", t.queue),
        ("lorax_request_inference_duration", t.inference),
        (
            "lorax_request_mean_time_per_token_duration",
            t.time_per_token(),
        ),
    ];
    for (name, value) in seconds {
        metrics::histogram!(name, "adapter" => a.clone()).record(value.as_secs_f64());
    }
    metrics::histogram!("lorax_request_generated_tokens", "adapter" => a.clone())
        .record(t.generated_tokens as f64);
    metrics::histogram!("lorax_request_input_length", "adapter" => a)
        .record(t.prompt_tokens as f64);
}
