"""Green-list watermarking as TGI and LoRAX do it: the green list of each watermarked row (torch's
generator seeded with the paper's key times the row's previous token, on the logits' device) gets delta,
before every other processor; other rows are untouched; and text sampled with it is detected by the
paper's z-test, text sampled without it is not."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from lorax_server import cli, watermark
from lorax_server.batch import RequestIn
from lorax_server.engine import CacheConfig, Engine
from lorax_server.layers.attention import TorchAttention
from lorax_server.models.loader import load_model
from lorax_server.sampling import BatchSampler, SamplingParams
from lorax_server.watermark import HASH_KEY, WatermarkSettings, apply_watermark

CPU = torch.device("cpu")


def paper_greenlist(previous: int, vocab: int, gamma: float) -> set[int]:
    """The green list as the paper's reference code (and TGI's, and LoRAX's) draws it."""
    rng = torch.Generator(device="cpu")
    rng.manual_seed(HASH_KEY * previous)
    return set(torch.randperm(vocab, device="cpu", generator=rng)[: int(vocab * gamma)].tolist())


def test_green_tokens_get_delta_and_other_rows_nothing() -> None:
    vocab, config = 50, WatermarkSettings(gamma=0.3, delta=1.5)
    scores = torch.randn(3, vocab)
    history = torch.tensor([[5, 9, -1, -1], [7, 7, 7, 7], [4, 2, 11, -1]])
    out = apply_watermark(scores.clone(), history, [0, 2], config)
    for row, previous in ((0, 9), (2, 11)):
        green = paper_greenlist(previous, vocab, 0.3)
        assert len(green) == int(vocab * 0.3)
        for token in range(vocab):
            expected = scores[row, token] + (1.5 if token in green else 0.0)
            assert out[row, token] == expected, (row, token)
    assert torch.equal(out[1], scores[1])
    assert paper_greenlist(9, vocab, 0.3) != paper_greenlist(11, vocab, 0.3)


def test_watermark_comes_before_the_other_processors() -> None:
    """Watermark then repetition penalty, as TGI orders them: the penalty divides a boosted logit."""
    vocab = 40
    logits = torch.full((1, vocab), 2.0)
    history = torch.tensor([[3, 17]])
    sampler = BatchSampler.from_params([SamplingParams(watermark=True, repetition_penalty=2.0)], CPU)
    scores = sampler.process(logits, history)
    green = paper_greenlist(17, vocab, watermark.settings().gamma)
    delta = watermark.settings().delta
    for token in range(vocab):
        boosted = 2.0 + (delta if token in green else 0.0)
        assert scores[0, token] == (boosted / 2.0 if token in (3, 17) else boosted), token
    assert torch.equal(logits, torch.full((1, vocab), 2.0)), "the caller's logits stay as they were"


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATERMARK_GAMMA", raising=False)
    monkeypatch.delenv("WATERMARK_DELTA", raising=False)
    assert WatermarkSettings.from_env() == WatermarkSettings(0.5, 2.0)
    monkeypatch.setenv("WATERMARK_GAMMA", "0.25")
    monkeypatch.setenv("WATERMARK_DELTA", "4")
    assert WatermarkSettings.from_env() == WatermarkSettings(0.25, 4.0)
    for name, bad in (("WATERMARK_GAMMA", "1"), ("WATERMARK_GAMMA", "x"), ("WATERMARK_DELTA", "-1")):
        monkeypatch.setenv(name, bad)
        with pytest.raises(ValueError, match=name):
            WatermarkSettings.from_env()
        watermark.settings.cache_clear()
        with pytest.raises(SystemExit, match=name):
            cli._shard_config(cli._parser().parse_args(["serve", "m"]))
        monkeypatch.setenv(name, "0.5")
    watermark.settings.cache_clear()


def z_score(prompt: list[int], tokens: list[int], vocab: int, gamma: float) -> float:
    """The paper's detector: green tokens among `tokens`, each judged by the token before it."""
    previous = [prompt[-1], *tokens[:-1]]
    green = sum(t in paper_greenlist(p, vocab, gamma) for p, t in zip(previous, tokens, strict=True))
    n = len(tokens)
    return (green - gamma * n) / math.sqrt(n * gamma * (1 - gamma))


def test_sampled_text_is_detected_only_when_watermarked(llama_dir: Path) -> None:
    model = load_model(llama_dir, TorchAttention(16), CPU, "float32")
    engine = Engine(model, AutoTokenizer.from_pretrained(llama_dir), CacheConfig(16, num_blocks=64))
    engine.warmup(32, 64, 256)
    vocab, gamma = model.config.vocab_size, watermark.settings().gamma
    prompt = list(range(5, 15))
    scores = {}
    for on in (True, False):
        params = SamplingParams(do_sample=True, seed=7, watermark=on)
        requests = [RequestIn(i, prompt, params, 120, ignore_eos=True) for i in range(1)]
        tokens: list[int] = []
        gens, batch = engine.prefill(1 if on else 2, requests)
        while True:
            tokens += [g.token_id for g in gens]
            if batch is None:
                break
            gens, batch = engine.decode([batch.id])
        scores[on] = z_score(prompt, tokens, vocab, gamma)
    assert scores[True] > 4.0, scores  # the paper's threshold
    assert abs(scores[False]) < 4.0, scores
