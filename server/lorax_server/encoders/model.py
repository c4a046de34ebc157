"""The encoder's forward pass: BERT, RoBERTa, XLM-RoBERTa and DistilBERT (post-LayerNorm blocks).

The inputs of one call are computed together: their tokens packed one input after the other, longest
first ([num_tokens, hidden], no padding), through every linear, LayerNorm and activation, and laid out
for attention in padded [inputs, longest] grids of inputs of similar lengths, where a key padding mask
keeps each input to its own tokens.
Bidirectional attention, absolute learned positions (or DistilBERT's sinusoidal table), token type 0.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..layers.activations import activation
from ..layers.linear import Linear
from ..layers.norm import LayerNorm
from ..layers.packed import pack_dense_weights, packing_applies
from ..models.loader import resolve_dtype
from ..utils.weights import Weights, WeightsError
from .config import EncoderConfig

logger = logging.getLogger(__name__)


# The most padding one attention grid may hold, as a share of its cells. A call's inputs are packed
# longest first and attended in runs of similar lengths, each in its own grid: with inputs of 16-128
# tokens in arrival order, one grid as wide as the longest input is about 45% padding, all of it
# zeroed and attended over.
MAX_PADDING = 0.25


@dataclass(frozen=True)
class AttentionRun:
    """Inputs next to each other in the packed tokens, attended in one padded [inputs, longest] grid."""

    first: int  # the run's first token (a row of the packed tokens)
    tokens: int
    inputs: int
    longest: int
    # Each token's cell of the row-major grid, and which keys of a grid row are real tokens; both None
    # when the run's inputs have one length (the grid is the tokens).
    grid_index: torch.Tensor | None  # [tokens] int64
    key_mask: torch.Tensor | None  # [inputs, 1, 1, longest] bool


@dataclass(frozen=True)
class EncoderBatch:
    """One forward's inputs, their tokens packed longest input first. Per-input fields are in the
    caller's order, so pooled vectors and token labels come out in it."""

    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64: each token's row of the position table
    lengths: torch.Tensor  # [batch] int64: tokens of each input
    starts: torch.Tensor  # [batch] int64: index of each input's first token
    seq_index: torch.Tensor  # [num_tokens] int64: the input each token belongs to
    offsets: torch.Tensor  # [num_tokens] int64: each token's index within its input
    runs: list[AttentionRun]

    @property
    def size(self) -> int:
        return self.lengths.shape[0]

    @classmethod
    def build(cls, inputs: list[list[int]], config: EncoderConfig, device: torch.device) -> EncoderBatch:
        """`inputs`: each input's token ids (none empty)."""
        lens = [len(ids) for ids in inputs]
        order = sorted(range(len(lens)), key=lambda i: -lens[i])
        ids = torch.tensor([t for i in order for t in inputs[i]], dtype=torch.int64, device=device)
        lengths = torch.tensor(lens, dtype=torch.int64, device=device)
        packed = torch.tensor([lens[i] for i in order], dtype=torch.int64, device=device)
        order_t = torch.tensor(order, dtype=torch.int64, device=device)
        starts = torch.empty_like(lengths).index_copy_(0, order_t, torch.cumsum(packed, 0) - packed)
        seq_index = torch.repeat_interleave(order_t, packed)
        offsets = torch.arange(ids.shape[0], device=device) - starts[seq_index]
        positions = offsets
        if config.position_offset:
            # RoBERTa: real tokens count up from padding_idx + 1, a pad token stays at padding_idx.
            real = (ids != config.pad_token_id).long()
            seen = torch.cumsum(real, 0)
            before = (seen - real)[starts]  # real tokens ahead of each input
            positions = (seen - before[seq_index]) * real + config.pad_token_id
        return cls(ids, positions, lengths, starts, seq_index, offsets, _runs(sorted(lens, reverse=True), device))


def _runs(lens: list[int], device: torch.device) -> list[AttentionRun]:
    """Consecutive inputs (lengths longest first) in runs whose grids hold at most MAX_PADDING padding."""
    runs: list[list[int]] = [[lens[0]]]
    for n in lens[1:]:
        run = runs[-1]
        cells = (len(run) + 1) * run[0]
        if cells - sum(run) - n <= MAX_PADDING * cells:
            run.append(n)
        else:
            runs.append([n])
    out, first = [], 0
    for run in runs:
        grid_index = key_mask = None
        if run[-1] != run[0]:
            lengths = torch.tensor(run, dtype=torch.int64, device=device)
            row = torch.repeat_interleave(torch.arange(len(run), device=device), lengths)
            offset = torch.arange(sum(run), device=device) - (torch.cumsum(lengths, 0) - lengths)[row]
            grid_index = row * run[0] + offset
            key_mask = (torch.arange(run[0], device=device)[None, :] < lengths[:, None])[:, None, None, :]
        out.append(AttentionRun(first, sum(run), len(run), run[0], grid_index, key_mask))
        first += sum(run)
    return out


