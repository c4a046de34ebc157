//! Test doubles used by this crate's tests: a tiny word-level tokenizer and `FakeShard`, an
//! in-memory `ShardClient` that behaves like a shard (cached batches, concatenation, filtering)
//! and records every call, so the queue and the batching loop are tested without a model.

use crate::client::{ShardClient, ShardError, StepOutput};
use crate::pb;
use crate::queue::round_up;
use crate::validation::ValidGenerateRequest;
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokenizers::Tokenizer;
use tokio::sync::Semaphore;

/// Id of the end-of-sequence token of the test vocabulary.
pub const EOS_ID: u32 = 2;
/// A prompt containing this word ("stop") makes `FakeShard` emit EOS as its second token.
pub const STOP_WORD_ID: u32 = 3;

/// Word-level tokenizer: `<unk>`=0 `<s>`=1 `</s>`=2 stop=3 hello=4 world=5 x=6 a=7 b=8 c=9 d=10;
/// prepends `<s>` like a Llama tokenizer.
pub const TEST_TOKENIZER_JSON: &str = r#"{
  "version": "1.0",
  "truncation": null,
  "padding": null,
  "added_tokens": [
    {"id": 0, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
  ],
  "normalizer": null,
  "pre_tokenizer": {"type": "Whitespace"},
  "post_processor": {
    "type": "TemplateProcessing",
    "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
    "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
    "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}
  },
  "decoder": null,
  "model": {
    "type": "WordLevel",
    "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, "stop": 3, "hello": 4, "world": 5, "x": 6, "a": 7, "b": 8, "c": 9, "d": 10},
    "unk_token": "<unk>"
  }
}"#;

pub fn test_tokenizer() -> Tokenizer {
    TEST_TOKENIZER_JSON.parse().expect("test tokenizer")
}

/// A valid greedy request of `input_length` tokens.
pub fn valid_request(input_length: u32, max_new_tokens: u32) -> ValidGenerateRequest {
    ValidGenerateRequest {
        input_ids: vec![4; input_length as usize],
        input_length,
        parameters: pb::NextTokenChooserParameters {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            typical_p: 1.0,
            do_sample: false,
            seed: 0,
            repetition_penalty: 1.0,
            watermark: false,
        },
        stopping_parameters: pb::StoppingCriteriaParameters {
            max_new_tokens,
            stop_sequences: vec![],
            ignore_eos_token: false,
        },
        decoder_input_details: false,
        top_n_tokens: 0,
        adapter_index: 0,
    }
}

/// A call the fake shard received.
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    Prefill {
        batch_id: u64,
        request_ids: Vec<u64>,
        prefill_tokens: u32,
    },
    Decode {
        batch_ids: Vec<u64>,
        request_ids: Vec<u64>,
    },
    Filter {
        batch_id: u64,
        request_ids: Vec<u64>,
    },
    Clear {
        batch_id: Option<u64>,
    },
}

#[derive(Debug, Clone)]
struct FakeRequest {
    request: pb::Request,
    generated: u32,
    finished: bool,
}

#[derive(Debug, Default)]
struct FakeState {
    batches: HashMap<u64, Vec<FakeRequest>>,
    calls: Vec<Call>,
    max_reserved: u32,
    violations: Vec<String>,
    fail_prefill: bool,
    fail_decode: bool,
    healthy: bool,
}

/// In-memory shard. The batch it returns after a step still holds the requests that just
/// finished (as TGI's shards do), so the router must filter them out.
pub struct FakeShard {
    state: Mutex<FakeState>,
    gate: Option<Arc<Semaphore>>,
    /// Tokens the fake KV cache holds (Warmup's answer).
    pub capacity: u32,
    pub block_size: u32,
}

impl FakeShard {
    pub fn new(capacity: u32, block_size: u32) -> Self {
        Self {
            state: Mutex::new(FakeState {
                healthy: true,
                ..Default::default()
            }),
            gate: None,
            capacity,
            block_size,
        }
    }

    /// Every Prefill/Decode waits for a permit given by `allow_steps`.
    pub fn gated(capacity: u32, block_size: u32) -> Self {
        Self {
            gate: Some(Arc::new(Semaphore::new(0))),
            ..Self::new(capacity, block_size)
        }
    }

