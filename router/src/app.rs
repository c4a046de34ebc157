//! What every HTTP handler shares: the application state and the request steps common to the
//! native and the OpenAI endpoints (what the model serves, bearer token, chat template, adapter
//! resolution).

use crate::adapter::ApiToken;
use crate::api::{GenerateParameters, GenerateRequest, Info};
use crate::client::ShardClient;
use crate::encoder::Encoders;
use crate::errors::{ApiError, ValidationError};
use crate::infer::Infer;
use crate::metrics as m;
use crate::template::{ChatMessage, ChatTemplate};
use crate::tools::Tools;
use crate::validation::ResolvedRequest;
use axum::http::header::AUTHORIZATION;
use axum::http::HeaderMap;
use metrics_exporter_prometheus::PrometheusHandle;
use std::sync::Arc;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub infer: Infer,
    /// The Embed and Classify calls of encoder models.
    pub encoders: Encoders,
    pub info: Arc<Info>,
    pub client: Arc<dyn ShardClient>,
    pub prometheus: PrometheusHandle,
    /// The tokenizer's chat template, when it has one.
    pub chat_template: Option<Arc<ChatTemplate>>,
}

/// The endpoints the model serves, for the errors of those it does not.
pub fn served_endpoints(info: &Info) -> String {
    let mut served = Vec::new();
    if info.supports_generation {
        served.push(
            "`/generate`, `/generate_stream`, `/`, `/v1/completions`, `/v1/chat/completions` \
             (text generation)",
        );
    }
    if info.supports_embeddings {
        served.push("`/embed`, `/v1/embeddings` (embeddings)");
    }
    if info.supports_classification {
        served.push("`/classify`, `/classify_batch` (token classification)");
    }
    if served.is_empty() {
        return "no inference endpoint".into();
    }
    served.join("; ")
}

/// Refuses a generation request on a model that does not generate (an encoder), naming what
/// it serves instead; counted as a failed request.
pub fn require_generation(state: &AppState) -> Result<(), ApiError> {
    if state.info.supports_generation {
        return Ok(());
    }
    m::request_failed(None, "validation");
    Err(ValidationError::GenerationNotSupported(served_endpoints(&state.info)).into())
}

/// The token of an `Authorization: Bearer <token>` header, if the request has one.
pub fn bearer_token(headers: &HeaderMap) -> Option<ApiToken> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| ApiToken::new(token))
}

/// As LoRAX does: a request without `api_token` uses the `Authorization: Bearer` token (for its
/// adapter; the base model needs none).
pub fn token_from_header(api_token: &mut Option<ApiToken>, headers: &HeaderMap) {
    if api_token.is_none() {
        *api_token = bearer_token(headers);
    }
}

/// A request with `apply_chat_template` gets its `inputs` (a JSON list of messages) rendered
/// by its chat template (see `chat_template`).
pub async fn apply_chat_template(
    state: &AppState,
    mut request: GenerateRequest,
) -> Result<GenerateRequest, ApiError> {
    if !request.parameters.apply_chat_template {
        return Ok(request);
    }
    let messages: Vec<ChatMessage> = serde_json::from_str(&request.inputs).map_err(|e| {
        ValidationError::ChatTemplate(format!("`inputs` must be a JSON list of messages: {e}"))
    })?;
    let template = chat_template(state, &request.parameters).await?;
    request.inputs = render_chat(&template, &messages, None)?;
    request.parameters.apply_chat_template = false;
    request.parameters.prompt_has_special_tokens = true;
    Ok(request)
}

/// The chat template a request is rendered with: its adapter's own when the adapter ships one
/// (the adapter is downloaded first, as its request would be), else the tokenizer's.
pub async fn chat_template(
    state: &AppState,
    parameters: &GenerateParameters,
) -> Result<Arc<ChatTemplate>, ApiError> {
    let adapter = state
        .infer
        .validation()
        .resolve_adapter(parameters)
        .map_err(|err| {
            m::request_failed(None, "validation");
            ApiError::from(err)
        })?;
    if let Some(adapter) = adapter {
        let key = adapter.key.clone();
        let own = state
            .infer
            .queue()
            .adapter_chat_template(adapter)
            .await
            .map_err(|err| {
                m::request_failed(Some(&key), err.error_type());
                ApiError::from(err)
            })?;
        match own {
            Ok(Some(template)) => return Ok(template),
            Ok(None) => {}
            Err(why) => {
                return Err(ValidationError::ChatTemplate(format!(
                    "adapter `{}` ships a chat template that cannot be used: {why}",
                    key.describe()
                ))
                .into())
            }
        }
    }
    state.chat_template.clone().ok_or_else(|| {
        ValidationError::ChatTemplate("the tokenizer has no chat template".into()).into()
    })
}

/// The prompt `template` makes of `messages`, with the tools the model may call (see
/// `ChatTemplate::apply_with_tools`).
pub fn render_chat(
    template: &ChatTemplate,
    messages: &[ChatMessage],
    tools: Option<&Tools>,
) -> Result<String, ApiError> {
    let (list, prompt) = match tools {
        Some(t) => (Some(&t.tools[..]), t.prompt.as_deref()),
        None => (None, None),
    };
    Ok(template
        .apply_with_tools(messages, list, prompt)
        .map_err(ValidationError::ChatTemplate)?)
}

/// Resolves the request's adapter (once); a request naming an invalid one is counted as a
/// failure of the base label, since it has no adapter.
pub fn resolve(state: &AppState, request: GenerateRequest) -> Result<ResolvedRequest, ApiError> {
    state.infer.validation().resolve(request).map_err(|err| {
        m::request_failed(None, "validation");
        ApiError::from(err)
    })
}

/// Resolves the requests of one call's choices (each its own sequence of the same prompt); there
/// is at least one.
pub fn resolve_choices(
    state: &AppState,
    requests: Vec<GenerateRequest>,
) -> Result<Vec<ResolvedRequest>, ApiError> {
    let resolved = requests
        .into_iter()
        .map(|r| resolve(state, r))
        .collect::<Result<Vec<ResolvedRequest>, ApiError>>()?;
    if resolved.is_empty() {
        return Err(ValidationError::N(state.info.max_best_of, 0).into());
    }
    Ok(resolved)
}
