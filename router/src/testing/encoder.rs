//! The fake shard as an encoder model (BERT family): a WordPiece test tokenizer that adds
//! `[CLS]`/`[SEP]` and lowercases (so answers can show they quote the input, not the tokens),
//! and deterministic Embed and Classify answers computed from the token ids alone, so a test
//! knows what each input must get back whichever call it shared.

use super::{Call, FakeShard};
use crate::client::ShardError;
use crate::pb;
use std::sync::Arc;
use tokio::sync::Semaphore;
use tonic::Code;

/// BERT-like tokenizer (lowercase, accents stripped, WordPiece): `[PAD]`=0 `[UNK]`=1 `[CLS]`=2
/// `[SEP]`=3 `[MASK]`=4 john=5 ##ny=6 lives=7 in=8 new=9 york=10 zurich=11 sao=12 paulo=13
/// and=14 works=15 for=16 acme=17 the=18 fox=19 `.`=20 `,`=21; wraps inputs in `[CLS] … [SEP]`.
pub const TEST_ENCODER_TOKENIZER_JSON: &str = r###"{
  "version": "1.0",
  "truncation": null,
  "padding": null,
  "added_tokens": [
    {"id": 0, "content": "[PAD]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 1, "content": "[UNK]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 2, "content": "[CLS]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 3, "content": "[SEP]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 4, "content": "[MASK]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
  ],
  "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true, "strip_accents": null, "lowercase": true},
  "pre_tokenizer": {"type": "BertPreTokenizer"},
  "post_processor": {
    "type": "TemplateProcessing",
    "single": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}}],
    "pair": [{"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "[SEP]", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}, {"SpecialToken": {"id": "[SEP]", "type_id": 1}}],
    "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]}, "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}
  },
  "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": true},
  "model": {
    "type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##", "max_input_chars_per_word": 100,
    "vocab": {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, "john": 5, "##ny": 6, "lives": 7, "in": 8, "new": 9, "york": 10, "zurich": 11, "sao": 12, "paulo": 13, "and": 14, "works": 15, "for": 16, "acme": 17, "the": 18, "fox": 19, ".": 20, ",": 21}
  }
}"###;

pub fn test_encoder_tokenizer() -> tokenizers::Tokenizer {
    TEST_ENCODER_TOKENIZER_JSON
        .parse()
        .expect("test encoder tokenizer")
}

/// Length of the fake embeddings.
pub const FAKE_EMBEDDING_DIM: u32 = 4;
/// A call with an input holding this token ("fox") is refused with INVALID_ARGUMENT, as a shard
/// refuses an input it cannot compute.
pub const REFUSED_ENCODER_TOKEN: u32 = 19;
/// What the fake encoder says is its longest input (`Info.max_position_embeddings`).
pub const FAKE_ENCODER_POSITIONS: u32 = 12;

/// What the fake shard's model serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FakeModel {
    /// A causal LM: Prefill and Decode; Embed and Classify are FAILED_PRECONDITION.
    Generating,
    /// An encoder: Embed and/or Classify; Prefill and Decode are FAILED_PRECONDITION.
    Encoder {
        embeddings: bool,
        classification: bool,
    },
}

impl FakeModel {
    pub fn generates(self) -> bool {
        self == Self::Generating
    }

    /// The Info fields that differ between the kinds of model.
    pub(super) fn describe(self, info: &mut pb::InfoResponse) {
        match self {
            Self::Generating => info.supports_generation = true,
            Self::Encoder {
                embeddings,
                classification,
            } => {
                info.supports_generation = false;
                info.supports_adapters = false;
                info.supports_embeddings = embeddings;
                info.supports_classification = classification;
                info.embedding_dim = if embeddings { FAKE_EMBEDDING_DIM } else { 0 };
                info.max_position_embeddings = FAKE_ENCODER_POSITIONS;
                info.eos_token_ids = Vec::new();
                info.architecture = if classification {
                    "BertForTokenClassification".into()
                } else {
                    "BertModel".into()
                };
            }
        }
    }
}

