//! The encoder endpoints, as LoRAX serves them: `POST /embed`, `POST /v1/embeddings` (OpenAI's),
//! `POST /classify` and `POST /classify_batch`. Each request: the model must serve the task,
//! names no adapter, takes one concurrency permit per input (a list is at most
//! `--max-concurrent-requests` inputs: more could never be admitted), tokenizes each input
//! within the limit (`EncoderConfig`), and hands them to the encoder batching task, where
//! they share shard calls with other requests' inputs. Counted in the request metrics like a
//! generation.

mod body;

pub use body::{
    base64_f32, BatchClassifyRequest, ClassifyRequest, EmbedRequest, EmbedResponse,
    EmbeddingObject, EmbeddingUsage, EmbeddingValues, EmbeddingsRequest, EmbeddingsResponse,
    EncodingFormat,
};

use crate::adapter::{self, AdapterParams};
use crate::app::{served_endpoints, AppState};
use crate::encoder::{entities, Computed, Entity, TokenClass};
use crate::error_docs::EncoderErrors;
use crate::errors::{ApiError, InferError, JsonBody, ValidationError};
use crate::metrics::{self as m, RequestTimings};
use crate::openai::StringOrList;
use crate::pb;
use crate::respond::answer_headers;
use crate::validation::EncoderTokens;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::future::try_join_all;
use std::future::Future;
use tokio::time::Instant;

/// Embed a text: one vector (LoRAX's endpoint).
#[utoipa::path(post, path = "/embed", tag = "Encoders", request_body = EmbedRequest,
    responses((status = 200, description = "The embedding", body = EmbedResponse), EncoderErrors))]
pub async fn embed(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<EmbedRequest>,
) -> Result<Response, ApiError> {
    counted(async {
        let inputs = vec![("inputs".to_string(), request.inputs)];
        let ran = embed_inputs(&state, request.parameters.as_ref(), "inputs", inputs).await?;
        let embeddings = ran.outputs.into_iter().next().unwrap_or_default();
        Ok((ran.headers, Json(EmbedResponse { embeddings })).into_response())
    })
    .await
}

/// Embed one text or a list (OpenAI's endpoint).
///
/// The answer has OpenAI's shape, plus LoRAX's key `embeddings` holding the same list as
/// `data`. `encoding_format: "base64"` (the `openai` client's default) gives base64 of the
/// little-endian float32 bytes.
#[utoipa::path(post, path = "/v1/embeddings", tag = "OpenAI compatible",
    request_body = EmbeddingsRequest,
    responses((status = 200, description = "The embeddings", body = EmbeddingsResponse),
        EncoderErrors))]
pub async fn embeddings(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<EmbeddingsRequest>,
) -> Result<Response, ApiError> {
    counted(async {
        if let Some(asked) = request.dimensions {
            let dim = state.info.embedding_dim;
            if asked != dim && state.info.supports_embeddings {
                return Err(ValidationError::Dimensions(dim, asked).into());
            }
        }
        let inputs = match request.input {
            StringOrList::One(text) => vec![("input".to_string(), text)],
            StringOrList::Many(texts) => named("input", texts),
        };
        let ran = embed_inputs(&state, request.parameters.as_ref(), "input", inputs).await?;
        let format = request.encoding_format.unwrap_or_default();
        let data: Vec<EmbeddingObject> = ran
            .outputs
            .into_iter()
            .enumerate()
            .map(|(index, values)| EmbeddingObject {
                object: "embedding",
                index,
                embedding: EmbeddingValues::new(values, format),
            })
            .collect();
        let model = match request.model.is_empty() {
            true => state.info.model_id.clone(),
            false => request.model,
        };
        let tokens = ran.timings.prompt_tokens;
        let answer = EmbeddingsResponse {
            object: "list",
            embeddings: data.clone(),
            data,
            model,
            usage: EmbeddingUsage {
                prompt_tokens: tokens,
                total_tokens: tokens,
            },
        };
        Ok((ran.headers, Json(answer)).into_response())
    })
    .await
}

