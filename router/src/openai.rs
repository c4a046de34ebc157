//! OpenAI-compatible endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (both with
//! `stream`, `n` choices, log-probabilities, `response_format`) and `GET /v1/models`
//! (`POST /v1/embeddings` is in `encoder_api`). Requests
//! become native generate requests, one per choice; `model` names the adapter (`""` and the
//! placeholders "dummy"/"tgi": the default adapter or the base model; the served model's id:
//! the base model).
//!
//! Parts: `request` (bodies, their native parameters), `body` (answer objects and choices),
//! `stream` (the chunk encoder).

mod body;
mod request;
mod stream;

pub use body::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatDelta, ChatLogprobs, CompletionChoice,
    Logprobs, Usage,
};
pub use request::{
    adapter_of_model, ChatCompletionRequest, ChatFields, CompletionFields, CompletionRequest,
    OpenAiRequest, SamplingFields, StreamOptions, StringOrList, MODEL_PLACEHOLDERS,
};
pub use stream::{openai_event, Kind, OpenAiEncoder, StreamSettings};

use crate::api::{GenerateParameters, GenerateRequest, GenerateResponse};
use crate::app::{chat_template, render_chat, require_generation, token_from_header, AppState};
use crate::error_docs::GenerationErrors;
use crate::errors::{ApiError, JsonBody, ValidationError};
use crate::respond::generate_responses;
use crate::sse::stream_choices;
use crate::validation::schema::check_schema;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use body::{chat_choice, completion_choice, usage_of, Answer, Header};
use request::{chat_logprobs, choice_parameters, completion_logprobs, is_unnamed};
use serde::Serialize;
use serde_json::{json, Value};
use std::time::{SystemTime, UNIX_EPOCH};
use utoipa::ToSchema;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What an OpenAI request asks for beyond its native parameters.
#[derive(Clone, Debug)]
pub struct OpenAiCall {
    pub kind: Kind,
    /// `model` as given.
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    /// Choices (`n`), already checked against the limit.
    pub n: usize,
    pub logprobs: Logprobs,
    /// The model may call tools: answers that are calls become `tool_calls`.
    pub tools: bool,
}

impl OpenAiCall {
    /// Reads what the shared fields ask for; `n` is bounded by `--max-best-of`.
    fn new(kind: Kind, s: &SamplingFields, state: &AppState) -> Result<Self, ValidationError> {
        Ok(Self {
            kind,
            model: s.model.clone(),
            stream: s.stream,
            include_usage: s.include_usage(),
            n: s.choices(state.info.max_best_of)?,
            logprobs: Logprobs::None,
            tools: false,
        })
    }
}

/// OpenAI completions; `model` names the adapter.
///
/// `stream` answers with SSE chunks ending with `data: [DONE]`; also `n` choices, `logprobs`
/// and `response_format`.
#[utoipa::path(post, path = "/v1/completions", tag = "OpenAI compatible",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "Completion", content(
            (Answer<CompletionChoice> = "application/json"),
            (Answer<CompletionChoice> = "text/event-stream"),
        )),
        GenerationErrors,
    ))]
pub async fn completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(mut request): JsonBody<CompletionRequest>,
) -> Result<Response, ApiError> {
    require_generation(&state)?;
    token_from_header(&mut request.sampling.api_token, &headers);
    let mut call = OpenAiCall::new(Kind::Completion, &request.sampling, &state)?;
    let fields = request.fields;
    let (logprobs, top_n_tokens) = completion_logprobs(&fields)?;
    call.logprobs = logprobs;
    let prompt = match fields.prompt {
        StringOrList::One(p) => p,
        StringOrList::Many(mut v) if v.len() == 1 => v.remove(0),
        StringOrList::Many(_) => {
            return Err(ValidationError::NotSupported("a list of several prompts").into())
        }
    };
    if call.n > 1 && fields.best_of.is_some_and(|b| b > 1) {
        return Err(ValidationError::NWithBestOf.into());
    }
    let mut parameters = request.sampling.parameters()?;
    parameters.return_full_text = Some(fields.echo);
    parameters.best_of = fields.best_of;
    parameters.top_n_tokens = Some(top_n_tokens);
    respond(&state, prompt, parameters, call).await
}

