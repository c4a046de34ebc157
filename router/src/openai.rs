//! OpenAI-compatible endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (both with
//! `stream`) and `GET /v1/models`. Requests become native generate requests; `model` names the
//! adapter (empty: the default adapter or the base model; the served model's id: the base model).

use crate::adapter::{AdapterParams, ApiToken};
use crate::api::{
    FinishReason, GenerateParameters, GenerateRequest, GenerateResponse, StreamResponse,
};
use crate::app::{render_chat, token_from_header, AppState};
use crate::errors::{ApiError, ErrorResponse, JsonBody, ValidationError};
use crate::respond::generate_response;
use crate::sse::{stream_with, EventEncoder};
use crate::template::ChatMessage;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::time::{SystemTime, UNIX_EPOCH};

/// `stop` as a string or a list of strings.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum StringOrList {
    One(String),
    Many(Vec<String>),
}

impl StringOrList {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// Sampling fields shared by both endpoints (OpenAI's, plus LoRAX's extras).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct SamplingFields {
    #[serde(default)]
    pub model: String,
    pub max_tokens: Option<u32>,
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub n: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    pub stop: Option<StringOrList>,
    pub seed: Option<u64>,
    pub repetition_penalty: Option<f32>,
    pub top_k: Option<i32>,
    pub ignore_eos_token: Option<bool>,
    pub adapter_source: Option<String>,
    pub api_token: Option<ApiToken>,
    pub response_format: Option<Value>,
}

/// Body of `POST /v1/completions`.
#[derive(Clone, Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: StringOrList,
    #[serde(default)]
    pub echo: bool,
    pub best_of: Option<usize>,
    pub logprobs: Option<u32>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

/// Body of `POST /v1/chat/completions`.
#[derive(Clone, Debug, Deserialize)]
pub struct ChatCompletionRequest {
    pub messages: Vec<ChatMessage>,
    #[serde(flatten)]
    pub sampling: SamplingFields,
}

#[derive(Clone, Debug, Serialize)]
struct Usage {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::EndOfSequenceToken | FinishReason::StopSequence => "stop",
    }
}

/// The native parameters of an OpenAI request.
fn parameters(s: SamplingFields) -> Result<GenerateParameters, ApiError> {
    if s.n.unwrap_or(1) != 1 {
        return Err(ValidationError::NotSupported("n > 1").into());
    }
    // OpenAI's temperature 0 means greedy; ours must be > 0, so it becomes "unset".
    let temperature = s.temperature.filter(|t| *t != 0.0);
    Ok(GenerateParameters {
        // The served model's id means the base model (resolved in validation).
        adapter: AdapterParams {
            adapter_id: (!s.model.is_empty()).then_some(s.model),
            adapter_source: s.adapter_source,
            merged_adapters: None,
            api_token: s.api_token,
        },
        temperature,
        top_p: s.top_p,
        top_k: s.top_k,
        repetition_penalty: s.repetition_penalty,
        do_sample: temperature.is_some() || s.top_p.is_some_and(|p| p < 1.0) || s.top_k.is_some(),
        max_new_tokens: s.max_tokens.or(s.max_completion_tokens),
        ignore_eos_token: s.ignore_eos_token.unwrap_or(false),
        stop: s.stop.map(StringOrList::into_vec).unwrap_or_default(),
        seed: s.seed,
        response_format: s.response_format,
        details: true,
        ..Default::default()
    })
}

/// Which OpenAI object the answers are.
#[derive(Clone, Copy)]
enum Kind {
    Completion,
    Chat,
}

impl Kind {
    /// A new response id, prefixed as OpenAI's: `cmpl-…` or `chatcmpl-…`.
    fn new_id(self) -> String {
        let prefix = match self {
            Self::Completion => "cmpl",
            Self::Chat => "chatcmpl",
        };
        format!("{prefix}-{:016x}", rand::random::<u64>())
    }
}

/// `POST /v1/completions`.
pub async fn completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(mut request): JsonBody<CompletionRequest>,
) -> Result<Response, ApiError> {
    token_from_header(&mut request.sampling.api_token, &headers);
    let prompt = match request.prompt {
        StringOrList::One(p) => p,
        StringOrList::Many(mut v) if v.len() == 1 => v.remove(0),
        StringOrList::Many(_) => {
            return Err(ValidationError::NotSupported("a list of several prompts").into())
        }
    };
    let model = request.sampling.model.clone();
    let stream = request.sampling.stream;
    let mut parameters = parameters(request.sampling)?;
    parameters.return_full_text = Some(request.echo);
    parameters.best_of = request.best_of;
    let generate = GenerateRequest {
        inputs: prompt,
        parameters,
    };
    respond(
        &state,
        generate,
        Kind::Completion,
        model,
        stream,
        request.logprobs.is_some(),
    )
    .await
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(mut request): JsonBody<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    token_from_header(&mut request.sampling.api_token, &headers);
    let inputs = render_chat(&state, &request.messages)?;
    let model = request.sampling.model.clone();
    let stream = request.sampling.stream;
    let mut parameters = parameters(request.sampling)?;
    parameters.prompt_has_special_tokens = true;
    let generate = GenerateRequest { inputs, parameters };
    respond(&state, generate, Kind::Chat, model, stream, false).await
}

