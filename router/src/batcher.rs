//! The continuous-batching loop (TGI-style). One task owns the running batch and its entries:
//! it prefills a first batch, then decodes it step by step; between steps it may prefill new
//! entries (with `eager_prefill`, batch after batch while more fit) and have the next Decode
//! concatenate them into the running batch. After every step each generation goes to its
//! request's channel; finished and cancelled requests are filtered out of the cached batch at
//! once, so their KV blocks are freed.
//!
//! Every call for new entries tells the queue how many requests of each adapter are running, so
//! an adapter is offloaded only once none of its requests remain in the shard's batch. Adapter
//! downloads and loads run in the queue task's background: this loop never waits for them.

use crate::client::{ShardClient, ShardError, StepOutput, StepTimings};
use crate::entry::{
    prefill_from_proto, token_from_generation, ClientGone, Entry, Finished, InferStreamResponse,
};
use crate::errors::InferError;
use crate::health::Health;
use crate::pb;
use crate::queue::{NextBatch, Queue};
use crate::telemetry;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{Instrument, Span};

/// The batching policy's limits.
#[derive(Debug, Clone, Copy)]
pub struct BatcherConfig {
    /// Most prompt tokens in one Prefill.
    pub max_batch_prefill_tokens: u32,
    /// Most KV-cache tokens (prompt + max_new_tokens, block-rounded) reserved at once.
    pub max_batch_total_tokens: u32,
    /// Decode steps after which waiting requests are prefilled whatever their number.
    pub max_waiting_tokens: usize,
    /// Most decode steps in one Decode call, taken only while no request waits (see `decode`).
    pub decode_steps_per_call: u32,
    /// New requests join early only when waiting / running >= this ratio.
    pub waiting_served_ratio: f32,
    /// KV-cache block size of the shard.
    pub block_size: u32,
    /// The shards prefill long prompts in chunks of `max_batch_prefill_tokens` (see `QueueConfig`).
    pub chunked_prefill: bool,
    /// The shards compute prompt blocks shared within a Prefill once (see `QueueConfig`).
    pub prefix_caching: bool,
    /// Between two decode steps, prefill waiting requests batch after batch (each within the
    /// budgets) while any fit, to grow the decode batch; false: at most one prefill.
    pub eager_prefill: bool,
}

type Entries = HashMap<u64, Entry>;

/// Spawns the batching task.
pub fn spawn_batcher(
    client: Arc<dyn ShardClient>,
    queue: Queue,
    notify: Arc<Notify>,
    config: BatcherConfig,
    health: Health,
) -> JoinHandle<()> {
    // Alive from now (not from the task's first poll), until the task ends or panics.
    let alive = health.loop_started();
    tokio::spawn(async move {
        let _alive = alive;
        batching_task(client, queue, notify, config, health).await
    })
}

/// The shard and the health record every step reports to.
#[derive(Clone, Copy)]
struct Shard<'a> {
    client: &'a dyn ShardClient,
    health: &'a Health,
}

async fn batching_task(
    client: Arc<dyn ShardClient>,
    queue: Queue,
    notify: Arc<Notify>,
    config: BatcherConfig,
    health: Health,
) {
    let shard = Shard {
        client: client.as_ref(),
        health: &health,
    };
    let client = shard.client;
    loop {
        let first = queue
            .next_batch(
                None,
                config.max_batch_prefill_tokens,
                config.max_batch_total_tokens,
                HashMap::new(),
            )
            .await;
        let Some(NextBatch { mut entries, batch }) = first else {
            notify.notified().await;
            continue;
        };
        let mut cached = prefill(shard, batch, &mut entries).await;
        let mut waiting_tokens = 1;
        while let Some(batch) = cached {
            let Some(batch) = filter_cancelled(client, batch, &mut entries).await else {
                break;
            };
            let mut batches = vec![batch];
            // TGI semantics: join early only if enough requests wait; after max_waiting_tokens
            // steps, take whatever fits.
            let min_size = if waiting_tokens >= config.max_waiting_tokens {
                None
            } else {
                Some((entries.len() as f32 * config.waiting_served_ratio).floor() as usize)
            };
            while let Some(mut next) = join(&queue, config, min_size, &entries).await {
                if let Some(new_cached) = prefill(shard, next.batch, &mut next.entries).await {
                    batches.push(new_cached);
                }
                entries.extend(next.entries);
                waiting_tokens = 1;
                if !config.eager_prefill || queue.waiting() == 0 {
                    break;
                }
            }
            metrics::gauge!("lorax_batch_current_size").set(entries.len() as f64);
            metrics::gauge!("lorax_batch_current_max_tokens")
                .set(reserved_tokens(&entries, config.block_size) as f64);
            let steps = if queue.waiting() == 0 {
                config.decode_steps_per_call.max(1)
            } else {
                1
            };
            let ran;
            (cached, ran) = decode(shard, batches, steps, &mut entries, &notify).await;
            waiting_tokens += ran;
        }
        metrics::gauge!("lorax_batch_current_size").set(0.0);
        metrics::gauge!("lorax_batch_current_max_tokens").set(0.0);
    }
}

