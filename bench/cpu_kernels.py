"""The CPU kernels of the decode step against the torch code they replace, on the bench model's shapes,
in one process (interleaved, best of N):

- LoRA (`adapters/lora_cpu.py`) against the torch plans (the padded grid on decode steps, the segment
  loop on prompts), over the four adapted linears of one layer (q|k|v, o, gate|up, down; rank 16 on
  every part), for several layouts of the batch's rows over adapters; reported per decode step (× 8
  layers) and in GFLOP/s; then whole decode steps whose 8 layers have factors of their own, read from
  memory (the caches flushed before each step, as the base weights do in a real step), against the
  time this machine's memory bandwidth allows for those bytes (measured in the same run), and with the
  same factors kept in bfloat16 (adapters stored in 16 bits: half the bytes);
- RMSNorm and rotary embeddings (`layers/fused_cpu.py`) against their torch operators;
- paged attention (`layers/paged_attention.py`) against the torch backend's gather-and-SDPA path, one
  layer of the bench model over 63 sequences in a cache of 2048 blocks (larger than the caches):
  prompts behind a cached 208-token prefix, whole prompts, and a decode step.

Prints tables; not a test.

    .venv/bin/python bench/cpu_kernels.py [--repeats 25]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shard_throughput import MODEL  # noqa: E402

from lorax_server.adapters import lora_cpu  # noqa: E402
from lorax_server.adapters.lora import LoraModuleWeights, LoraSlots  # noqa: E402
from lorax_server.forward import ForwardBatch  # noqa: E402
from lorax_server.layers import fused_cpu, paged_attention  # noqa: E402
from lorax_server.layers.attention import TorchAttention  # noqa: E402
from lorax_server.layers.linear import Linear  # noqa: E402
from lorax_server.layers.norm import RMSNorm  # noqa: E402
from lorax_server.layers.rotary import apply_rotary  # noqa: E402

HIDDEN, INTER, LAYERS, RANK = MODEL["hidden_size"], MODEL["intermediate_size"], MODEL["num_hidden_layers"], 16
LINEARS = {"q|k|v": (HIDDEN, [HIDDEN] * 3), "o": (HIDDEN, [HIDDEN]), "gate|up": (HIDDEN, [INTER] * 2),
           "down": (INTER, [HIDDEN])}  # fmt: skip
LAYOUTS = {  # tokens per segment, one adapter each
    "decode, 8 adapters x 8 rows": [8] * 8,
    "decode, 8 adapters, ragged (52 rows)": [5, 8, 7, 8, 6, 8, 3, 7],
    "decode, 32 adapters x 2 rows": [2] * 32,
    "decode, 64 adapters x 1 row": [1] * 64,
    "decode, 1 adapter x 64 rows": [64],
    "prompts, 4 adapters x 100 tokens": [100] * 4,
}
STREAMED = {k: v for k, v in LAYOUTS.items() if k.startswith("decode") and "ragged" not in k}


def best_of(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def interleaved(fn: Callable[[], object], use_kernel: Callable[[bool], None], repeats: int) -> tuple[float, float]:
    """(torch seconds, kernel seconds): the best of two alternating rounds of each, after a warm-up call."""
    timings: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(2):
        for on in (False, True):
            use_kernel(on)
            fn()
            timings[on].append(best_of(fn, repeats))
    use_kernel(True)
    return min(timings[False]), min(timings[True])


def lora_kernel(on: bool, applies: Callable = lora_cpu.kernel_applies) -> None:
    lora_cpu.kernel_applies = applies if on else (lambda y, x: False)


def fused_kernels(on: bool, applies: Callable = fused_cpu.kernel_applies) -> None:
    fused_cpu.kernel_applies = applies if on else (lambda *tensors: False)


def adapted_linear(in_features: int, parts: list[int], adapters: int, g: torch.Generator) -> Linear:
    linear = Linear(torch.randn(sum(parts), in_features, generator=g), None, parts, [str(p) for p in parts], parts)
    linear.lora = LoraSlots(linear)
    for index in range(1, adapters + 1):
        factors = {
            p: LoraModuleWeights(torch.randn(RANK, in_features, generator=g), torch.randn(n, RANK, generator=g), 2.0)
            for p, n in enumerate(parts)
        }
        linear.lora.install(index, factors)
    return linear


def decode_batch(sizes: list[int]) -> tuple[int, ForwardBatch]:
    """(tokens, batch) of one-token rows whose segments of `sizes` rows have adapters 1, 2, ..."""
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    segments = [(s, s + n, i + 1) for i, (s, n) in enumerate(zip(starts, sizes, strict=True))]
    tokens = sum(sizes)
    meta = ForwardBatch.build(torch.zeros(tokens, dtype=torch.int64), [1] * tokens, [1] * tokens,
                              torch.zeros(tokens, 1, dtype=torch.int64), 16, lora_segments=segments)  # fmt: skip
    return tokens, meta


def lora_table(repeats: int) -> None:
    g = torch.Generator().manual_seed(0)
    print("| rows over adapters | torch plans, ms per step | kernel, ms per step | ratio | kernel GFLOP/s |")
    print("|---|---:|---:|---:|---:|")
    for label, sizes in LAYOUTS.items():
        tokens, meta = decode_batch(sizes)
        plans = kernel = flops = 0.0
        for in_features, parts in LINEARS.values():
            linear = adapted_linear(in_features, parts, len(sizes), g)
            x, y = torch.randn(tokens, in_features, generator=g), torch.zeros(tokens, sum(parts))
            torch_s, kernel_s = interleaved(lambda: linear.lora.add_to(y, x, meta), lora_kernel, repeats)  # noqa: B023
            plans, kernel = plans + torch_s, kernel + kernel_s
            flops += 2 * tokens * RANK * (in_features * len(parts) + sum(parts))
        print(f"| {label} | {plans * LAYERS * 1e3:.2f} | {kernel * LAYERS * 1e3:.2f} | {plans / kernel:.2f}× | "
              f"{flops / kernel / 1e9:.0f} |")  # fmt: skip


def read_bandwidth(repeats: int = 5) -> float:
    """Bytes/s of torch reading 400 MB (more than any cache) on its threads: what the memory delivers."""
    big = torch.randn(100 * 2**20)
    return big.numel() * 4 / best_of(big.sum, repeats)


def streamed_lora_table(repeats: int) -> None:
    g = torch.Generator().manual_seed(2)
    flush = torch.randn(32 * 2**20)  # 128 MB: evicts the factors from the 32 MB L3 between steps
    bandwidth = read_bandwidth()
    print(f"\nmemory read bandwidth: {bandwidth / 2**30:.1f} GiB/s (torch sum over 400 MB)")
    print("| decode step, factors from memory | torch plans ms | kernel ms | factor MiB | kernel GiB/s | bound ms "
          "| kernel / bound | kernel, bfloat16 factors, ms | that / its bound |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, sizes in STREAMED.items():
        tokens, meta = decode_batch(sizes)
        # A copy of every linear for each side: the kernel and the torch plans keep stacks of their own
        # layouts, so sharing the linears would restack them at every switch.
        layers: dict[bool | str, list] = {False: [], True: [], "bf16": []}
        for _ in range(LAYERS):
            for in_features, parts in LINEARS.values():
                linear = adapted_linear(in_features, parts, len(sizes), g)
                twin = adapted_linear(in_features, parts, 0, g)
                twin.lora.by_adapter = linear.lora.by_adapter  # the same factors, a stack of its own
                half = adapted_linear(in_features, parts, 0, g)
                for index, factors in linear.lora.by_adapter.items():
                    half.lora.install(index, {p: LoraModuleWeights(w.lora_a.bfloat16(), w.lora_b.bfloat16(), w.scale)
                                              for p, w in factors.parts.items()})  # fmt: skip
                x, y = torch.randn(tokens, in_features, generator=g), torch.zeros(tokens, sum(parts))
                layers[True].append((linear, x, y))
                layers[False].append((twin, x, y))
                layers["bf16"].append((half, x, y))
        factor_bytes = len(sizes) * LAYERS * sum(RANK * (i * len(p) + sum(p)) for i, p in LINEARS.values()) * 4

        def step(side: bool | str) -> float:
            flush.sum()
            start = time.perf_counter()
            for linear, x, y in layers[side]:  # noqa: B023
                linear.lora.add_to(y, x, meta)  # noqa: B023
            return time.perf_counter() - start

        timings: dict[bool | str, list[float]] = {side: [] for side in layers}
        for side in layers:  # each side builds its stacks
            lora_kernel(side is not False)
            step(side)
        for _ in range(repeats):
            for side in layers:
                lora_kernel(side is not False)
                timings[side].append(step(side))
        lora_kernel(True)
        plans, kernel, half = min(timings[False]), min(timings[True]), min(timings["bf16"])
        bound = factor_bytes / bandwidth
        print(f"| {label} | {plans * 1e3:.2f} | {kernel * 1e3:.2f} | {factor_bytes / 2**20:.1f} | "
              f"{factor_bytes / kernel / 2**30:.1f} | {bound * 1e3:.2f} | {kernel / bound:.2f}× | {half * 1e3:.2f} | "
              f"{half / (bound / 2):.2f}× |")  # fmt: skip


def norm_rotary_table(repeats: int) -> None:
    g = torch.Generator().manual_seed(1)
    heads = MODEL["num_attention_heads"]
    head_dim = HIDDEN // heads
    print("\n| op | rows | torch ops µs | kernel µs | ratio |")
    print("|---|---:|---:|---:|---:|")
    for rows in (64, 400):
        norm = RMSNorm(torch.randn(HIDDEN, generator=g), 1e-6)
        x = torch.randn(rows, HIDDEN, generator=g)
        q = torch.randn(rows, 3 * HIDDEN, generator=g)[:, :HIDDEN].view(rows, heads, head_dim)  # inside a qkv
        freqs = torch.arange(rows).float().unsqueeze(-1) * torch.rand(head_dim // 2, generator=g)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        ops = {"RMSNorm": lambda: norm(x), "rotary (one of q, k)": lambda: apply_rotary(q, cos, sin)}  # noqa: B023
        for name, fn in ops.items():
            torch_s, kernel_s = interleaved(fn, fused_kernels, repeats * 8)
            torch_us, kernel_us = torch_s * 1e6, kernel_s * 1e6
            print(f"| {name} | {rows} | {torch_us:.1f} | {kernel_us:.1f} | {torch_us / kernel_us:.2f}× |")


ATTENTION = {  # (new tokens, context) of each of 63 sequences
    "prompts behind a cached prefix (16 new of 224)": (16, 224),
    "whole prompts (224)": (224, 224),
    "decode step (1 new of 224)": (1, 224),
}


def attention_times(meta: ForwardBatch, q: torch.Tensor, cache: tuple, repeats: int) -> tuple[float, float]:
    """(torch seconds, kernel seconds) of one layer's attention over `meta`'s batch."""
    backends = {False: TorchAttention(cache[0].shape[1], cpu_kernels=False), True: TorchAttention(cache[0].shape[1])}
    chosen = [backends[True]]

    def attend() -> None:
        meta.backend_state.clear()
        chosen[0].attend(q, *cache, meta, q.shape[-1] ** -0.5)

    return interleaved(attend, lambda on: chosen.__setitem__(0, backends[on]), repeats)


def attention_table(repeats: int) -> None:
    g = torch.Generator().manual_seed(2)
    heads, block = MODEL["num_attention_heads"], 16
    kv_heads, head_dim = MODEL["num_key_value_heads"], HIDDEN // heads
    cache = tuple(torch.randn(2048, block, kv_heads, head_dim, generator=g) for _ in range(2))
    tables = torch.randperm(2048, generator=g)[: 63 * 14].view(63, 14).sort(dim=1).values  # ascending, scattered
    print("\n| attention, one layer, 63 sequences | torch gather + SDPA ms | kernel ms | ratio |")
    print("|---|---:|---:|---:|")
    for label, (new, context) in ATTENTION.items():
        meta = ForwardBatch.build(torch.zeros(63 * new, dtype=torch.int64), [new] * 63, [context] * 63, tables, block)
        q = torch.randn(63 * new, heads, head_dim, generator=g)
        torch_s, kernel_s = attention_times(meta, q, cache, max(1, repeats // 5))
        print(f"| {label} | {torch_s * 1e3:.2f} | {kernel_s * 1e3:.2f} | {torch_s / kernel_s:.2f}× |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=25)
    args = parser.parse_args()
    built = (
        lora_cpu.kernel_applies(torch.zeros(1, 1), torch.zeros(1, 1))
        and fused_cpu.kernel_applies(torch.zeros(1))
        and paged_attention.kernel_available()
    )
    if not built:
        sys.exit("the CPU kernels are not built (LORAX_CPU_KERNELS=0, or the build failed)")
    lora_table(args.repeats)
    streamed_lora_table(args.repeats)
    norm_rotary_table(args.repeats)
    attention_table(args.repeats)
    print(f"\nfloat32, {torch.get_num_threads()} threads, torch {torch.__version__}; best of {args.repeats}")


if __name__ == "__main__":
    main()
