//! The encoder batching task: owns the waiting inputs, sends one Embed or Classify call at a
//! time (to every shard; rank 0 answers), and answers each input's caller. Inputs that arrive
//! while a call runs wait for the next one, so concurrent requests share calls; callers that
//! went away are left out. An input the model refuses (INVALID_ARGUMENT) fails only itself: the
//! call's inputs then go again one by one.

use super::schedule::{take_call, EncoderTask, Waiting};
use super::EncoderOutput;
use crate::client::{ShardClient, ShardError};
use crate::errors::{InferError, ValidationError};
use crate::health::Health;
use crate::pb;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::Instrument;

/// An input waiting for its call.
pub(super) struct Pending {
    pub task: EncoderTask,
    pub input_ids: Vec<u32>,
    pub answer: oneshot::Sender<Result<Answered, InferError>>,
}

impl Waiting for Pending {
    fn task(&self) -> EncoderTask {
        self.task
    }

    fn tokens(&self) -> u32 {
        self.input_ids.len() as u32
    }
}

/// An input's answer: its output, and when its call started.
pub(super) struct Answered {
    pub output: EncoderOutput,
    pub start: Instant,
}

/// What the task shares with the handle.
pub(super) struct Shared {
    pub client: Arc<dyn ShardClient>,
    pub health: Health,
    /// Inputs sent and not yet taken into a call (or dropped).
    pub waiting: Arc<AtomicUsize>,
    pub max_batch_tokens: u32,
}

impl Shared {
    fn taken(&self, n: usize) {
        let left = self.waiting.fetch_sub(n, Ordering::SeqCst) - n;
        metrics::gauge!("lorax_encoder_queue_size").set(left as f64);
    }
}

/// Runs until every handle is dropped.
pub(super) async fn run(shared: Shared, mut inputs: mpsc::UnboundedReceiver<Pending>) {
    let mut waiting: VecDeque<Pending> = VecDeque::new();
    loop {
        if waiting.is_empty() {
            let Some(first) = inputs.recv().await else {
                return;
            };
            waiting.push_back(first);
        }
        while let Ok(more) = inputs.try_recv() {
            waiting.push_back(more);
        }
        let before = waiting.len();
        waiting.retain(|p| !p.answer.is_closed());
        shared.taken(before - waiting.len());
        let Some((task, call)) = take_call(&mut waiting, shared.max_batch_tokens) else {
            continue;
        };
        shared.taken(call.len());
        serve(&shared, task, call).await;
    }
}

/// Computes one call's inputs and answers each caller.
async fn serve(shared: &Shared, task: EncoderTask, call: Vec<Pending>) {
    let start = Instant::now();
    let (answers, inputs): (Vec<_>, Vec<_>) = call
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let input = pb::EncoderInput {
                id: i as u64,
                input_ids: p.input_ids,
            };
            (p.answer, input)
        })
        .unzip();
    match compute(shared, task, &inputs).await {
        Ok(outputs) => {
            for (answer, output) in answers.into_iter().zip(outputs) {
                let _ = answer.send(output.map(|output| Answered { output, start }));
            }
        }
        // One input the model refuses must not fail the others that shared its call.
        Err(err) if err.code() == tonic::Code::InvalidArgument && inputs.len() > 1 => {
            for (answer, input) in answers.into_iter().zip(inputs) {
                if answer.is_closed() {
                    continue;
                }
                // Alone, it is the call's input 0.
                let input = pb::EncoderInput { id: 0, ..input };
                let alone = compute(shared, task, std::slice::from_ref(&input)).await;
                let output = alone
                    .map_err(|err| encoder_error(&err))
                    .and_then(|outputs| outputs.into_iter().next().unwrap_or(Err(missing())));
                let _ = answer.send(output.map(|output| Answered { output, start }));
            }
        }
        Err(err) => {
            let error = encoder_error(&err);
            for answer in answers {
                let _ = answer.send(Err(error.clone()));
            }
        }
    }
}

/// One Embed or Classify call, reported to the health record and the metrics; its outputs in
/// the order of `inputs` (an input the answer lacks gets an error of its own).
async fn compute(
    shared: &Shared,
    task: EncoderTask,
    inputs: &[pb::EncoderInput],
) -> Result<Vec<Result<EncoderOutput, InferError>>, ShardError> {
    let method = task.method();
    metrics::counter!("lorax_batch_inference_count", "method" => method).increment(1);
    let span = tracing::info_span!("encoder_call", method, inputs = inputs.len());
    let client = shared.client.as_ref();
    let started = Instant::now();
    shared.health.step_started(method);
    let call = async {
        let outputs: Vec<(u64, EncoderOutput)> = match task {
            EncoderTask::Embed => client
                .embed(inputs.to_vec())
                .await?
                .into_iter()
                .map(|e| (e.request_id, EncoderOutput::Embedding(e.values)))
                .collect(),
            EncoderTask::Classify => client
                .classify(inputs.to_vec())
                .await?
                .into_iter()
                .map(|c| (c.request_id, EncoderOutput::Classes(c)))
                .collect(),
        };
        Ok(outputs)
    };
    let result = call.instrument(span).await;
    shared.health.step_finished(result.is_ok());
    match &result {
        Ok(_) => {
            metrics::histogram!("lorax_batch_inference_duration", "method" => method)
                .record(started.elapsed().as_secs_f64());
            metrics::counter!("lorax_batch_inference_success", "method" => method).increment(1);
            metrics::histogram!("lorax_encoder_call_inputs", "method" => method)
                .record(inputs.len() as f64);
        }
        Err(err) => {
            tracing::error!("{method} failed: {err}");
            metrics::counter!("lorax_batch_inference_failure", "method" => method).increment(1);
        }
    }
    result.map(|outputs| in_order(outputs, inputs.len()))
}

/// The outputs placed by their ids (the inputs' positions).
fn in_order(
    outputs: Vec<(u64, EncoderOutput)>,
    n: usize,
) -> Vec<Result<EncoderOutput, InferError>> {
    let mut slots: Vec<Option<EncoderOutput>> = (0..n).map(|_| None).collect();
    for (id, output) in outputs {
        if let Some(slot) = slots.get_mut(id as usize) {
            *slot = Some(output);
        }
    }
    slots
        .into_iter()
        .map(|slot| slot.ok_or_else(missing))
        .collect()
}

fn missing() -> InferError {
    InferError::Generation("the shard's answer lacks this input".into())
}

/// A failed call as its inputs' error: the model refusing them (INVALID_ARGUMENT, or
/// FAILED_PRECONDITION: it does not serve the task) is the request's fault (422); anything else
/// the shard's (424).
fn encoder_error(err: &ShardError) -> InferError {
    match err.code() {
        tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => {
            ValidationError::ShardRefused(err.message()).into()
        }
        _ => InferError::Generation(err.to_string()),
    }
}
