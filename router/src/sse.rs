//! A generation answered as a stream of server-sent events: LoRAX's `data:{json}` events, or
//! another framing through an `EventEncoder` (OpenAI's chunks). Several requests (OpenAI's `n`
//! choices) can share one stream: their events interleave, each tagged with its choice index.

use crate::adapter::AdapterKey;
use crate::api::GenerateRequest;
use crate::api::{StreamDetails, StreamResponse};
use crate::app::{resolve_choices, AppState};
use crate::entry::{Delivery, Finished, InferStreamResponse};
use crate::errors::{ApiError, ErrorResponse, InferError, ValidationError};
use crate::metrics::{self as m, RequestTimings};
use crate::respond::prepend_prompt;
use axum::body::{Body, Bytes};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::HeaderValue;
use axum::response::Response;
use futures::stream::{BoxStream, SelectAll};
use futures::{Stream, StreamExt};
use serde::Serialize;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use tokio::time::Instant;

/// Turns stream events into SSE bytes (LoRAX's format, or OpenAI's).
pub trait EventEncoder: Send + 'static {
    /// The event of one token of choice `index` (0 when there is one request); empty bytes send
    /// nothing. The last event of a choice has `generated_text` set.
    fn event(&mut self, index: usize, response: StreamResponse) -> Bytes;
    /// The error event that ends a failed stream (framed like the other events).
    fn error(&mut self, body: &ErrorResponse) -> Bytes {
        sse_event(body)
    }
    /// Sent after the last event of every choice.
    fn done(&mut self) -> Option<Bytes> {
        None
    }
}

/// LoRAX's events: `data:{StreamResponse}`.
pub struct LoraxEncoder;

impl EventEncoder for LoraxEncoder {
    fn event(&mut self, _index: usize, response: StreamResponse) -> Bytes {
        sse_event(&response)
    }
}

/// Validates and queues a request, then answers with its SSE stream. Errors found before the
/// first token (validation, overload) are plain HTTP errors; later ones are an error event.
pub async fn stream_with(
    state: &AppState,
    request: GenerateRequest,
    encoder: Box<dyn EventEncoder>,
) -> Result<Response, ApiError> {
    stream_choices(state, vec![request], encoder).await
}

/// Streams several requests of the same prompt at once (choice `i` is `requests[i]`); all are
/// validated and queued before the answer starts, and each must produce its first token.
pub async fn stream_choices(
    state: &AppState,
    requests: Vec<GenerateRequest>,
    encoder: Box<dyn EventEncoder>,
) -> Result<Response, ApiError> {
    let start = Instant::now();
    let resolved = resolve_choices(state, requests)?;
    let first = &resolved[0];
    let adapter = first.adapter_key();
    let p = &first.request.parameters;
    let early = if p.best_of.unwrap_or(1) != 1 {
        Some(ValidationError::BestOfStream)
    } else if p.decoder_input_details {
        Some(ValidationError::PrefillDetailsStream)
    } else {
        None
    };
    if let Some(err) = early {
        m::request_failed(adapter.as_deref(), "validation");
        return Err(err.into());
    }
    let prompt = p
        .return_full_text
        .unwrap_or(false)
        .then(|| first.request.inputs.clone());
    let details = p.details;
    let fail = |err: InferError| {
        m::request_failed(adapter.as_deref(), err.error_type());
        ApiError::from(err)
    };
    let mut generations = state
        .infer
        .generate_streams(resolved, Delivery::EveryStep)
        .await
        .map_err(fail)?;
    let prompt_tokens = generations.first().map_or(0, |g| g.prompt_tokens);
    // Wait for every first token so that a failed prefill is still a plain 424.
    let firsts = futures::future::join_all(generations.iter_mut().map(|g| g.next())).await;
    let mut pending = VecDeque::new();
    for (index, first) in firsts.into_iter().enumerate() {
        match first {
            Some(Ok(message)) => pending.push_back((index, Some(Ok(message)))),
            Some(Err(err)) => return Err(fail(err)),
            None => return Err(fail(InferError::IncompleteGeneration)),
        }
    }
    let choices = generations.len();
    let streams = generations
        .into_iter()
        .enumerate()
        .map(|(index, generation)| {
            // A stream that ends is marked by a last `None`, to tell an incomplete one apart.
            generation
                .map(move |message| (index, Some(message)))
                .chain(futures::stream::once(async move { (index, None) }))
                .boxed()
        });
    let events = SseState {
        pending,
        streams: futures::stream::select_all(streams),
        unfinished: vec![true; choices],
        prompt_tokens,
        generated_tokens: 0,
        prompt,
        details,
        adapter,
        start,
        encoder,
        trailer: None,
        done: false,
        span: tracing::Span::current(),
    }
    .into_stream();
    let mut response = Response::new(Body::from_stream(events));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    if let Ok(model_id) = HeaderValue::from_str(&state.info.model_id) {
        headers.insert("x-model-id", model_id);
    }
    Ok(response)
}

