//! Helpers shared by the HTTP tests: the axum app over a fake shard, and in-process requests.
#![allow(dead_code)]

use axum::body::{to_bytes, Body, Bytes};
use axum::http::{HeaderMap, Request, StatusCode};
use axum::Router;
use lorax_router::adapter::AdapterConfig;
use lorax_router::api::Info;
use lorax_router::app::AppState;
use lorax_router::batcher::BatcherConfig;
use lorax_router::client::ShardClient;
use lorax_router::cors::CorsOptions;
use lorax_router::encoder::{EncoderConfig, Encoders};
use lorax_router::exchange::ExchangeConfig;
use lorax_router::health::HealthConfig;
use lorax_router::infer::Infer;
use lorax_router::server::router;
use lorax_router::template::ChatTemplate;
use lorax_router::testing::{
    test_encoder_tokenizer, test_tokenizer, AdapterBehaviour, FakeModel, FakeShard,
    FAKE_EMBEDDING_DIM, FAKE_ENCODER_POSITIONS,
};
use lorax_router::validation::{Validation, ValidationLimits};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tower::ServiceExt;

pub fn info() -> Info {
    Info {
        model_id: "test/model".into(),
        model_sha: None,
        model_dtype: "float32".into(),
        model_device_type: "cpu".into(),
        model_pipeline_tag: None,
        architecture: "LlamaForCausalLM".into(),
        quantize: None,
        speculate: 0,
        max_concurrent_requests: 4,
        max_best_of: 2,
        max_stop_sequences: 4,
        max_input_length: 16,
        max_total_tokens: 32,
        waiting_served_ratio: 1.2,
        max_batch_total_tokens: 1000,
        max_batch_prefill_tokens: 100,
        max_waiting_tokens: 20,
        max_active_adapters: 128,
        adapter_cycle_time_s: 2,
        block_size: 1,
        eos_token_ids: vec![2],
        supports_adapters: true,
        supports_generation: true,
        supports_embeddings: false,
        supports_classification: false,
        embedding_dim: 0,
        validation_workers: 1,
        eager_prefill: true,
        version: lorax_router::VERSION,
        sha: None,
        docker_label: None,
        request_logger_url: None,
        default_adapter_id: None,
        adapters: vec![],
    }
}

/// The `/info` of the fake encoder `model` (limits as `info()`'s).
pub fn encoder_info(model: FakeModel) -> Info {
    let FakeModel::Encoder {
        embeddings,
        classification,
    } = model
    else {
        return info();
    };
    Info {
        architecture: "BertModel".into(),
        supports_adapters: false,
        supports_generation: false,
        supports_embeddings: embeddings,
        supports_classification: classification,
        embedding_dim: if embeddings { FAKE_EMBEDDING_DIM } else { 0 },
        eos_token_ids: vec![],
        ..info()
    }
}

/// What an encoder model says about adapters: it takes none.
pub fn encoder_adapter_config() -> AdapterConfig {
    AdapterConfig {
        supports_adapters: false,
        architecture: "BertModel".into(),
        ..adapter_config()
    }
}

/// The app of an encoder model over `shard` (made with `FakeShard::encoder`).
pub fn encoder_app(shard: Arc<FakeShard>, max_concurrent_requests: usize) -> Router {
    let health = HealthConfig::default();
    let adapters = encoder_adapter_config();
    let state = app_state(shard, max_concurrent_requests, adapters, exchange(), health);
    router(state, CorsOptions::default().layer().unwrap())
}

pub fn chat_template() -> ChatTemplate {
    let source = "{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}";
    ChatTemplate::new(source.into(), "<s>".into(), "</s>".into()).unwrap()
}

/// The app with the test model's adapter settings (adapters supported, no default adapter,
/// two slots).
pub fn app(shard: Arc<FakeShard>, max_concurrent_requests: usize) -> Router {
    app_with(shard, max_concurrent_requests, adapter_config(), exchange())
}

pub fn adapter_config() -> AdapterConfig {
    AdapterConfig {
        model_id: "test/model".into(),
        architecture: "LlamaForCausalLM".into(),
        ..Default::default()
    }
}

pub fn exchange() -> ExchangeConfig {
    ExchangeConfig {
        max_active_adapters: 2,
        cycle_time: Duration::from_secs(2),
    }
}

pub fn app_with(
    shard: Arc<FakeShard>,
    max_concurrent_requests: usize,
    adapters: AdapterConfig,
    exchange: ExchangeConfig,
) -> Router {
    app_with_health(
        shard,
        max_concurrent_requests,
        adapters,
        exchange,
        HealthConfig::default(),
    )
}

/// An app whose `/health` uses `health`'s bounds.
pub fn app_with_health(
    shard: Arc<FakeShard>,
    max_concurrent_requests: usize,
    adapters: AdapterConfig,
    exchange: ExchangeConfig,
    health: HealthConfig,
) -> Router {
    let state = app_state(shard, max_concurrent_requests, adapters, exchange, health);
    router(state, CorsOptions::default().layer().unwrap())
}

