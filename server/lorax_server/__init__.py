"""LoRAX-compatible shard: model, paged KV cache and batching engine behind a gRPC service."""