/// Token classification of a text: its entities.
///
/// Grouped as Hugging Face's token-classification pipeline with
/// `aggregation_strategy="simple"`; `start`/`end` are character offsets and `word` the input's
/// own text between them.
#[utoipa::path(post, path = "/classify", tag = "Encoders", request_body = ClassifyRequest,
    responses((status = 200, description = "The entities", body = Vec<Entity>), EncoderErrors))]
pub async fn classify(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<ClassifyRequest>,
) -> Result<Response, ApiError> {
    counted(async {
        let inputs = vec![("inputs".to_string(), request.inputs)];
        let ran = classify_inputs(&state, request.parameters.as_ref(), "inputs", inputs).await?;
        let found = ran.outputs.into_iter().next().unwrap_or_default();
        Ok((ran.headers, Json(found)).into_response())
    })
    .await
}

/// Token classification of several texts: one list of entities per text, in order.
#[utoipa::path(post, path = "/classify_batch", tag = "Encoders",
    request_body = BatchClassifyRequest,
    responses((status = 200, description = "The entities of each input", body = Vec<Vec<Entity>>),
        EncoderErrors))]
pub async fn classify_batch(
    State(state): State<AppState>,
    JsonBody(request): JsonBody<BatchClassifyRequest>,
) -> Result<Response, ApiError> {
    counted(async {
        let inputs = named("inputs", request.inputs);
        let ran = classify_inputs(&state, request.parameters.as_ref(), "inputs", inputs).await?;
        Ok((ran.headers, Json(ran.outputs)).into_response())
    })
    .await
}

/// A request's inputs, computed: one output per input, its timings and its answer headers.
struct Ran<T> {
    outputs: Vec<T>,
    timings: RequestTimings,
    headers: HeaderMap,
}

/// Counts a failed request (its JSON body was read: malformed bodies are not requests).
async fn counted(
    handle: impl Future<Output = Result<Response, ApiError>>,
) -> Result<Response, ApiError> {
    let result = handle.await;
    if let Err(err) = &result {
        m::request_failed(None, &err.body.error_type);
    }
    result
}

/// A list's texts named by their place (`inputs[2]`) for their errors.
fn named(list: &str, texts: Vec<String>) -> Vec<(String, String)> {
    texts
        .into_iter()
        .enumerate()
        .map(|(i, text)| (format!("{list}[{i}]"), text))
        .collect()
}

/// Embeds `inputs` (field name, text), the texts of the body's field `list`.
async fn embed_inputs(
    state: &AppState,
    parameters: Option<&AdapterParams>,
    list: &'static str,
    inputs: Vec<(String, String)>,
) -> Result<Ran<Vec<f32>>, ApiError> {
    if !state.info.supports_embeddings {
        let served = served_endpoints(&state.info);
        return Err(ValidationError::EmbeddingsNotSupported(served).into());
    }
    let encoders = &state.encoders;
    let ran = run(state, parameters, list, inputs, |tokens| {
        encoders.embed(tokens.ids.clone())
    })
    .await?;
    let outputs: Vec<Vec<f32>> = ran
        .outputs
        .into_iter()
        .map(|(_, _, values)| values)
        .collect();
    m::encoder_request_succeeded("embed", &ran.timings, outputs.len());
    Ok(Ran {
        outputs,
        timings: ran.timings,
        headers: ran.headers,
    })
}

/// Classifies `inputs` (field name, text), the texts of the body's field `list`.
async fn classify_inputs(
    state: &AppState,
    parameters: Option<&AdapterParams>,
    list: &'static str,
    inputs: Vec<(String, String)>,
) -> Result<Ran<Vec<Entity>>, ApiError> {
    if !state.info.supports_classification {
        let served = served_endpoints(&state.info);
        return Err(ValidationError::ClassificationNotSupported(served).into());
    }
    let encoders = &state.encoders;
    let ran = run(state, parameters, list, inputs, |tokens| {
        encoders.classify(tokens.ids.clone())
    })
    .await?;
    let mut outputs = Vec::with_capacity(ran.outputs.len());
    for (text, tokens, classes) in ran.outputs {
        let found = entities_of(&text, &tokens, &classes)?;
        metrics::histogram!("lorax_request_classify_output_count").record(found.len() as f64);
        outputs.push(found);
    }
    m::encoder_request_succeeded("classify", &ran.timings, outputs.len());
    Ok(Ran {
        outputs,
        timings: ran.timings,
        headers: ran.headers,
    })
}