    pub fn allow_steps(&self, n: usize) {
        if let Some(gate) = &self.gate {
            gate.add_permits(n);
        }
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    /// Protocol violations seen (decoding a finished request, unknown batch, ...).
    pub fn violations(&self) -> Vec<String> {
        self.state.lock().unwrap().violations.clone()
    }

    /// Most KV tokens ever reserved at once.
    pub fn max_reserved(&self) -> u32 {
        self.state.lock().unwrap().max_reserved
    }

    /// Requests currently cached.
    pub fn cached_requests(&self) -> Vec<u64> {
        let state = self.state.lock().unwrap();
        let mut ids: Vec<u64> = state
            .batches
            .values()
            .flatten()
            .map(|r| r.request.id)
            .collect();
        ids.sort();
        ids
    }

    pub fn set_fail_prefill(&self, fail: bool) {
        self.state.lock().unwrap().fail_prefill = fail;
    }

    pub fn set_fail_decode(&self, fail: bool) {
        self.state.lock().unwrap().fail_decode = fail;
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.state.lock().unwrap().healthy = healthy;
    }

    /// Waits (up to 5 s) until `n` calls were received.
    pub async fn wait_calls(&self, n: usize) {
        for _ in 0..5000 {
            if self.calls().len() >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("expected {n} calls, got {:?}", self.calls());
    }

    async fn pass_gate(&self) {
        if let Some(gate) = &self.gate {
            gate.acquire().await.expect("gate").forget();
        }
    }

    fn reserved(&self, state: &FakeState) -> u32 {
        state
            .batches
            .values()
            .flatten()
            .map(|r| {
                let stop = r.request.stopping_parameters.as_ref().unwrap();
                round_up(
                    r.request.input_ids.len() as u32 + stop.max_new_tokens,
                    self.block_size,
                )
            })
            .sum()
    }
}

/// One generation step for one request.
fn step(request: &mut FakeRequest, violations: &mut Vec<String>) -> pb::Generation {
    let r = &request.request;
    if request.finished {
        violations.push(format!("request {} stepped after it finished", r.id));
    }
    request.generated += 1;
    let k = request.generated;
    let stop = r.stopping_parameters.clone().unwrap_or_default();
    let eos = r.input_ids.contains(&STOP_WORD_ID) && !stop.ignore_eos_token && k == 2;
    let (token_id, token_text) = if eos {
        (EOS_ID, "</s>".to_string())
    } else {
        (r.id as u32 * 100 + k, format!(" r{}t{}", r.id, k))
    };
    let finish = if eos {
        Some(pb::FinishReason::EosToken)
    } else if k >= stop.max_new_tokens {
        Some(pb::FinishReason::Length)
    } else {
        None
    };
    request.finished = finish.is_some();
    let params = r.parameters.unwrap_or_default();
    let generated_text = finish.map(|reason| pb::GeneratedText {
        text: (1..=k)
            .filter(|i| !(eos && *i == k))
            .map(|i| format!(" r{}t{}", r.id, i))
            .collect(),
        generated_tokens: k,
        finish_reason: reason as i32,
        seed: params.do_sample.then_some(params.seed),
    });
    let prefill_tokens = (k == 1 && r.prefill_logprobs).then(|| pb::Tokens {
        ids: r.input_ids.clone(),
        logprobs: (0..r.input_ids.len())
            .map(|i| if i == 0 { f32::NAN } else { -1.0 })
            .collect(),
        texts: r.input_ids.iter().map(|id| format!("w{id}")).collect(),
        is_special: r.input_ids.iter().map(|id| *id <= EOS_ID).collect(),
    });
    let n = r.top_n_tokens;
    let top_tokens = (n > 0).then(|| pb::Tokens {
        ids: (0..n).map(|j| token_id + j).collect(),
        logprobs: (0..n).map(|j| -(j as f32) - 0.5).collect(),
        texts: (0..n).map(|j| format!("alt{j}")).collect(),
        is_special: vec![false; n as usize],
    });
    // Sampled requests get a seed-dependent log-probability, so best_of has something to rank.
    let logprob = if params.do_sample {
        -((params.seed % 7) as f32) - 0.25
    } else {
        -0.5
    };
    pb::Generation {
        request_id: r.id,
        prefill_tokens,
        token_id,
        token_logprob: logprob,
        token_text,
        token_is_special: eos,
        generated_text,
        top_tokens,
    }
}

fn cached(id: u64, requests: &[FakeRequest], block_size: u32) -> Option<pb::CachedBatch> {
    if requests.iter().all(|r| r.finished) {
        return None;
    }
    Some(pb::CachedBatch {
        id,
        request_ids: requests.iter().map(|r| r.request.id).collect(),
        size: requests.len() as u32,
        max_tokens: requests
            .iter()
            .map(|r| {
                let stop = r.request.stopping_parameters.as_ref().unwrap();
                round_up(
                    r.request.input_ids.len() as u32 + stop.max_new_tokens,
                    block_size,
                )
            })
            .sum(),
    })
}

#[async_trait]
impl ShardClient for FakeShard {
    async fn info(&self) -> Result<pb::InfoResponse, ShardError> {
        Ok(pb::InfoResponse {
            requires_padding: false,
            dtype: "float32".into(),
            device_type: "cpu".into(),
            window_size: None,
            block_size: self.block_size,
            vocab_size: 11,
            max_position_embeddings: 4096,
            eos_token_ids: vec![EOS_ID],
            supports_adapters: true,
            architecture: "LlamaForCausalLM".into(),
        })
    }

    async fn health(&self) -> Result<(), ShardError> {
        if self.state.lock().unwrap().healthy {
            Ok(())
        } else {
            Err(ShardError::Rpc("unhealthy".into()))
        }
    }

    async fn warmup(&self, _: u32, _: u32, _: u32) -> Result<u32, ShardError> {
        Ok(self.capacity)
    }

    async fn prefill(&self, batch: pb::Batch) -> Result<StepOutput, ShardError> {
        self.pass_gate().await;
        let mut state = self.state.lock().unwrap();
        state.calls.push(Call::Prefill {
            batch_id: batch.id,
            request_ids: batch.requests.iter().map(|r| r.id).collect(),
            prefill_tokens: batch
                .requests
                .iter()
                .map(|r| r.input_ids.len() as u32)
                .sum(),
        });
        if state.fail_prefill {
            return Err(ShardError::Rpc("prefill exploded".into()));
        }
        if batch.size as usize != batch.requests.len() {
            state
                .violations
                .push(format!("batch {} has a wrong size", batch.id));
        }
        let mut requests: Vec<FakeRequest> = batch
            .requests
            .into_iter()
            .map(|request| FakeRequest {
                request,
                generated: 0,
                finished: false,
            })
            .collect();
        let mut violations = Vec::new();
        let generations = requests
            .iter_mut()
            .map(|r| step(r, &mut violations))
            .collect();
        let next = cached(batch.id, &requests, self.block_size);
        if next.is_some() {
            state.batches.insert(batch.id, requests);
        }
        state.violations.extend(violations);
        let reserved = self.reserved(&state);
        state.max_reserved = state.max_reserved.max(reserved);
        if reserved > self.capacity {
            state
                .violations
                .push(format!("{reserved} tokens reserved > {}", self.capacity));
        }
        Ok((generations, next))
    }

    async fn decode(&self, batches: Vec<pb::CachedBatch>) -> Result<StepOutput, ShardError> {
        self.pass_gate().await;
        let mut state = self.state.lock().unwrap();
        let batch_ids: Vec<u64> = batches.iter().map(|b| b.id).collect();
        state.calls.push(Call::Decode {
            batch_ids: batch_ids.clone(),
            request_ids: batches.iter().flat_map(|b| b.request_ids.clone()).collect(),
        });
        if state.fail_decode {
            return Err(ShardError::Rpc("decode exploded".into()));
        }
        let mut merged = Vec::new();
        for id in &batch_ids {
            match state.batches.remove(id) {
                Some(requests) => merged.extend(requests),
                None => state
                    .violations
                    .push(format!("decode of unknown batch {id}")),
            }
        }
        let mut violations = Vec::new();
        let generations = merged
            .iter_mut()
            .map(|r| step(r, &mut violations))
            .collect();
        state.violations.extend(violations);
        let id = batch_ids.first().copied().unwrap_or_default();
        let next = cached(id, &merged, self.block_size);
        if next.is_some() {
            state.batches.insert(id, merged);
        }
        Ok((generations, next))
    }

    async fn filter_batch(
        &self,
        batch_id: u64,
        request_ids: Vec<u64>,
    ) -> Result<Option<pb::CachedBatch>, ShardError> {
        let mut state = self.state.lock().unwrap();
        state.calls.push(Call::Filter {
            batch_id,
            request_ids: request_ids.clone(),
        });
        let Some(requests) = state.batches.get_mut(&batch_id) else {
            state
                .violations
                .push(format!("filter of unknown batch {batch_id}"));
            return Err(ShardError::Rpc("unknown batch".into()));
        };
        requests.retain(|r| request_ids.contains(&r.request.id));
        Ok(
            cached(batch_id, requests, self.block_size).or(Some(pb::CachedBatch {
                id: batch_id,
                ..Default::default()
            })),
        )
    }

    async fn clear_cache(&self, batch_id: Option<u64>) -> Result<(), ShardError> {
        let mut state = self.state.lock().unwrap();
        state.calls.push(Call::Clear { batch_id });
        match batch_id {
            Some(id) => {
                state.batches.remove(&id);
            }
            None => state.batches.clear(),
        }
        Ok(())
    }
}
