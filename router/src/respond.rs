//! A generation answered as one JSON document: runs the request (or its `best_of` sequences, or
//! several requests of one prompt: OpenAI's `n` choices) to its end, records its metrics, and
//! sets LoRAX's timing headers.

use crate::api::{BestOfSequence, Details, GenerateRequest, GenerateResponse, Token};
use crate::app::{resolve, resolve_choices, AppState};
use crate::entry::Delivery;
use crate::errors::ApiError;
use crate::infer::{collect, InferResponse};
use crate::metrics::{self as m, RequestTimings};
use axum::http::{HeaderMap, HeaderValue};
use futures::future::try_join_all;
use tokio::time::Instant;

/// `text` after the prompt when `return_full_text` asked for it.
pub fn prepend_prompt(prompt: &Option<String>, text: String) -> String {
    match prompt {
        Some(prompt) => format!("{prompt}{text}"),
        None => text,
    }
}

/// Runs a request to its end and builds the answer and its timing headers.
pub async fn generate_response(
    state: &AppState,
    request: GenerateRequest,
) -> Result<(HeaderMap, GenerateResponse), ApiError> {
    let start = Instant::now();
    let request = resolve(state, request)?;
    let adapter = request.adapter_key();
    let p = &request.request.parameters;
    let prompt = p
        .return_full_text
        .unwrap_or(false)
        .then(|| request.request.inputs.clone());
    let want_details = p.details || p.decoder_input_details;
    let compute_characters = request.request.inputs.chars().count();
    let best_of = p.best_of.unwrap_or(1);
    let result = if best_of > 1 {
        state
            .infer
            .generate_best_of(request, best_of)
            .await
            .map(|(best, others)| (best, Some(others)))
    } else {
        state.infer.generate(request).await.map(|r| (r, None))
    };
    let (response, others) = result.map_err(|err| {
        m::request_failed(adapter.as_deref(), err.error_type());
        ApiError::from(err)
    })?;

    let t = RequestTimings::new(
        start,
        response.queued,
        response.start,
        response.prompt_tokens,
        response.generated_text.generated_tokens,
    );
    m::request_succeeded(adapter.as_deref(), &t);
    let mut headers = timing_headers(state, &t, compute_characters);
    set_skipped_header(&mut headers, skipped_tokens(&response.tokens));
    let best_of_sequences = others.map(|others| {
        others
            .into_iter()
            .map(|r| BestOfSequence {
                generated_text: prepend_prompt(&prompt, r.generated_text.text),
                finish_reason: r.generated_text.finish_reason,
                generated_tokens: r.generated_text.generated_tokens,
                seed: r.generated_text.seed,
                prefill: r.prefill,
                tokens: r.tokens,
                top_tokens: r.top_tokens,
            })
            .collect()
    });
    let answer = answer_of(response, &prompt, want_details, best_of_sequences);
    Ok((headers, answer))
}

/// Runs several requests of one prompt at once (OpenAI's `n` choices; each one sequence, no
/// `best_of`) and answers with each one's answer, in order. Counted as one request.
pub async fn generate_responses(
    state: &AppState,
    requests: Vec<GenerateRequest>,
) -> Result<(HeaderMap, Vec<GenerateResponse>), ApiError> {
    if requests.len() == 1 {
        let (headers, answer) =
            generate_response(state, requests.into_iter().next().unwrap()).await?;
        return Ok((headers, vec![answer]));
    }
    let start = Instant::now();
    let resolved = resolve_choices(state, requests)?;
    let first = &resolved[0];
    let adapter = first.adapter_key();
    let p = &first.request.parameters;
    let prompt = p
        .return_full_text
        .unwrap_or(false)
        .then(|| first.request.inputs.clone());
    let want_details = p.details || p.decoder_input_details;
    let compute_characters = first.request.inputs.chars().count();
    let run = async {
        let streams = state
            .infer
            .generate_streams(resolved, Delivery::AtEnd)
            .await?;
        try_join_all(streams.into_iter().map(collect)).await
    };
    let responses = run.await.map_err(|err| {
        m::request_failed(adapter.as_deref(), err.error_type());
        ApiError::from(err)
    })?;
    let generated_tokens = responses
        .iter()
        .map(|r| r.generated_text.generated_tokens)
        .sum();
    let first = &responses[0];
    let t = RequestTimings::new(
        start,
        first.queued,
        first.start,
        first.prompt_tokens,
        generated_tokens,
    );
    m::request_succeeded(adapter.as_deref(), &t);
    let mut headers = timing_headers(state, &t, compute_characters);
    let skipped = responses.iter().map(|r| skipped_tokens(&r.tokens)).sum();
    set_skipped_header(&mut headers, skipped);
    let answers = responses
        .into_iter()
        .map(|r| answer_of(r, &prompt, want_details, None))
        .collect();
    Ok((headers, answers))
}

/// The answer of one finished request.
fn answer_of(
    response: InferResponse,
    prompt: &Option<String>,
    want_details: bool,
    best_of_sequences: Option<Vec<BestOfSequence>>,
) -> GenerateResponse {
    let generated = response.generated_text;
    let details = want_details.then_some(Details {
        finish_reason: generated.finish_reason,
        prompt_tokens: response.prompt_tokens,
        generated_tokens: generated.generated_tokens,
        skipped_tokens: skipped_tokens(&response.tokens),
        seed: generated.seed,
        prefill: response.prefill,
        tokens: response.tokens,
        top_tokens: response.top_tokens,
        best_of_sequences,
    });
    GenerateResponse {
        generated_text: prepend_prompt(prompt, generated.text),
        details,
    }
}

/// Tokens that speculative decode steps gave beyond one per step.
fn skipped_tokens(tokens: &[Token]) -> u32 {
    tokens.iter().filter(|t| t.skipped).count() as u32
}

/// `x-skipped-tokens`, as LoRAX sends it.
fn set_skipped_header(headers: &mut HeaderMap, skipped: u32) {
    headers.insert("x-skipped-tokens", HeaderValue::from(skipped));
}

fn timing_headers(state: &AppState, t: &RequestTimings, characters: usize) -> HeaderMap {
    let mut headers = answer_headers(state, t, characters);
    let mut set = |name: &'static str, value: u128| {
        headers.insert(
            name,
            HeaderValue::from_str(&value.to_string()).expect("digits"),
        );
    };
    set("x-time-per-token", t.time_per_token().as_millis());
    set("x-generated-tokens", t.generated_tokens.into());
    headers
}

/// LoRAX's timing headers that every answer carries, generated or not (embeddings, entities).
pub(crate) fn answer_headers(state: &AppState, t: &RequestTimings, characters: usize) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let mut set = |name: &'static str, value: String| {
        if let Ok(value) = HeaderValue::from_str(&value) {
            headers.insert(name, value);
        }
    };
    set("x-compute-type", state.info.model_device_type.clone());
    set("x-compute-time", t.total.as_millis().to_string());
    set("x-compute-characters", characters.to_string());
    set("x-total-time", t.total.as_millis().to_string());
    set("x-validation-time", t.validation.as_millis().to_string());
    set("x-queue-time", t.queue.as_millis().to_string());
    set("x-inference-time", t.inference.as_millis().to_string());
    set("x-prompt-tokens", t.prompt_tokens.to_string());
    let total_tokens = t.prompt_tokens + t.generated_tokens;
    set("x-total-tokens", total_tokens.to_string());
    set("x-model-id", state.info.model_id.clone());
    headers
}
