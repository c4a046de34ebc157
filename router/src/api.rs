//! The HTTP API's JSON types, shaped as LoRAX's REST reference (and TGI's, which LoRAX extends),
//! so that `lorax-client` and `text-generation` parse our answers unmodified.

use crate::adapter::{AdapterParams, AdapterSource, MergedAdapters};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Generation parameters of a request. Absent fields take LoRAX's defaults.
#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct GenerateParameters {
    /// `adapter_id`, `adapter_source`, `merged_adapters`, `api_token`.
    #[serde(flatten)]
    pub adapter: AdapterParams,
    /// Generate this many sequences and return the one with the highest log-probability
    /// (at most `--max-best-of`; more than 1 needs sampling and no `seed`).
    #[serde(default)]
    #[schema(minimum = 1, example = 1)]
    pub best_of: Option<usize>,
    /// Divides the logits; 1 leaves them as they are.
    #[serde(default)]
    #[schema(exclusive_minimum = 0.0, example = 0.5)]
    pub temperature: Option<f32>,
    /// Penalizes tokens already in the prompt or the output; 1 is off.
    #[serde(default)]
    #[schema(exclusive_minimum = 0.0, example = 1.03)]
    pub repetition_penalty: Option<f32>,
    /// OpenAI's frequency penalty, -2..=2 (0: off).
    #[serde(default)]
    #[schema(minimum = -2.0, maximum = 2.0, default = 0.0, example = 0.1)]
    pub frequency_penalty: Option<f32>,
    /// OpenAI's presence penalty, -2..=2 (0: off).
    #[serde(default)]
    #[schema(minimum = -2.0, maximum = 2.0, default = 0.0, example = 0.1)]
    pub presence_penalty: Option<f32>,
    /// Sample from the `top_k` most likely tokens only.
    #[serde(default)]
    #[schema(minimum = 1, example = 10)]
    pub top_k: Option<i32>,
    /// Nucleus sampling: the smallest set of tokens whose probabilities add up to `top_p`.
    #[serde(default)]
    #[schema(exclusive_minimum = 0.0, maximum = 1.0, example = 0.95)]
    pub top_p: Option<f32>,
    /// Typical decoding mass.
    #[serde(default)]
    #[schema(exclusive_minimum = 0.0, maximum = 1.0, example = 0.95)]
    pub typical_p: Option<f32>,
    /// Sample; also on when temperature != 1, top_k > 0, top_p < 1 or typical_p < 1.
    #[serde(default)]
    #[schema(default = false)]
    pub do_sample: bool,
    /// Most tokens to generate; absent means `max_total_tokens - input tokens`.
    #[serde(default)]
    #[schema(minimum = 1, example = 20)]
    pub max_new_tokens: Option<u32>,
    #[serde(default)]
    #[schema(default = false)]
    pub ignore_eos_token: bool,
    /// Prepend the prompt to the generated text.
    #[serde(default)]
    #[schema(default = false)]
    pub return_full_text: Option<bool>,
    /// Stop sequences (at most `--max-stop-sequences`).
    #[serde(default)]
    #[schema(example = json!(["photographer"]))]
    pub stop: Vec<String>,
    /// Keep only the last `truncate` prompt tokens (at most `--max-input-length`).
    #[serde(default)]
    #[schema(minimum = 1)]
    pub truncate: Option<usize>,
    /// Green-list watermarking (Kirchenbauer et al.), as TGI and LoRAX do it; strength from the
    /// launcher's `--watermark-gamma` and `--watermark-delta`.
    #[serde(default)]
    #[schema(default = false)]
    pub watermark: bool,
    /// Return generation details (finish reason, tokens, ...).
    #[serde(default = "default_true")]
    #[schema(default = true)]
    pub details: bool,
    /// Return the prompt tokens with their log-probabilities.
    #[serde(default)]
    #[schema(default = false)]
    pub decoder_input_details: bool,
    /// Return this many most likely alternatives per generated token (TGI's name).
    #[serde(default)]
    #[schema(maximum = 10)]
    pub top_n_tokens: Option<u32>,
    /// LoRAX's name for `top_n_tokens`.
    #[serde(default)]
    #[schema(maximum = 10)]
    pub return_k_alternatives: Option<u32>,
    /// Sampling seed.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Constrained decoding, LoRAX's and OpenAI's forms: `{"type": "json_object", "schema":
    /// ...}`, `{"type": "json_schema", "schema": ...}` or `{"type": "json_schema",
    /// "json_schema": {"schema": ...}}`, `{"type": "text"}`; the schema within the subset of
    /// `proto/json_schema_support.json` (checked by the router: 422 otherwise).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub response_format: Option<serde_json::Value>,
    /// Constrained decoding, TGI's form: `{"type": "json", "value": <schema>}` or
    /// `{"type": "regex", "value": "<regex>"}`. Exclusive with `response_format`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub grammar: Option<serde_json::Value>,
    /// Set by the router (never from JSON): a grammar it built and checked itself (tool calls,
    /// see `validation::schema_grammar`). Exclusive with `grammar` and `response_format`.
    #[serde(skip)]
    #[schema(ignore)]
    pub prepared_grammar: Option<crate::pb::Grammar>,
    /// Format `inputs` (a JSON list of chat messages) with the tokenizer's chat template.
    #[serde(default)]
    #[schema(default = false)]
    pub apply_chat_template: bool,
    /// Set by the router (never from JSON) when the prompt came from the chat template and
    /// already holds its special tokens: the tokenizer then adds none.
    #[serde(skip)]
    #[schema(ignore)]
    pub prompt_has_special_tokens: bool,
}

