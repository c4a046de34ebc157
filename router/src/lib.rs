//! lorax-router: the HTTP front of a LoRAX-compatible multi-LoRA inference server.
//!
//! Request path: `server` (the route table) → handlers (`native`, `openai`, `adapters_api`, `playground`, on
//! the shared steps in `app`, `respond` and `sse`) → `infer` (admission, validation, queueing)
//! → `queue` (waiting entries and token budgets) → `batcher` (continuous batching loop) →
//! `client` (`ShardClient` trait; gRPC to the Python shards over unix sockets; `decode_stream`
//! for decode steps answered one by one). `entry` holds
//! what travels between them (the queue entry and its stream messages); `health` judges
//! whether the batching loop can generate now.
//!
//! Adapters: `adapter` (what a request names and its key) → `registry` (tracked adapters, their
//! queues and states, owned by the queue task) with `exchange` (the pure slot policy);
//! `adapters_api` holds the management endpoints.
//!
//! Encoder models (embeddings, token classification): `encoder_api` holds their endpoints,
//! `encoder` batches their inputs into Embed and Classify calls and groups entities.
//!
//! The OpenAPI document (`openapi`, serving `/docs` and `/api-doc/openapi.json`) is generated
//! from the API types and the handlers' annotations; `error_docs` holds their error answers.
//!
//! Layers (each module uses only those above it): `pb`, `client` with `decode_stream`, `exchange` → `errors`, `error_docs` →
//! `tools` (OpenAI tool calling) → `template` → `adapter` → `api`, `metrics` → `validation` →
//! `entry` → `registry` → `queue` → `health` → `batcher`, `encoder` → `infer` → `app` → `respond` → `sse` → handlers → `openapi` → `cors` → `server`.

pub mod adapter;
pub mod adapters_api;
pub mod api;
pub mod app;
pub mod batcher;
pub mod client;
pub mod cors;
pub mod decode_stream;
pub mod encoder;
pub mod encoder_api;
pub mod entry;
pub mod error_docs;
pub mod errors;
pub mod exchange;
pub mod health;
pub mod infer;
pub mod metrics;
pub mod native;
pub mod openai;
pub mod openapi;
pub mod playground;
pub mod queue;
pub mod registry;
pub mod respond;
pub mod server;
pub mod sse;
pub mod telemetry;
pub mod template;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tools;
pub mod validation;

/// Code generated from `proto/generate.proto` (package `generate.v1`).
#[allow(clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("generate.v1");
}

/// The router's version, reported by `GET /info`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
