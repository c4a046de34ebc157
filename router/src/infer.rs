//! `Infer`: the handle HTTP handlers use to run requests. It admits (concurrency limit),
//! validates, queues, and hands back the request's stream of generations; `generate` collects a
//! stream into one answer, `generate_best_of` runs several sampled sequences and keeps the best.
//! Requests arrive with their adapter resolved (`Validation::resolve`), so the handler's metrics
//! label and the queue agree on it.

use crate::api::{PrefillToken, Token};
use crate::batcher::{spawn_batcher, BatcherConfig};
use crate::client::ShardClient;
use crate::entry::{Entry, Finished, GeneratedText, InferStreamResponse};
use crate::errors::{InferError, ValidationError};
use crate::exchange::ExchangeConfig;
use crate::health::{Health, HealthConfig};
use crate::queue::{Queue, QueueConfig};
use crate::validation::{ResolvedRequest, ValidGenerateRequest, Validation};
use futures::future::try_join_all;
use futures::StreamExt;
use std::sync::Arc;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tracing::Instrument;

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
    health: Health,
}

impl Infer {
    /// Spawns the queue and batching tasks.
    pub fn new(
        client: Arc<dyn ShardClient>,
        validation: Validation,
        config: BatcherConfig,
        exchange: ExchangeConfig,
        health: HealthConfig,
        max_concurrent_requests: usize,
    ) -> Self {
        let notify = Arc::new(Notify::new());
        let queue_config = QueueConfig {
            block_size: config.block_size,
            exchange,
        };
        let queue = Queue::spawn(client.clone(), queue_config, notify.clone());
        let health = Health::new(health, validation.probe_request());
        spawn_batcher(
            client,
            queue.clone(),
            notify.clone(),
            config,
            health.clone(),
        );
        Self {
            validation,
            queue,
            notify,
            limit: Arc::new(Semaphore::new(max_concurrent_requests)),
            health,
        }
    }

    /// Ok when the server can generate now, else why not (see `health`).
    pub async fn health(&self) -> Result<(), String> {
        self.health.check(&self.queue, &self.notify).await
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
        request: ResolvedRequest,
    ) -> Result<GenerationStream, InferError> {
        let permit = self.permits(1)?;
        let valid = self.validate(request).await?;
        Ok(self.enqueue(valid, Some(permit)))
    }

    async fn validate(&self, request: ResolvedRequest) -> Result<ValidGenerateRequest, InferError> {
        let span = tracing::info_span!("validation");
        Ok(self.validation.validate(request).instrument(span).await?)
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
    pub async fn generate(&self, request: ResolvedRequest) -> Result<InferResponse, InferError> {
        collect(self.generate_stream(request).await?).await
    }

    /// Runs `best_of` sampled sequences (each validated on its own, so each gets its own seed)
    /// and returns the one with the highest log-probability sum, and the others.
    pub async fn generate_best_of(
        &self,
        request: ResolvedRequest,
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
                let valid = self.validate(request).await?;
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
            InferStreamResponse::End(end) => {
                let Finished {
                    token,
                    top_tokens,
                    generated_text,
                    queued,
                    start,
                } = end;
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
