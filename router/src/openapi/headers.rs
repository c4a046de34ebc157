//! The headers of a generated answer (`respond`: LoRAX's timings and token counts), added to the
//! 200 answers of the operations that send them: `/generate`, and `/` and the OpenAI endpoints
//! when they answer with JSON rather than a stream; the encoder endpoints send those that mean
//! something without generated tokens (`encoder_api`).

use serde_json::{json, Map, Value};

/// (name, JSON type, meaning) of each header `respond` sets on an answer.
const ANSWER_HEADERS: [(&str, &str, &str); 13] = [
    (
        "x-compute-type",
        "string",
        "Device type of the shards (`cpu`, `cuda`)",
    ),
    (
        "x-compute-time",
        "integer",
        "Milliseconds from arrival to answer (as `x-total-time`)",
    ),
    (
        "x-compute-characters",
        "integer",
        "Characters in the prompt",
    ),
    (
        "x-total-time",
        "integer",
        "Milliseconds from arrival to answer",
    ),
    (
        "x-validation-time",
        "integer",
        "Milliseconds spent validating and tokenizing",
    ),
    (
        "x-queue-time",
        "integer",
        "Milliseconds waiting in the queue",
    ),
    (
        "x-inference-time",
        "integer",
        "Milliseconds in a running batch",
    ),
    (
        "x-time-per-token",
        "integer",
        "Inference milliseconds per generated token",
    ),
    ("x-prompt-tokens", "integer", "Tokens in the prompt"),
    ("x-generated-tokens", "integer", "Tokens generated"),
    (
        "x-skipped-tokens",
        "integer",
        "Tokens speculative decoding gave beyond one per step (as `details.skipped_tokens`)",
    ),
    ("x-total-tokens", "integer", "Prompt and generated tokens"),
    ("x-model-id", "string", "The served model"),
];

/// The operations whose JSON answers carry them.
const ANSWERED: [&str; 4] = ["/", "/generate", "/v1/completions", "/v1/chat/completions"];

/// The encoder operations, and the headers of `ANSWER_HEADERS` their answers carry.
const ENCODED: [&str; 4] = ["/embed", "/v1/embeddings", "/classify", "/classify_batch"];
const ENCODER_HEADERS: [&str; 10] = [
    "x-compute-type",
    "x-compute-time",
    "x-compute-characters",
    "x-total-time",
    "x-validation-time",
    "x-queue-time",
    "x-inference-time",
    "x-prompt-tokens",
    "x-total-tokens",
    "x-model-id",
];

pub fn describe_answer_headers(doc: &mut Value) {
    let headers: Map<String, Value> = ANSWER_HEADERS
        .iter()
        .map(|(name, kind, description)| {
            let header = json!({"description": description, "schema": {"type": kind}});
            (name.to_string(), header)
        })
        .collect();
    let encoder_headers: Map<String, Value> = headers
        .iter()
        .filter(|(name, _)| ENCODER_HEADERS.contains(&name.as_str()))
        .map(|(name, header)| (name.clone(), header.clone()))
        .collect();
    let sets = [(&ANSWERED[..], &headers), (&ENCODED[..], &encoder_headers)];
    for (paths, headers) in sets {
        for path in paths {
            let ok = &mut doc["paths"][path]["post"]["responses"]["200"];
            assert!(ok.is_object(), "{path} answers 200");
            ok["headers"] = Value::Object(headers.clone());
        }
    }
}