impl FakeShard {
    /// An encoder model (no generation, no adapters) serving Embed and/or Classify; Warmup
    /// answers `capacity`.
    pub fn encoder(capacity: u32, embeddings: bool, classification: bool) -> Self {
        Self {
            model: FakeModel::Encoder {
                embeddings,
                classification,
            },
            ..Self::new(capacity, 1)
        }
    }

    /// As `encoder`, every Embed/Classify waiting for a permit given by `allow_steps`.
    pub fn gated_encoder(capacity: u32, embeddings: bool, classification: bool) -> Self {
        Self {
            gate: Some(Arc::new(Semaphore::new(0))),
            ..Self::encoder(capacity, embeddings, classification)
        }
    }

    /// Refuses a step on a model that does not generate, as an encoder's shard does.
    pub(super) fn check_generates(&self) -> Result<(), ShardError> {
        if self.model.generates() {
            return Ok(());
        }
        let message = "this model does not generate: it serves Embed and Classify only";
        Err(ShardError::status(Code::FailedPrecondition, message))
    }

    /// Records an encoder call and waits at the gate like a step.
    pub(super) async fn encoder_call(&self, inputs: &[pb::EncoderInput], embed: bool) {
        let inputs = inputs.iter().map(|i| (i.id, i.input_ids.len())).collect();
        let call = match embed {
            true => Call::Embed { inputs },
            false => Call::Classify { inputs },
        };
        self.state.lock().unwrap().calls.push(call);
        self.pass_gate().await;
    }
}

/// The label and score the fake classifier gives a token: names where the test sentences have
/// them, and "B-MISC" for `[CLS]`/`[SEP]` (the router must drop special tokens, whatever their
/// label). Scores differ by token so means can be checked.
pub fn fake_token_class(id: u32) -> (&'static str, f32) {
    let label = match id {
        2 | 3 => "B-MISC",
        5 => "B-PER",
        6 => "I-PER",
        9 | 11 | 12 => "B-LOC",
        10 | 13 => "I-LOC",
        17 => "B-ORG",
        _ => "O",
    };
    (label, 0.5 + (id % 10) as f32 * 0.05)
}

/// The fake embedding of an input: its length, the sum of its ids, its first and last id.
pub fn fake_embedding(ids: &[u32]) -> Vec<f32> {
    let sum: u32 = ids.iter().sum();
    let first = ids.first().copied().unwrap_or_default();
    let last = ids.last().copied().unwrap_or_default();
    vec![ids.len() as f32, sum as f32, first as f32, last as f32]
}

/// Refuses a call as the shard would: the model does not serve it (FAILED_PRECONDITION), or an
/// input holds the refused token (INVALID_ARGUMENT).
pub(super) fn check_call(
    served: bool,
    what: &str,
    inputs: &[pb::EncoderInput],
) -> Result<(), ShardError> {
    if !served {
        let message = format!("this model does not serve {what}");
        return Err(ShardError::status(Code::FailedPrecondition, message));
    }
    if let Some(bad) = inputs
        .iter()
        .find(|i| i.input_ids.contains(&REFUSED_ENCODER_TOKEN))
    {
        let message = format!("input {} holds a token the model refuses", bad.id);
        return Err(ShardError::status(Code::InvalidArgument, message));
    }
    Ok(())
}

pub(super) fn embed(inputs: &[pb::EncoderInput]) -> Vec<pb::Embedding> {
    inputs
        .iter()
        .map(|input| pb::Embedding {
            request_id: input.id,
            values: fake_embedding(&input.input_ids),
        })
        .collect()
}

pub(super) fn classify(inputs: &[pb::EncoderInput]) -> Vec<pb::ClassifyPredictionList> {
    inputs
        .iter()
        .map(|input| {
            let (labels, scores) = input
                .input_ids
                .iter()
                .map(|&id| fake_token_class(id))
                .unzip();
            let labels: Vec<&str> = labels;
            pb::ClassifyPredictionList {
                request_id: input.id,
                predictions: labels.into_iter().map(String::from).collect(),
                scores,
            }
        })
        .collect()
}
