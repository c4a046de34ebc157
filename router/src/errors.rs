//! Errors and their HTTP form: every error answer is JSON `{"error": ..., "error_type": ...}`,
//! including axum's own rejections (which are plain text by default).

use crate::client::ShardError;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Body of every error answer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct ErrorResponse {
    #[schema(example = "Input validation error: `inputs` cannot be empty")]
    pub error: String,
    #[schema(example = "validation")]
    pub error_type: String,
}

/// Why a request is invalid (answered with 422 `validation`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidationError {
    #[error("`best_of` must be > 0 and <= {0}. Given: {1}")]
    BestOf(usize, usize),
    #[error("you must use sampling when `best_of` is > 1")]
    BestOfSampling,
    #[error("`seed` must not be set when `best_of` > 1")]
    BestOfSeed,
    #[error("`best_of` != 1 is not supported when streaming tokens")]
    BestOfStream,
    #[error("`decoder_input_details` == true is not supported when streaming tokens")]
    PrefillDetailsStream,
    #[error("`temperature` must be strictly positive")]
    Temperature,
    #[error("`repetition_penalty` must be strictly positive")]
    RepetitionPenalty,
    #[error("`top_p` must be > 0.0 and <= 1.0")]
    TopP,
    #[error("`top_k` must be strictly positive")]
    TopK,
    #[error("`typical_p` must be > 0.0 and <= 1.0")]
    TypicalP,
    #[error("`top_n_tokens` must be <= {0}. Given: {1}")]
    TopNTokens(u32, u32),
    #[error("`truncate` must be strictly positive and at most {0}. Given: {1}")]
    Truncate(usize, usize),
    #[error("`max_new_tokens` must be strictly positive")]
    NegativeMaxNewTokens,
    #[error("`inputs` tokens + `max_new_tokens` must be <= {0}. Given: {1} `inputs` tokens and {2} `max_new_tokens`")]
    MaxTotalTokens(usize, usize, u32),
    #[error("`inputs` must have at most {0} tokens. Given: {1}")]
    InputLength(usize, usize),
    #[error("`inputs` cannot be empty")]
    EmptyInput,
    #[error("`stop` supports up to {0} stop sequences. Given: {1}")]
    StopSequence(usize, usize),
    #[error("`adapter_source` must be one of hub, local, s3. Given: {0}")]
    AdapterSource(String),
    #[error("architecture {0} does not support dynamic adapter loading")]
    AdaptersNotSupported(String),
    #[error(
        "this server merged {0} into the base model's weights (--merge-adapter-weights), which \
         turns dynamic adapters off: name no adapter, or {0}"
    )]
    AdaptersMerged(String),
    #[error("`adapter_id` and `merged_adapters` cannot both be set")]
    AdapterConflict,
    #[error("`adapter_id` {0}")]
    AdapterId(String),
    #[error("{0}")]
    MergedAdapters(String),
    #[error("`{0}` is not supported yet")]
    NotSupported(&'static str),
    /// `frequency_penalty` or `presence_penalty` out of range (or NaN).
    #[error("`{0}` must be between -2.0 and 2.0. Given: {1}")]
    Penalty(&'static str, f32),
    #[error("`grammar` and `response_format` cannot both be set")]
    GrammarConflict,
    /// A `grammar` or `response_format` the router refuses (the message names the field, the
    /// place in the schema and what is allowed).
    #[error("{0}")]
    Constraint(String),
    /// The shard could not compile the request's grammar (its INVALID_ARGUMENT message).
    #[error("the grammar cannot be compiled: {0}")]
    GrammarCompile(String),
    #[error("`n` must be between 1 and {0}. Given: {1}")]
    N(usize, u32),
    #[error("`n` > 1 cannot be combined with `best_of` > 1")]
    NWithBestOf,
    #[error("`{0}` must be between 0 and {1}. Given: {2}")]
    TopLogprobs(&'static str, u32, u32),
    #[error("`top_logprobs` needs `logprobs: true`")]
    TopLogprobsWithoutLogprobs,
    #[error("{0}")]
    ChatTemplate(String),
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// Invalid `tools` / `tool_choice` (the message names the field).
    #[error("{0}")]
    Tools(String),
    /// A generation endpoint called on a model that does not generate (an encoder); the
    /// message names the endpoints it serves.
    #[error("this model does not generate text; it serves {0}")]
    GenerationNotSupported(String),
    #[error("this model does not serve embeddings; it serves {0}")]
    EmbeddingsNotSupported(String),
    #[error("this model does not serve token classification (it has no token-classification head); it serves {0}")]
    ClassificationNotSupported(String),
    #[error(
        "adapters are not applied to embeddings or token classification: name no adapter \
         (`adapter_id`, `merged_adapters`)"
    )]
    EncoderAdapter,
    /// An input of an encoder endpoint (named by its field, e.g. `inputs[2]`) is empty.
    #[error("`{0}` cannot be empty")]
    EmptyField(String),
    /// An input of an encoder endpoint is longer than the model takes (encoders never truncate).
    #[error("`{0}` must have at most {1} tokens, special tokens included (inputs are not truncated). Given: {2}")]
    EncoderInputLength(String, usize, usize),
    #[error("`{0}` must hold at least one input")]
    EmptyList(&'static str),
    #[error("`{0}` must hold at most {1} inputs (--max-concurrent-requests). Given: {2}")]
    TooManyInputs(&'static str, usize, usize),
    #[error("`dimensions` must be the model's embedding size, {0} (shortened embeddings are not offered). Given: {1}")]
    Dimensions(u32, u32),
    /// The shard refused an encoder input (its INVALID_ARGUMENT or FAILED_PRECONDITION message).
    #[error("the model refused the input: {0}")]
    ShardRefused(String),
}

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
    /// The request's adapter could not be downloaded or loaded (the shard's reason).
    #[error("{1}")]
    Adapter(AdapterErrorKind, String),
}

/// Why the shard refused an adapter, from its gRPC status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterErrorKind {
    /// NOT_FOUND, INVALID_ARGUMENT: no such adapter, or not a valid one for this model (422).
    Invalid,
    /// UNAUTHENTICATED: a private adapter without a valid token (401).
    Unauthorized,
    /// PERMISSION_DENIED: the token lacks access (403).
    Forbidden,
    /// Anything else: source unreachable, memory budget full, ... (424).
    Unavailable,
}

