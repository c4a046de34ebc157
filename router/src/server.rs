//! HTTP routes and handlers (LoRAX's REST API): generation (plain, SSE stream, and the `POST /`
//! compat endpoint), health, info, metrics, tokenize, and the API docs.

use crate::adapter::{AdapterKey, ApiToken};
use crate::adapters_api;
use crate::api::{
    BestOfSequence, CompatGenerateRequest, Details, ErrorResponse, GenerateRequest,
    GenerateResponse, Info, StreamDetails, StreamResponse, TokenizeRequest,
};
use crate::client::ShardClient;
use crate::errors::{method_not_allowed, not_found, ApiError, InferError, JsonBody};
use crate::infer::{GenerationStream, Infer, InferResponse, InferStreamResponse};
use crate::metrics::{self as m, RequestTimings};
use crate::openai;
use crate::openapi;
use crate::registry::AdapterState;
use crate::template::ChatTemplate;
use crate::validation::ValidationError;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{Stream, StreamExt};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tower_http::cors::{AllowOrigin, CorsLayer};

/// How long `GET /health` waits for the shards.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(10);

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub infer: Infer,
    pub info: Arc<Info>,
    pub client: Arc<dyn ShardClient>,
    pub prometheus: PrometheusHandle,
    /// The tokenizer's chat template, when it has one.
    pub chat_template: Option<Arc<ChatTemplate>>,
}

/// The application: every route, JSON fallbacks for unknown paths and methods, CORS.
pub fn router(state: AppState, cors_allow_origin: &[String]) -> Router {
    let origins: Vec<HeaderValue> = cors_allow_origin
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    let allow_origin = if origins.is_empty() {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins)
    };
    let cors = CorsLayer::new()
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([CONTENT_TYPE])
        .allow_origin(allow_origin);
    Router::new()
        // As in LoRAX: `GET /` (inference API) and `GET /ping` (SageMaker) are health checks.
        .route("/", get(health).post(compat_generate))
        .route("/generate", post(generate))
        .route("/generate_stream", post(generate_stream))
        .route("/health", get(health))
        .route("/ping", get(health))
        .route("/info", get(info))
        .route("/metrics", get(prometheus_metrics))
        .route("/tokenize", post(tokenize))
        .route("/adapters", get(adapters_api::list))
        .route("/adapters/load", post(adapters_api::load))
        .route("/adapters/unload", post(adapters_api::unload))
        .route("/adapters/pin", post(adapters_api::pin))
        .route("/adapters/unpin", post(adapters_api::unpin))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/models", get(openai::models))
        .route("/docs", get(docs))
        .route("/api-doc/openapi.json", get(openapi_json))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(cors)
        .with_state(state)
}

/// The token of an `Authorization: Bearer <token>` header, if the request has one.
pub(crate) fn bearer_token(headers: &HeaderMap) -> Option<ApiToken> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| ApiToken::new(token))
}

/// As LoRAX does: a request without `api_token` uses the `Authorization: Bearer` token (for its
/// adapter; the base model needs none).
pub(crate) fn token_from_header(api_token: &mut Option<ApiToken>, headers: &HeaderMap) {
    if api_token.is_none() {
        *api_token = bearer_token(headers);
    }
}

/// `POST /`: `stream` chooses; the non-streamed answer is a list of one object.
async fn compat_generate(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(mut request): JsonBody<CompatGenerateRequest>,
) -> Result<Response, ApiError> {
    token_from_header(&mut request.parameters.api_token, &headers);
    let stream = request.stream;
    let request = openai::apply_chat_template(&state, request.into())?;
    if stream {
        return stream_with(&state, request, Box::new(LoraxEncoder)).await;
    }
    let (headers, response) = generate_response(&state, request).await?;
    Ok((headers, Json(vec![response])).into_response())
}

