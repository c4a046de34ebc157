//! Prometheus metrics (`GET /metrics`), through the `metrics` facade. Request metrics carry an
//! `adapter` label: "base" for the base model, the adapter's id once it was downloaded
//! successfully, and the fixed "unknown" otherwise (adapters that failed or are still being
//! fetched, and any beyond `MAX_ADAPTER_LABELS`), so labels stay bounded and hold only names the
//! shard accepted. Tokens never reach a label.

use crate::adapter::AdapterKey;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::collections::{HashMap, HashSet};
use std::sync::{OnceLock, RwLock};
use std::time::Duration;
use tokio::time::Instant;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The label of requests whose adapter has no label of its own.
pub const UNKNOWN_ADAPTER: &str = "unknown";
/// Most distinct adapter labels.
pub const MAX_ADAPTER_LABELS: usize = 1000;

/// Adapter names that were downloaded successfully (each becomes a label).
fn labels() -> &'static RwLock<HashSet<String>> {
    static LABELS: OnceLock<RwLock<HashSet<String>>> = OnceLock::new();
    LABELS.get_or_init(|| RwLock::new(HashSet::new()))
}

/// Gives a successfully downloaded adapter its own label; returns the label to use for it.
pub fn register_adapter_label(name: &str) -> String {
    let Ok(mut set) = labels().write() else {
        return UNKNOWN_ADAPTER.to_string();
    };
    if set.contains(name) || set.len() < MAX_ADAPTER_LABELS {
        set.insert(name.to_string());
        name.to_string()
    } else {
        UNKNOWN_ADAPTER.to_string()
    }
}

const DURATION_BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const TOKEN_BUCKETS: [f64; 12] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0,
];

