//! Errors and their HTTP form: every error answer is JSON `{"error": ..., "error_type": ...}`,
//! including axum's own rejections (which are plain text by default).

use crate::api::ErrorResponse;
use crate::validation::ValidationError;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;

/// Why a generation request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum InferError {
    /// The shard failed while running the request.
    #[error("Request failed during generation: {0}")]
    Generation(String),
    /// Too many requests in flight.
    #[error("Model is overloaded")]
    Overloaded,
    /// The request is invalid.
    #[error("Input validation error: {0}")]
    Validation(#[from] ValidationError),
    /// The request's stream ended before its last token.
    #[error("Incomplete generation")]
    IncompleteGeneration,
}

impl InferError {
    /// The `error_type` field of the JSON answer.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::Generation(_) => "generation",
            Self::Overloaded => "overloaded",
            Self::Validation(_) => "validation",
            Self::IncompleteGeneration => "incomplete_generation",
        }
    }

    /// The HTTP status of the answer.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Generation(_) => StatusCode::FAILED_DEPENDENCY,
            Self::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            Self::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::IncompleteGeneration => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The JSON body (also the payload of an SSE error event).
    pub fn to_response_body(&self) -> ErrorResponse {
        ErrorResponse {
            error: self.to_string(),
            error_type: self.error_type().to_string(),
        }
    }
}

/// An HTTP error answer: a status and the JSON body.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorResponse,
}

impl ApiError {
    pub fn new(status: StatusCode, error: impl Into<String>, error_type: &str) -> Self {
        Self {
            status,
            body: ErrorResponse {
                error: error.into(),
                error_type: error_type.to_string(),
            },
        }
    }
}

/// The `error_type` of a framework rejection, from its status.
fn rejection_error_type(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "validation",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        _ => "bad_request",
    }
}

impl From<InferError> for ApiError {
    fn from(err: InferError) -> Self {
        Self {
            status: err.status(),
            body: err.to_response_body(),
        }
    }
}

impl From<ValidationError> for ApiError {
    fn from(err: ValidationError) -> Self {
        InferError::from(err).into()
    }
}

/// Syntax errors → 400, wrong content type → 415, body too large → 413, well-formed JSON of
/// the wrong shape (missing `inputs`, wrong types) → 422 `validation`.
impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let status = rejection.status();
        Self::new(status, rejection.body_text(), rejection_error_type(status))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

/// `axum::Json` whose rejections answer with our JSON error body.
pub struct JsonBody<T>(pub T);

impl<T, S> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Json(value) = Json::<T>::from_request(req, state).await?;
        Ok(Self(value))
    }
}

/// Answer for unknown paths.
pub async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "Not found", "not_found")
}

/// Answer for a known path called with the wrong method.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "Method not allowed",
        "method_not_allowed",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infer_errors_map_to_lorax_statuses() {
        let cases = [
            (InferError::Generation("boom".into()), 424, "generation"),
            (InferError::Overloaded, 429, "overloaded"),
            (
                InferError::Validation(ValidationError::EmptyInput),
                422,
                "validation",
            ),
            (
                InferError::IncompleteGeneration,
                500,
                "incomplete_generation",
            ),
        ];
        for (err, status, kind) in cases {
            let api = ApiError::from(err.clone());
            assert_eq!(api.status.as_u16(), status, "{err}");
            assert_eq!(api.body.error_type, kind);
            assert!(!api.body.error.is_empty());
        }
    }

    #[test]
    fn rejection_types() {
        assert_eq!(rejection_error_type(StatusCode::BAD_REQUEST), "bad_request");
        assert_eq!(
            rejection_error_type(StatusCode::PAYLOAD_TOO_LARGE),
            "payload_too_large"
        );
        assert_eq!(
            rejection_error_type(StatusCode::UNSUPPORTED_MEDIA_TYPE),
            "unsupported_media_type"
        );
        assert_eq!(
            rejection_error_type(StatusCode::UNPROCESSABLE_ENTITY),
            "validation"
        );
    }
}
