//! Test doubles used by this crate's tests: a tiny word-level tokenizer and `FakeShard`, an
//! in-memory `ShardClient` that behaves like a shard (cached batches, concatenation, filtering)
//! and records every call, so the queue and the batching loop are tested without a model. As an
//! encoder model (`FakeShard::encoder`, `encoder`) it answers Embed and Classify instead.

mod adapters;
mod encoder;
mod grammars;
mod step;
mod steps;

use crate::client::{
    DownloadedAdapter, LoadedAdapter, ShardClient, ShardError, StepOutput, StepTimings,
};
use crate::decode_stream::{DecodeSteps, Stopper};
use crate::entry::round_up;
use crate::health::{Health, HealthConfig};
use crate::pb;
use crate::validation::ValidGenerateRequest;
use adapters::{adapter_name, FakeAdapters};
pub use adapters::{AdapterBehaviour, PrefillRecord};
use async_trait::async_trait;
pub use encoder::{
    fake_embedding, fake_token_class, test_encoder_tokenizer, FakeModel, FAKE_EMBEDDING_DIM,
    FAKE_ENCODER_POSITIONS, REFUSED_ENCODER_TOKEN, TEST_ENCODER_TOKENIZER_JSON,
};
use grammars::FakeGrammars;
pub use grammars::{FAILING_GRAMMAR_MARKER, REFUSED_GRAMMAR_MARKER};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use step::{cached, step, FakeRequest};
use steps::FakeSteps;
use tokenizers::Tokenizer;
use tokio::sync::Semaphore;

/// A health record with the default bounds, for batchers started by tests.
pub fn test_health() -> Health {
    Health::new(HealthConfig::default(), valid_request(1, 1))
}

/// What `FakeShard` says each step took.
pub const FAKE_TIMINGS: StepTimings = StepTimings {
    concat: Duration::from_millis(1),
    forward: Duration::from_millis(2),
    decode: Duration::from_millis(3),
    total: Duration::from_millis(7),
};

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
    ValidGenerateRequest::greedy(vec![4; input_length as usize], max_new_tokens)
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
        steps: u32,
    },
    Filter {
        batch_id: u64,
        request_ids: Vec<u64>,
    },
    Clear {
        batch_id: Option<u64>,
    },
    /// A stop message of a decode stream (recorded by the gRPC service in front of the fake).
    StopStream,
    Download {
        adapter: String,
    },
    Load {
        adapter: String,
        index: u32,
    },
    /// A load that fetches the adapter first (`if_fits`).
    FetchAndLoad {
        adapter: String,
        index: u32,
    },
    Offload {
        adapter: String,
        index: u32,
    },
    CompileGrammar {
        grammar: pb::Grammar,
    },
    /// An Embed call: each input's id and token count, in order.
    Embed {
        inputs: Vec<(u64, usize)>,
    },
    /// A Classify call: each input's id and token count, in order.
    Classify {
        inputs: Vec<(u64, usize)>,
    },
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
    /// Every Prefill/Decode takes this long.
    step_delay: Duration,
    adapters: FakeAdapters,
    grammars: FakeGrammars,
    /// Every request prefilled, as the shard received it.
    requests: Vec<pb::Request>,
    /// What stops each decode stream opened, in order.
    stream_stoppers: Vec<Stopper>,
}

/// In-memory shard. The batch it returns after a step still holds the requests that just
/// finished (as TGI's shards do), so the router must filter them out.
pub struct FakeShard {
    state: Mutex<FakeState>,
    gate: Option<Arc<Semaphore>>,
    /// Steps waiting at the gate now.
    at_gate: AtomicUsize,
    /// Tokens the fake KV cache holds (Warmup's answer).
    pub capacity: u32,
    pub block_size: u32,
    /// What the model serves (generation, or an encoder's Embed/Classify).
    pub model: FakeModel,
}

