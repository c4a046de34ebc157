"""Best-effort serving of architectures we have no spec for, through transformers itself.

The paged cache holds each sequence's token ids instead of keys and values (one "layer" of int64
slots); every step re-runs each sequence's whole history, right-padded into one batch, and reads the
logits of the new tokens. Correct for any causal LM, batched, and cheap to keep compatible with the
engine (blocks, filtering and merging work unchanged), but quadratic in length: a fallback, not a fast
path. Dynamic adapters are not offered on it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from ..forward import ForwardBatch
from ..kv_cache import KVCache
from .config import ModelConfig


class UnsupportedArchitecture(ValueError):
    pass


class TransformersCausalLM:
    supports_adapters = False
    recompute_at_length = None  # every step recomputes whole sequences already
    length_dependent_above = None  # transformers' own module: the cache holds token ids, not keys

    @property
    def position_limit(self) -> int | None:
        """transformers' own module may index a position table: keep within the configured positions."""
        return self.config.max_position_embeddings

    spec = None

    def __init__(
        self, model_dir: Path, config: ModelConfig, dtype: torch.dtype, device: torch.device, trust_remote_code: bool
    ) -> None:
        model_cls = getattr(transformers, config.architecture, None)
        if model_cls is None and not trust_remote_code:
            raise UnsupportedArchitecture(
                f"architecture {config.architecture!r} is neither supported natively nor known to transformers "
                "(custom code needs --trust-remote-code)"
            )
        loader = model_cls or transformers.AutoModelForCausalLM
        self.hf = loader.from_pretrained(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
        self.hf = self.hf.to(device).eval()
        self.config, self.dtype, self.device = config, dtype, device

    @property
    def cache_geometry(self) -> tuple[int, int, int, torch.dtype]:
        return 1, 1, 1, torch.int64  # one token id per slot

    @torch.inference_mode()
    def forward(self, meta: ForwardBatch, cache: KVCache) -> torch.Tensor:
        ids = meta.input_ids.view(-1, 1, 1)
        cache.write(0, meta.slots, ids, ids)
        batch, length, block = meta.batch_size, meta.max_context_len, cache.block_size
        tables = meta.block_tables[:, : -(-length // block)]
        tokens = cache.keys[0].view(cache.num_blocks, block)[tables].reshape(batch, -1)[:, :length]
        mask = torch.arange(length, device=tokens.device)[None, :] < meta.context_lens[:, None]
        logits = self.hf(input_ids=tokens, attention_mask=mask.long()).logits  # [batch, length, vocab]
        wanted = meta.logits_index
        return logits[meta.seq_index[wanted], meta.positions[wanted]].float()
