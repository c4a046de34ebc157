//! Adapter management endpoints (ours; LoRAX has none): `GET /adapters`, `POST /adapters/load`,
//! `POST /adapters/unload`, `POST /adapters/pin`, `POST /adapters/unpin`. Adapters are named as
//! in generate requests (`adapter_id` or `merged_adapters`, `adapter_source`, `api_token`, else
//! the `Authorization: Bearer` token); a private adapter is the same adapter only with the same
//! token.

use crate::adapter::{self, AdapterParams, AdapterRequest};
use crate::api::AdapterStatus;
use crate::app::{token_from_header, AppState};
use crate::error_docs::AdapterErrors;
use crate::errors::{ApiError, JsonBody, ValidationError};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use serde::Deserialize;
use utoipa::ToSchema;

/// Body of the `POST /adapters/*` endpoints.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct AdapterRef {
    /// `adapter_id` or `merged_adapters`, `adapter_source`, `api_token`.
    #[serde(flatten)]
    pub adapter: AdapterParams,
    /// `POST /adapters/load` only: pin the adapter once active (never offloaded).
    #[serde(default)]
    #[schema(default = false)]
    pub pin: bool,
}

/// The adapter a management request names (it must name one explicitly), with the request's
/// `Authorization: Bearer` token as its api_token when the body gives none.
fn named_adapter(
    state: &AppState,
    headers: &HeaderMap,
    r: &mut AdapterRef,
) -> Result<AdapterRequest, ApiError> {
    let a = &mut r.adapter;
    token_from_header(&mut a.api_token, headers);
    let named = a.adapter_id.as_deref().is_some_and(|id| !id.is_empty());
    let config = state.infer.validation().adapter_config();
    match adapter::resolve(config, a.fields())? {
        Some(request) if named || a.merged_adapters.is_some() => Ok(request),
        _ => Err(ValidationError::AdapterId(
            "must name an adapter (or give `merged_adapters`); the base model is always loaded"
                .into(),
        )
        .into()),
    }
}

/// Tracked adapters (state, index, counts) and recent failures.
#[utoipa::path(get, path = "/adapters", tag = "Adapters",
    responses((status = 200, description = "Adapters", body = Vec<AdapterStatus>)))]
pub async fn list(State(state): State<AppState>) -> Json<Vec<AdapterStatus>> {
    Json(state.infer.queue().adapters().await)
}

/// Download and activate an adapter (optionally pin it); answers once it is active.
#[utoipa::path(post, path = "/adapters/load", tag = "Adapters", request_body = AdapterRef,
    responses((status = 200, description = "The adapter", body = AdapterStatus), AdapterErrors))]
pub async fn load(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(mut r): JsonBody<AdapterRef>,
) -> Result<Json<AdapterStatus>, ApiError> {
    let request = named_adapter(&state, &headers, &mut r)?;
    let status = state.infer.queue().load_adapter(request, r.pin).await?;
    Ok(Json(status))
}

/// Offload an idle adapter from the device (409 while in use or pinned).
#[utoipa::path(post, path = "/adapters/unload", tag = "Adapters", request_body = AdapterRef,
    responses((status = 200, description = "The adapter", body = AdapterStatus), AdapterErrors))]
pub async fn unload(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(mut r): JsonBody<AdapterRef>,
) -> Result<Json<AdapterStatus>, ApiError> {
    let request = named_adapter(&state, &headers, &mut r)?;
    let status = state.infer.queue().unload_adapter(request.key).await?;
    Ok(Json(status))
}

/// Pin a tracked adapter: never drained or offloaded.
#[utoipa::path(post, path = "/adapters/pin", tag = "Adapters", request_body = AdapterRef,
    responses((status = 200, description = "The adapter", body = AdapterStatus), AdapterErrors))]
pub async fn pin(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(mut r): JsonBody<AdapterRef>,
) -> Result<Json<AdapterStatus>, ApiError> {
    let request = named_adapter(&state, &headers, &mut r)?;
    let status = state.infer.queue().pin_adapter(request.key, true).await?;
    Ok(Json(status))
}

/// Unpin a tracked adapter.
#[utoipa::path(post, path = "/adapters/unpin", tag = "Adapters", request_body = AdapterRef,
    responses((status = 200, description = "The adapter", body = AdapterStatus), AdapterErrors))]
pub async fn unpin(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(mut r): JsonBody<AdapterRef>,
) -> Result<Json<AdapterStatus>, ApiError> {
    let request = named_adapter(&state, &headers, &mut r)?;
    let status = state.infer.queue().pin_adapter(request.key, false).await?;
    Ok(Json(status))
}
