//! The route table: every endpoint, JSON fallbacks for unknown paths and methods, and CORS;
//! serving it until SIGINT or SIGTERM.

use crate::adapters_api;
use crate::app::AppState;
use crate::encoder_api;
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
use axum::http::Method;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use std::time::Duration;
use tower_http::cors::CorsLayer;
use tracing::Instrument;

/// The application: every route, JSON fallbacks for unknown paths and methods, `cors` (see
/// `CorsOptions::layer`).
pub fn router(state: AppState, cors: CorsLayer) -> Router {
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
        .route("/embed", post(encoder_api::embed))
        .route("/classify", post(encoder_api::classify))
        .route("/classify_batch", post(encoder_api::classify_batch))
        .route("/adapters", get(adapters_api::list))
        .route("/adapters/load", post(adapters_api::load))
        .route("/adapters/unload", post(adapters_api::unload))
        .route("/adapters/pin", post(adapters_api::pin))
        .route("/adapters/unpin", post(adapters_api::unpin))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/models", get(openai::models))
        .route("/v1/embeddings", post(encoder_api::embeddings))
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

/// Serves `app` on `hostname:port` until SIGINT or SIGTERM.
pub async fn serve(hostname: &str, port: u16, app: Router) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind((hostname, port))
        .await
        .map_err(|e| format!("cannot listen on {hostname}:{port}: {e}"))?;
    tracing::info!("listening on {hostname}:{port}");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM; open streams then get a few seconds to finish.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let terminate = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {},
        _ = terminate => {},
    }
    tracing::info!("shutting down");
    tokio::spawn(async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        std::process::exit(0);
    });
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