fn default_true() -> bool {
    true
}

impl Default for GenerateParameters {
    fn default() -> Self {
        Self {
            adapter: AdapterParams::default(),
            best_of: None,
            temperature: None,
            repetition_penalty: None,
            frequency_penalty: None,
            presence_penalty: None,
            top_k: None,
            top_p: None,
            typical_p: None,
            do_sample: false,
            max_new_tokens: None,
            ignore_eos_token: false,
            return_full_text: None,
            stop: Vec::new(),
            truncate: None,
            watermark: false,
            details: true,
            decoder_input_details: false,
            top_n_tokens: None,
            return_k_alternatives: None,
            seed: None,
            response_format: None,
            grammar: None,
            prepared_grammar: None,
            apply_chat_template: false,
            prompt_has_special_tokens: false,
        }
    }
}

/// Body of `POST /generate` and `POST /generate_stream`.
#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct GenerateRequest {
    #[schema(example = "My name is Olivier and I")]
    pub inputs: String,
    #[serde(default)]
    pub parameters: GenerateParameters,
}

/// Body of `POST /`: the `stream` field chooses between `/generate` and `/generate_stream`.
#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct CompatGenerateRequest {
    #[schema(example = "My name is Olivier and I")]
    pub inputs: String,
    #[serde(default)]
    pub parameters: GenerateParameters,
    /// Answer with server-sent events (as `/generate_stream`) instead of a JSON list of one.
    #[serde(default)]
    #[schema(default = false)]
    pub stream: bool,
}

impl From<CompatGenerateRequest> for GenerateRequest {
    fn from(req: CompatGenerateRequest) -> Self {
        Self {
            inputs: req.inputs,
            parameters: req.parameters,
        }
    }
}

/// A prompt token; `logprob` is null for the first one, which has no context.
#[derive(Clone, Debug, Serialize, PartialEq, ToSchema)]
pub struct PrefillToken {
    pub id: u32,
    pub text: String,
    pub logprob: Option<f32>,
}

/// One of the most likely alternatives to a generated token.
#[derive(Clone, Debug, Serialize, PartialEq, ToSchema)]
pub struct AlternativeToken {
    pub id: u32,
    pub text: String,
    pub logprob: f32,
}

/// A generated token.
#[derive(Clone, Debug, Serialize, PartialEq, ToSchema)]
pub struct Token {
    pub id: u32,
    pub text: String,
    pub logprob: f32,
    pub special: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alternative_tokens: Option<Vec<AlternativeToken>>,
    /// True for the extra tokens a speculative decode step accepted (from a draft) beyond the
    /// first token of that step.
    pub skipped: bool,
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq, ToSchema)]
pub enum FinishReason {
    #[serde(rename = "length")]
    Length,
    #[serde(rename = "eos_token")]
    EndOfSequenceToken,
    #[serde(rename = "stop_sequence")]
    StopSequence,
}