/// The waiting requests that may join the running `entries` now: a batch of at least `min_size`
/// within the prefill budget and what the running requests leave of the token budget.
async fn join(
    queue: &Queue,
    config: BatcherConfig,
    min_size: Option<usize>,
    entries: &Entries,
) -> Option<NextBatch> {
    let reserved = reserved_tokens(entries, config.block_size);
    let token_budget = config.max_batch_total_tokens.saturating_sub(reserved);
    let running = running_per_adapter(entries);
    queue
        .next_batch(
            min_size,
            config.max_batch_prefill_tokens,
            token_budget,
            running,
        )
        .await
}

/// Running requests per adapter index (0: base model).
fn running_per_adapter(entries: &Entries) -> HashMap<u32, usize> {
    let mut running = HashMap::new();
    for entry in entries.values() {
        *running.entry(entry.adapter_index).or_insert(0) += 1;
    }
    running
}

/// KV-cache tokens reserved by running entries.
fn reserved_tokens(entries: &Entries, block_size: u32) -> u32 {
    entries
        .values()
        .map(|e| e.reserved_tokens(block_size))
        .sum()
}

async fn prefill(
    shard: Shard<'_>,
    batch: pb::Batch,
    entries: &mut Entries,
) -> Option<pb::CachedBatch> {
    // Integers as i64: OpenTelemetry has no unsigned attribute (u64 would become a string).
    let prefill_tokens: usize = batch.requests.iter().map(|r| r.input_ids.len()).sum();
    let span = tracing::info_span!(
        parent: None,
        "prefill",
        batch_id = batch.id as i64,
        batch_size = batch.requests.len() as i64,
        prefill_tokens = prefill_tokens as i64,
        trace_id = tracing::field::Empty,
    );
    let batch_ids = [batch.id];
    let call = shard.client.prefill(batch);
    step(shard, "prefill", span, &batch_ids, call, entries).await
}

/// Up to `steps` decode steps in one call, answered one by one: each step's tokens reach their
/// requests while the shard runs the next. The call is stopped (after the step in progress) as
/// soon as a request arrives (`arrivals`) or a client goes away, so neither waits for the rest
/// of the call; the loop asks for several steps only while no request waits. Returns the batch
/// left and the steps run.
async fn decode(
    shard: Shard<'_>,
    batches: Vec<pb::CachedBatch>,
    steps: u32,
    entries: &mut Entries,
    arrivals: &Notify,
) -> (Option<pb::CachedBatch>, usize) {
    let batch_ids: Vec<u64> = batches.iter().map(|b| b.id).collect();
    let span = tracing::info_span!(
        parent: None,
        "decode",
        batches = batch_ids.len() as i64,
        batch_size = entries.len() as i64,
        steps = steps as i64,
        trace_id = tracing::field::Empty,
    );
    let span = step_span(span, entries);
    metrics::counter!("lorax_batch_inference_count", "method" => "decode").increment(1);
    let mut start = Instant::now();
    shard.health.step_started("decode");
    let opened = shard
        .client
        .decode_stream(batches, steps)
        .instrument(span.clone())
        .await;
    let mut call = match opened {
        Ok(call) => call,
        Err(err) => {
            return (
                step_failed(shard, "decode", &batch_ids, err, entries).await,
                0,
            )
        }
    };
    let stopper = call.stopper();
    let mut last = None;
    let mut ran = 0;
    loop {
        let next = call.next().instrument(span.clone());
        tokio::pin!(next);
        let answer = loop {
            tokio::select! {
                biased;
                answer = &mut next => break answer,
                () = arrivals.notified(), if !stopper.stopped() => stopper.stop(),
            }
        };
        match answer {
            None => break,
            Some(Ok(output)) => {
                shard.health.step_finished(true);
                record_step("decode", start.elapsed(), &output.timings);
                metrics::counter!("lorax_batch_decode_steps").increment(1);
                ran += 1;
                let handing_out = Instant::now();
                last = output.batch;
                // A client went away: filter it out after this step. Sending finds most; the scan
                // finds those that got no token this step (a prompt still prefilled in chunks).
                let gone = send_generations(output.generations, entries);
                if gone || entries.values().any(Entry::is_cancelled) {
                    stopper.stop();
                }
                metrics::histogram!("lorax_batch_filter_duration", "method" => "decode")
                    .record(handing_out.elapsed().as_secs_f64());
                start = Instant::now();
                shard.health.step_started("decode");
            }
            Some(Err(err)) => {
                let failed = step_failed(shard, "decode", &batch_ids, err, entries).await;
                return (failed, ran);
            }
        }
    }
    shard.health.step_finished(true);
    (filter_batch(shard.client, last, entries).await, ran)
}

