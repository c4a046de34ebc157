//! Encoder models (BERT family): their Embed and Classify calls. Every HTTP request's inputs go
//! to one task (`task`) that owns the waiting inputs and sends them to the shards in shared calls
//! (`schedule` picks each call's inputs within the token budget), one call at a time, then
//! answers each input's caller. `Encoders` is the cloneable handle to it; `entities` turns a
//! classified input into entities.

mod entities;
mod schedule;
mod task;

pub use entities::{entities, Entity, TokenClass};
pub use schedule::EncoderTask;

use crate::client::ShardClient;
use crate::errors::InferError;
use crate::health::{Health, HealthConfig};
use crate::pb;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use task::{Answered, Pending};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// The limits of encoder inputs and calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncoderConfig {
    /// Most tokens in one input, special tokens included.
    pub max_input_length: usize,
    /// Most tokens in one call, summed over its inputs.
    pub max_batch_tokens: u32,
}

impl EncoderConfig {
    /// A call holds at most `max_batch_prefill_tokens` (what the shards' Warmup was sized for).
    /// An input holds at most `--max-input-length`, the model's positions
    /// (`Info.max_position_embeddings`, when reported: a longer input cannot be computed), and
    /// one call's budget (only smaller than the others with `--chunked-prefill`, which encoders
    /// do not have).
    pub fn new(
        max_input_length: usize,
        max_position_embeddings: u32,
        max_batch_prefill_tokens: u32,
    ) -> Self {
        let mut longest = max_input_length.min(max_batch_prefill_tokens as usize);
        if max_position_embeddings > 0 {
            longest = longest.min(max_position_embeddings as usize);
        }
        Self {
            max_input_length: longest,
            max_batch_tokens: max_batch_prefill_tokens,
        }
    }
}

/// What the shard computed for one input, and when.
#[derive(Debug, Clone)]
pub struct Computed<T> {
    pub output: T,
    /// When the input was handed to the batching task.
    pub queued: Instant,
    /// When the call that computed it started.
    pub start: Instant,
}

/// What a call computes for one input.
#[derive(Debug, Clone)]
pub enum EncoderOutput {
    Embedding(Vec<f32>),
    Classes(pb::ClassifyPredictionList),
}

/// Cloneable handle to the encoder batching task.
#[derive(Clone)]
pub struct Encoders {
    inputs: mpsc::UnboundedSender<Pending>,
    /// Inputs handed to the task and not yet in a call.
    waiting: Arc<AtomicUsize>,
    health: Health,
    config: EncoderConfig,
}

impl Encoders {
    /// Spawns the batching task; its calls report to a health record of their own, whose
    /// probe is the shard's Health call.
    pub fn spawn(
        client: Arc<dyn ShardClient>,
        config: EncoderConfig,
        health: HealthConfig,
    ) -> Self {
        let (inputs, receiver) = mpsc::unbounded_channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let health = Health::without_generation(health);
        let alive = health.loop_started();
        let shared = task::Shared {
            client,
            health: health.clone(),
            waiting: waiting.clone(),
            max_batch_tokens: config.max_batch_tokens,
        };
        tokio::spawn(async move {
            let _alive = alive;
            task::run(shared, receiver).await
        });
        Self {
            inputs,
            waiting,
            health,
            config,
        }
    }

    pub fn config(&self) -> EncoderConfig {
        self.config
    }

    /// Inputs waiting for a call now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// The embedding of one tokenized input.
    pub async fn embed(&self, input_ids: Vec<u32>) -> Result<Computed<Vec<f32>>, InferError> {
        let computed = self.compute(EncoderTask::Embed, input_ids).await?;
        match computed.output {
            EncoderOutput::Embedding(values) => Ok(Computed {
                output: values,
                queued: computed.queued,
                start: computed.start,
            }),
            EncoderOutput::Classes(_) => Err(wrong_answer()),
        }
    }

    /// The label and score of every token of one tokenized input.
    pub async fn classify(
        &self,
        input_ids: Vec<u32>,
    ) -> Result<Computed<pb::ClassifyPredictionList>, InferError> {
        let computed = self.compute(EncoderTask::Classify, input_ids).await?;
        match computed.output {
            EncoderOutput::Classes(classes) => Ok(Computed {
                output: classes,
                queued: computed.queued,
                start: computed.start,
            }),
            EncoderOutput::Embedding(_) => Err(wrong_answer()),
        }
    }

    /// Ok when the encoder can compute now, else why not (see `Health::check_shard`).
    pub async fn health(&self, client: &dyn ShardClient) -> Result<(), String> {
        self.health.check_shard(client).await
    }

    /// Hands one input to the task and waits for its answer. Dropping the future (the client
    /// went away) drops the receiver: the task then leaves the input out of its calls.
    async fn compute(
        &self,
        task: EncoderTask,
        input_ids: Vec<u32>,
    ) -> Result<Computed<EncoderOutput>, InferError> {
        let queued = Instant::now();
        let (answer, receiver) = oneshot::channel();
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let pending = Pending {
            task,
            input_ids,
            answer,
        };
        if self.inputs.send(pending).is_err() {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(stopped());
        }
        let Answered { output, start } = receiver.await.map_err(|_| stopped())??;
        Ok(Computed {
            output,
            queued,
            start,
        })
    }
}

fn stopped() -> InferError {
    InferError::Generation("the encoder batching task has stopped".into())
}

fn wrong_answer() -> InferError {
    InferError::Generation("the encoder call answered another task".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_input_fits_every_limit() {
        assert_eq!(EncoderConfig::new(512, 64, 4096).max_input_length, 64);
        assert_eq!(EncoderConfig::new(32, 64, 4096).max_input_length, 32);
        // A model that reports no positions is bounded by the flags alone.
        assert_eq!(EncoderConfig::new(32, 0, 4096).max_input_length, 32);
        let small_calls = EncoderConfig::new(512, 512, 100);
        assert_eq!(small_calls.max_input_length, 100);
        assert_eq!(small_calls.max_batch_tokens, 100);
    }
}