impl FinishReason {
    /// From the proto enum's integer value; unknown values read as `length`.
    pub fn from_proto(value: i32) -> Self {
        match value {
            1 => Self::EndOfSequenceToken,
            2 => Self::StopSequence,
            _ => Self::Length,
        }
    }
}

/// An extra sequence of a `best_of` request.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct BestOfSequence {
    pub generated_text: String,
    pub finish_reason: FinishReason,
    pub generated_tokens: u32,
    pub seed: Option<u64>,
    pub prefill: Vec<PrefillToken>,
    pub tokens: Vec<Token>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top_tokens: Vec<Vec<Token>>,
}

/// `details` of a non-streamed answer.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Details {
    pub finish_reason: FinishReason,
    pub prompt_tokens: u32,
    pub generated_tokens: u32,
    /// Generated tokens that speculative decoding accepted beyond one per decode step.
    pub skipped_tokens: u32,
    pub seed: Option<u64>,
    pub prefill: Vec<PrefillToken>,
    pub tokens: Vec<Token>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top_tokens: Vec<Vec<Token>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best_of_sequences: Option<Vec<BestOfSequence>>,
}

/// Answer of `POST /generate` (and, wrapped in a list, of `POST /`).
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct GenerateResponse {
    pub generated_text: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub details: Option<Details>,
}

/// `details` of the last streamed event.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct StreamDetails {
    pub finish_reason: FinishReason,
    pub prompt_tokens: u32,
    pub generated_tokens: u32,
    pub seed: Option<u64>,
}

/// One server-sent event of `POST /generate_stream`.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct StreamResponse {
    pub token: Token,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub top_tokens: Vec<Token>,
    /// Set on the last event only.
    pub generated_text: Option<String>,
    /// Set on the last event only (when details were asked for).
    pub details: Option<StreamDetails>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
/// Where a tracked adapter is in its life (`GET /adapters`).
pub enum AdapterState {
    Queued,
    Downloading,
    Downloaded,
    Loading,
    Active,
    Offloading,
    /// Only in listings: the last attempt failed and the adapter is no longer tracked.
    Failed,
}

/// One adapter as `GET /adapters` shows it. Never holds the token.
#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct AdapterStatus {
    /// The adapter id (merged ids joined by `+`).
    pub adapter_id: String,
    pub adapter_ids: Vec<String>,
    pub merged_adapters: Option<MergedAdapters>,
    pub adapter_source: AdapterSource,
    /// Fetched with a request's own `api_token`.
    pub private: bool,
    pub state: AdapterState,
    /// The index requests use at the shard while tracked.
    pub index: Option<u32>,
    pub pinned: bool,
    /// Admits no new requests until it is offloaded (its slot goes to a waiting adapter).
    pub draining: bool,
    pub queued: usize,
    pub running: usize,
    /// Share of the adapter memory budget it takes on the device (its bytes / the budget's
    /// bytes), known once downloaded; never above 1 (larger adapters fail after download).
    pub memory_fraction: Option<f32>,
    pub active_for_s: Option<f64>,
    pub last_error: Option<String>,
}

