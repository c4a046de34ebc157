"""The encoder engine: check a call's inputs, run them in one forward pass, and answer vectors or token
labels; Warmup and Health forward passes. Proto-free, like `lorax_server.engine` (whose errors it
raises, so the gRPC statuses are the same). Nothing is kept between calls: there is no KV cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..engine import HealthCheckFailed, RequestError
from ..layers import packed
from .model import EncoderBatch, EncoderModel, load_encoder
from .pooling import EmbeddingHead, load_embedding_head

log = logging.getLogger(__name__)


class NotServed(RuntimeError):
    """The model does not serve this kind of call (Classify without a token-classification head)."""


@dataclass(frozen=True)
class EncoderInput:
    id: int
    input_ids: list[int]


@dataclass(frozen=True)
class TokenLabels:
    """One input's token classes: a label and its probability per token."""

    request_id: int
    labels: list[str]
    scores: list[float]


class EncoderEngine:
    def __init__(self, model: EncoderModel, head: EmbeddingHead) -> None:
        self.model = model
        self.head = head
        self.architecture = model.config.architecture

    @classmethod
    def load(cls, model_dir: str | Path, device: torch.device, dtype: str | None = None) -> EncoderEngine:
        model = load_encoder(model_dir, device, dtype)
        return cls(model, load_embedding_head(model_dir, model.config.hidden_size, device, model.dtype))

    @property
    def supports_classification(self) -> bool:
        return self.model.classifier is not None

    @property
    def embedding_dim(self) -> int:
        return self.head.dim

    @property
    def max_input_length(self) -> int:
        """The most tokens an input may have: the model's positions, and sentence-transformers'
        `max_seq_length` where the model sets one (a longer input would not give its vector)."""
        return min(self.model.max_input_length, self.head.max_length or self.model.max_input_length)

    def _batch(self, inputs: list[EncoderInput]) -> EncoderBatch:
        """The inputs as one batch; RequestError naming the first input that cannot be computed."""
        if not inputs:
            raise RequestError("the call has no inputs")
        limit, vocab = self.max_input_length, self.model.vocab_size
        for x in inputs:
            if not x.input_ids:
                raise RequestError(f"input {x.id}: empty input")
            if len(x.input_ids) > limit:
                raise RequestError(f"input {x.id}: {len(x.input_ids)} tokens, more than the {limit} this model takes")
            if max(x.input_ids) >= vocab:
                raise RequestError(f"input {x.id}: token id {max(x.input_ids)} is outside the vocabulary ({vocab})")
        return EncoderBatch.build([x.input_ids for x in inputs], self.model.config, self.model.device)

    @torch.inference_mode()
    def embed(self, inputs: list[EncoderInput]) -> list[list[float]]:
        """One vector (`embedding_dim` values) per input, in order."""
        batch = self._batch(inputs)
        return self.head(self.model.forward(batch), batch).float().tolist()

    @torch.inference_mode()
    def classify(self, inputs: list[EncoderInput]) -> list[TokenLabels]:
        """Every token's most likely label and its probability, per input, in order."""
        if not self.supports_classification:
            raise NotServed(f"{self.architecture} has no token-classification head: it serves embeddings only")
        batch = self._batch(inputs)
        labels, scores = self.model.classify(self.model.forward(batch))
        names, label_ids, values = self.model.labels, labels.tolist(), scores.tolist()
        out = []
        for x, start in zip(inputs, batch.starts.tolist(), strict=True):
            end = start + len(x.input_ids)
            out.append(TokenLabels(x.id, [names[i] for i in label_ids[start:end]], values[start:end]))
        return out

    def _dummy_inputs(self, lengths: list[int]) -> list[EncoderInput]:
        token = 1 if self.model.config.pad_token_id == 0 else 0  # a real token (RoBERTa's pad has no position)
        return [EncoderInput(i, [token] * n) for i, n in enumerate(lengths)]

    @torch.inference_mode()
    def _run_all(self, inputs: list[EncoderInput]) -> torch.Tensor:
        """The full path of a call (forward, pooling, the classifier where there is one); the vectors."""
        batch = self._batch(inputs)
        hidden = self.model.forward(batch)
        if self.supports_classification:
            self.model.classify(hidden)
        return self.head(hidden, batch)

    def warmup(self, max_input_length: int, max_prefill_tokens: int, max_total_tokens: int) -> int:
        """Run the largest call the router may send: `max_prefill_tokens` tokens in inputs of at most
        `max_input_length` (capped at what the model takes). Returns `max_prefill_tokens`: with no KV
        cache, nothing else bounds the tokens in flight. `max_total_tokens` is not used."""
        if max_input_length < 1 or max_prefill_tokens < 1:
            raise RequestError("max_input_length and max_prefill_tokens must be positive")
        longest = min(max_input_length, self.max_input_length, max_prefill_tokens)
        lengths = [longest] * (max_prefill_tokens // longest)
        if max_prefill_tokens % longest:
            lengths.append(max_prefill_tokens % longest)
        self._run_all(self._dummy_inputs(lengths))
        if self.model.device.type == "cpu":  # oneDNN's primitives for the smallest calls, now rather than then
            packed.make_primitives(self.model.linears())
        log.info("warmed up: %d tokens in %d inputs of at most %d", max_prefill_tokens, len(lengths), longest)
        return max_prefill_tokens

    def health(self) -> None:
        """One token through the whole path; HealthCheckFailed when it raises or is not finite."""
        try:
            finite = bool(torch.isfinite(self._run_all(self._dummy_inputs([1]))).all())
        except Exception as e:
            log.exception("health check failed")
            raise HealthCheckFailed(f"the health check's forward pass failed: {type(e).__name__}: {e}") from e
        if not finite:
            raise HealthCheckFailed("the health check's forward pass gave non-finite values")
