"""bench/gpu_check.py's throughput section: a random ~0.9B Llama (bf16) with rank-16 adapters on every
projection, served by our engine in this process; greedy decode replayed from CUDA graphs against eager
decode, then decode tokens/s at several batch sizes and adapter counts beside the memory-bandwidth
bound, and PASS/FAIL lines for the issue's targets; last, the steps around an adapter joining running
batches of adapters."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from gpu_check_common import BLOCK, HBM_BYTES_PER_S, BenchSizes, Plan, Report, sync


# ---------------------------------------------------------------------------------------- throughput
def model_bytes_read_per_step(cfg: dict, element_size: int) -> int:
    """Weights a decode step reads: every layer's projections and norms, the final norm and the LM head
    (the embedding only at the batch's rows: left out)."""
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    head_dim = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return element_size * (layers * per_layer + h + cfg["vocab_size"] * h)


def kv_bytes_read_per_step(cfg: dict, context_lens: Sequence[float], element_size: int) -> float:
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * element_size
    return per_token * sum(context_lens)


def adapter_bytes(cfg: dict, rank: int, targets: Sequence[str], element_size: int) -> int:
    """One adapter's A and B factors over every layer."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    shapes = {
        "q_proj": (h, h),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (h, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }
    return element_size * cfg["num_hidden_layers"] * sum(rank * sum(shapes[t]) for t in targets)


def write_bench_model(out_dir: Path, sizes: BenchSizes, device: torch.device) -> Path:
    """A random Llama checkpoint (weights drawn on `device`, where it is fast) with a word-level
    tokenizer covering its whole vocabulary, so any sampled id detokenizes."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    cfg = sizes.model
    LlamaConfig(
        **cfg,
        architectures=["LlamaForCausalLM"],
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        dtype=sizes.dtype,
    ).save_pretrained(out_dir)
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    g = torch.Generator(device=device).manual_seed(0)
    dtype = getattr(torch, sizes.dtype)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device) * 0.02).to(dtype).cpu()

    tensors = {
        "model.embed_tokens.weight": rand(v, h),
        "lm_head.weight": rand(v, h),
        "model.norm.weight": torch.ones(h, dtype=dtype),
    }
    shapes = {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (kv, h),
        "self_attn.v_proj": (kv, h),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (i, h),
        "mlp.up_proj": (i, h),
        "mlp.down_proj": (h, i),
    }
    for layer in range(cfg["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        tensors.update({f"{prefix}{name}.weight": rand(*shape) for name, shape in shapes.items()})
        tensors.update(
            {f"{prefix}{n}.weight": torch.ones(h, dtype=dtype) for n in ("input_layernorm", "post_attention_layernorm")}
        )
    save_file(tensors, str(out_dir / "model.safetensors"))
    write_word_tokenizer(out_dir, v)
    (out_dir / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2]}))
    return out_dir