impl FakeShard {
    pub fn new(capacity: u32, block_size: u32) -> Self {
        Self {
            state: Mutex::new(FakeState {
                healthy: true,
                ..Default::default()
            }),
            gate: None,
            at_gate: AtomicUsize::new(0),
            capacity,
            block_size,
            model: FakeModel::Generating,
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

    /// Records a call the fake's own methods do not see (a stream's stop message).
    pub fn record(&self, call: Call) {
        self.state.lock().unwrap().calls.push(call);
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

    /// Makes every Prefill/Decode take `delay`.
    pub fn set_step_delay(&self, delay: Duration) {
        self.state.lock().unwrap().step_delay = delay;
    }

    /// Sets how the fake treats adapter `id` (delays, failure, private token, memory).
    pub fn set_adapter(&self, id: &str, behaviour: AdapterBehaviour) {
        let mut state = self.state.lock().unwrap();
        state.adapters.behaviours.insert(id.to_string(), behaviour);
    }

    /// Every prefilled request with the adapter installed at its index at that time.
    pub fn prefills(&self) -> Vec<PrefillRecord> {
        self.state.lock().unwrap().adapters.prefills.clone()
    }

    /// Every request prefilled so far, as the shard received it (sampling parameters, grammar).
    pub fn prefilled_requests(&self) -> Vec<pb::Request> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Most adapters installed at once.
    pub fn max_installed_adapters(&self) -> usize {
        self.state.lock().unwrap().adapters.max_installed
    }

    /// What is installed now, by index.
    pub fn installed_adapters(&self) -> HashMap<u32, String> {
        self.state.lock().unwrap().adapters.installed.clone()
    }

    /// Every api_token the shard received in adapter calls.
    pub fn tokens_seen(&self) -> Vec<Option<String>> {
        self.state.lock().unwrap().adapters.tokens_seen.clone()
    }

    fn adapter_delay(&self, name: &str, load: bool) -> Duration {
        self.state.lock().unwrap().adapters.delay(name, load)
    }

    /// A fetch's delay, then its gate (a download the test releases).
    async fn fetch_delay(&self, name: &str) {
        tokio::time::sleep(self.adapter_delay(name, false)).await;
        let gate = self.state.lock().unwrap().adapters.download_gate(name);
        if let Some(gate) = gate {
            let _permit = gate.acquire().await.expect("download gate");
        }
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

    /// Waits (up to 5 s) until a step waits at the gate: a request is in the shard.
    /// Waits until the router has stopped the last decode stream it opened (panics after 5 s).
    pub async fn wait_for_stream_stop(&self) {
        for _ in 0..5000 {
            let stopped = self
                .state
                .lock()
                .unwrap()
                .stream_stoppers
                .last()
                .map(Stopper::stopped);
            if stopped == Some(true) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("no decode stream was stopped");
    }

    pub async fn wait_at_gate(&self) {
        for _ in 0..5000 {
            if self.at_gate.load(Ordering::SeqCst) > 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("no step reached the gate");
    }

    async fn pass_gate(&self) {
        if let Some(gate) = &self.gate {
            self.at_gate.fetch_add(1, Ordering::SeqCst);
            gate.acquire().await.expect("gate").forget();
            self.at_gate.fetch_sub(1, Ordering::SeqCst);
        }
        let delay = self.state.lock().unwrap().step_delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
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

#[async_trait]
impl ShardClient for FakeShard {
    async fn info(&self) -> Result<pb::InfoResponse, ShardError> {
        let mut info = pb::InfoResponse {
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
            quantize: None,
            speculate: 0,
            prefix_caching: false,
            ..Default::default()
        };
        self.model.describe(&mut info);
        Ok(info)
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
        self.check_generates()?;
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
        let state = &mut *state;
        let names = state
            .adapters
            .prefill(&batch.requests, &mut state.violations)?;
        state
            .grammars
            .check_prefill(&batch.requests, &mut state.violations);
        state.requests.extend(batch.requests.iter().cloned());
        let mut requests: Vec<FakeRequest> = batch
            .requests
            .into_iter()
            .zip(names)
            .map(|(request, adapter)| FakeRequest {
                request,
                adapter,
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
        let reserved = self.reserved(state);
        state.max_reserved = state.max_reserved.max(reserved);
        if reserved > self.capacity {
            state
                .violations
                .push(format!("{reserved} tokens reserved > {}", self.capacity));
        }
        Ok(StepOutput {
            generations,
            batch: next,
            timings: FAKE_TIMINGS,
        })
    }

    /// Runs `steps` steps as one: later steps skip the requests that finished (the batch keeps
    /// them, TGI-style) and the call ends once every request has finished.
    async fn decode(
        &self,
        batches: Vec<pb::CachedBatch>,
        steps: u32,
    ) -> Result<StepOutput, ShardError> {
        self.check_generates()?;
        self.pass_gate().await;
        let batch_ids = self.record_decode(&batches, steps);
        let mut output = self.decode_step(&batch_ids, true)?;
        for _ in 1..steps {
            let Some(batch) = &output.batch else { break };
            let more = self.decode_step(&[batch.id], false)?;
            output.generations.extend(more.generations);
            output.batch = more.batch;
        }
        Ok(output)
    }

    /// Recorded as one Decode call of `steps`; each step passes the gate.
    async fn decode_stream<'a>(
        &'a self,
        batches: Vec<pb::CachedBatch>,
        steps: u32,
    ) -> Result<Box<dyn DecodeSteps + 'a>, ShardError> {
        self.check_generates()?;
        let batch_ids = self.record_decode(&batches, steps);
        let call = FakeSteps::new(self, batch_ids, steps);
        let stopper = call.stopper();
        self.state.lock().unwrap().stream_stoppers.push(stopper);
        Ok(Box::new(call))
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

    async fn download_adapter(
        &self,
        parameters: pb::AdapterParameters,
        _source: pb::AdapterSource,
        api_token: Option<String>,
    ) -> Result<DownloadedAdapter, ShardError> {
        let name = adapter_name(&Some(parameters));
        self.state.lock().unwrap().calls.push(Call::Download {
            adapter: name.clone(),
        });
        self.fetch_delay(&name).await;
        self.state
            .lock()
            .unwrap()
            .adapters
            .download(&name, api_token)
    }

    async fn load_adapter(
        &self,
        parameters: pb::AdapterParameters,
        _source: pb::AdapterSource,
        index: u32,
        api_token: Option<String>,
        if_fits: bool,
    ) -> Result<LoadedAdapter, ShardError> {
        let name = adapter_name(&Some(parameters));
        let adapter = name.clone();
        let call = match if_fits {
            true => Call::FetchAndLoad { adapter, index },
            false => Call::Load { adapter, index },
        };
        self.state.lock().unwrap().calls.push(call);
        if if_fits {
            self.fetch_delay(&name).await;
        }
        tokio::time::sleep(self.adapter_delay(&name, true)).await;
        let mut state = self.state.lock().unwrap();
        let state = &mut *state;
        state
            .adapters
            .load(&name, index, api_token, if_fits, &mut state.violations)
    }

    async fn offload_adapter(
        &self,
        parameters: pb::AdapterParameters,
        _source: pb::AdapterSource,
        index: u32,
    ) -> Result<bool, ShardError> {
        let name = adapter_name(&Some(parameters));
        let mut state = self.state.lock().unwrap();
        state.calls.push(Call::Offload {
            adapter: name.clone(),
            index,
        });
        let in_use = state
            .batches
            .values()
            .flatten()
            .any(|r| r.request.adapter_index == index);
        let state = &mut *state;
        state
            .adapters
            .offload(&name, index, in_use, &mut state.violations)
    }

    async fn compile_grammar(&self, grammar: pb::Grammar) -> Result<(), ShardError> {
        let mut state = self.state.lock().unwrap();
        state.calls.push(Call::CompileGrammar {
            grammar: grammar.clone(),
        });
        state.grammars.compile(&grammar)
    }

    async fn embed(&self, inputs: Vec<pb::EncoderInput>) -> Result<Vec<pb::Embedding>, ShardError> {
        self.encoder_call(&inputs, true).await;
        let served = matches!(
            self.model,
            FakeModel::Encoder {
                embeddings: true,
                ..
            }
        );
        encoder::check_call(served, "embeddings", &inputs)?;
        Ok(encoder::embed(&inputs))
    }

    async fn classify(
        &self,
        inputs: Vec<pb::EncoderInput>,
    ) -> Result<Vec<pb::ClassifyPredictionList>, ShardError> {
        self.encoder_call(&inputs, false).await;
        let served = matches!(
            self.model,
            FakeModel::Encoder {
                classification: true,
                ..
            }
        );
        encoder::check_call(served, "token classification", &inputs)?;
        Ok(encoder::classify(&inputs))
    }
}
