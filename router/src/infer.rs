//! `Infer`: the handle HTTP handlers use to run requests. It admits (concurrency limit),
//! validates, queues, and hands back the request's stream of generations; `generate` collects a
//! stream into one answer, `generate_best_of` runs several sampled sequences and keeps the best.

use crate::api::{AlternativeToken, FinishReason, GenerateRequest, PrefillToken, Token};
use crate::batcher::{spawn_batcher, BatcherConfig};
use crate::client::ShardClient;
use crate::errors::InferError;
use crate::exchange::ExchangeConfig;
use crate::pb;
use crate::queue::{Entry, Queue, QueueConfig};
use crate::validation::{ValidGenerateRequest, Validation, ValidationError};
use futures::future::try_join_all;
use futures::StreamExt;
use std::sync::Arc;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;

/// What the batcher sends to a request, in order: at most one `Prefill`, then one message per
/// generated token, the last being `End`.
#[derive(Debug, Clone)]
pub enum InferStreamResponse {
    /// Prompt tokens with log-probabilities (when `decoder_input_details`).
    Prefill(Vec<PrefillToken>),
    /// A generated token.
    Intermediate {
        token: Token,
        top_tokens: Vec<Token>,
    },
    /// The last generated token and the final text.
    End {
        token: Token,
        top_tokens: Vec<Token>,
        generated_text: GeneratedText,
        /// When the request was queued.
        queued: Instant,
        /// When it was put in a batch.
        start: Instant,
    },
}

/// The end of a request, from the shard's `GeneratedText`.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedText {
    pub text: String,
    pub generated_tokens: u32,
    pub finish_reason: FinishReason,
    pub seed: Option<u64>,
}

impl From<pb::GeneratedText> for GeneratedText {
    fn from(g: pb::GeneratedText) -> Self {
        Self {
            text: g.text,
            generated_tokens: g.generated_tokens,
            finish_reason: FinishReason::from_proto(g.finish_reason),
            seed: g.seed,
        }
    }
}

/// A finished request.
#[derive(Debug, Clone)]
pub struct InferResponse {
    pub prompt_tokens: u32,
    pub prefill: Vec<PrefillToken>,
    pub tokens: Vec<Token>,
    pub top_tokens: Vec<Vec<Token>>,
    pub generated_text: GeneratedText,
    pub queued: Instant,
    pub start: Instant,
}

impl InferResponse {
    /// Sum of the generated tokens' log-probabilities (how `best_of` ranks sequences).
    pub fn logprob_sum(&self) -> f32 {
        self.tokens.iter().map(|t| t.logprob).sum()
    }
}

/// A request's stream of generations; holds its concurrency permit while alive. Dropping it tells
/// the batcher the client went away.
pub struct GenerationStream {
    /// Prompt tokens after truncation.
    pub prompt_tokens: u32,
    pub stream: UnboundedReceiverStream<Result<InferStreamResponse, InferError>>,
    _permit: Option<OwnedSemaphorePermit>,
}

/// Cloneable handle to validation, the queue and the batching task.
#[derive(Clone)]
pub struct Infer {
    validation: Validation,
    queue: Queue,
    notify: Arc<Notify>,
    limit: Arc<Semaphore>,
}

impl Infer {
    /// Spawns the queue and batching tasks.
    pub fn new(
        client: Arc<dyn ShardClient>,
        validation: Validation,
        config: BatcherConfig,
        exchange: ExchangeConfig,
        max_concurrent_requests: usize,
    ) -> Self {
        let notify = Arc::new(Notify::new());
        let queue_config = QueueConfig {
            block_size: config.block_size,
            exchange,
        };
        let queue = Queue::spawn(client.clone(), queue_config, notify.clone());
        spawn_batcher(client, queue.clone(), notify.clone(), config);
        Self {
            validation,
            queue,
            notify,
            limit: Arc::new(Semaphore::new(max_concurrent_requests)),
        }
    }

    pub fn validation(&self) -> &Validation {
        &self.validation
    }