def write_word_tokenizer(out_dir: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(out_dir)


def random_adapter(manager, sizes: BenchSizes, seed: int):  # noqa: ANN001, ANN201
    """Rank-`sizes.rank` factors for every targeted module, drawn on the device in the model's dtype
    (as `AdapterManager.prepare` would leave them), small enough to keep bf16 activations sane."""
    from lorax_server.adapters.lora import LoraModuleWeights

    g = torch.Generator(device=manager.device).manual_seed(seed)
    modules = {}
    for name, (linear, part) in manager.targets.items():
        if name.rsplit(".", 1)[-1] not in sizes.targets:
            continue
        n_in, n_out = linear.full_in_features, linear.full_part_sizes[part]
        a = torch.randn(sizes.rank, n_in, generator=g, device=manager.device) / n_in**0.5
        b = torch.randn(n_out, sizes.rank, generator=g, device=manager.device) * 0.01
        modules[name] = LoraModuleWeights(a.to(manager.dtype), b.to(manager.dtype), 2.0)
    return modules


@dataclass
class Measure:
    batch: int
    adapters: int  # distinct adapters in the batch (0: every row on the base model)
    step_s: float  # one engine decode step: forward, sampling, detokenization, stop checks
    forward_s: float | None  # the model's forward alone, on the same batch
    mean_context: float  # tokens each row attends to, averaged over the timed steps
    graph_s: float | None = None  # one engine decode step replayed from a CUDA graph (--compile)


def make_engine(model_dir: Path, plan: Plan, num_adapters: int):  # noqa: ANN201
    """Our engine on the checkpoint, as `lorax-server serve` builds it, with `num_adapters` random
    adapters installed at indices 1..num_adapters and a KV cache sized for the largest batch."""
    from transformers import AutoTokenizer

    from lorax_server.adapters import lora
    from lorax_server.adapters.manager import AdapterManager, AdapterRequest
    from lorax_server.engine import CacheConfig, Engine
    from lorax_server.layers.attention import select_backend
    from lorax_server.models.loader import load_model

    sizes = plan.bench
    lora.set_kernels("triton" if plan.attention == "triton" else "torch")
    model = load_model(model_dir, select_backend(plan.device, BLOCK, plan.attention), plan.device, sizes.dtype)
    one = adapter_bytes(sizes.model, sizes.rank, sizes.targets, model.dtype.itemsize)
    manager = AdapterManager(model, fetch=_never_fetch, device_budget_bytes=2 * num_adapters * one + 2**20)
    for i in range(1, num_adapters + 1):
        manager.install(i, AdapterRequest(ids=(f"random-{i}",), source="local"), random_adapter(manager, sizes, i))
    total = sizes.prompt_len + max_new_tokens(sizes)
    num_blocks = (max(sizes.batches) + 1) * math.ceil(total / BLOCK)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # Decode graphs where they apply (a CUDA device, the triton backend); `measure` times both ways.
    engine = Engine(model, tokenizer, CacheConfig(BLOCK, num_blocks=num_blocks + 1), manager, cuda_graphs=True)
    engine.warmup(sizes.prompt_len, max(sizes.batches) * sizes.prompt_len, total)
    return engine


def _never_fetch(adapter_id: str, source: object, token: str | None) -> Path:
    raise RuntimeError(f"the throughput check installs its adapters directly; nothing fetches {adapter_id}")


def max_new_tokens(sizes: BenchSizes) -> int:
    # Every row stays in the batch for the whole measurement (ignore_eos; the limit is never reached):
    # eager steps, then the steps that settle and capture the decode graphs, then replayed steps.
    from lorax_server.decode_graphs import STABLE_STEPS

    return sizes.warmup_steps + 2 * sizes.timed_steps + STABLE_STEPS + 4


def measure(engine, plan: Plan, batch: int, adapters: int, batch_id: int) -> Measure:  # noqa: ANN001
    """Prefill `batch` requests (row r on adapter r % adapters + 1, or the base model), run the warm-up
    decode steps, then time the decode steps; the forward-only timing runs on the same batch after."""
    from lorax_server.batch import RequestIn
    from lorax_server.sampling import SamplingParams

    sizes = plan.bench
    vocab = engine.model.config.vocab_size
    g = torch.Generator().manual_seed(batch_id)
    requests = [
        RequestIn(
            id=r,
            input_ids=torch.randint(3, vocab, (sizes.prompt_len,), generator=g).tolist(),
            sampling=SamplingParams(),
            max_new_tokens=max_new_tokens(sizes),
            ignore_eos=True,
            adapter_index=r % adapters + 1 if adapters else 0,
        )
        for r in range(batch)
    ]
    from lorax_server.decode_graphs import STABLE_STEPS

    graphs, engine.graphs = engine.graphs, None  # eager first
    _, running = engine.prefill(batch_id, requests)
    running, step_s = timed_steps(engine, running, sizes.warmup_steps, sizes.timed_steps, plan.device)
    assert running is not None and len(running) == batch, "a row left the batch during the measurement"
    forward_s = forward_only(engine, running, sizes.forward_steps, plan.device)
    graph_s = None
    if graphs is not None:  # the same batch, a little longer: settle, capture, then replay
        engine.graphs = graphs
        running, graph_s = timed_steps(engine, running, STABLE_STEPS + 2, sizes.timed_steps, plan.device)
    engine.clear(running.id)
    # The first decode step attends to prompt + 1 tokens; each later one to one more.
    mean_context = sizes.prompt_len + 1 + sizes.warmup_steps + (sizes.timed_steps - 1) / 2
    return Measure(batch, adapters, step_s, forward_s, mean_context, graph_s)


def join_steps(engine, plan: Plan, running: int, batch_id: int) -> tuple[float, float, float]:  # noqa: ANN001
    """A batch of `max(batches)` rows on adapters 1..`running` decodes (eagerly); then a request for
    adapter `running` + 1, which the kept LoRA stacks do not hold, is prefilled and decodes with them:
    (a steady decode step, the new request's prompt step, the decode step after it), in seconds. The
    kernels' stacks take the new adapter into a free slot rather than copying every running one's."""
    from lorax_server.batch import RequestIn
    from lorax_server.sampling import SamplingParams

    sizes = plan.bench
    g = torch.Generator().manual_seed(batch_id)

    def request(rid: int, adapter: int) -> RequestIn:
        ids = torch.randint(3, engine.model.config.vocab_size, (sizes.prompt_len,), generator=g).tolist()
        return RequestIn(rid, ids, SamplingParams(), max_new_tokens=max_new_tokens(sizes), ignore_eos=True,
                         adapter_index=adapter)  # fmt: skip

    graphs, engine.graphs = engine.graphs, None
    try:
        _, batch = engine.prefill(batch_id, [request(r, r % running + 1) for r in range(max(sizes.batches))])
        batch, steady_s = timed_steps(engine, batch, sizes.warmup_steps, sizes.timed_steps, plan.device)
        start = time.perf_counter()
        _, joining = engine.prefill(batch_id + 1000, [request(10_000, running + 1)])
        sync(plan.device)
        prompt_s = time.perf_counter() - start
        start = time.perf_counter()
        _, batch = engine.decode([batch.id, joining.id])
        sync(plan.device)
        after_s = time.perf_counter() - start
        engine.clear(batch.id)
    finally:
        engine.graphs = graphs
    return steady_s, prompt_s, after_s


def section_join(engine, plan: Plan, report: Report) -> None:  # noqa: ANN001
    """An adapter joining running batches of adapters (INFO lines: no target)."""
    installed = max(plan.bench.adapter_counts)
    for i, running in enumerate(sorted({min(8, installed - 1), installed - 1}), start=1):
        if running < 1 or report.past(plan.budget_s, f"an adapter joining {running}"):
            continue
        steady, prompt, after = join_steps(engine, plan, running, batch_id=900 + i)
        report.verdict(
            "INFO",
            f"an adapter joining {running} running ({max(plan.bench.batches)} rows): steady decode step "
            f"{steady * 1e3:.2f} ms, its prompt step {prompt * 1e3:.2f} ms, the decode step after it "
            f"{after * 1e3:.2f} ms ({after / steady:.2f}x steady)",
        )


def graphs_match_eager(engine, plan: Plan, report: Report) -> None:  # noqa: ANN001
    """Greedy decode of 6 rows (base and 3 adapters; bucket 8: 2 padding rows; fewer in a dry run)
    eagerly, then replayed from CUDA graphs captured at the first step: the same tokens, logprobs within
    the dtype's noise."""
    from lorax_server import decode_graphs
    from lorax_server.batch import RequestIn
    from lorax_server.sampling import SamplingParams

    if engine.graphs is None:
        report.verdict("SKIP", "decode graphs vs eager: --compile does not apply here (see the log)")
        return
    g = torch.Generator().manual_seed(99)
    vocab, steps = engine.model.config.vocab_size, 12
    rows, kinds = min(6, max(plan.bench.batches) - 1), min(3, max(plan.bench.adapter_counts)) + 1
    requests = [
        RequestIn(id=r, input_ids=torch.randint(3, vocab, (plan.bench.prompt_len,), generator=g).tolist(),
                  sampling=SamplingParams(), max_new_tokens=steps, ignore_eos=True, adapter_index=r % kinds)
        for r in range(rows)
    ]  # fmt: skip
    graphs, stable, runs = engine.graphs, decode_graphs.STABLE_STEPS, []
    decode_graphs.STABLE_STEPS = 1
    try:
        for batch_id, use in ((900, None), (901, graphs)):
            engine.graphs, out = use, {}
            gens, running = engine.prefill(batch_id, requests)
            while True:
                for x in gens:
                    out.setdefault(x.request_id, []).append((x.token_id, x.logprob))
                if running is None:
                    break
                gens, running = engine.decode([running.id])
            runs.append(out)
    finally:
        engine.graphs, decode_graphs.STABLE_STEPS = graphs, stable
    eager, replayed = runs
    same = sum(a[0] == b[0] for r in eager for a, b in zip(eager[r], replayed[r], strict=True))
    worst = max(abs(a[1] - b[1]) for r in eager for a, b in zip(eager[r], replayed[r], strict=True))
    total, tol = rows * steps, 1e-4 if plan.bench.dtype == "float32" else 5e-2
    report.verdict(
        "PASS" if same == total and worst < tol and graphs.replays else "FAIL",
        f"decode graphs vs eager: {same}/{total} greedy tokens equal, max |dlogprob| {worst:.2e} (needs < {tol}), "
        f"{graphs.captures} captures, {graphs.replays} replays",
    )


def timed_steps(engine, running, warmup: int, timed: int, device: torch.device):  # noqa: ANN001, ANN201
    """`warmup` decode steps, then `timed` timed ones: (the batch, seconds per timed step)."""
    for _ in range(warmup):
        _, running = engine.decode([running.id])
    sync(device)
    start = time.perf_counter()
    for _ in range(timed):
        _, running = engine.decode([running.id])
    sync(device)
    return running, (time.perf_counter() - start) / timed


def forward_only(engine, running, steps: int, device: torch.device) -> float | None:  # noqa: ANN001
    """Seconds per model forward on the running batch's decode inputs (as `Engine._step` builds them),
    without sampling or host bookkeeping: the gap to the engine's step is host overhead. Each pass
    rewrites the same cache slots, so the batch is left as it was. None if the batch's internals moved."""
    from lorax_server.adapters.lora import segments_of
    from lorax_server.forward import ForwardBatch

    try:
        ones = [1] * len(running)
        lengths = [s.length for s in running.seqs]
        segments = segments_of([s.request.adapter_index for s in running.seqs], ones)

        def step() -> None:
            meta = ForwardBatch.build(
                running.next_ids, ones, lengths, running.block_tables, BLOCK, lora_segments=segments
            )
            engine.model.forward(meta, engine.cache)

        step()
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        return (time.perf_counter() - start) / steps
    except (AttributeError, TypeError):  # engine internals changed: the engine figure still stands
        traceback.print_exc()
        return None


THROUGHPUT_HEADER = (
    "| batch | adapters | engine ms/step | tokens/s | forward-only ms/step | bound tokens/s (weights+KV) | "
    "measured/bound | bound tokens/s (+adapter bytes) | measured/bound | --compile ms/step | --compile tokens/s |"
    "\n|---|---|---|---|---|---|---|---|---|---|---|"
)


@dataclass
class Bounds:
    """Memory-bandwidth bounds of one decode step: bytes it must read / HBM_BYTES_PER_S."""

    tokens_per_s: float  # weights + KV cache
    with_adapters_tokens_per_s: float  # + the distinct adapters' factors


def bounds(plan: Plan, m: Measure) -> Bounds:
    sizes = plan.bench
    size = getattr(torch, sizes.dtype).itemsize
    step_bytes = model_bytes_read_per_step(sizes.model, size) + kv_bytes_read_per_step(
        sizes.model, [m.mean_context] * m.batch, size
    )
    lora_bytes = m.adapters * adapter_bytes(sizes.model, sizes.rank, sizes.targets, size)
    return Bounds(m.batch * HBM_BYTES_PER_S / step_bytes, m.batch * HBM_BYTES_PER_S / (step_bytes + lora_bytes))


def table_row(plan: Plan, m: Measure) -> str:
    b = bounds(plan, m)
    tps = m.batch / m.step_s
    fwd = f"{m.forward_s * 1e3:.2f}" if m.forward_s is not None else "n/a"
    graph = f"{m.graph_s * 1e3:.2f} | {m.batch / m.graph_s:,.0f}" if m.graph_s is not None else "n/a | n/a"
    return (
        f"| {m.batch} | {m.adapters} | {m.step_s * 1e3:.2f} | {tps:,.0f} | {fwd} | {b.tokens_per_s:,.0f} | "
        f"{tps / b.tokens_per_s:.3f} | {b.with_adapters_tokens_per_s:,.0f} | "
        f"{tps / b.with_adapters_tokens_per_s:.3f} | {graph} |"
    )


def bench_configs(sizes: BenchSizes) -> list[tuple[int, int]]:
    """(batch, distinct adapters): a batch holds at most one adapter a row, so counts above the batch
    size collapse into one configuration."""
    return sorted({(b, min(a, b)) for b in sizes.batches for a in sizes.adapter_counts})


def section_throughput(plan: Plan, report: Report) -> None:
    if report.past(plan.budget_s, "throughput"):  # writing and loading the checkpoint alone takes a while
        return
    sizes = plan.bench
    size = getattr(torch, sizes.dtype).itemsize
    weights = model_bytes_read_per_step(sizes.model, size)
    one = adapter_bytes(sizes.model, sizes.rank, sizes.targets, size)
    report.say(
        f"Random Llama {json.dumps(sizes.model)}, {sizes.dtype}: {weights / 1e9:.2f} GB of weights read "
        f"per decode step; rank-{sizes.rank} adapters on {','.join(sizes.targets)}: {one / 1e6:.1f} MB each. "
        f"Prompts of {sizes.prompt_len} tokens, {sizes.warmup_steps} warm-up + {sizes.timed_steps} timed "
        f"decode steps, greedy; bound = bytes read per step / {HBM_BYTES_PER_S / 1e12:.1f} TB/s."
    )
    with tempfile.TemporaryDirectory(prefix="gpu_check_bench_", dir=os.environ.get("GPU_CHECK_TMP")) as tmp:
        report.log("writing the random checkpoint")
        model_dir = write_bench_model(Path(tmp), sizes, plan.device)
        report.log("loading it into the engine, installing the adapters")
        if plan.dry_run:  # no CUDA graphs on the CPU: replay them eagerly, so the path still runs
            from lorax_server import decode_graphs

            decode_graphs.CAPTURE_BY_DEVICE.setdefault("cpu", decode_graphs.replay_eagerly)
        engine = make_engine(model_dir, plan, max(sizes.adapter_counts))
        report.log("engine ready")
        graphs_match_eager(engine, plan, report)
        report.say(THROUGHPUT_HEADER)
        results: dict[tuple[int, int], Measure] = {}
        for i, (batch, adapters) in enumerate(bench_configs(sizes), start=1):
            if report.past(plan.budget_s, f"throughput batch {batch} with {adapters} adapters"):
                continue
            results[(batch, adapters)] = m = measure(engine, plan, batch, adapters, batch_id=i)
            report.say(table_row(plan, m))
        section_join(engine, plan, report)
    throughput_verdicts(plan, report, results)


def throughput_verdicts(plan: Plan, report: Report, results: dict[tuple[int, int], Measure]) -> None:
    """The issue's targets at the largest batch: many adapters ≥ 0.9× the base model, and within 2× of
    the bandwidth bound (measured/bound ≥ 0.5)."""
    sizes = plan.bench
    batch = max(sizes.batches)
    many = min(max(sizes.adapter_counts), batch)
    base, adapted = results.get((batch, 0)), results.get((batch, many))

    def judge(ok: bool, text: str) -> None:
        if plan.dry_run:  # CPU figures at toy sizes say nothing about the targets
            report.verdict("INFO", f"(dry run, would be {'PASS' if ok else 'FAIL'}) {text}")
        else:
            report.verdict("PASS" if ok else "FAIL", text)

    if base is None or adapted is None:
        report.verdict("SKIP", f"throughput targets: batch {batch} with 0 and {many} adapters were not both measured")
        return
    ratio = base.step_s / adapted.step_s
    judge(ratio >= 0.9, f"{many} adapters at batch {batch}: {ratio:.3f}x the base model's tokens/s (target >= 0.9)")
    for m in (base, adapted):
        share = (m.batch / m.step_s) / bounds(plan, m).tokens_per_s
        judge(
            share >= 0.5,
            f"batch {batch}, {m.adapters} adapters: {share:.3f} of the bandwidth bound (weights+KV; "
            "target >= 0.5, within 2x)",
        )
