"""`hqq-4bit`, `hqq-3bit`, `hqq-2bit`: Half-Quadratic Quantization at load time. Asymmetric integer
codes per group of consecutive input channels (64 for 4 and 3 bits, 16 for 2 bits, as LoRAX
configures it); the zero point of each group is then refined by HQQ's proximal solver, which fits the
rounding error under a sparsity-promoting l_p norm (p < 1) instead of the mean squared error, without
calibration data. Scales and zero points stay in float32.
"""

from __future__ import annotations

import torch

from .grouped import GroupedWeight

GROUP_SIZE = {4: 64, 3: 64, 2: 16}
ITERATIONS, LP_NORM, BETA, KAPPA = 20, 0.7, 10.0, 1.01


def _shrink(x: torch.Tensor, beta: float) -> torch.Tensor:
    """The proximal operator of the l_p norm (p = LP_NORM < 1): a generalised soft threshold."""
    magnitude = x.abs()
    return torch.sign(x) * torch.relu(magnitude - magnitude.clamp_min(1e-12).pow(LP_NORM - 1) / beta)


def _optimise_zero(w: torch.Tensor, inv_scale: torch.Tensor, zero: torch.Tensor, top: int) -> torch.Tensor:
    """w [groups, group_size]; the zero points [groups, 1] that minimise ‖w − dequant(quant(w))‖_p."""
    beta, best_error, best = BETA, float("inf"), zero
    for _ in range(ITERATIONS):
        q = torch.round(w * inv_scale + zero).clamp_(0, top)
        error = w - (q - zero) / inv_scale
        mean_error = error.abs().mean().item()
        if mean_error >= best_error:
            break
        best_error, best = mean_error, zero
        sparse_error = _shrink(error, beta)
        zero = torch.mean(q - (w - sparse_error) * inv_scale, dim=1, keepdim=True)
        beta *= KAPPA
    return best


def quantize_hqq(weight: torch.Tensor, bits: int) -> GroupedWeight:
    group, top = GROUP_SIZE[bits], 2**bits - 1
    w = weight.detach().float()
    out_features, in_features = w.shape
    groups = -(-in_features // group)
    pad = groups * group - in_features
    if pad:  # a partial last group: repeat the row's last weight, which leaves its min and max unchanged
        w = torch.cat([w, w[:, -1:].expand(-1, pad)], dim=1)
    g = w.reshape(-1, group)
    low, high = g.amin(dim=1, keepdim=True), g.amax(dim=1, keepdim=True)
    inv_scale = top / (high - low).clamp_min(1e-8)
    zero = _optimise_zero(g, inv_scale, -low * inv_scale, top)
    codes = torch.round(g * inv_scale + zero).clamp_(0, top).view(out_features, -1)[:, :in_features]
    scales = (1.0 / inv_scale).view(out_features, groups)
    offsets = (-zero / inv_scale).view(out_features, groups)
    table = torch.arange(2**bits, dtype=torch.float32, device=w.device)
    return GroupedWeight.from_codes(codes, bits, table, scales, offsets, group)