def attention(qkv: torch.Tensor, batch: EncoderBatch, heads: int) -> torch.Tensor:
    """Bidirectional attention of each input over its own tokens. qkv [num_tokens, 3 * hidden] (q | k | v)
    → [num_tokens, hidden]."""
    if len(batch.runs) == 1:
        return _attend(qkv, batch.runs[0], heads)
    return torch.cat([_attend(qkv[r.first : r.first + r.tokens], r, heads) for r in batch.runs])


def _attend(qkv: torch.Tensor, run: AttentionRun, heads: int) -> torch.Tensor:
    """One run's attention: qkv [run tokens, 3 * hidden] → [run tokens, hidden]."""
    rows, width = run.inputs, run.longest
    hidden = qkv.shape[1] // 3
    grid = qkv
    if run.grid_index is not None:
        grid = qkv.new_zeros(rows * width, 3 * hidden).index_copy_(0, run.grid_index, qkv)
    q, k, v = grid.view(rows, width, 3, heads, hidden // heads).permute(2, 0, 3, 1, 4).unbind(0)  # [b, h, l, d]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=run.key_mask)  # [inputs, heads, longest, head_dim]
    out = out.transpose(1, 2).reshape(rows * width, hidden)
    return out if run.grid_index is None else out.index_select(0, run.grid_index)


class EncoderLayer:
    """x = LN(x + attn(x)); x = LN(x + down(act(up(x))))."""

    def __init__(self, weights: Weights, prefix: str, config: EncoderConfig) -> None:
        lay, hidden, inner, eps = config.layout, config.hidden_size, config.intermediate_size, config.layer_norm_eps
        names = [f"{prefix}.{lay.query}", f"{prefix}.{lay.key}", f"{prefix}.{lay.value}"]
        self.qkv = Linear.load(weights, names, bias=True, shapes=[(hidden, hidden)] * 3)
        self.attn_out = Linear.load(weights, [f"{prefix}.{lay.attn_out}"], bias=True, shapes=[(hidden, hidden)])
        self.attn_norm = _layer_norm(weights, f"{prefix}.{lay.attn_norm}", eps, hidden)
        self.up = Linear.load(weights, [f"{prefix}.{lay.up}"], bias=True, shapes=[(inner, hidden)])
        self.down = Linear.load(weights, [f"{prefix}.{lay.down}"], bias=True, shapes=[(hidden, inner)])
        self.out_norm = _layer_norm(weights, f"{prefix}.{lay.out_norm}", eps, hidden)
        self.act: Callable[[torch.Tensor], torch.Tensor] = activation(config.hidden_act)
        self.heads = config.num_heads

    def __call__(self, x: torch.Tensor, batch: EncoderBatch) -> torch.Tensor:
        """x [num_tokens, hidden] → [num_tokens, hidden]."""
        x = self.attn_norm(self.attn_out(attention(self.qkv(x), batch, self.heads)) + x)
        return self.out_norm(self.down(self.act(self.up(x))) + x)


class EncoderModel:
    """The encoder's weights and forward pass, and the token-classification head where there is one."""

    def __init__(self, config: EncoderConfig, weights: Weights, device: torch.device, dtype: torch.dtype) -> None:
        self.config, self.device, self.dtype = config, device, dtype
        lay, hidden, base = config.layout, config.hidden_size, config.layout.prefix
        word = weights.get(f"{base}{lay.word}.weight")
        if word.dim() != 2 or word.shape[1] != hidden:
            raise WeightsError(f"{lay.word}.weight has shape {tuple(word.shape)}, expected [vocab, {hidden}]")
        self.vocab_size = word.shape[0]
        if lay.token_type is not None:
            # Every token has type 0: its row joins the word embeddings once, the same sum per token
            # ((word + type) + position, as transformers adds them), one lookup fewer per call.
            word = word + weights.get(f"{base}{lay.token_type}.weight")[0]
        self.word = word  # [vocab, hidden]
        self.position = _position_table(weights, f"{base}{lay.position}.weight", config, device, dtype)
        self.embed_norm = _layer_norm(weights, f"{base}{lay.embed_norm}", config.layer_norm_eps, hidden)
        self.layers = [EncoderLayer(weights, base + lay.layer.format(i=i), config) for i in range(config.num_layers)]
        self.classifier: Linear | None = None
        self.labels: list[str] = []
        if config.token_classification:
            self.classifier = Linear.load(weights, [lay.classifier], bias=True)
            if self.classifier.in_features != hidden:
                raise WeightsError(f"{lay.classifier}.weight does not take {hidden} features")
            self.labels = _labels(config, self.classifier.out_splits[0])

    @property
    def max_input_length(self) -> int:
        """The most tokens one input may have: the positions the table holds (past RoBERTa's offset)."""
        return min(self.config.max_input_length, self.position.shape[0] - self.config.position_offset)

    def linears(self) -> list[Linear]:
        layers = [m for layer in self.layers for m in (layer.qkv, layer.attn_out, layer.up, layer.down)]
        return layers + ([self.classifier] if self.classifier is not None else [])

    @torch.inference_mode()
    def forward(self, batch: EncoderBatch) -> torch.Tensor:
        """The final hidden state of every token, in the batch's packed order: [num_tokens, hidden]."""
        x = F.embedding(batch.input_ids, self.word) + F.embedding(batch.positions, self.position)
        x = self.embed_norm(x)
        for layer in self.layers:
            x = layer(x, batch)
        return x

    @torch.inference_mode()
    def classify(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's most likely label and its softmax probability: ([num_tokens] int64, [num_tokens]
        float32), from hidden [num_tokens, hidden]."""
        if self.classifier is None:
            raise RuntimeError(f"{self.config.architecture} has no token-classification head")
        probs = torch.softmax(self.classifier(hidden).float(), dim=-1)  # [num_tokens, labels]
        scores, labels = probs.max(dim=-1)
        return labels, scores


def load_encoder(model_dir: str | Path, device: torch.device, dtype: str | None = None) -> EncoderModel:
    """The encoder of a model directory (safetensors weights), in `dtype` (`--dtype`; see `resolve_dtype`).
    Float32 weights on a CPU with oneDNN are packed for its matmuls (`layers.packed`)."""
    config = EncoderConfig.from_dir(model_dir)
    torch_dtype = resolve_dtype(dtype, config, device)
    weights = Weights(model_dir, torch_dtype, device, optional_prefix=config.layout.prefix)
    model = EncoderModel(config, weights, device, torch_dtype)
    if packing_applies(device, torch_dtype):
        logger.info("%d dense linear weights packed for oneDNN", pack_dense_weights(model.linears()))
    return model


def sinusoidal_positions(count: int, dim: int) -> torch.Tensor:
    """DistilBERT's fixed table [count, dim]: sin at even columns, cos at odd, of pos / 10000^(2(j//2)/dim),
    computed in float64 and rounded once."""
    pos = torch.arange(count, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)[None, :]
    angles = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    table = torch.empty(count, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(angles[:, 0::2])
    table[:, 1::2] = torch.cos(angles[:, 1::2])
    return table.float()


def _position_table(
    weights: Weights, name: str, config: EncoderConfig, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """The stored table; DistilBERT's sinusoidal one is computed when the checkpoint leaves it out."""
    if not weights.has(name) and config.sinusoidal_positions:
        return sinusoidal_positions(config.max_position_embeddings, config.hidden_size).to(device, dtype)
    table = weights.get(name)
    if table.dim() != 2 or table.shape[1] != config.hidden_size or table.shape[0] <= config.position_offset:
        raise WeightsError(f"{name} has shape {tuple(table.shape)}, expected [positions, {config.hidden_size}]")
    return table


def _layer_norm(weights: Weights, name: str, eps: float, hidden: int) -> LayerNorm:
    """A LayerNorm by `weight`/`bias`, or by the `gamma`/`beta` of older BERT checkpoints."""
    if not weights.has(f"{name}.weight") and weights.has(f"{name}.gamma"):
        return LayerNorm(weights.get(f"{name}.gamma", (hidden,)), weights.get(f"{name}.beta", (hidden,)), eps)
    return LayerNorm.load(weights, name, eps, hidden)


def _labels(config: EncoderConfig, count: int) -> list[str]:
    """The head's label names in output order: config.json's id2label (LABEL_i where it has none)."""
    if config.id2label and sorted(config.id2label) != list(range(count)):
        raise WeightsError(f"config.json's id2label names {len(config.id2label)} labels, the classifier has {count}")
    return [config.id2label.get(i, f"LABEL_{i}") for i in range(count)]