/// `GET /v1/models`: the served model.
pub async fn models(State(state): State<AppState>) -> Json<Value> {
    Json(json!({"object": "list", "data": [
        {"id": state.info.model_id, "object": "model", "created": 0, "owned_by": "lorax"}
    ]}))
}

async fn respond(
    state: &AppState,
    request: GenerateRequest,
    kind: Kind,
    model: String,
    stream: bool,
    logprobs: bool,
) -> Result<Response, ApiError> {
    let id = kind.new_id();
    let model = if model.is_empty() {
        state.info.model_id.clone()
    } else {
        model
    };
    if stream {
        let encoder = OpenAiEncoder {
            kind,
            id,
            model,
            created: now(),
            first: true,
        };
        return stream_with(state, request, Box::new(encoder)).await;
    }
    let (headers, answer) = generate_response(state, request).await?;
    let body = completion_body(kind, &id, &model, answer, logprobs);
    Ok((headers, Json(body)).into_response())
}

fn completion_body(
    kind: Kind,
    id: &str,
    model: &str,
    answer: GenerateResponse,
    logprobs: bool,
) -> Value {
    let details = answer.details;
    let usage = details.as_ref().map(|d| Usage {
        prompt_tokens: d.prompt_tokens,
        completion_tokens: d.generated_tokens,
        total_tokens: d.prompt_tokens + d.generated_tokens,
    });
    let reason = details.as_ref().map(|d| finish_reason(d.finish_reason));
    let choice = match kind {
        Kind::Completion => {
            let logprobs = details.as_ref().filter(|_| logprobs).map(|d| {
                let mut offset = 0;
                let offsets: Vec<usize> = d
                    .tokens
                    .iter()
                    .map(|t| {
                        let at = offset;
                        offset += t.text.len();
                        at
                    })
                    .collect();
                json!({
                    "tokens": d.tokens.iter().map(|t| &t.text).collect::<Vec<_>>(),
                    "token_logprobs": d.tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
                    "top_logprobs": null,
                    "text_offset": offsets,
                })
            });
            json!({"index": 0, "text": answer.generated_text, "logprobs": logprobs, "finish_reason": reason})
        }
        Kind::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": answer.generated_text},
            "logprobs": null,
            "finish_reason": reason,
        }),
    };
    let object = match kind {
        Kind::Completion => "text_completion",
        Kind::Chat => "chat.completion",
    };
    json!({"id": id, "object": object, "created": now(), "model": model, "choices": [choice], "usage": usage})
}

/// One SSE event as OpenAI frames it: `data: {json}` (with a space), chunks and errors alike.
fn openai_event<T: Serialize>(payload: &T) -> Bytes {
    let json = serde_json::to_string(payload).unwrap_or_else(|_| "{}".to_string());
    Bytes::from(format!("data: {json}\n\n"))
}

/// SSE chunks in OpenAI's format, ending with `data: [DONE]` (not after an error).
struct OpenAiEncoder {
    kind: Kind,
    id: String,
    model: String,
    created: u64,
    first: bool,
}

impl EventEncoder for OpenAiEncoder {
    fn event(&mut self, response: StreamResponse) -> Bytes {
        let reason = response
            .details
            .as_ref()
            .map(|d| finish_reason(d.finish_reason));
        let text = if response.token.special {
            String::new()
        } else {
            response.token.text
        };
        let usage = response.details.as_ref().map(|d| Usage {
            prompt_tokens: d.prompt_tokens,
            completion_tokens: d.generated_tokens,
            total_tokens: d.prompt_tokens + d.generated_tokens,
        });
        let (object, choice) = match self.kind {
            Kind::Completion => (
                "text_completion",
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": reason}),
            ),
            Kind::Chat => {
                let mut delta = json!({"content": text});
                if self.first {
                    delta["role"] = json!("assistant");
                }
                (
                    "chat.completion.chunk",
                    json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": reason}),
                )
            }
        };
        self.first = false;
        let chunk = json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model,
            "choices": [choice], "usage": usage,
        });
        openai_event(&chunk)
    }

    fn error(&mut self, body: &ErrorResponse) -> Bytes {
        openai_event(body)
    }

    fn done(&mut self) -> Option<Bytes> {
        Some(Bytes::from_static(b"data: [DONE]\n\n"))
    }
}