/// `POST /generate`.
async fn generate(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(mut request): JsonBody<GenerateRequest>,
) -> Result<Response, ApiError> {
    token_from_header(&mut request.parameters.api_token, &headers);
    let request = openai::apply_chat_template(&state, request)?;
    let (headers, response) = generate_response(&state, request).await?;
    Ok((headers, Json(response)).into_response())
}

/// `POST /generate_stream`.
async fn generate_stream(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(mut request): JsonBody<GenerateRequest>,
) -> Result<Response, ApiError> {
    token_from_header(&mut request.parameters.api_token, &headers);
    let request = openai::apply_chat_template(&state, request)?;
    stream_with(&state, request, Box::new(LoraxEncoder)).await
}

fn prepend_prompt(prompt: &Option<String>, text: String) -> String {
    match prompt {
        Some(prompt) => format!("{prompt}{text}"),
        None => text,
    }
}

/// The adapter a request will run with, for its metrics label (None: base model, or an
/// invalid request).
fn request_adapter(state: &AppState, request: &GenerateRequest) -> Option<Arc<AdapterKey>> {
    let validation = state.infer.validation();
    let adapter = validation.resolve_adapter(&request.parameters).ok()??;
    Some(adapter.key)
}

fn timings(start: Instant, response: &InferResponse) -> RequestTimings {
    RequestTimings {
        total: start.elapsed(),
        validation: response.queued.saturating_duration_since(start),
        queue: response.start.saturating_duration_since(response.queued),
        inference: response.start.elapsed(),
        prompt_tokens: response.prompt_tokens,
        generated_tokens: response.generated_text.generated_tokens,
    }
}

/// Runs a request to its end and builds the answer and its timing headers.
pub(crate) async fn generate_response(
    state: &AppState,
    request: GenerateRequest,
) -> Result<(HeaderMap, GenerateResponse), ApiError> {
    let start = Instant::now();
    let adapter = request_adapter(state, &request);
    let p = &request.parameters;
    let prompt = p
        .return_full_text
        .unwrap_or(false)
        .then(|| request.inputs.clone());
    let want_details = p.details || p.decoder_input_details;
    let compute_characters = request.inputs.chars().count();
    let best_of = p.best_of.unwrap_or(1);
    let result = if best_of > 1 {
        state
            .infer
            .generate_best_of(request, best_of)
            .await
            .map(|(best, others)| (best, Some(others)))
    } else {
        state.infer.generate(request).await.map(|r| (r, None))
    };
    let (response, others) = result.map_err(|err| {
        m::request_failed(adapter.as_deref(), err.error_type());
        ApiError::from(err)
    })?;

    let t = timings(start, &response);
    m::request_succeeded(adapter.as_deref(), &t);
    let headers = timing_headers(state, &t, compute_characters);
    let best_of_sequences = others.map(|others| {
        others
            .into_iter()
            .map(|r| BestOfSequence {
                generated_text: prepend_prompt(&prompt, r.generated_text.text),
                finish_reason: r.generated_text.finish_reason,
                generated_tokens: r.generated_text.generated_tokens,
                seed: r.generated_text.seed,
                prefill: r.prefill,
                tokens: r.tokens,
                top_tokens: r.top_tokens,
            })
            .collect()
    });
    let generated = response.generated_text;
    let details = want_details.then_some(Details {
        finish_reason: generated.finish_reason,
        prompt_tokens: response.prompt_tokens,
        generated_tokens: generated.generated_tokens,
        skipped_tokens: 0,
        seed: generated.seed,
        prefill: response.prefill,
        tokens: response.tokens,
        top_tokens: response.top_tokens,
        best_of_sequences,
    });
    let answer = GenerateResponse {
        generated_text: prepend_prompt(&prompt, generated.text),
        details,
    };
    Ok((headers, answer))
}

