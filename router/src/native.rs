//! LoRAX's native endpoints: generation (plain, SSE stream, and the `POST /` compat endpoint),
//! health, info, metrics, tokenize, and the API docs.

use crate::api::AdapterState;
use crate::api::{CompatGenerateRequest, GenerateRequest, Info, TokenizeRequest};
use crate::app::{apply_chat_template, token_from_header, AppState};
use crate::errors::{ApiError, JsonBody};
use crate::openapi;
use crate::respond::generate_response;
use crate::sse::{stream_with, LoraxEncoder};
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
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

/// `POST /`: `stream` chooses; the non-streamed answer is a list of one object.
pub async fn compat_generate(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(request): JsonBody<CompatGenerateRequest>,
) -> Result<Response, ApiError> {
    let stream = request.stream;
    let request = prepared(&state, &headers, request.into()).await?;
    if stream {
        return stream_with(&state, request, Box::new(LoraxEncoder)).await;
    }
    let (headers, response) = generate_response(&state, request).await?;
    Ok((headers, Json(vec![response])).into_response())
}

/// `POST /generate`.
pub async fn generate(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(request): JsonBody<GenerateRequest>,
) -> Result<Response, ApiError> {
    let request = prepared(&state, &headers, request).await?;
    let (headers, response) = generate_response(&state, request).await?;
    Ok((headers, Json(response)).into_response())
}

/// `POST /generate_stream`.
pub async fn generate_stream(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(request): JsonBody<GenerateRequest>,
) -> Result<Response, ApiError> {
    let request = prepared(&state, &headers, request).await?;
    stream_with(&state, request, Box::new(LoraxEncoder)).await
}

/// `GET /health` (and `GET /`, `GET /ping`): 200 when the server can generate now; 503 with
/// the reason otherwise (see `health`).
pub async fn health(State(state): State<AppState>) -> Result<StatusCode, ApiError> {
    match state.infer.health().await {
        Ok(()) => Ok(StatusCode::OK),
        Err(reason) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("unhealthy: {reason}"),
            "healthcheck",
        )),
    }
}

/// `GET /info`, with the adapters active now.
pub async fn info(State(state): State<AppState>) -> Json<Info> {
    let mut info = state.info.as_ref().clone();
    info.adapters = state.infer.queue().adapters().await;
    info.adapters.retain(|a| a.state == AdapterState::Active);
    Json(info)
}

/// `GET /metrics`: Prometheus text format.
pub async fn prometheus_metrics(State(state): State<AppState>) -> Response {
    let body = state.prometheus.render();
    ([(CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

/// `POST /tokenize`: the prompt's tokens with their byte offsets.
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

/// `GET /docs`: a readable page generated from the OpenAPI document.
pub async fn docs(State(state): State<AppState>) -> Html<String> {
    Html(openapi::docs_html(&openapi::spec(&state.info)))
}

/// `GET /api-doc/openapi.json`.
pub async fn openapi_json(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(openapi::spec(&state.info))
}