/// OpenAI chat completions, the prompt built by the chat template; `model` names the adapter.
///
/// `stream` answers with SSE chunks ending with `data: [DONE]`; also `n` choices,
/// `logprobs`/`top_logprobs`, `response_format`, `stream_options` and `tools`.
#[utoipa::path(post, path = "/v1/chat/completions", tag = "OpenAI compatible",
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "Chat completion", content(
            (Answer<ChatChoice> = "application/json"),
            (Answer<ChatChunkChoice> = "text/event-stream"),
        )),
        GenerationErrors,
    ))]
pub async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(mut request): JsonBody<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    require_generation(&state)?;
    token_from_header(&mut request.sampling.api_token, &headers);
    let mut call = OpenAiCall::new(Kind::Chat, &request.sampling, &state)?;
    let (logprobs, top_n_tokens) = chat_logprobs(&request.fields)?;
    call.logprobs = logprobs;
    let tools = request.fields.tools.resolve()?;
    let mut parameters = request.sampling.parameters()?;
    let template = chat_template(&state, &parameters).await?;
    let inputs = render_chat(&template, &request.fields.messages, tools.as_ref())?;
    parameters.prompt_has_special_tokens = true;
    parameters.top_n_tokens = Some(top_n_tokens);
    if let Some(tools) = &tools {
        // Each function's parameters obey the same schema rules as response_format's.
        for (field, schema) in tools.parameter_schemas() {
            check_schema(&field, &schema)?;
        }
        parameters.prepared_grammar = tools.pb_grammar();
        call.tools = true;
    }
    respond(&state, inputs, parameters, call).await
}

/// One model of `GET /v1/models`.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Model {
    pub id: String,
    #[schema(example = "model")]
    pub object: &'static str,
    pub created: u64,
    #[schema(example = "lorax")]
    pub owned_by: &'static str,
}

/// Answer of `GET /v1/models`.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct ModelList {
    #[schema(example = "list")]
    pub object: &'static str,
    pub data: Vec<Model>,
}

/// The served model.
#[utoipa::path(get, path = "/v1/models", tag = "OpenAI compatible",
    responses((status = 200, description = "Model list", body = ModelList)))]
pub async fn models(State(state): State<AppState>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: vec![Model {
            id: state.info.model_id.clone(),
            object: "model",
            created: 0,
            owned_by: "lorax",
        }],
    })
}

/// Runs the call's choices (each one native request; choice `i` samples with `seed + i` when a
/// seed is given) and answers in OpenAI's format, whole or streamed.
pub async fn respond(
    state: &AppState,
    inputs: String,
    parameters: GenerateParameters,
    call: OpenAiCall,
) -> Result<Response, ApiError> {
    let requests: Vec<GenerateRequest> = (0..call.n)
        .map(|i| GenerateRequest {
            inputs: inputs.clone(),
            parameters: choice_parameters(&parameters, i),
        })
        .collect();
    let header = Header {
        id: call.kind.new_id(),
        object: call.kind.object(),
        created: now(),
        model: if is_unnamed(&call.model) {
            state.info.model_id.clone()
        } else {
            call.model.clone()
        },
    };
    if call.stream {
        let encoder = OpenAiEncoder::new(StreamSettings {
            kind: call.kind,
            id: header.id,
            model: header.model,
            created: header.created,
            n: call.n,
            logprobs: call.logprobs,
            include_usage: call.include_usage,
            tools: call.tools,
        });
        return stream_choices(state, requests, Box::new(encoder)).await;
    }
    let (headers, answers) = generate_responses(state, requests).await?;
    let body = answer_body(call.kind, header, answers, call.logprobs, call.tools);
    Ok((headers, Json(body)).into_response())
}

/// The whole answer of a call: one choice per native answer.
fn answer_body(
    kind: Kind,
    header: Header,
    answers: Vec<GenerateResponse>,
    logprobs: Logprobs,
    tools: bool,
) -> Value {
    let usage = usage_of(&answers);
    let choices = answers.into_iter().enumerate();
    let body = match kind {
        Kind::Completion => serde_json::to_value(Answer {
            header,
            choices: choices
                .map(|(i, a)| completion_choice(i, a, logprobs))
                .collect(),
            usage,
        }),
        Kind::Chat => serde_json::to_value(Answer {
            header,
            choices: choices
                .map(|(i, a)| chat_choice(i, a, logprobs, tools))
                .collect(),
            usage,
        }),
    };
    body.unwrap_or_else(|_| json!({}))
}
