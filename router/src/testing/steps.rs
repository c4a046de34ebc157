//! The fake shard's decode stream: one step per `next`, each through the gate, ending after its
//! steps, once every request has finished, or at the first `next` after a stop (the first step
//! always runs: the call asked for it).

use super::step::{cached, step};
use super::{Call, FakeShard, FAKE_TIMINGS};
use crate::client::{ShardError, StepOutput};
use crate::decode_stream::{DecodeSteps, Stopper};
use crate::pb;
use async_trait::async_trait;

impl FakeShard {
    pub(super) fn record_decode(&self, batches: &[pb::CachedBatch], steps: u32) -> Vec<u64> {
        let batch_ids: Vec<u64> = batches.iter().map(|b| b.id).collect();
        self.state.lock().unwrap().calls.push(Call::Decode {
            batch_ids: batch_ids.clone(),
            request_ids: batches.iter().flat_map(|b| b.request_ids.clone()).collect(),
            steps,
        });
        batch_ids
    }

    /// One decode step. The first of a call merges `batch_ids` and steps every request; a later one
    /// steps the requests of its batch still running.
    pub(super) fn decode_step(
        &self,
        batch_ids: &[u64],
        first: bool,
    ) -> Result<StepOutput, ShardError> {
        let mut state = self.state.lock().unwrap();
        if state.fail_decode {
            return Err(ShardError::Rpc("decode exploded".into()));
        }
        let mut merged = Vec::new();
        for id in batch_ids {
            match state.batches.remove(id) {
                Some(requests) => merged.extend(requests),
                None => state
                    .violations
                    .push(format!("decode of unknown batch {id}")),
            }
        }
        let mut violations = Vec::new();
        for r in &merged {
            if !state.adapters.holds(r.request.adapter_index, &r.adapter) {
                violations.push(format!(
                    "request {} decoded after its adapter left index {}",
                    r.request.id, r.request.adapter_index
                ));
            }
        }
        let generations = merged
            .iter_mut()
            .filter(|r| first || !r.finished)
            .map(|r| step(r, &mut violations))
            .collect();
        state.violations.extend(violations);
        let id = batch_ids.first().copied().unwrap_or_default();
        let next = cached(id, &merged, self.block_size);
        if next.is_some() {
            state.batches.insert(id, merged);
        }
        Ok(StepOutput {
            generations,
            batch: next,
            timings: FAKE_TIMINGS,
        })
    }
}

pub(super) struct FakeSteps<'a> {
    shard: &'a FakeShard,
    batch_ids: Vec<u64>,
    steps_left: u32,
    first: bool,
    stopper: Stopper,
}

impl<'a> FakeSteps<'a> {
    pub(super) fn new(shard: &'a FakeShard, batch_ids: Vec<u64>, steps: u32) -> Self {
        Self {
            shard,
            batch_ids,
            steps_left: steps.max(1),
            first: true,
            stopper: Stopper::default(),
        }
    }
}

#[async_trait]
impl DecodeSteps for FakeSteps<'_> {
    async fn next(&mut self) -> Option<Result<StepOutput, ShardError>> {
        let stopped = self.stopper.stopped() && !self.first;
        if self.steps_left == 0 || self.batch_ids.is_empty() || stopped {
            return None;
        }
        self.shard.pass_gate().await;
        let result = self.shard.decode_step(&self.batch_ids, self.first);
        self.first = false;
        self.steps_left -= 1;
        match &result {
            Ok(output) => self.batch_ids = output.batch.iter().map(|b| b.id).collect(),
            Err(_) => self.steps_left = 0,
        }
        Some(result)
    }

    fn stopper(&self) -> Stopper {
        self.stopper.clone()
    }
}