/// One SSE event: `data:{json}\n\n`.
fn sse_event<T: Serialize>(payload: &T) -> Bytes {
    let json = serde_json::to_string(payload).unwrap_or_else(|_| "{}".to_string());
    Bytes::from(format!("data:{json}\n\n"))
}

/// A choice's next message; `None` once its stream ended.
type Tagged = (usize, Option<Result<InferStreamResponse, InferError>>);

/// State of one answer's event stream (one request, or several choices).
struct SseState {
    /// Messages read before the stream started.
    pending: VecDeque<Tagged>,
    streams: SelectAll<BoxStream<'static, Tagged>>,
    /// Per choice: not ended yet.
    unfinished: Vec<bool>,
    prompt_tokens: u32,
    /// Generated by the choices that ended.
    generated_tokens: u32,
    prompt: Option<String>,
    details: bool,
    adapter: Option<Arc<AdapterKey>>,
    start: Instant,
    encoder: Box<dyn EventEncoder>,
    /// Sent once after the last event.
    trailer: Option<Bytes>,
    done: bool,
    /// The request's span, kept open until the stream ends.
    span: tracing::Span,
}

impl SseState {
    fn into_stream(self) -> impl Stream<Item = Result<Bytes, Infallible>> + Send {
        futures::stream::unfold(self, |mut s| async move {
            let event = if s.done {
                s.trailer.take()?
            } else {
                s.next_event().await?
            };
            Some((Ok(event), s))
        })
    }

    /// The next non-empty event (None: nothing more); sets `done` after the last one.
    async fn next_event(&mut self) -> Option<Bytes> {
        loop {
            let next = match self.pending.pop_front() {
                Some(tagged) => Some(tagged),
                None => self.streams.next().await,
            };
            let (index, message) = match next {
                Some((index, Some(Ok(message)))) => (index, message),
                Some((_, Some(Err(err)))) => return Some(self.fail(err)),
                Some((index, None)) if !self.unfinished[index] => continue,
                Some((_, None)) | None => return Some(self.fail(InferError::IncompleteGeneration)),
            };
            let event = match message {
                InferStreamResponse::Prefill(_) => continue,
                InferStreamResponse::Intermediate { token, top_tokens } => self.encoder.event(
                    index,
                    StreamResponse {
                        token,
                        top_tokens,
                        generated_text: None,
                        details: None,
                    },
                ),
                InferStreamResponse::End(end) => {
                    // The body is polled outside the handler: log and count in its span.
                    let span = self.span.clone();
                    let _inside = span.enter();
                    self.finish(index, end)
                }
            };
            if !event.is_empty() {
                return Some(event);
            }
            if self.done {
                return self.trailer.take();
            }
        }
    }

    /// The last event of choice `index`: the final text, and the details when asked for. The
    /// request is answered when its last choice ends.
    fn finish(&mut self, index: usize, end: Finished) -> Bytes {
        self.unfinished[index] = false;
        let generated = end.generated_text;
        self.generated_tokens += generated.generated_tokens;
        if self.unfinished.iter().all(|u| !u) {
            self.done = true;
            let t = RequestTimings::new(
                self.start,
                end.queued,
                end.start,
                self.prompt_tokens,
                self.generated_tokens,
            );
            m::request_succeeded(self.adapter.as_deref(), &t);
        }
        let details = self.details.then_some(StreamDetails {
            finish_reason: generated.finish_reason,
            prompt_tokens: self.prompt_tokens,
            generated_tokens: generated.generated_tokens,
            seed: generated.seed,
        });
        let event = self.encoder.event(
            index,
            StreamResponse {
                token: end.token,
                top_tokens: end.top_tokens,
                generated_text: Some(prepend_prompt(&self.prompt, generated.text)),
                details,
            },
        );
        if self.done {
            self.trailer = self.encoder.done();
        }
        event
    }

    fn fail(&mut self, err: InferError) -> Bytes {
        self.done = true;
        m::request_failed(self.adapter.as_deref(), err.error_type());
        self.encoder.error(&err.to_response_body())
    }
}
