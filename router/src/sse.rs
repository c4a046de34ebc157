//! A generation answered as a stream of server-sent events: LoRAX's `data:{json}` events, or
//! another framing through an `EventEncoder` (OpenAI's chunks).

use crate::adapter::AdapterKey;
use crate::api::GenerateRequest;
use crate::api::{StreamDetails, StreamResponse};
use crate::app::{resolve, AppState};
use crate::entry::{Finished, InferStreamResponse};
use crate::errors::{ApiError, ErrorResponse, InferError, ValidationError};
use crate::infer::GenerationStream;
use crate::metrics::{self as m, RequestTimings};
use crate::respond::prepend_prompt;
use axum::body::{Body, Bytes};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::HeaderValue;
use axum::response::Response;
use futures::{Stream, StreamExt};
use serde::Serialize;
use std::convert::Infallible;
use std::sync::Arc;
use tokio::time::Instant;

/// Turns stream events into SSE bytes (LoRAX's format, or OpenAI's).
pub trait EventEncoder: Send + 'static {
    fn event(&mut self, response: StreamResponse) -> Bytes;
    /// The error event that ends a failed stream (framed like the other events).
    fn error(&mut self, body: &ErrorResponse) -> Bytes {
        sse_event(body)
    }
    /// Sent after the last event.
    fn done(&mut self) -> Option<Bytes> {
        None
    }
}

/// LoRAX's events: `data:{StreamResponse}`.
pub struct LoraxEncoder;

impl EventEncoder for LoraxEncoder {
    fn event(&mut self, response: StreamResponse) -> Bytes {
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
    let start = Instant::now();
    let request = resolve(state, request)?;
    let adapter = request.adapter_key();
    let p = &request.request.parameters;
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
        .then(|| request.request.inputs.clone());
    let details = p.details;
    let fail = |err: InferError| {
        m::request_failed(adapter.as_deref(), err.error_type());
        ApiError::from(err)
    };
    let mut generation = state.infer.generate_stream(request).await.map_err(fail)?;
    // Wait for the first token so that a failed prefill is still a plain 424.
    let first = match generation.stream.next().await {
        Some(Ok(message)) => message,
        Some(Err(err)) => return Err(fail(err)),
        None => return Err(fail(InferError::IncompleteGeneration)),
    };
    let events = SseState {
        pending: Some(first),
        generation,
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

/// State of one request's event stream.
struct SseState {
    /// A message read before the stream started.
    pending: Option<InferStreamResponse>,
    generation: GenerationStream,
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
            if s.done {
                let trailer = s.trailer.take()?;
                return Some((Ok(trailer), s));
            }
            let event = s.next_event().await;
            Some((Ok(event), s))
        })
    }

    /// The next event; sets `done` after the last one.
    async fn next_event(&mut self) -> Bytes {
        loop {
            let next = match self.pending.take() {
                Some(message) => Some(Ok(message)),
                None => self.generation.stream.next().await,
            };
            let message = match next {
                Some(Ok(message)) => message,
                Some(Err(err)) => return self.fail(err),
                None => return self.fail(InferError::IncompleteGeneration),
            };
            match message {
                InferStreamResponse::Prefill(_) => continue,
                InferStreamResponse::Intermediate { token, top_tokens } => {
                    return self.encoder.event(StreamResponse {
                        token,
                        top_tokens,
                        generated_text: None,
                        details: None,
                    });
                }
                InferStreamResponse::End(end) => {
                    // The body is polled outside the handler: log and count in its span.
                    let span = self.span.clone();
                    let _inside = span.enter();
                    return self.finish(end);
                }
            }
        }
    }

    /// The last event: the final text, and the details when asked for.
    fn finish(&mut self, end: Finished) -> Bytes {
        self.done = true;
        let generated = end.generated_text;
        let prompt_tokens = self.generation.prompt_tokens;
        let t = RequestTimings::new(
            self.start,
            end.queued,
            end.start,
            prompt_tokens,
            generated.generated_tokens,
        );
        m::request_succeeded(self.adapter.as_deref(), &t);
        let details = self.details.then_some(StreamDetails {
            finish_reason: generated.finish_reason,
            prompt_tokens,
            generated_tokens: generated.generated_tokens,
            seed: generated.seed,
        });
        self.trailer = self.encoder.done();
        self.encoder.event(StreamResponse {
            token: end.token,
            top_tokens: end.top_tokens,
            generated_text: Some(prepend_prompt(&self.prompt, generated.text)),
            details,
        })
    }

    fn fail(&mut self, err: InferError) -> Bytes {
        self.done = true;
        m::request_failed(self.adapter.as_deref(), err.error_type());
        self.encoder.error(&err.to_response_body())
    }
}