/// The test model's app with the CORS settings of `cors_args` (`--cors-*` flags).
pub fn app_with_cors(shard: Arc<FakeShard>, cors_args: &[&str]) -> Result<Router, String> {
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        cors: CorsOptions,
    }
    let args = std::iter::once("lorax-router").chain(cors_args.iter().copied());
    let cli = <Cli as clap::Parser>::try_parse_from(args).map_err(|e| e.to_string())?;
    let (adapters, health) = (adapter_config(), HealthConfig::default());
    let state = app_state(shard, 4, adapters, exchange(), health);
    Ok(router(state, cli.cors.layer()?))
}

/// The state the test apps share: the test model over `shard` (the encoder test model when
/// `shard` is an encoder: its tokenizer, its `/info`).
pub fn app_state(
    shard: Arc<FakeShard>,
    max_concurrent_requests: usize,
    adapters: AdapterConfig,
    exchange: ExchangeConfig,
    health: HealthConfig,
) -> AppState {
    let limits = ValidationLimits {
        max_best_of: 2,
        max_stop_sequences: 4,
        max_input_length: 16,
        max_total_tokens: 32,
    };
    let config = BatcherConfig {
        max_batch_prefill_tokens: 100,
        max_batch_total_tokens: 1000,
        max_waiting_tokens: 20,
        decode_steps_per_call: 1,
        waiting_served_ratio: 1.2,
        block_size: 1,
        chunked_prefill: false,
        prefix_caching: false,
        eager_prefill: true,
    };
    let (tokenizer, info) = match shard.model {
        FakeModel::Generating => (test_tokenizer(), info()),
        encoder => (test_encoder_tokenizer(), encoder_info(encoder)),
    };
    let encoder_config = EncoderConfig::new(
        limits.max_input_length,
        FAKE_ENCODER_POSITIONS,
        config.max_batch_prefill_tokens,
    );
    let client: Arc<dyn ShardClient> = shard;
    let validation = Validation::new(tokenizer, limits).with_adapters(adapters);
    let infer = Infer::new(
        client.clone(),
        validation,
        config,
        exchange,
        health,
        max_concurrent_requests,
    );
    let encoders = Encoders::spawn(client.clone(), encoder_config, health);
    AppState {
        infer,
        encoders,
        info: Arc::new(Info {
            max_concurrent_requests,
            ..info
        }),
        client,
        prometheus: lorax_router::metrics::install(),
        chat_template: Some(Arc::new(chat_template())),
    }
}

pub fn fake() -> Arc<FakeShard> {
    Arc::new(FakeShard::new(1000, 1))
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    /// The SSE events' JSON payloads.
    pub fn events(&self) -> Vec<Value> {
        let text = String::from_utf8(self.body.to_vec()).unwrap();
        assert!(text.ends_with("\n\n"), "{text}");
        text.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                let data = e.strip_prefix("data:").unwrap_or_else(|| panic!("{e}"));
                assert!(data.starts_with('{'), "data:{{json}} without a space");
                serde_json::from_str(data).unwrap()
            })
            .collect()
    }
}

pub fn request(
    method: &str,
    uri: &str,
    content_type: Option<&str>,
    body: impl Into<Body>,
) -> Request<Body> {
    let mut builder = Request::builder().method(method).uri(uri);
    if let Some(ct) = content_type {
        builder = builder.header("content-type", ct);
    }
    builder.body(body.into()).unwrap()
}

pub async fn send(app: &Router, req: Request<Body>) -> Answer {
    let response = tokio::time::timeout(Duration::from_secs(10), app.clone().oneshot(req))
        .await
        .expect("answer in time")
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = to_bytes(response.into_body(), usize::MAX).await.unwrap();
    Answer {
        status,
        headers,
        body,
    }
}

pub async fn post(app: &Router, uri: &str, body: Value) -> Answer {
    send(
        app,
        request("POST", uri, Some("application/json"), body.to_string()),
    )
    .await
}

pub async fn get(app: &Router, uri: &str) -> Answer {
    send(app, request("GET", uri, None, Body::empty())).await
}

pub fn assert_error(answer: &Answer, status: u16, error_type: &str) {
    assert_eq!(
        answer.status.as_u16(),
        status,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let body = answer.json();
    assert_eq!(body["error_type"], error_type, "{body}");
    assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()));
}

/// The value of the Prometheus line `line_start value` in `text` (`line_start` is the series with its
/// labels).
pub fn metric_value(text: &str, line_start: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
}

/// A /generate body for "hello" (2 new tokens) with `adapter`'s parameters added.
pub fn generate(adapter: Value) -> Value {
    let mut parameters = json!({"max_new_tokens": 2});
    for (k, v) in adapter.as_object().unwrap() {
        parameters[k] = v.clone();
    }
    json!({"inputs": "hello", "parameters": parameters})
}

/// The generated text of an answer that must be a 200.
pub fn text_of(answer: &Answer) -> String {
    assert_eq!(
        answer.status.as_u16(),
        200,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    answer.json()["generated_text"]
        .as_str()
        .unwrap()
        .to_string()
}

/// An adapter whose download or load fails with `code`.
pub fn failing(code: tonic::Code, message: &str) -> AdapterBehaviour {
    AdapterBehaviour {
        error: Some((code, message.into())),
        ..Default::default()
    }
}
