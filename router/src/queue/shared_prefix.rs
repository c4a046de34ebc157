//! Prompt tokens a new batch really computes when the shards cache prompt prefixes.
//!
//! Under `--prefix-caching` a shard computes the full KV-cache blocks that several requests of
//! one Prefill share (same adapter, same tokens up to the block's end) once: the first request
//! computes them, the others read them in the same forward pass. So those blocks cost the
//! prefill budget once, and a batch of requests sharing a long system prompt fits many more
//! requests than their whole prompts would. Blocks found in the shard's cache from earlier
//! batches are not counted here (the router cannot know what the shard kept), so the count is
//! never below what the shard computes.
//!
//! The rules mirror the shard's (`prompts.allocate`): a prompt's last token is always computed,
//! a request asking for its prompt's logprobs computes its whole prompt, and every request makes
//! all of its full prompt blocks readable by the requests after it. Blocks are keyed by a hash
//! chain (SipHash, 64 bits) over the adapter index and the tokens up to the block's end; a
//! collision would only misjudge the budget of one batch, never an answer.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};

/// The full prompt blocks of the requests taken into a batch so far.
#[derive(Debug, Default)]
pub struct SharedPrefixes {
    seen: HashSet<u64>,
}

/// What one request would cost: the prompt tokens it computes, and the keys it would add.
#[derive(Debug)]
pub struct PromptCost {
    pub computed: u32,
    keys: Vec<u64>,
}

impl SharedPrefixes {
    /// The cost of a request of adapter `adapter_index` (0: the base model) with prompt
    /// `input_ids`, after the requests already taken (`take` adds it).
    pub fn cost(
        &self,
        adapter_index: u32,
        input_ids: &[u32],
        block_size: u32,
        prompt_logprobs: bool,
    ) -> PromptCost {
        let block = block_size.max(1) as usize;
        let n = input_ids.len();
        let usable = if prompt_logprobs || n == 0 {
            0
        } else {
            (n - 1) / block
        };
        let mut parent = {
            let mut h = DefaultHasher::new();
            adapter_index.hash(&mut h);
            h.finish()
        };
        let mut keys = Vec::with_capacity(n / block);
        let mut shared = 0;
        for (i, tokens) in input_ids.chunks_exact(block).enumerate() {
            let mut h = DefaultHasher::new();
            parent.hash(&mut h);
            tokens.hash(&mut h);
            parent = h.finish();
            // Only a leading run is shared: the shard stops matching at the first unknown block.
            if i < usable && shared == i && self.seen.contains(&parent) {
                shared += 1;
            }
            keys.push(parent);
        }
        PromptCost {
            computed: (n - shared * block) as u32,
            keys,
        }
    }

    /// Adds a request taken into the batch: its full blocks become readable by later requests.
    pub fn take(&mut self, cost: PromptCost) {
        self.seen.extend(cost.keys);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(shared: u32, own: &[u32]) -> Vec<u32> {
        (0..shared).chain(own.iter().copied()).collect()
    }

    #[test]
    fn a_shared_prefix_costs_once_per_adapter() {
        let mut batch = SharedPrefixes::default();
        let first = prompt(8, &[100, 101, 102]);
        let cost = batch.cost(0, &first, 4, false);
        assert_eq!(cost.computed, 11);
        batch.take(cost);
        // Same 8 leading tokens: two full blocks are read, the rest computed.
        let second = prompt(8, &[200, 201]);
        assert_eq!(batch.cost(0, &second, 4, false).computed, 2);
        // Another adapter never reads the base model's blocks.
        assert_eq!(batch.cost(3, &second, 4, false).computed, 10);
    }

    #[test]
    fn the_last_prompt_token_and_prompt_logprobs_are_always_computed() {
        let mut batch = SharedPrefixes::default();
        let whole = prompt(8, &[]);
        let cost = batch.cost(1, &whole, 4, false);
        assert_eq!(cost.computed, 8);
        batch.take(cost);
        // The same 8 tokens again: the block holding the last token is computed.
        assert_eq!(batch.cost(1, &whole, 4, false).computed, 4);
        assert_eq!(batch.cost(1, &prompt(8, &[9]), 4, true).computed, 9);
    }

    #[test]
    fn only_a_leading_run_of_blocks_is_shared() {
        let mut batch = SharedPrefixes::default();
        let cost = batch.cost(0, &prompt(12, &[50]), 4, false);
        batch.take(cost);
        // The first block differs: the chain differs from there on, nothing is shared.
        let mut other = prompt(12, &[50]);
        other[0] = 99;
        assert_eq!(batch.cost(0, &other, 4, false).computed, 13);
        // A later block alone matching (tokens 4..8 after another first block) shares nothing either.
        let mut tail_only = prompt(8, &[7]);
        tail_only[1] = 98;
        assert_eq!(batch.cost(0, &tail_only, 4, false).computed, 9);
    }
}
