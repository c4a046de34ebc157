//! The JSON bodies of the encoder endpoints, shaped as LoRAX's (`/embed`, `/classify`,
//! `/classify_batch`) and OpenAI's (`/v1/embeddings`) so their clients read them unmodified.
//! The bodies `lorax-client` sends also carry `"parameters": null` and `"stream": false`: the
//! first is read for its adapter fields, the second ignored.

use crate::adapter::AdapterParams;
use crate::openai::StringOrList;
use base64::Engine;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Body of `POST /embed`.
#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct EmbedRequest {
    #[schema(example = "My name is Olivier and I")]
    pub inputs: String,
    /// Only the adapter fields are read: naming an adapter is refused (embeddings are the base
    /// model's).
    #[serde(default)]
    pub parameters: Option<AdapterParams>,
}

/// Answer of `POST /embed`.
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct EmbedResponse {
    /// `embedding_dim` numbers (see `GET /info`).
    pub embeddings: Vec<f32>,
}

/// How `/v1/embeddings` writes each vector.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    /// A JSON list of numbers.
    #[default]
    Float,
    /// Base64 of the little-endian float32 bytes (what the `openai` Python client asks for).
    Base64,
}

/// Body of `POST /v1/embeddings`.
#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct EmbeddingsRequest {
    /// One text, or a list of texts (at most `max_concurrent_requests`); token arrays are not
    /// taken.
    pub input: StringOrList,
    /// Echoed in the answer; it names no adapter (as in LoRAX).
    #[serde(default)]
    #[schema(example = "my-embedder")]
    pub model: String,
    #[serde(default)]
    pub encoding_format: Option<EncodingFormat>,
    /// Must be the model's `embedding_dim` when given (shortened vectors are not offered).
    #[serde(default)]
    pub dimensions: Option<u32>,
    /// Ignored.
    #[serde(default)]
    pub user: Option<String>,
    /// LoRAX's extension; only the adapter fields are read, and naming an adapter is refused.
    #[serde(default)]
    pub parameters: Option<AdapterParams>,
}

/// One vector of a `/v1/embeddings` answer.
#[derive(Clone, Debug, Serialize, PartialEq, ToSchema)]
pub struct EmbeddingObject {
    #[schema(example = "embedding")]
    pub object: &'static str,
    /// The position of its input in `input`.
    pub index: usize,
    pub embedding: EmbeddingValues,
}

/// A vector as `encoding_format` asked.
#[derive(Clone, Debug, Serialize, PartialEq, ToSchema)]
#[serde(untagged)]
pub enum EmbeddingValues {
    Float(Vec<f32>),
    /// Base64 of the little-endian float32 bytes.
    Base64(String),
}

impl EmbeddingValues {
    pub fn new(values: Vec<f32>, format: EncodingFormat) -> Self {
        match format {
            EncodingFormat::Float => Self::Float(values),
            EncodingFormat::Base64 => Self::Base64(base64_f32(&values)),
        }
    }
}

/// Base64 of `values` as little-endian float32 bytes (how `openai` clients decode it:
/// `np.frombuffer(base64.b64decode(s), dtype="<f4")`).
pub fn base64_f32(values: &[f32]) -> String {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// `usage` of a `/v1/embeddings` answer.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, ToSchema)]
pub struct EmbeddingUsage {
    /// Tokens of every input, special tokens included.
    pub prompt_tokens: u32,
    pub total_tokens: u32,
}

/// Answer of `POST /v1/embeddings`: OpenAI's list object, with LoRAX's key `embeddings`
/// holding the same vectors as `data` (LoRAX answered with that key alone).
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct EmbeddingsResponse {
    #[schema(example = "list")]
    pub object: &'static str,
    /// One per input, in order.
    pub data: Vec<EmbeddingObject>,
    /// The request's `model`, or the served model's id when it gave none.
    pub model: String,
    pub usage: EmbeddingUsage,
    /// The same list as `data`.
    pub embeddings: Vec<EmbeddingObject>,
}

/// Body of `POST /classify`.
#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct ClassifyRequest {
    #[schema(example = "John lives in New York")]
    pub inputs: String,
    /// Only the adapter fields are read: naming an adapter is refused.
    #[serde(default)]
    pub parameters: Option<AdapterParams>,
}

/// Body of `POST /classify_batch`.
#[derive(Clone, Debug, Deserialize, ToSchema)]
pub struct BatchClassifyRequest {
    /// At least one text, at most `max_concurrent_requests`.
    #[schema(example = json!(["John lives in New York", "Acme hired Maria"]))]
    pub inputs: Vec<String>,
    /// Only the adapter fields are read: naming an adapter is refused.
    #[serde(default)]
    pub parameters: Option<AdapterParams>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_little_endian_float32() {
        // 1.0 = 0x3f800000, -2.5 = 0xc0200000 (little-endian bytes reversed).
        let encoded = base64_f32(&[1.0, -2.5]);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&encoded)
            .unwrap();
        assert_eq!(bytes, [0, 0, 0x80, 0x3f, 0, 0, 0x20, 0xc0]);
        assert_eq!(encoded, "AACAPwAAIMA=");
    }

    #[test]
    fn lorax_client_bodies_parse() {
        // What lorax-client's `Request(inputs=...)` and `BatchRequest(...)` send.
        let one: EmbedRequest =
            serde_json::from_str(r#"{"inputs": "x", "parameters": null, "stream": false}"#)
                .unwrap();
        assert!(one.parameters.is_none());
        let batch: BatchClassifyRequest =
            serde_json::from_str(r#"{"inputs": ["a", "b"], "parameters": null, "stream": false}"#)
                .unwrap();
        assert_eq!(batch.inputs, ["a", "b"]);
    }

    #[test]
    fn openai_bodies_parse() {
        let body = r#"{"input": ["a", "b"], "model": "m", "encoding_format": "base64",
            "dimensions": 4, "user": "u"}"#;
        let request: EmbeddingsRequest = serde_json::from_str(body).unwrap();
        assert_eq!(request.encoding_format, Some(EncodingFormat::Base64));
        assert_eq!(request.dimensions, Some(4));
        let one: EmbeddingsRequest =
            serde_json::from_str(r#"{"input": "a", "encoding_format": null}"#).unwrap();
        assert!(matches!(one.input, StringOrList::One(_)));
        assert!(one.encoding_format.is_none());
        assert!(serde_json::from_str::<EmbeddingsRequest>(
            r#"{"input": "a", "encoding_format": "int8"}"#
        )
        .is_err());
    }
}