impl AdapterErrorKind {
    pub fn from_code(code: tonic::Code) -> Self {
        match code {
            tonic::Code::NotFound | tonic::Code::InvalidArgument => Self::Invalid,
            tonic::Code::Unauthenticated => Self::Unauthorized,
            tonic::Code::PermissionDenied => Self::Forbidden,
            _ => Self::Unavailable,
        }
    }
}

impl InferError {
    /// The `error_type` field of the JSON answer.
    pub fn error_type(&self) -> &'static str {
        match self {
            Self::Generation(_) => "generation",
            Self::Overloaded => "overloaded",
            Self::Validation(_) => "validation",
            Self::IncompleteGeneration => "incomplete_generation",
            Self::Adapter(AdapterErrorKind::Invalid, _) => "validation",
            Self::Adapter(AdapterErrorKind::Unauthorized, _) => "unauthorized",
            Self::Adapter(AdapterErrorKind::Forbidden, _) => "forbidden",
            Self::Adapter(AdapterErrorKind::Unavailable, _) => "generation",
        }
    }

    /// The HTTP status of the answer.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Generation(_) => StatusCode::FAILED_DEPENDENCY,
            Self::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            Self::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::IncompleteGeneration => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Adapter(AdapterErrorKind::Invalid, _) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Adapter(AdapterErrorKind::Unauthorized, _) => StatusCode::UNAUTHORIZED,
            Self::Adapter(AdapterErrorKind::Forbidden, _) => StatusCode::FORBIDDEN,
            Self::Adapter(AdapterErrorKind::Unavailable, _) => StatusCode::FAILED_DEPENDENCY,
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

/// A request's error for an adapter the shard refused, by the shard's status code:
/// NOT_FOUND and INVALID_ARGUMENT → 422, UNAUTHENTICATED → 401, PERMISSION_DENIED → 403,
/// anything else → 424. `adapter` names it (never with its token), `source` is where it is from.
pub fn adapter_error(adapter: &str, source: &str, what: &str, err: &ShardError) -> InferError {
    let kind = AdapterErrorKind::from_code(err.code());
    let message = format!(
        "adapter `{adapter}` ({source}) could not be {what}ed: {}",
        err.message()
    );
    InferError::Adapter(kind, message)
}

/// Why a management command failed.
#[derive(Debug, Clone)]
pub enum AdapterCommandError {
    /// The adapter is not tracked (404).
    NotFound(String),
    /// Not possible in the adapter's current state (409).
    Conflict(String),
    /// The shard refused (mapped like a request's failure).
    Failed(InferError),
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
        StatusCode::CONFLICT => "conflict",
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

impl From<AdapterCommandError> for ApiError {
    fn from(err: AdapterCommandError) -> Self {
        match err {
            AdapterCommandError::NotFound(message) => {
                ApiError::new(StatusCode::NOT_FOUND, message, "not_found")
            }
            AdapterCommandError::Conflict(message) => {
                ApiError::new(StatusCode::CONFLICT, message, "conflict")
            }
            AdapterCommandError::Failed(err) => err.into(),
        }
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
            (
                InferError::Adapter(AdapterErrorKind::Invalid, "no such adapter".into()),
                422,
                "validation",
            ),
            (
                InferError::Adapter(AdapterErrorKind::Unauthorized, "token".into()),
                401,
                "unauthorized",
            ),
            (
                InferError::Adapter(AdapterErrorKind::Forbidden, "gated".into()),
                403,
                "forbidden",
            ),
            (
                InferError::Adapter(AdapterErrorKind::Unavailable, "budget".into()),
                424,
                "generation",
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
    fn adapter_codes() {
        use tonic::Code;
        let cases = [
            (Code::NotFound, AdapterErrorKind::Invalid),
            (Code::InvalidArgument, AdapterErrorKind::Invalid),
            (Code::Unauthenticated, AdapterErrorKind::Unauthorized),
            (Code::PermissionDenied, AdapterErrorKind::Forbidden),
            (Code::Unavailable, AdapterErrorKind::Unavailable),
            (Code::ResourceExhausted, AdapterErrorKind::Unavailable),
            (Code::Internal, AdapterErrorKind::Unavailable),
        ];
        for (code, kind) in cases {
            assert_eq!(AdapterErrorKind::from_code(code), kind, "{code:?}");
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