/// Runs one shard step (`call`, over `batch_ids`) in its span, reports it to the health record
/// and the metrics, and hands its generations to their requests. A failed step fails every
/// entry and clears the batches from the shard.
async fn step(
    shard: Shard<'_>,
    method: &'static str,
    span: Span,
    batch_ids: &[u64],
    call: impl Future<Output = Result<StepOutput, ShardError>>,
    entries: &mut Entries,
) -> Option<pb::CachedBatch> {
    metrics::counter!("lorax_batch_inference_count", "method" => method).increment(1);
    let span = step_span(span, entries);
    let start = Instant::now();
    shard.health.step_started(method);
    let result = call.instrument(span).await;
    match result {
        Ok(output) => {
            shard.health.step_finished(true);
            record_step(method, start.elapsed(), &output.timings);
            let handing_out = Instant::now();
            send_generations(output.generations, entries);
            let next = filter_batch(shard.client, output.batch, entries).await;
            metrics::histogram!("lorax_batch_filter_duration", "method" => method)
                .record(handing_out.elapsed().as_secs_f64());
            next
        }
        Err(err) => step_failed(shard, method, batch_ids, err, entries).await,
    }
}

/// A failed step fails every entry and clears the batches from the shard.
async fn step_failed(
    shard: Shard<'_>,
    method: &'static str,
    batch_ids: &[u64],
    err: ShardError,
    entries: &mut Entries,
) -> Option<pb::CachedBatch> {
    shard.health.step_finished(false);
    for id in batch_ids {
        let _ = shard.client.clear_cache(Some(*id)).await;
    }
    fail_entries(method, err, entries);
    None
}

/// A batch step's span: a trace of its own (it serves many requests), linked to the span of
/// every request it serves when spans are exported (the links cost one lookup per request).
fn step_span(span: Span, entries: &Entries) -> Span {
    if span.is_disabled() {
        return span;
    }
    if telemetry::exporting() {
        for entry in entries.values() {
            telemetry::link(&span, &entry.span);
        }
    }
    telemetry::record_trace_id(&span);
    span
}

/// A successful call's metrics: its time as the router saw it, where the shard says it spent it, and
/// the rest (gRPC, the socket and both sides' event loops).
fn record_step(method: &'static str, call: Duration, timings: &StepTimings) {
    metrics::histogram!("lorax_batch_inference_duration", "method" => method)
        .record(call.as_secs_f64());
    metrics::counter!("lorax_batch_inference_success", "method" => method).increment(1);
    metrics::histogram!("lorax_batch_forward_duration", "method" => method)
        .record(timings.forward.as_secs_f64());
    metrics::histogram!("lorax_batch_decode_duration", "method" => method)
        .record(timings.decode.as_secs_f64());
    if method == "decode" {
        metrics::histogram!("lorax_batch_concat_duration", "method" => method)
            .record(timings.concat.as_secs_f64());
    }
    metrics::histogram!("lorax_batch_rpc_overhead_duration", "method" => method)
        .record(call.saturating_sub(timings.total).as_secs_f64());
}