fn timing_headers(state: &AppState, t: &RequestTimings, characters: usize) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let mut set = |name: &'static str, value: String| {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    };
    set("x-compute-type", state.info.model_device_type.clone());
    set("x-compute-time", t.total.as_millis().to_string());
    set("x-compute-characters", characters.to_string());
    set("x-total-time", t.total.as_millis().to_string());
    set("x-validation-time", t.validation.as_millis().to_string());
    set("x-queue-time", t.queue.as_millis().to_string());
    set("x-inference-time", t.inference.as_millis().to_string());
    set(
        "x-time-per-token",
        t.time_per_token().as_millis().to_string(),
    );
    set("x-prompt-tokens", t.prompt_tokens.to_string());
    set("x-generated-tokens", t.generated_tokens.to_string());
    let total_tokens = t.prompt_tokens + t.generated_tokens;
    set("x-total-tokens", total_tokens.to_string());
    set("x-model-id", state.info.model_id.clone());
    headers
}

/// Turns stream events into SSE bytes (LoRAX's format, or OpenAI's).
pub(crate) trait EventEncoder: Send + 'static {
    fn event(&mut self, response: StreamResponse) -> Bytes;
    /// The error event that ends a failed stream (framed like the other events).
    fn error(&mut self, body: &ErrorResponse) -> Bytes {
        sse_event(body)
    }
    /// Sent after the last event.
    fn done(&mut self) -> Option<Bytes> {
        None
    }
}

/// LoRAX's events: `data:{StreamResponse}`.
struct LoraxEncoder;

impl EventEncoder for LoraxEncoder {
    fn event(&mut self, response: StreamResponse) -> Bytes {
        sse_event(&response)
    }
}

/// Validates and queues a request, then answers with its SSE stream. Errors found before the
/// first token (validation, overload) are plain HTTP errors; later ones are an error event.
pub(crate) async fn stream_with(
    state: &AppState,
    request: GenerateRequest,
    encoder: Box<dyn EventEncoder>,
) -> Result<Response, ApiError> {
    let start = Instant::now();
    let adapter = request_adapter(state, &request);
    let p = &request.parameters;
    let early = if p.best_of.unwrap_or(1) != 1 {
        Some(ValidationError::BestOfStream)
    } else if p.decoder_input_details {
        Some(ValidationError::PrefillDetailsStream)
    } else {
        None
    };
    if let Some(err) = early {
        m::request_failed(adapter.as_deref(), "validation");
        return Err(err.into());
    }
    let prompt = p
        .return_full_text
        .unwrap_or(false)
        .then(|| request.inputs.clone());
    let details = p.details;
    let fail = |err: InferError| {
        m::request_failed(adapter.as_deref(), err.error_type());
        ApiError::from(err)
    };
    let mut generation = state.infer.generate_stream(request).await.map_err(fail)?;
    // Wait for the first token so that a failed prefill is still a plain 424.
    let first = match generation.stream.next().await {
        Some(Ok(message)) => message,
        Some(Err(err)) => return Err(fail(err)),
        None => return Err(fail(InferError::IncompleteGeneration)),
    };
    let events = SseState {
        pending: Some(first),
        generation,
        prompt,
        details,
        adapter,
        start,
        encoder,
        trailer: None,
        done: false,
    }
    .into_stream();
    let mut response = Response::new(Body::from_stream(events));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    if let Ok(model_id) = HeaderValue::from_str(&state.info.model_id) {
        headers.insert("x-model-id", model_id);
    }
    Ok(response)
}

/// One SSE event: `data:{json}\n\n`.
fn sse_event<T: Serialize>(payload: &T) -> Bytes {
    let json = serde_json::to_string(payload).unwrap_or_else(|_| "{}".to_string());
    Bytes::from(format!("data:{json}\n\n"))
}

/// State of one request's event stream.
struct SseState {
    /// A message read before the stream started.
    pending: Option<InferStreamResponse>,
    generation: GenerationStream,
    prompt: Option<String>,
    details: bool,
    adapter: Option<Arc<AdapterKey>>,
    start: Instant,
    encoder: Box<dyn EventEncoder>,
    /// Sent once after the last event.
    trailer: Option<Bytes>,
    done: bool,
}

