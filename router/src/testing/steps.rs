//! The fake shard's decode stream: one step per `next`, each through the gate, ending after its
//! steps, once every request has finished, or at the first `next` after a stop (the first step
//! always runs: the call asked for it).

use super::FakeShard;
use crate::client::{ShardError, StepOutput};
use crate::decode_stream::{DecodeSteps, Stopper};
use async_trait::async_trait;

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