/// Drops entries whose client went away and filters them out of the cached batch.
async fn filter_cancelled(
    client: &dyn ShardClient,
    batch: pb::CachedBatch,
    entries: &mut Entries,
) -> Option<pb::CachedBatch> {
    let before = entries.len();
    entries.retain(|_, entry| !entry.is_cancelled());
    if entries.len() == before {
        return Some(batch);
    }
    filter_batch(client, Some(batch), entries).await
}

/// Makes the cached batch hold exactly the live entries: FilterBatch when some of its requests
/// are gone, ClearCache when all are. Entries the shard no longer holds are failed.
async fn filter_batch(
    client: &dyn ShardClient,
    batch: Option<pb::CachedBatch>,
    entries: &mut Entries,
) -> Option<pb::CachedBatch> {
    let Some(batch) = batch else {
        fail_orphans(&[], entries);
        return None;
    };
    fail_orphans(&batch.request_ids, entries);
    if entries.is_empty() {
        let _ = client.clear_cache(Some(batch.id)).await;
        return None;
    }
    if entries.len() == batch.request_ids.len() {
        return Some(batch);
    }
    let keep: Vec<u64> = batch
        .request_ids
        .iter()
        .copied()
        .filter(|id| entries.contains_key(id))
        .collect();
    match client.filter_batch(batch.id, keep).await {
        Ok(Some(filtered)) => Some(filtered),
        Ok(None) => {
            fail_entries("filter", ShardError::MissingField("batch"), entries);
            None
        }
        Err(err) => {
            let _ = client.clear_cache(Some(batch.id)).await;
            fail_entries("filter", err, entries);
            None
        }
    }
}

/// Fails entries the shard's batch does not hold (they could never finish).
fn fail_orphans(batch_ids: &[u64], entries: &mut Entries) {
    entries.retain(|id, entry| {
        let held = batch_ids.contains(id);
        if !held {
            tracing::error!("request {id} vanished from the shard's batch");
            let _ = entry
                .response_tx
                .send(Err(InferError::IncompleteGeneration));
        }
        held
    });
}

/// Sends each generation to its request; removes finished requests and those whose client left.
/// True when some client had left.
fn send_generations(generations: Vec<pb::Generation>, entries: &mut Entries) -> bool {
    let mut gone = false;
    for generation in generations {
        let id = generation.request_id;
        let Some(entry) = entries.get_mut(&id) else {
            continue;
        };
        entry.skipped_tokens += u32::from(generation.skipped);
        let finished = generation.generated_text.is_some();
        if finished {
            metrics::histogram!("lorax_request_skipped_tokens").record(entry.skipped_tokens as f64);
        }
        let delivered = send_generation(generation, entry).is_ok();
        gone |= !delivered;
        if !delivered || finished {
            entries.remove(&id);
        }
    }
    gone
}

fn send_generation(generation: pb::Generation, entry: &mut Entry) -> Result<(), ClientGone> {
    if let Some(prefill) = generation.prefill_tokens.as_ref() {
        if !prefill.ids.is_empty() {
            entry.deliver(InferStreamResponse::Prefill(prefill_from_proto(prefill)))?;
        }
    }
    let (token, top_tokens) = token_from_generation(&generation);
    let message = match generation.generated_text {
        Some(generated_text) => InferStreamResponse::End(Finished {
            token,
            top_tokens,
            generated_text: generated_text.into(),
            queued: entry.queue_time,
            start: entry.batch_time.unwrap_or(entry.queue_time),
        }),
        None => InferStreamResponse::Intermediate { token, top_tokens },
    };
    entry.deliver(message)
}

/// Sends the error to every entry and drops them all.
fn fail_entries(method: &'static str, err: ShardError, entries: &mut Entries) {
    tracing::error!("{method} failed: {err}");
    metrics::counter!("lorax_batch_inference_failure", "method" => method).increment(1);
    let error = InferError::Generation(err.to_string());
    for (_, entry) in entries.drain() {
        let _ = entry.response_tx.send(Err(error.clone()));
    }
}