/// Answer of `GET /info`.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Info {
    pub model_id: String,
    pub model_sha: Option<String>,
    pub model_dtype: String,
    pub model_device_type: String,
    pub model_pipeline_tag: Option<String>,
    pub architecture: String,
    /// The `--quantize` method of the base model (also when detected from the checkpoint).
    pub quantize: Option<String>,
    /// Most tokens a decode step drafts per request (`--speculative-tokens`; 0: no speculation).
    pub speculate: u32,
    pub max_concurrent_requests: usize,
    pub max_best_of: usize,
    pub max_stop_sequences: usize,
    pub max_input_length: usize,
    pub max_total_tokens: usize,
    pub waiting_served_ratio: f32,
    pub max_batch_total_tokens: u32,
    pub max_batch_prefill_tokens: u32,
    pub max_waiting_tokens: usize,
    pub max_active_adapters: usize,
    pub adapter_cycle_time_s: u64,
    pub block_size: u32,
    pub eos_token_ids: Vec<u32>,
    pub supports_adapters: bool,
    /// Whether the model generates text (`/generate`, `/`, the OpenAI completions); false for
    /// encoder models (BERT family), which serve only the endpoints below.
    pub supports_generation: bool,
    /// Whether `/embed` and `/v1/embeddings` are served.
    pub supports_embeddings: bool,
    /// Whether `/classify` and `/classify_batch` are served.
    pub supports_classification: bool,
    /// Length of the vectors `/embed` returns (0 when embeddings are not served).
    pub embedding_dim: u32,
    pub validation_workers: usize,
    /// `--eager-prefill`: several prefills may run between two decode steps.
    pub eager_prefill: bool,
    pub version: &'static str,
    pub sha: Option<&'static str>,
    pub docker_label: Option<&'static str>,
    pub request_logger_url: Option<String>,
    /// The default adapter of requests that name none.
    pub default_adapter_id: Option<String>,
    /// The adapters loaded on the device now (filled when `/info` is asked).
    pub adapters: Vec<AdapterStatus>,
}

/// Body of `POST /tokenize`.
#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct TokenizeRequest {
    #[schema(example = "My name is Olivier and I")]
    pub inputs: String,
    /// Add the tokenizer's special tokens (e.g. BOS), as generation does.
    #[serde(default = "default_true")]
    #[schema(default = true)]
    pub add_special_tokens: bool,
}

/// One token of a `POST /tokenize` answer; `start`/`stop` are byte offsets into `inputs`.
#[derive(Clone, Debug, Serialize, PartialEq, ToSchema)]
pub struct SimpleToken {
    pub id: u32,
    pub text: String,
    pub start: usize,
    pub stop: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_default_as_lorax() {
        let req: GenerateRequest = serde_json::from_str(r#"{"inputs": "hi"}"#).unwrap();
        assert!(req.parameters.details);
        assert!(!req.parameters.do_sample);
        assert_eq!(req.parameters.max_new_tokens, None);
        let req: GenerateRequest =
            serde_json::from_str(r#"{"inputs": "hi", "parameters": {"stop": []}}"#).unwrap();
        assert!(req.parameters.details);
    }

    #[test]
    fn lorax_client_payload_parses() {
        // What lorax-client's `Request(...).dict()` sends, nulls included.
        let body = r#"{"inputs": "x", "parameters": {"adapter_id": null, "adapter_source": null,
            "merged_adapters": null, "api_token": null, "do_sample": false, "max_new_tokens": 20,
            "ignore_eos_token": false, "repetition_penalty": null, "return_full_text": false,
            "stop": [], "seed": null, "temperature": null, "top_k": null, "top_p": null,
            "truncate": null, "typical_p": null, "best_of": null, "watermark": false,
            "details": true, "decoder_input_details": false, "return_k_alternatives": null,
            "response_format": null}, "stream": false}"#;
        let req: CompatGenerateRequest = serde_json::from_str(body).unwrap();
        assert_eq!(req.parameters.max_new_tokens, Some(20));
        assert!(!req.stream);
    }

    #[test]
    fn finish_reason_serializes_as_lorax() {
        let s = serde_json::to_string(&[
            FinishReason::Length,
            FinishReason::EndOfSequenceToken,
            FinishReason::StopSequence,
        ])
        .unwrap();
        assert_eq!(s, r#"["length","eos_token","stop_sequence"]"#);
    }

    #[test]
    fn stream_response_has_null_text_until_the_end() {
        let event = StreamResponse {
            token: Token {
                id: 1,
                text: "a".into(),
                logprob: -0.5,
                special: false,
                alternative_tokens: None,
                skipped: false,
            },
            top_tokens: vec![],
            generated_text: None,
            details: None,
        };
        let v: serde_json::Value = serde_json::to_value(&event).unwrap();
        assert!(v["generated_text"].is_null());
        assert!(v["details"].is_null());
        assert_eq!(v["token"]["special"], false);
    }
}
