"""Sparse mixture-of-experts MLP (Mixtral-style top-k routing with renormalised weights).

Tokens are grouped by expert once per layer (one sort), then each expert runs one batched SwiGLU on
its tokens and scatters the weighted result back: a loop over experts, never over tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .linear import Linear


class SparseMoE:
    def __init__(
        self,
        gate: Linear,
        w1: torch.Tensor,  # [experts, intermediate, hidden]
        w3: torch.Tensor,  # [experts, intermediate, hidden]
        w2: torch.Tensor,  # [experts, hidden, intermediate]
        top_k: int,
        act: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        self.gate, self.w1, self.w3, self.w2 = gate, w1, w3, w2
        self.top_k, self.act = top_k, act
        self.num_experts = w1.shape[0]

    def __call__(self, x: torch.Tensor, meta=None) -> torch.Tensor:  # noqa: ANN001
        """x: [num_tokens, hidden] → [num_tokens, hidden]."""
        probs = torch.softmax(self.gate(x, meta).float(), dim=-1)  # [num_tokens, experts]
        weights, experts = probs.topk(self.top_k, dim=-1)  # [num_tokens, top_k]
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        flat_experts = experts.flatten()
        order = torch.argsort(flat_experts, stable=True)
        tokens = order // self.top_k  # token of each (token, choice) pair, grouped by expert
        routed_weights = weights.flatten()[order]
        counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()  # one sync per layer
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n:
                idx = tokens[start : start + n]
                xe = x[idx]
                h = self.act(xe @ self.w1[e].t()) * (xe @ self.w3[e].t())
                out.index_add_(0, idx, (h @ self.w2[e].t()) * routed_weights[start : start + n, None])
            start += n
        return out
