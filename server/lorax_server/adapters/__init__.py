"""LoRA adapters: sources, validation against the base model, the cache tiers, the batched math, merges."""