    /// The queue (adapter listing and management).
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// `n` concurrency permits, or `Overloaded`.
    fn permits(&self, n: u32) -> Result<OwnedSemaphorePermit, InferError> {
        self.limit
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|_| InferError::Overloaded)
    }

    /// Validates and queues a request; returns its stream.
    pub async fn generate_stream(
        &self,
        request: GenerateRequest,
    ) -> Result<GenerationStream, InferError> {
        let permit = self.permits(1)?;
        let valid = self.validation.validate(request).await?;
        Ok(self.enqueue(valid, Some(permit)))
    }

    fn enqueue(
        &self,
        request: ValidGenerateRequest,
        permit: Option<OwnedSemaphorePermit>,
    ) -> GenerationStream {
        let prompt_tokens = request.input_length;
        let (tx, rx) = mpsc::unbounded_channel();
        self.queue.append(Entry::new(request, tx));
        self.notify.notify_one();
        GenerationStream {
            prompt_tokens,
            stream: UnboundedReceiverStream::new(rx),
            _permit: permit,
        }
    }

    /// Runs a request to its end.
    pub async fn generate(&self, request: GenerateRequest) -> Result<InferResponse, InferError> {
        collect(self.generate_stream(request).await?).await
    }

    /// Runs `best_of` sampled sequences (each validated on its own, so each gets its own seed)
    /// and returns the one with the highest log-probability sum, and the others.
    pub async fn generate_best_of(
        &self,
        request: GenerateRequest,
        best_of: usize,
    ) -> Result<(InferResponse, Vec<InferResponse>), InferError> {
        let max_best_of = self.validation.limits().max_best_of;
        if best_of > max_best_of {
            return Err(ValidationError::BestOf(max_best_of, best_of).into());
        }
        let _permits = self.permits(best_of as u32)?;
        let runs = (0..best_of).map(|_| {
            let request = request.clone();
            async move {
                let valid = self.validation.validate(request).await?;
                collect(self.enqueue(valid, None)).await
            }
        });
        let mut responses = try_join_all(runs).await?;
        let best = responses
            .iter()
            .enumerate()
            .max_by(|(_, a), (_, b)| a.logprob_sum().total_cmp(&b.logprob_sum()))
            .map(|(i, _)| i)
            .unwrap_or(0);
        let best = responses.remove(best);
        Ok((best, responses))
    }
}

/// Reads a stream to its `End`.
async fn collect(mut generation: GenerationStream) -> Result<InferResponse, InferError> {
    let mut prefill = Vec::new();
    let mut tokens = Vec::new();
    let mut all_top_tokens = Vec::new();
    while let Some(message) = generation.stream.next().await {
        match message? {
            InferStreamResponse::Prefill(p) => prefill = p,
            InferStreamResponse::Intermediate { token, top_tokens } => {
                tokens.push(token);
                all_top_tokens.push(top_tokens);
            }
            InferStreamResponse::End {
                token,
                top_tokens,
                generated_text,
                queued,
                start,
            } => {
                tokens.push(token);
                all_top_tokens.push(top_tokens);
                if all_top_tokens.iter().all(Vec::is_empty) {
                    all_top_tokens.clear();
                }
                return Ok(InferResponse {
                    prompt_tokens: generation.prompt_tokens,
                    prefill,
                    tokens,
                    top_tokens: all_top_tokens,
                    generated_text,
                    queued,
                    start,
                });
            }
        }
    }
    Err(InferError::IncompleteGeneration)
}

/// The API's token from a shard generation (alternatives attached when asked for).
pub fn token_from_generation(g: &pb::Generation) -> (Token, Vec<Token>) {
    let top_tokens = g
        .top_tokens
        .as_ref()
        .map(tokens_from_proto)
        .unwrap_or_default();
    let alternative_tokens = (!top_tokens.is_empty()).then(|| {
        top_tokens
            .iter()
            .map(|t| AlternativeToken {
                id: t.id,
                text: t.text.clone(),
                logprob: t.logprob,
            })
            .collect()
    });
    let token = Token {
        id: g.token_id,
        text: g.token_text.clone(),
        logprob: g.token_logprob,
        special: g.token_is_special,
        alternative_tokens,
        skipped: false,
    };
    (token, top_tokens)
}

/// A proto token list as API tokens.
pub fn tokens_from_proto(tokens: &pb::Tokens) -> Vec<Token> {
    (0..tokens.ids.len())
        .map(|i| Token {
            id: tokens.ids[i],
            text: tokens.texts.get(i).cloned().unwrap_or_default(),
            logprob: tokens.logprobs.get(i).copied().unwrap_or(f32::NAN),
            special: tokens.is_special.get(i).copied().unwrap_or(false),
            alternative_tokens: None,
            skipped: false,
        })
        .collect()
}

/// A proto token list as prompt tokens (NaN log-probabilities become null).
pub fn prefill_from_proto(tokens: &pb::Tokens) -> Vec<PrefillToken> {
    (0..tokens.ids.len())
        .map(|i| PrefillToken {
            id: tokens.ids[i],
            text: tokens.texts.get(i).cloned().unwrap_or_default(),
            logprob: tokens.logprobs.get(i).copied().filter(|l| l.is_finite()),
        })
        .collect()
}
