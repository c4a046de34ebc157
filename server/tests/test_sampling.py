"""Batched sampler vs transformers' logits processors, and the seeded Gumbel-max draw."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from lorax_server.sampling import (
    BatchSampler,
    SamplingParams,
    _mix32,
    gumbel_noise,
    random_bits,
    seed_key,
)

CPU = torch.device("cpu")
VOCAB = 300


def reference_scores(p: SamplingParams, logits: torch.Tensor, history: list[int]) -> torch.Tensor:
    """One row processed the way transformers' generate would build its processor list."""
    scores = logits[None].clone()  # [1, vocab]
    ids = torch.tensor([history], dtype=torch.int64)  # [1, len]
    if p.repetition_penalty != 1.0 and history:
        scores = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, scores)
    if p.do_sample:
        if p.temperature != 1.0:
            scores = TemperatureLogitsWarper(p.temperature)(ids, scores)
        if p.top_k > 0:
            scores = TopKLogitsWarper(p.top_k)(ids, scores)
        if p.top_p < 1.0:
            scores = TopPLogitsWarper(p.top_p)(ids, scores)
        if p.typical_p < 1.0:
            scores = TypicalLogitsWarper(p.typical_p)(ids, scores)
    return scores[0]


def make_history(lengths: list[int], vocab: int = VOCAB, seed: int = 0) -> tuple[torch.Tensor, list[list[int]]]:
    """History [batch, max_len] padded with -1 (ids repeat), and the unpadded rows."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, vocab // 4, (n,), generator=g).tolist() for n in lengths]
    history = torch.full((len(lengths), max(lengths, default=0)), -1, dtype=torch.int64)
    for i, row in enumerate(rows):
        history[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
    return history, rows


MIXED_PARAMS = [
    SamplingParams(do_sample=True, temperature=0.7),
    SamplingParams(do_sample=True, top_k=10),
    SamplingParams(do_sample=True, top_p=0.8),
    SamplingParams(do_sample=True, typical_p=0.6),
    SamplingParams(do_sample=True, temperature=1.3, top_k=40, top_p=0.9, typical_p=0.95),
    SamplingParams(do_sample=True, temperature=0.5, top_p=0.3, repetition_penalty=1.3),
    SamplingParams(do_sample=True, top_k=VOCAB + 7),  # larger than the vocabulary
    SamplingParams(do_sample=True, top_p=0.0),  # keeps only the best token
    SamplingParams(repetition_penalty=0.8),  # greedy: penalty only
    SamplingParams(temperature=0.5, top_k=3, top_p=0.5, typical_p=0.5),  # greedy: warpers ignored
    SamplingParams(do_sample=True),  # plain sampling
    SamplingParams(do_sample=True, top_k=1, repetition_penalty=1.1),
]


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_processed_scores_match_transformers(scale: float) -> None:
    torch.manual_seed(1)
    params = MIXED_PARAMS
    logits = torch.randn(len(params), VOCAB) * scale
    history, rows = make_history([(7 * i) % 23 for i in range(len(params))])
    sampler = BatchSampler.from_params(params, CPU)
    processed = sampler.process(logits, history)
    out = sampler(logits, history, torch.zeros(len(params), dtype=torch.int64))
    for i, p in enumerate(params):
        ref = reference_scores(p, logits[i], rows[i])
        assert torch.equal(processed[i], ref), (i, p)
        assert torch.equal(out.logprobs[i], torch.log_softmax(ref, dim=-1)), (i, p)
        assert torch.isfinite(ref[out.next_ids[i]])  # only kept tokens are chosen


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(do_sample=True, top_k=5),
        SamplingParams(do_sample=True, top_p=0.5),
        SamplingParams(do_sample=True, typical_p=0.5),
        SamplingParams(do_sample=True, temperature=0.3),
        SamplingParams(repetition_penalty=1.5),
    ],
)
def test_each_stage_alone_matches_transformers(params: SamplingParams) -> None:
    torch.manual_seed(2)
    logits = torch.randn(4, VOCAB) * 3
    history, rows = make_history([0, 1, 9, 30], seed=3)
    processed = BatchSampler.from_params([params] * 4, CPU).process(logits, history)
    for i in range(4):
        assert torch.equal(processed[i], reference_scores(params, logits[i], rows[i]))


def test_repetition_penalty_matches_transformers_and_ignores_padding() -> None:
    torch.manual_seed(3)
    logits = torch.randn(3, VOCAB)
    history = torch.tensor([[5, 5, 0, 299, -1, -1], [-1, -1, -1, -1, -1, -1], [1, 2, 3, 4, 5, 6]])
    sampler = BatchSampler.from_params([SamplingParams(repetition_penalty=1.7)] * 3, CPU)
    processed = sampler.process(logits, history)
    ref0 = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([[5, 5, 0, 299]]), logits[:1].clone())
    assert torch.equal(processed[0], ref0[0])
    assert torch.equal(processed[1], logits[1])  # all padding: nothing touched (not token 0, not the last)
    changed = (processed[2] != logits[2]).nonzero().flatten().tolist()
    assert changed == [1, 2, 3, 4, 5, 6]


def test_flags_skip_unused_stages() -> None:
    greedy = BatchSampler.from_params([SamplingParams(), SamplingParams(top_k=5, top_p=0.5)], CPU)
    assert not greedy.any_sample and greedy.max_top_k == 0 and not greedy.any_top_p
    assert not greedy.any_penalty and not greedy.any_typical and not greedy.any_temperature
    logits = torch.randn(2, VOCAB)
    assert torch.equal(greedy.process(logits, torch.full((2, 3), -1)), logits)
    mixed = BatchSampler.from_params([SamplingParams(), SamplingParams(do_sample=True, top_p=0.5)], CPU)
    assert mixed.any_sample and not mixed.all_sample and mixed.any_top_p and mixed.max_top_k == 0


def test_greedy_is_argmax() -> None:
    torch.manual_seed(4)
    logits = torch.randn(5, VOCAB)
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.1, top_k=2),
        SamplingParams(do_sample=True, temperature=0.0),
    ] + [SamplingParams(seed=i) for i in range(2)]
    out = BatchSampler.from_params(params, CPU)(logits, torch.full((5, 1), -1), torch.zeros(5, dtype=torch.int64))
    assert torch.equal(out.next_ids, logits.argmax(dim=-1))
    assert torch.equal(out.logprobs, torch.log_softmax(logits, dim=-1))


def test_top_k_one_is_greedy() -> None:
    torch.manual_seed(5)
    logits = torch.randn(16, VOCAB)
    history, _ = make_history([4] * 16)
    sampled = [SamplingParams(do_sample=True, top_k=1, seed=i, repetition_penalty=1.2) for i in range(16)]
    greedy = [SamplingParams(repetition_penalty=1.2)] * 16
    for step in range(3):
        steps = torch.full((16,), step, dtype=torch.int64)
        a = BatchSampler.from_params(sampled, CPU)(logits, history, steps).next_ids
        b = BatchSampler.from_params(greedy, CPU)(logits, history, steps).next_ids
        assert torch.equal(a, b)


def run_rows(params: list[SamplingParams], logits: torch.Tensor, steps: list[int]) -> list[int]:
    history = torch.full((len(params), 1), -1, dtype=torch.int64)
    out = BatchSampler.from_params(params, CPU)(logits, history, torch.tensor(steps, dtype=torch.int64))
    return out.next_ids.tolist()


def test_seeded_sampling_is_independent_of_batch_composition() -> None:
    torch.manual_seed(6)
    row = torch.randn(VOCAB)
    mine = SamplingParams(do_sample=True, seed=1234, temperature=1.5, top_p=0.95)
    alone = [run_rows([mine], row[None], [s])[0] for s in range(20)]
    others = [
        SamplingParams(),
        SamplingParams(do_sample=True, seed=7, top_k=3),
        SamplingParams(do_sample=True, seed=2**64 - 1, typical_p=0.5),
        SamplingParams(repetition_penalty=1.3),
    ]
    for s in range(20):
        batch = others[:2] + [mine] + others[2:]
        logits = torch.randn(len(batch), VOCAB)
        logits[2] = row
        assert run_rows(batch, logits, [3, 0, s, 9, 1])[2] == alone[s]
        batch = [mine] + others
        logits = torch.randn(len(batch), VOCAB)
        logits[0] = row
        assert run_rows(batch, logits, [s, 4, 4, 4, 4])[0] == alone[s]
    assert len(set(alone)) > 5  # the stream moves with the step
    other_seed = SamplingParams(do_sample=True, seed=1235, temperature=1.5, top_p=0.95)
    assert [run_rows([other_seed], row[None], [s])[0] for s in range(20)] != alone


def test_huge_seeds_and_steps() -> None:
    logits = torch.zeros(3, VOCAB)
    params = [SamplingParams(do_sample=True, seed=s) for s in (0, 2**63, 2**64 - 1)]
    ids = run_rows(params, logits, [0, 2**40, 2**31 + 5])
    assert all(0 <= i < VOCAB for i in ids)


def test_random_bits_match_pure_integer_definition() -> None:
    keys_py = [seed_key(s) for s in (0, 1, 99, 2**64 - 1)]
    steps_py = [0, 1, 2**31 + 12345, 2**40 - 1]
    bits = random_bits(torch.tensor(keys_py, dtype=torch.int32), torch.tensor(steps_py), 50)
    for i, (k, s) in enumerate(zip(keys_py, steps_py, strict=True)):
        step_key = _mix32((k + (s & 0xFFFFFFFF) * 0x7F4A7C15) & 0xFFFFFFFF)
        for v in (0, 1, 17, 49):
            want = _mix32((step_key + v * 0x9E3779B9) & 0xFFFFFFFF)
            assert int(bits[i, v]) & 0xFFFFFFFF == want
    g = gumbel_noise(torch.tensor(keys_py, dtype=torch.int32), torch.tensor(steps_py), 4096)
    assert torch.isfinite(g).all()


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    assert (counts[~keep] == 0).all()
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


@pytest.mark.parametrize("vary", ["step", "seed"])
def test_sample_frequencies_follow_softmax(vary: str) -> None:
    n = 20000
    row = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.25])
    if vary == "step":
        params = [SamplingParams(do_sample=True, seed=42)] * n
        steps = list(range(n))
    else:
        params = [SamplingParams(do_sample=True, seed=s) for s in range(n)]
        steps = [7] * n
    ids = torch.tensor(run_rows(params, row.expand(n, -1), steps))
    counts = torch.bincount(ids, minlength=8).double()
    # 7 degrees of freedom: P(chi2 > 30) ~ 1e-4; the draws are fixed, so this cannot flake.
    assert chi_square(counts, row.double().softmax(-1)) < 30


def test_filtered_sample_frequencies() -> None:
    n = 20000
    row = torch.tensor([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.25])
    p = SamplingParams(do_sample=True, seed=3, temperature=0.8, top_k=5, top_p=0.9)
    ids = torch.tensor(run_rows([p] * n, row.expand(n, -1), list(range(n))))
    counts = torch.bincount(ids, minlength=8).double()
    probs = reference_scores(p, row, []).double().softmax(-1)
    assert (probs == 0).sum() >= 3
    assert chi_square(counts, probs) < 30


def test_mixed_batch_rows_equal_their_solo_results() -> None:
    torch.manual_seed(7)
    params = MIXED_PARAMS
    logits = torch.randn(len(params), VOCAB) * 2
    history, _ = make_history([3] * len(params))
    steps = torch.arange(len(params), dtype=torch.int64)
    full = BatchSampler.from_params(params, CPU)(logits, history, steps)
    for i, p in enumerate(params):
        solo = BatchSampler.from_params([p], CPU)(logits[i : i + 1], history[i : i + 1], steps[i : i + 1])
        assert solo.next_ids[0] == full.next_ids[i]
        assert torch.equal(solo.logprobs[0], full.logprobs[i])


def test_filter_and_concatenate_keep_rows_params() -> None:
    torch.manual_seed(8)
    params = MIXED_PARAMS
    n = len(params)
    logits = torch.randn(n, VOCAB)
    history, _ = make_history([5] * n)
    steps = torch.arange(n, dtype=torch.int64) * 3
    sampler = BatchSampler.from_params(params, CPU)
    full = sampler(logits, history, steps)

    keep = torch.tensor([9, 2, 4, 0])
    sub = sampler.filter(keep)
    assert sub.params == [params[i] for i in keep.tolist()]
    out = sub(logits[keep], history[keep], steps[keep])
    assert torch.equal(out.next_ids, full.next_ids[keep])
    assert torch.equal(out.logprobs, full.logprobs[keep])

    only_greedy = sampler.filter(torch.tensor([8, 9]))
    assert not only_greedy.any_sample and only_greedy.max_top_k == 0 and only_greedy.any_penalty

    left, right = sampler.filter(torch.arange(0, 5)), sampler.filter(torch.arange(5, n))
    joined = BatchSampler.concatenate([left, right])
    assert joined.params == params and len(joined) == n
    out = joined(logits, history, steps)
    assert torch.equal(out.next_ids, full.next_ids)
    assert torch.equal(out.logprobs, full.logprobs)

    empty = sampler.filter(torch.tensor([], dtype=torch.int64))
    assert len(empty) == 0 and not empty.any_sample


def test_top_n_and_chosen_logprobs() -> None:
    torch.manual_seed(9)
    logits = torch.randn(3, 10)
    params = [
        SamplingParams(),
        SamplingParams(do_sample=True, seed=1, top_k=2),
        SamplingParams(do_sample=True),
    ]
    out = BatchSampler.from_params(params, CPU)(logits, torch.full((3, 1), -1), torch.zeros(3, dtype=torch.int64))
    chosen = out.chosen_logprobs()
    assert chosen.shape == (3,)
    for i in range(3):
        assert chosen[i] == out.logprobs[i, out.next_ids[i]]
    ids, lps = out.top_n(4)
    assert ids.shape == lps.shape == (3, 4)
    assert torch.equal(ids[0], logits[0].argsort(descending=True)[:4])
    assert torch.equal(lps, out.logprobs.gather(1, ids))
    assert (lps[:, :-1] >= lps[:, 1:]).all()
    assert torch.isinf(lps[1, 2:]).all()  # top_k=2 row: the rest are filtered
    assert out.top_n(50)[0].shape == (3, 10)


@pytest.mark.parametrize("tiny", [1.401298464324817e-45, 1e-40])
def test_extreme_temperature_and_penalty_keep_logprobs_finite(tiny: float) -> None:
    # A penalty or temperature this small turned repeated tokens' scores into +inf, and their
    # log-probabilities (the API's `logprob`) into NaN.
    torch.manual_seed(3)
    logits = torch.randn(2, VOCAB)
    logits[0, 1] = logits[1, 1] = 2.0  # seen and positive: divided by the penalty
    params = [
        SamplingParams(do_sample=True, seed=1, top_k=1, repetition_penalty=tiny),
        SamplingParams(do_sample=True, seed=2, temperature=tiny),
        SamplingParams(do_sample=True, seed=3, temperature=tiny, repetition_penalty=tiny),
    ]
    logits = torch.cat([logits, logits[:1]])
    history = torch.tensor([[1, 2, 3]] * 3)
    out = BatchSampler.from_params(params, CPU)(logits, history, torch.zeros(3, dtype=torch.int64))
    chosen = out.chosen_logprobs()
    assert torch.isfinite(chosen).all(), chosen
    assert out.next_ids[1] == logits[1].argmax()  # a near-zero temperature is greedy


def test_watermark_makes_the_sampler_read_the_history() -> None:
    sampler = BatchSampler.from_params([SamplingParams(), SamplingParams(watermark=True)], CPU)
    assert sampler.watermark_rows == [1] and sampler.uses_history and not sampler.row_independent
    assert sampler.filter([1, 0]).watermark_rows == [0]
    assert sampler.expand(torch.tensor([0, 1, 1, 1]), [1, 3]).watermark_rows == [1, 2, 3]
    assert BatchSampler.concatenate([sampler, sampler]).watermark_rows == [1, 3]


def test_from_proto() -> None:
    pb = pytest.importorskip("lorax_server.pb.generate_pb2")
    msg = pb.NextTokenChooserParameters(
        temperature=0.5,
        top_k=3,
        top_p=0.9,
        typical_p=0.8,
        do_sample=True,
        seed=2**64 - 1,
        repetition_penalty=1.1,
    )
    p = SamplingParams.from_proto(msg)
    assert p.top_k == 3 and p.do_sample and p.seed == 2**64 - 1 and not p.watermark
    assert p.temperature == pytest.approx(0.5) and p.repetition_penalty == pytest.approx(1.1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_draws_equal_cpu_draws() -> None:
    cuda = torch.device("cuda")
    keys = torch.tensor([seed_key(s) for s in (0, 5, 2**64 - 1)], dtype=torch.int32)
    steps = torch.tensor([0, 3, 2**33 + 1])
    assert torch.equal(random_bits(keys, steps, 1000), random_bits(keys.to(cuda), steps.to(cuda), 1000).cpu())
    torch.manual_seed(10)
    params = MIXED_PARAMS
    logits = torch.randn(len(params), VOCAB) * 2
    history, _ = make_history([6] * len(params))
    steps = torch.arange(len(params), dtype=torch.int64)
    cpu_ids = BatchSampler.from_params(params, CPU)(logits, history, steps).next_ids
    gpu = BatchSampler.from_params(params, cuda)(logits.to(cuda), history.to(cuda), steps.to(cuda))
    assert torch.equal(gpu.next_ids.cpu(), cpu_ids)


def openai_penalised(logits: torch.Tensor, generated: list[int], frequency: float, presence: float) -> torch.Tensor:
    """OpenAI's definition, token by token: logit - frequency·count - presence·[count > 0]."""
    out = logits.clone()
    for token in set(generated):
        count = generated.count(token)
        out[token] = logits[token] - frequency * count - presence * (1.0 if count > 0 else 0.0)
    return out