/// An input's entities from the shard's labels for its tokens.
fn entities_of(
    text: &str,
    tokens: &EncoderTokens,
    classes: &pb::ClassifyPredictionList,
) -> Result<Vec<Entity>, InferError> {
    let n = tokens.ids.len();
    if classes.predictions.len() != n || classes.scores.len() != n {
        return Err(InferError::Generation(format!(
            "the shard classified {} tokens of an input of {n}",
            classes.predictions.len()
        )));
    }
    let token_classes: Vec<TokenClass<'_>> = (0..n)
        .map(|i| TokenClass {
            label: &classes.predictions[i],
            score: classes.scores[i],
            start: tokens.offsets[i].0,
            end: tokens.offsets[i].1,
            special: tokens.special[i],
        })
        .collect();
    Ok(entities(text, &token_classes))
}

/// The steps every encoder request shares: its adapter fields, the size of its list (the body's
/// field `list`), admission, tokenization, and one `compute` per input (all at once, so they can
/// share a call). Each output comes with its input's text and tokens. Its success is counted by
/// the caller, once the answer is made.
async fn run<T, F, Fut>(
    state: &AppState,
    parameters: Option<&AdapterParams>,
    list: &'static str,
    inputs: Vec<(String, String)>,
    compute: F,
) -> Result<Ran<(String, EncoderTokens, T)>, ApiError>
where
    F: Fn(&EncoderTokens) -> Fut,
    Fut: Future<Output = Result<Computed<T>, InferError>>,
{
    let received = Instant::now();
    check_adapter(state, parameters)?;
    let most = state.info.max_concurrent_requests;
    if inputs.is_empty() {
        return Err(ValidationError::EmptyList(list).into());
    }
    if inputs.len() > most {
        return Err(ValidationError::TooManyInputs(list, most, inputs.len()).into());
    }
    let _permits = state.infer.admit(inputs.len() as u32)?;
    let max_length = state.encoders.config().max_input_length;
    let validation = state.infer.validation();
    let tokenized = try_join_all(inputs.into_iter().map(|(field, text)| async move {
        let tokens = validation
            .encoder_tokens(&field, text.clone(), max_length)
            .await?;
        Ok::<_, ValidationError>((text, tokens))
    }))
    .await?;
    let computed = try_join_all(tokenized.iter().map(|(_, tokens)| compute(tokens))).await?;
    let timings = timings_of(received, &tokenized, &computed);
    let characters = tokenized.iter().map(|(text, _)| text.chars().count()).sum();
    let headers = answer_headers(state, &timings, characters);
    let outputs = tokenized
        .into_iter()
        .zip(computed)
        .map(|((text, tokens), computed)| (text, tokens, computed.output))
        .collect();
    Ok(Ran {
        outputs,
        timings,
        headers,
    })
}

/// Refuses a request that names an adapter: the shards compute encoders with the base weights.
/// Naming none (or the base model's id) is fine; on a model without adapters, naming one gets
/// the same 422 as a generation naming one.
fn check_adapter(state: &AppState, parameters: Option<&AdapterParams>) -> Result<(), ApiError> {
    let Some(p) = parameters else {
        return Ok(());
    };
    let names_one = p.adapter_id.as_deref().is_some_and(|id| !id.is_empty());
    if !names_one && p.merged_adapters.is_none() {
        return Ok(());
    }
    let config = state.infer.validation().adapter_config();
    match adapter::resolve(config, p.fields())? {
        None => Ok(()),
        Some(_) => Err(ValidationError::EncoderAdapter.into()),
    }
}

/// A request's timings: validated once its first input was queued, in inference from the start
/// of the call its last input joined.
fn timings_of<T>(
    received: Instant,
    tokenized: &[(String, EncoderTokens)],
    computed: &[Computed<T>],
) -> RequestTimings {
    let queued = computed.iter().map(|c| c.queued).min().unwrap_or(received);
    let start = computed.iter().map(|c| c.start).max().unwrap_or(queued);
    let tokens: usize = tokenized.iter().map(|(_, t)| t.ids.len()).sum();
    RequestTimings::new(received, queued, start, tokens as u32, 0)
}