impl SseState {
    fn into_stream(self) -> impl Stream<Item = Result<Bytes, Infallible>> + Send {
        futures::stream::unfold(self, |mut s| async move {
            if s.done {
                let trailer = s.trailer.take()?;
                return Some((Ok(trailer), s));
            }
            let event = s.next_event().await;
            Some((Ok(event), s))
        })
    }

    /// The next event; sets `done` after the last one.
    async fn next_event(&mut self) -> Bytes {
        loop {
            let next = match self.pending.take() {
                Some(message) => Some(Ok(message)),
                None => self.generation.stream.next().await,
            };
            let message = match next {
                Some(Ok(message)) => message,
                Some(Err(err)) => return self.fail(err),
                None => return self.fail(InferError::IncompleteGeneration),
            };
            match message {
                InferStreamResponse::Prefill(_) => continue,
                InferStreamResponse::Intermediate { token, top_tokens } => {
                    return self.encoder.event(StreamResponse {
                        token,
                        top_tokens,
                        generated_text: None,
                        details: None,
                    });
                }
                InferStreamResponse::End {
                    token,
                    top_tokens,
                    generated_text,
                    queued,
                    start,
                } => {
                    self.done = true;
                    let t = RequestTimings {
                        total: self.start.elapsed(),
                        validation: queued.saturating_duration_since(self.start),
                        queue: start.saturating_duration_since(queued),
                        inference: start.elapsed(),
                        prompt_tokens: self.generation.prompt_tokens,
                        generated_tokens: generated_text.generated_tokens,
                    };
                    m::request_succeeded(self.adapter.as_deref(), &t);
                    let details = self.details.then_some(StreamDetails {
                        finish_reason: generated_text.finish_reason,
                        prompt_tokens: self.generation.prompt_tokens,
                        generated_tokens: generated_text.generated_tokens,
                        seed: generated_text.seed,
                    });
                    self.trailer = self.encoder.done();
                    return self.encoder.event(StreamResponse {
                        token,
                        top_tokens,
                        generated_text: Some(prepend_prompt(&self.prompt, generated_text.text)),
                        details,
                    });
                }
            }
        }
    }

    fn fail(&mut self, err: InferError) -> Bytes {
        self.done = true;
        m::request_failed(self.adapter.as_deref(), err.error_type());
        self.encoder.error(&err.to_response_body())
    }
}

/// `GET /health` (and `GET /`, `GET /ping`): 200 only when every shard answers Health.
async fn health(State(state): State<AppState>) -> Result<StatusCode, ApiError> {
    match tokio::time::timeout(HEALTH_TIMEOUT, state.client.health()).await {
        Ok(Ok(())) => Ok(StatusCode::OK),
        Ok(Err(err)) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {err}"),
            "healthcheck",
        )),
        Err(_) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unhealthy: the shards did not answer in time",
            "healthcheck",
        )),
    }
}

/// `GET /info`, with the adapters active now.
async fn info(State(state): State<AppState>) -> Json<Info> {
    let mut info = state.info.as_ref().clone();
    info.adapters = state.infer.queue().adapters().await;
    info.adapters.retain(|a| a.state == AdapterState::Active);
    Json(info)
}

/// `GET /metrics`: Prometheus text format.
async fn prometheus_metrics(State(state): State<AppState>) -> Response {
    let body = state.prometheus.render();
    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// `POST /tokenize`: the prompt's tokens with their byte offsets.
async fn tokenize(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<TokenizeRequest>,
) -> Result<Response, ApiError> {
    let tokens = state
        .infer
        .validation()
        .tokenize(request.inputs, request.add_special_tokens)
        .await?;
    Ok(Json(tokens).into_response())
}

/// `GET /docs`: a readable page generated from the OpenAPI document.
async fn docs(State(state): State<AppState>) -> Html<String> {
    Html(openapi::docs_html(&openapi::spec(&state.info)))
}

/// `GET /api-doc/openapi.json`.
async fn openapi_json(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(openapi::spec(&state.info))
}
