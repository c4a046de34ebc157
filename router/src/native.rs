//! LoRAX's native endpoints: generation (plain, SSE stream, and the `POST /` compat endpoint),
//! health, info, metrics and tokenize.

use crate::api::AdapterState;
use crate::api::{
    CompatGenerateRequest, GenerateRequest, GenerateResponse, Info, SimpleToken, StreamResponse,
    TokenizeRequest,
};
use crate::app::{apply_chat_template, require_generation, token_from_header, AppState};
use crate::error_docs::{BodyErrors, GenerationErrors, Unhealthy};
use crate::errors::{ApiError, JsonBody};
use crate::respond::generate_response;
use crate::sse::{stream_with, LoraxEncoder};
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

/// A native request as generation takes it: the `Authorization: Bearer` token as its default
/// `api_token`, its messages rendered when it asks for the chat template.
async fn prepared(
    state: &AppState,
    headers: &HeaderMap,
    mut request: GenerateRequest,
) -> Result<GenerateRequest, ApiError> {
    token_from_header(&mut request.parameters.adapter.api_token, headers);
    apply_chat_template(state, request).await
}

/// Generate text; `stream` picks a JSON list of one answer or an SSE stream.
#[utoipa::path(post, path = "/", tag = "LoRAX", request_body = CompatGenerateRequest,
    responses(
        (status = 200, description = "Generated text", content(
            (Vec<GenerateResponse> = "application/json"),
            (StreamResponse = "text/event-stream"),
        )),
        GenerationErrors,
    ))]
pub async fn compat_generate(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(request): JsonBody<CompatGenerateRequest>,
) -> Result<Response, ApiError> {
    require_generation(&state)?;
    let stream = request.stream;
    let request = prepared(&state, &headers, request.into()).await?;
    if stream {
        return stream_with(&state, request, Box::new(LoraxEncoder)).await;
    }
    let (headers, response) = generate_response(&state, request).await?;
    Ok((headers, Json(vec![response])).into_response())
}

/// Generate text.
#[utoipa::path(post, path = "/generate", tag = "LoRAX", request_body = GenerateRequest,
    responses(
        (status = 200, description = "Generated text", body = GenerateResponse),
        GenerationErrors,
    ))]
pub async fn generate(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(request): JsonBody<GenerateRequest>,
) -> Result<Response, ApiError> {
    require_generation(&state)?;
    let request = prepared(&state, &headers, request).await?;
    let (headers, response) = generate_response(&state, request).await?;
    Ok((headers, Json(response)).into_response())
}

/// Generate a stream of tokens (server-sent events `data:{json}`).
///
/// The last event carries `generated_text` and `details`; an error after the first token is an
/// event with the error body.
#[utoipa::path(post, path = "/generate_stream", tag = "LoRAX", request_body = GenerateRequest,
    responses(
        (status = 200, description = "Token events", body = StreamResponse,
            content_type = "text/event-stream"),
        GenerationErrors,
    ))]
pub async fn generate_stream(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(request): JsonBody<GenerateRequest>,
) -> Result<Response, ApiError> {
    require_generation(&state)?;
    let request = prepared(&state, &headers, request).await?;
    stream_with(&state, request, Box::new(LoraxEncoder)).await
}

/// Healthy when the server can serve now: generate, or (an encoder model) compute.
///
/// 503 with the reason otherwise (see the `health` module).
#[utoipa::path(get, path = "/health", tag = "LoRAX",
    responses((status = 200, description = "Healthy"), Unhealthy))]
pub async fn health(State(state): State<AppState>) -> Result<StatusCode, ApiError> {
    let verdict = if state.info.supports_generation {
        state.infer.health().await
    } else {
        state.encoders.health(state.client.as_ref()).await
    };
    match verdict {
        Ok(()) => Ok(StatusCode::OK),
        Err(reason) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {reason}"),
            "healthcheck",
        )),
    }
}

/// Health check (as `GET /health`; the inference API's route).
#[utoipa::path(get, path = "/", tag = "LoRAX",
    responses((status = 200, description = "Healthy"), Unhealthy))]
pub async fn root_health(state: State<AppState>) -> Result<StatusCode, ApiError> {
    health(state).await
}

/// Health check (as `GET /health`; SageMaker's route).
#[utoipa::path(get, path = "/ping", tag = "LoRAX",
    responses((status = 200, description = "Healthy"), Unhealthy))]
pub async fn ping(state: State<AppState>) -> Result<StatusCode, ApiError> {
    health(state).await
}

/// Model and router limits, with the adapters active now.
#[utoipa::path(get, path = "/info", tag = "LoRAX",
    responses((status = 200, description = "Info", body = Info)))]
pub async fn info(State(state): State<AppState>) -> Json<Info> {
    let mut info = state.info.as_ref().clone();
    info.adapters = state.infer.queue().adapters().await;
    info.adapters.retain(|a| a.state == AdapterState::Active);
    Json(info)
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "LoRAX",
    responses((status = 200, description = "Prometheus text format", body = String,
        content_type = "text/plain")))]
pub async fn prometheus_metrics(State(state): State<AppState>) -> Response {
    let body = state.prometheus.render();
    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// Tokenize a prompt: its tokens with their byte offsets.
#[utoipa::path(post, path = "/tokenize", tag = "LoRAX", request_body = TokenizeRequest,
    responses((status = 200, description = "Tokens", body = Vec<SimpleToken>), BodyErrors))]
pub async fn tokenize(
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
