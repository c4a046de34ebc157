//! Start-up of `lorax-router` (a module of the binary): connecting to the shards, their Info and
//! Warmup, and the token budgets derived from them and the flags.

use crate::Args;
use lorax_router::client::{ShardClient, ShardedClient};
use lorax_router::entry::round_up;
use lorax_router::pb;
use std::time::Duration;

/// Connects to the shards, retrying for a while (they may still be binding their sockets).
pub async fn connect(path: &str) -> Result<ShardedClient, String> {
    let mut last_error = String::new();
    for _ in 0..40 {
        match ShardedClient::connect_uds(path).await {
            Ok(client) => return Ok(client),
            Err(err) => last_error = err.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(format!(
        "cannot connect to the shard at {path}: {last_error}"
    ))
}

/// What the shards said at start-up, and the token budgets derived from it.
pub struct Shards {
    pub info: pb::InfoResponse,
    pub max_batch_total_tokens: u32,
    pub max_batch_prefill_tokens: u32,
    pub block_size: u32,
}

/// Asks the shards for their Info and runs Warmup; checks the token budget against the flags
/// (for a generating model: an encoder's Warmup only echoes the prefill budget).
pub async fn warm_up(client: &ShardedClient, args: &Args) -> Result<Shards, String> {
    let mut info = client.info().await.map_err(|e| e.to_string())?;
    // A shard that predates these fields reports none of them: it serves a generating model.
    if !(info.supports_generation || info.supports_embeddings || info.supports_classification) {
        info.supports_generation = true;
    }
    let supported = client
        .warmup(
            args.max_input_length as u32,
            args.max_batch_prefill_tokens,
            args.max_total_tokens as u32,
        )
        .await
        .map_err(|e| format!("warmup failed: {e}"))?;
    let max_batch_total_tokens = match args.max_batch_total_tokens {
        Some(tokens) if tokens > supported => {
            return Err(format!(
                "--max-batch-total-tokens {tokens} is more than the shards support ({supported})"
            ))
        }
        Some(tokens) => tokens,
        None => supported,
    };
    let block_size = info.block_size.max(1);
    let longest = round_up(args.max_total_tokens as u32, block_size);
    // An encoder model has no KV cache: its Warmup answers the prefill budget it was given.
    if info.supports_generation && max_batch_total_tokens < longest {
        return Err(format!(
            "the KV cache holds {max_batch_total_tokens} tokens, less than one request of \
             --max-total-tokens {} needs ({longest}); lower --max-total-tokens",
            args.max_total_tokens
        ));
    }
    tracing::info!("max_batch_total_tokens = {max_batch_total_tokens}");
    Ok(Shards {
        info,
        max_batch_total_tokens,
        max_batch_prefill_tokens: args.max_batch_prefill_tokens.min(max_batch_total_tokens),
        block_size,
    })
}