/// Histograms of counts (inputs, entities) that no suffix above gives buckets: without them
/// the exporter would render summaries.
const COUNT_HISTOGRAMS: [&str; 3] = [
    "lorax_request_input_count",
    "lorax_request_classify_output_count",
    "lorax_encoder_call_inputs",
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
                .and_then(|b| {
                    COUNT_HISTOGRAMS.iter().try_fold(b, |b, name| {
                        b.set_buckets_for_metric(Matcher::Full(name.to_string()), &TOKEN_BUCKETS)
                    })
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
        "lorax_batch_decode_steps",
        "Decode steps run (a Decode call runs up to --decode-steps-per-call)"
    );
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
    describe_histogram!(
        "lorax_adapter_load_duration",
        "Seconds from the start of an adapter's download (first time) or load until it is active"
    );
    describe_counter!(
        "lorax_adapter_failure",
        "Adapters that failed to download or load, by the shard's status code"
    );
    describe_gauge!("lorax_adapter_queue_size", "Requests waiting, per adapter");
    describe_gauge!(
        "lorax_adapters_active",
        "Adapters holding a device slot (loading or active)"
    );
    describe_histogram!(
        "lorax_request_input_count",
        "Inputs per embedding or classification request"
    );
    describe_histogram!(
        "lorax_request_classify_output_count",
        "Entities found per classified input"
    );
    describe_gauge!(
        "lorax_encoder_queue_size",
        "Embedding and classification inputs waiting for a shard call"
    );
    describe_histogram!(
        "lorax_encoder_call_inputs",
        "Inputs per Embed/Classify call (several requests share calls)"
    );
}

/// The `adapter` label of a request for `adapter` (None: the base model).
pub fn adapter_label(adapter: Option<&AdapterKey>) -> String {
    let Some(key) = adapter else {
        return "base".to_string();
    };
    let name = key.describe();
    match labels().read() {
        Ok(set) if set.contains(&name) => name,
        _ => UNKNOWN_ADAPTER.to_string(),
    }
}

/// An adapter became active `seconds` after its download (first time) or load started.
pub fn adapter_loaded(label: &str, seconds: f64) {
    metrics::histogram!("lorax_adapter_load_duration", "adapter" => label.to_string())
        .record(seconds);
}

/// An adapter failed to download or load (labelled by the shard's status code only).
pub fn adapter_failed(code: tonic::Code) {
    let code = format!("{code:?}");
    metrics::counter!("lorax_adapter_failure", "code" => code).increment(1);
}

/// Sets the per-adapter queue gauges; labels seen before and absent now drop to 0.
pub fn adapter_queue_sizes(sizes: &HashMap<String, usize>, previous: &mut HashSet<String>) {
    for label in previous.iter() {
        if !sizes.contains_key(label) {
            metrics::gauge!("lorax_adapter_queue_size", "adapter" => label.clone()).set(0.0);
        }
    }
    for (label, size) in sizes {
        metrics::gauge!("lorax_adapter_queue_size", "adapter" => label.clone()).set(*size as f64);
    }
    *previous = sizes.keys().cloned().collect();
}

/// A request for `adapter` failed. Request counts are recorded when a request ends, so that
/// its label is known (an adapter gets its own label only once it was downloaded).
pub fn request_failed(adapter: Option<&AdapterKey>, error_type: &str) {
    let a = adapter_label(adapter);
    metrics::counter!("lorax_request_count", "adapter" => a.clone()).increment(1);
    metrics::counter!(
        "lorax_request_failure",
        "adapter" => a,
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
    /// Timings of a request received at `received`, queued at `queued` and put in a batch at
    /// `batched`, measured now (at its end).
    pub fn new(
        received: Instant,
        queued: Instant,
        batched: Instant,
        prompt_tokens: u32,
        generated_tokens: u32,
    ) -> Self {
        Self {
            total: received.elapsed(),
            validation: queued.saturating_duration_since(received),
            queue: batched.saturating_duration_since(queued),
            inference: batched.elapsed(),
            prompt_tokens,
            generated_tokens,
        }
    }

    pub fn time_per_token(&self) -> Duration {
        self.inference / self.generated_tokens.max(1)
    }
}

/// An embedding or classification request (`task`: embed, classify) of `inputs` inputs was
/// answered. Counted as requests of the base model like generations (count, success and the
/// time histograms); its prompt tokens are all its inputs' tokens. Nothing is generated, so the
/// generated-token histograms are left alone.
pub fn encoder_request_succeeded(task: &str, t: &RequestTimings, inputs: usize) {
    let a = adapter_label(None);
    tracing::info!(
        task,
        inputs,
        total_ms = t.total.as_millis() as u64,
        queue_ms = t.queue.as_millis() as u64,
        inference_ms = t.inference.as_millis() as u64,
        prompt_tokens = t.prompt_tokens,
        "request answered"
    );
    record_answered(&a, t);
    metrics::histogram!("lorax_request_input_count").record(inputs as f64);
}

/// What every answered request records: its count, success, times and prompt tokens.
fn record_answered(a: &str, t: &RequestTimings) {
    metrics::counter!("lorax_request_count", "adapter" => a.to_string()).increment(1);
    metrics::counter!("lorax_request_success", "adapter" => a.to_string()).increment(1);
    let seconds = [
        ("lorax_request_duration", t.total),
        ("lorax_request_validation_duration", t.validation),
        ("lorax_request_queue_duration", t.queue),
        ("lorax_request_inference_duration", t.inference),
    ];
    for (name, value) in seconds {
        metrics::histogram!(name, "adapter" => a.to_string()).record(value.as_secs_f64());
    }
    metrics::histogram!("lorax_request_input_length", "adapter" => a.to_string())
        .record(t.prompt_tokens as f64);
}

/// A request for `adapter` was answered (logged in the caller's span, so with its trace id).
pub fn request_succeeded(adapter: Option<&AdapterKey>, t: &RequestTimings) {
    let a = adapter_label(adapter);
    tracing::info!(
        adapter = %a,
        total_ms = t.total.as_millis() as u64,
        queue_ms = t.queue.as_millis() as u64,
        inference_ms = t.inference.as_millis() as u64,
        prompt_tokens = t.prompt_tokens,
        generated_tokens = t.generated_tokens,
        "request answered"
    );
    record_answered(&a, t);
    metrics::histogram!("lorax_request_mean_time_per_token_duration", "adapter" => a.clone())
        .record(t.time_per_token().as_secs_f64());
    metrics::histogram!("lorax_request_generated_tokens", "adapter" => a)
        .record(t.generated_tokens as f64);
}