def test_frequency_and_presence_penalties_equal_openai_definition_batched_with_rows_without_them() -> None:
    torch.manual_seed(5)
    logits = torch.randn(5, VOCAB) * 2
    # Prompt ids repeat too, but only generated tokens count.
    prompts = [[7, 7, 8], [1], [9, 9, 9, 9], [4, 5], [2]]
    generated = [[7, 3, 3, 3, 299], [], [9, 10, 10], [4, 5, 4], [6, 6]]
    params = [
        SamplingParams(frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(frequency_penalty=2.0),  # nothing generated yet: no change
        SamplingParams(),  # unpenalised row in the same batch: untouched, bit for bit
        SamplingParams(presence_penalty=-2.0, repetition_penalty=1.3),  # negative: encourages; after repetition
        SamplingParams(frequency_penalty=-0.75, do_sample=True, temperature=0.5),  # before temperature
    ]
    rows = [p + g for p, g in zip(prompts, generated, strict=True)]
    history = torch.full((5, max(map(len, rows)) + 2), -1, dtype=torch.int64)
    for i, row in enumerate(rows):
        history[i, : len(row)] = torch.tensor(row)
    prompt_lens = torch.tensor([len(p) for p in prompts])
    processed = BatchSampler.from_params(params, CPU).process(logits, history, prompt_lens)
    for i, p in enumerate(params):
        base = logits[i]
        if p.repetition_penalty != 1.0:
            base = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(torch.tensor([rows[i]]), base[None].clone())[
                0
            ]
        expected = openai_penalised(base, generated[i], p.frequency_penalty, p.presence_penalty)
        if p.samples and p.temperature != 1.0:
            expected = expected / p.temperature
        torch.testing.assert_close(processed[i], expected, rtol=0, atol=1e-6)
    assert torch.equal(processed[1], logits[1]) and torch.equal(processed[2], logits[2])


def test_count_penalties_need_prompt_lengths_and_are_skipped_when_unused() -> None:
    sampler = BatchSampler.from_params([SamplingParams(presence_penalty=1.0), SamplingParams()], CPU)
    assert sampler.any_count_penalty
    with pytest.raises(ValueError, match="prompt lengths"):
        sampler.process(torch.zeros(2, VOCAB), torch.zeros(2, 3, dtype=torch.int64))
    assert not BatchSampler.from_params([SamplingParams()] * 2, CPU).any_count_penalty
