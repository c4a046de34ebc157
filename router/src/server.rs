//! The route table: every endpoint, JSON fallbacks for unknown paths and methods, and CORS.

use crate::adapters_api;
use crate::app::AppState;
use crate::errors::{method_not_allowed, not_found};
use crate::native::{
    compat_generate, generate, generate_stream, health, info, ping, prometheus_metrics,
    root_health, tokenize,
};
use crate::openai;
use crate::openapi::{docs, openapi_json};
use crate::playground;
use crate::telemetry;
use axum::extract::Request;
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, Method};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tracing::Instrument;

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
        .route("/", get(root_health).post(compat_generate))
        .route("/generate", post(generate))
        .route("/generate_stream", post(generate_stream))
        .route("/health", get(health))
        .route("/ping", get(ping))
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
        .route("/playground", get(playground::page))
        .route("/playground/playground.js", get(playground::script))
        .route("/playground/playground.css", get(playground::style))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(trace_request))
        .layer(cors)
        .with_state(state)
}

/// Routes probed often and cheap to answer: no trace of their own.
const UNTRACED: [&str; 4] = ["/health", "/ping", "/metrics", "/info"];

/// Runs every other request inside a `request` span (parented by its `traceparent` header);
/// handlers and the request's queue entry hang their spans under it.
async fn trace_request(request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    if UNTRACED.contains(&path.as_str()) || request.method() == Method::GET && path == "/" {
        return next.run(request).await;
    }
    let span = tracing::info_span!(
        "request",
        otel.kind = "server",
        http.request.method = %request.method(),
        url.path = %path,
        http.response.status_code = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    telemetry::continue_from(&span, request.headers());
    let response = next.run(request).instrument(span.clone()).await;
    span.record(
        "http.response.status_code",
        i64::from(response.status().as_u16()),
    );
    response
}
