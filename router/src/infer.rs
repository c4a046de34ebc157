//! `Infer`: the handle HTTP handlers use to run requests. It admits (concurrency limit),
//! validates, queues, and hands back the request's stream of generations; `generate` collects a
//! stream into one answer, `generate_best_of` runs several sampled sequences and keeps the best,
//! `generate_streams` runs several requests at once (OpenAI's `n` choices). A request with a
//! grammar waits here until every shard compiled it, never in a batch.
//! Requests arrive with their adapter resolved (`Validation::resolve`), so the handler's metrics
//! label and the queue agree on it.

use crate::api::{PrefillToken, Token};
use crate::batcher::{spawn_batcher, BatcherConfig};
use crate::client::{ShardClient, ShardError};
use crate::entry::{Delivery, Entry, Finished, GeneratedText, InferStreamResponse};
use crate::errors::{InferError, ValidationError};
use crate::exchange::ExchangeConfig;
use crate::health::{Health, HealthConfig};
use crate::pb;
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

/// The stream's messages (the permit stays held while the stream lives).
impl futures::Stream for GenerationStream {
    type Item = Result<InferStreamResponse, InferError>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::pin::Pin::new(&mut self.stream).poll_next(cx)
    }
}

/// Cloneable handle to validation, the queue and the batching task.
#[derive(Clone)]
pub struct Infer {
    client: Arc<dyn ShardClient>,
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
            chunked_prefill: config.chunked_prefill,
            prefix_caching: config.prefix_caching,
            exchange,
        };
        let queue = Queue::spawn(client.clone(), queue_config, notify.clone());
        let health = Health::new(health, validation.probe_request());
        spawn_batcher(
            client.clone(),
            queue.clone(),
            notify.clone(),
            config,
            health.clone(),
        );
        Self {
            client,
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

    /// `n` concurrency permits for work that does not go through the queue (the inputs of an
    /// encoder request), or `Overloaded`: they count against the same limit as generations.
    pub fn admit(&self, n: u32) -> Result<OwnedSemaphorePermit, InferError> {
        self.permits(n)
    }

    /// `n` concurrency permits, or `Overloaded`.
    fn permits(&self, n: u32) -> Result<OwnedSemaphorePermit, InferError> {
        self.limit
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|_| InferError::Overloaded)
    }

    /// Validates and queues several requests at once (all or none); returns their streams in
    /// order. Each is validated on its own (a sampled one draws its own seed when it has none).
    pub async fn generate_streams(
        &self,
        requests: Vec<ResolvedRequest>,
        delivery: Delivery,
    ) -> Result<Vec<GenerationStream>, InferError> {
        let mut permit = self.permits(requests.len() as u32)?;
        let valid = try_join_all(requests.into_iter().map(|r| self.validate(r))).await?;
        // Each stream holds one of the permits: a choice that ends frees its slot.
        Ok(valid
            .into_iter()
            .map(|request| {
                let own = permit.split(1);
                self.enqueue(request, own, delivery)
            })
            .collect())
    }

    /// Validates a request and has the shards compile its grammar, if it has one.
    async fn validate(&self, request: ResolvedRequest) -> Result<ValidGenerateRequest, InferError> {
        let span = tracing::info_span!("validation");
        let valid = self.validation.validate(request).instrument(span).await?;
        if let Some(grammar) = &valid.grammar {
            self.compile(grammar.clone()).await?;
        }
        Ok(valid)
    }

    /// Compiles a grammar on every shard: a grammar a shard cannot compile is the request's
    /// fault (422 with the shard's reason); any other failure is the shard's (424).
    async fn compile(&self, grammar: pb::Grammar) -> Result<(), InferError> {
        let span = tracing::info_span!("compile_grammar");
        let result = self.client.compile_grammar(grammar).instrument(span).await;
        result.map_err(|err| grammar_error(&err))
    }

    fn enqueue(
        &self,
        request: ValidGenerateRequest,
        permit: Option<OwnedSemaphorePermit>,
        delivery: Delivery,
    ) -> GenerationStream {
        let prompt_tokens = request.input_length;
        let (tx, rx) = mpsc::unbounded_channel();
        self.queue.append(Entry::new(request, tx, delivery));
        self.notify.notify_one();
        GenerationStream {
            prompt_tokens,
            stream: UnboundedReceiverStream::new(rx),
            _permit: permit,
        }
    }

    /// Runs a request to its end (its messages delivered at once when it ends).
    pub async fn generate(&self, request: ResolvedRequest) -> Result<InferResponse, InferError> {
        let permit = self.permits(1)?;
        let valid = self.validate(request).await?;
        collect(self.enqueue(valid, Some(permit), Delivery::AtEnd)).await
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
                collect(self.enqueue(valid, None, Delivery::AtEnd)).await
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

/// A failed grammar compilation as the request's error.
fn grammar_error(err: &ShardError) -> InferError {
    match err.code() {
        tonic::Code::InvalidArgument => ValidationError::GrammarCompile(err.message()).into(),
        _ => InferError::Generation(err.to_string()),
    }
}

/// Reads a stream to its `End`.
pub async fn collect(mut generation: GenerationStream) -> Result<InferResponse, InferError> {
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
