//! lorax-router: the HTTP front of a LoRAX-compatible multi-LoRA inference server.
//!
//! Request path: `server` (axum handlers) → `infer` (admission, validation, queueing) →
//! `queue` (waiting entries and token budgets) → `batcher` (continuous batching loop) →
//! `client` (`ShardClient` trait; gRPC to the Python shards over unix sockets).
//!
//! Adapters: `adapter` (what a request names and its key) → `registry` (tracked adapters, their
//! queues and states, owned by the queue task) with `exchange` (the pure slot policy);
//! `adapters_api` holds the management endpoints.

pub mod adapter;
pub mod adapters_api;
pub mod api;
pub mod batcher;
pub mod client;
pub mod errors;
pub mod exchange;
pub mod infer;
pub mod metrics;
pub mod openai;
pub mod openapi;
pub mod queue;
pub mod registry;
pub mod server;
pub mod template;
pub mod testing;
pub mod validation;

/// Code generated from `proto/generate.proto` (package `generate.v1`).
#[allow(clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("generate.v1");
}

/// The router's version, reported by `GET /info`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
