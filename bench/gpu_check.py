"""The prepared GPU check of issue 14 (item 4): one run on one NVIDIA H200 whose output is pasted into
bench/RESULTS-gpu.md. `bench/gpu_check.sh` is the way to start it (its header has the exact command).

Sections, each printed as it runs so that a run cut short still leaves its results:
1. env         GPU, versions, free memory, a measured device-to-device copy bandwidth.
2. parity      tiny random llama, mixtral and gemma2, two LoRA adapters in one mixed batch (a base row,
               adapter 1, adapter 2 on two rows), prefill then greedy decode: our model (Triton attention
               + Triton LoRA kernels) against transformers + peft on the same device, teacher-forced on
               our tokens so every position compares; and our torch backend against our Triton one.
               float32 (TF32 off) is a hard check, bfloat16 is reported.
3. throughput  a random ~0.9B Llama (bf16) with rank-16 adapters on every projection, served by our
               engine in this process: first greedy decode replayed from CUDA graphs (`--compile`)
               against eager decode on mixed adapters; then decode tokens/s at several batch sizes and
               adapter counts, eager and from CUDA graphs, each beside the memory-bandwidth bound, and
               PASS/FAIL lines for the issue's targets.

Every section checks a time budget (default 420 s in all) and skips what is left, with a SKIP line,
once past it. `--dry-run` runs all of it on the CPU at tiny sizes (Triton's interpreter when triton
imports, else the torch backend): the proof, before device time is spent, that the script runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# No install needed: the shard's package and the tests' model builders are imported from the tree, so
# the script runs on a machine where only the repo was copied (the GPU machine has no `make install`).
for _path in (REPO / "server" / "tests", REPO / "server"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

HBM_BYTES_PER_S = 4.8e12  # H200 HBM3e, datasheet: the bound the targets are stated against
BLOCK = 16  # KV cache block size, the server's default
ROW_ADAPTERS = [0, 1, 2, 2]  # parity batch: a base row, adapter 1, adapter 2 on two rows
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
FP32_TOLERANCE = 1e-3  # max |Δlogit| for float32 on the GPU with TF32 off
# Imported at module level by the engine (batch.py, grammar.py) but used only for constrained
# requests, which this check never sends; the GPU machine's image lacks it (see `stub_missing`).
IMPORT_ONLY = ("xgrammar",)


# ---------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class BenchSizes:
    """The throughput section's model and workload."""

    model: dict  # LlamaConfig keyword arguments
    dtype: str
    rank: int
    targets: tuple[str, ...]
    batches: tuple[int, ...]
    adapter_counts: tuple[int, ...]
    prompt_len: int
    warmup_steps: int
    timed_steps: int
    forward_steps: int  # steps of the forward-only timing (no sampling, no host bookkeeping)


@dataclass(frozen=True)
class Plan:
    device: torch.device
    dry_run: bool
    attention: str  # "triton", or "torch" in a dry run where triton does not import
    budget_s: float
    parity_share: float  # parity stops starting new models past this share of the budget
    families: tuple[str, ...]
    dtypes: tuple[str, ...]
    family_shapes: dict  # config overrides on top of families.FAMILIES' (larger heads on the GPU)
    prompt_lens: tuple[int, ...]
    parity_steps: int
    bench: BenchSizes


# The GPU's parity models: head_dim 128 like real models; the 70-token prompt spans several query
# blocks of the attention kernel (64 rows each) and several KV blocks.
GPU_SHAPES = dict(hidden_size=512, intermediate_size=1024, num_attention_heads=4, num_key_value_heads=2, head_dim=128)
GPU_PROMPT_LENS = (7, 3, 70, 21)
GPU_BENCH = BenchSizes(
    model=dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=8,
        vocab_size=32000,
        max_position_embeddings=4096,
    ),
    dtype="bfloat16",
    rank=16,
    targets=tuple(ATTN + MLP),
    batches=(1, 8, 64),
    adapter_counts=(0, 8, 64),
    prompt_len=128,
    warmup_steps=10,
    timed_steps=100,
    forward_steps=30,
)
DRY_BENCH = BenchSizes(
    model=dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=256,
    ),
    dtype="bfloat16",
    rank=4,
    targets=tuple(ATTN + MLP),
    batches=(1, 4),
    adapter_counts=(0, 2, 4),
    prompt_len=8,
    warmup_steps=1,
    timed_steps=2,
    forward_steps=1,
)


def triton_imports() -> bool:
    try:
        importlib.import_module("triton")
    except Exception:  # ImportError, or a broken native extension
        return False
    return True


def make_plan(args: argparse.Namespace) -> Plan:
    common = dict(budget_s=args.budget_s, families=tuple(args.families.split(",")))
    dtypes = tuple(args.dtypes.split(","))
    if not args.dry_run:
        # Without triton the torch backend still gives throughput figures; the env section flags it.
        attention = "triton" if triton_imports() else "torch"
        gpu = dict(family_shapes=GPU_SHAPES, prompt_lens=GPU_PROMPT_LENS, parity_steps=8, bench=GPU_BENCH)
        return Plan(torch.device("cuda"), False, attention, parity_share=0.45, dtypes=dtypes, **gpu, **common)
    attention = "triton" if triton_imports() and os.environ.get("TRITON_INTERPRET") == "1" else "torch"
    bench = DRY_BENCH
    if attention == "triton":
        # Triton's interpreter misreads bfloat16 operands of tl.dot (numpy has no bfloat16), which the
        # SGMV kernels use: float16 takes the same half-precision path through the code instead.
        dtypes = tuple("float16" if d == "bfloat16" else d for d in dtypes)
        bench = dataclasses.replace(bench, dtype="float16")
    if args.gpu_shapes:  # the GPU's parity shapes and bench model, on the CPU (slow: one section at a time)
        sizes = dict(
            family_shapes=GPU_SHAPES,
            prompt_lens=GPU_PROMPT_LENS,
            parity_steps=8,
            bench=dataclasses.replace(GPU_BENCH, dtype=bench.dtype),
        )
    else:
        sizes = dict(family_shapes={}, prompt_lens=(7, 3, 12, 5), parity_steps=3, bench=bench)
    return Plan(torch.device("cpu"), True, attention, parity_share=0.6, dtypes=dtypes, **sizes, **common)


# -------------------------------------------------------------------------------------------- report
@dataclass
class Report:
    """Prints as it goes (flushed: a run killed at its limit keeps what it printed) and keeps every
    verdict for the summary."""

    budget_s: float
    start: float = field(default_factory=time.monotonic)
    verdicts: list[tuple[str, str]] = field(default_factory=list)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def say(self, text: str = "") -> None:
        print(text, flush=True)

    def log(self, text: str) -> None:
        self.say(f"[{self.elapsed():6.1f}s] {text}")

    def verdict(self, status: str, text: str) -> None:
        self.verdicts.append((status, text))
        self.say(f"{status}: {text}")

    def past(self, deadline_s: float, what: str) -> bool:
        """True (with a SKIP line) once the run is past `deadline_s` seconds."""
        if self.elapsed() <= deadline_s:
            return False
        self.verdict("SKIP", f"{what}: {self.elapsed():.0f}s elapsed, past the {deadline_s:.0f}s budget")
        return True

    def summary(self) -> int:
        counts = {s: sum(1 for v, _ in self.verdicts if v == s) for s in ("PASS", "FAIL", "SKIP", "ERROR", "INFO")}
        self.say("\n## Summary")
        for status, text in self.verdicts:
            if status != "INFO":
                self.say(f"- {status}: {text}")
        self.say(", ".join(f"{n} {s}" for s, n in counts.items()) + f"; {self.elapsed():.0f}s in all")
        return 1 if counts["ERROR"] else 0


def run_section(report: Report, name: str, fn: Callable[[], None]) -> None:
    """A section that raises is reported and the next one still runs."""
    report.say(f"\n## {name}")
    try:
        fn()
    except Exception as e:  # report and go on: the other sections' results are still worth having
        report.say(traceback.format_exc())
        report.verdict("ERROR", f"section {name}: {type(e).__name__}: {e}")


# ----------------------------------------------------------------------------------------------- env
def stub_missing(report: Report) -> None:
    """Stand-ins for packages the engine imports but this check never uses (`IMPORT_ONLY`), where
    they do not import: the GPU machine cannot install anything."""
    for name in IMPORT_ONLY:
        try:
            importlib.import_module(name)
        except ImportError:
            sys.modules[name] = _unavailable(name)
            report.log(f"note: {name} does not import here; stubbed (this check sends no constrained requests)")


def _unavailable(name: str) -> types.ModuleType:
    module = types.ModuleType(name)

    def missing(attr: str) -> object:
        if attr.startswith("__"):  # the import machinery probes dunders: those must stay ordinary misses
            raise AttributeError(attr)
        raise ImportError(f"{name}.{attr}: {name} is not installed")

    module.__getattr__ = missing  # type: ignore[method-assign]  # PEP 562 module __getattr__
    return module


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda)}
    for name in ("triton", "transformers", "peft", "safetensors", "tokenizers"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception as e:  # a missing package is reported, not fatal here
            out[name] = f"unavailable ({type(e).__name__})"
    return out


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int) -> float:
    """Bytes read + written per second by a device-to-device copy: the practical ceiling beside the
    datasheet's 4.8 TB/s."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    sync(device)
    return 2 * nbytes * repeats / (time.perf_counter() - start)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def section_env(plan: Plan, report: Report) -> None:
    import lorax_server

    for key, value in versions().items():
        report.say(f"- {key}: {value}")
    report.say(f"- lorax_server: {Path(lorax_server.__file__).parent}")
    report.say(f"- device: {plan.device}; attention backend and LoRA kernels: {plan.attention}")
    if plan.device.type == "cuda" and plan.attention != "triton":
        report.verdict("FAIL", "triton does not import: every figure below is the torch backend's")
    if plan.device.type == "cuda":
        props = torch.cuda.get_device_properties(plan.device)
        free, total = torch.cuda.mem_get_info(plan.device)
        report.say(f"- GPU: {props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs")
        report.say(f"- memory: {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB")
        bandwidth = copy_bandwidth(plan.device, 2**32, 10)
        torch.cuda.empty_cache()  # the copy's 8 GiB go back before the models need them
    else:
        report.say(f"- CPU threads: {torch.get_num_threads()}")
        bandwidth = copy_bandwidth(plan.device, 2**24, 3)
    report.say(
        f"- device-to-device copy: {bandwidth / 1e9:,.0f} GB/s (read + write); bound used below: "
        f"{HBM_BYTES_PER_S / 1e12:.1f} TB/s"
    )
    from lorax_server.engine import Engine  # noqa: F401  # the throughput section needs it: fail here, early

    report.verdict("INFO", "the engine imports")


# -------------------------------------------------------------------------------------------- parity
@dataclass
class Run:
    """Logits of one mixed-batch run: every prompt token, then one row per greedy decode step."""

    prefill: torch.Tensor  # [sum(prompt lens), vocab] float32, CPU
    decoded: torch.Tensor  # [rows, steps, vocab] float32, CPU; step 0 is the prompt's last token

    @property
    def tokens(self) -> torch.Tensor:  # [rows, steps]: the greedy choice after each position
        return self.decoded.argmax(-1)


def load_ours(model_dir: Path, adapters: list[Path], device: torch.device, dtype: str, attention: str):  # noqa: ANN201
    """Our model with `attention` ("torch" or "triton") and the LoRA kernels that go with it, as
    `cli.choose_kernels` pairs them, and the adapters installed at indices 1, 2, ..."""
    from lorax_server.adapters import lora
    from lorax_server.adapters.manager import AdapterManager, AdapterRequest
    from lorax_server.layers.attention import select_backend
    from lorax_server.models.loader import load_model

    lora.set_kernels("triton" if attention == "triton" else "torch")
    model = load_model(model_dir, select_backend(device, BLOCK, attention), device, dtype)
    manager = AdapterManager(model, fetch=lambda a, s, t: Path(a), device_budget_bytes=2**30)
    for i, path in enumerate(adapters, start=1):
        request = AdapterRequest(ids=(str(path),), source="local")
        manager.install(i, request, manager.prepare(request))
    return model, manager


def block_tables(lens: list[int], device: torch.device, seed: int) -> tuple[torch.Tensor, int]:
    """Each sequence's blocks, scattered over the cache in random order (as a long-running server's
    are), and the number of blocks."""
    needed = [math.ceil(n / BLOCK) for n in lens]
    order = torch.randperm(sum(needed), generator=torch.Generator().manual_seed(seed)).tolist()
    width, rows, taken = max(needed), [], 0
    for n in needed:
        rows.append(order[taken : taken + n] + [0] * (width - n))
        taken += n
    return torch.tensor(rows, dtype=torch.int64, device=device), sum(needed)


@torch.no_grad()
def run_ours(model, prompts: list[torch.Tensor], steps: int, force: torch.Tensor | None = None) -> Run:  # noqa: ANN001
    """Prefill the mixed batch, then `steps - 1` decode steps feeding the greedy tokens (or `force`'s
    [rows, steps] tokens instead, so a second run sees exactly the first one's inputs)."""
    from lorax_server.adapters.lora import segments_of
    from lorax_server.forward import ForwardBatch
    from lorax_server.kv_cache import KVCache

    device, lens = model.device, [len(p) for p in prompts]
    layers, kv_heads, head_dim, dtype = model.cache_geometry
    tables, num_blocks = block_tables([n + steps for n in lens], device, seed=len(lens))
    cache = KVCache(layers, num_blocks, BLOCK, kv_heads, head_dim, dtype, device)
    ids = torch.cat(prompts).to(device)
    meta = ForwardBatch.build(
        ids,
        lens,
        lens,
        tables,
        BLOCK,
        logits_index=torch.arange(len(ids), device=device),
        lora_segments=segments_of(ROW_ADAPTERS, lens),
    )
    prefill = model.forward(meta, cache)
    ends = torch.tensor(lens, device=device).cumsum(0) - 1
    decoded, lengths = [prefill[ends]], list(lens)
    for step in range(1, steps):
        lengths = [n + 1 for n in lengths]
        ones = [1] * len(lens)
        fed = decoded[-1].argmax(-1) if force is None else force[:, step - 1].to(device)
        meta = ForwardBatch.build(fed, ones, lengths, tables, BLOCK, lora_segments=segments_of(ROW_ADAPTERS, ones))
        decoded.append(model.forward(meta, cache))
    return Run(prefill.float().cpu(), torch.stack(decoded, dim=1).float().cpu())


@torch.no_grad()
def run_peft(
    base: Path,
    adapters: list[Path],
    device: torch.device,
    dtype: str,
    prompts: list[torch.Tensor],
    tokens: torch.Tensor,
) -> Run:
    """transformers + peft on the same batch, each row run alone with its adapter on its prompt and our
    greedy tokens (teacher forcing: one forward gives every position's logits). In bfloat16, peft keeps
    the adapters' factors in float32 (its default, `autocast_adapter_dtype`); ours are bfloat16, so the
    bfloat16 difference includes that."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
    peft = PeftModel.from_pretrained(base_model, adapters[0], adapter_name="a1")
    peft.load_adapter(adapters[1], adapter_name="a2")
    peft.to(device).eval()
    names = ["__base__", "a1", "a2"]
    prefill, decoded = [], []
    for row, prompt in enumerate(prompts):
        seq = torch.cat([prompt, tokens[row, :-1]]).to(device)
        logits = peft(seq[None], adapter_names=[names[ROW_ADAPTERS[row]]]).logits[0].float().cpu()
        n = len(prompt)
        prefill.append(logits[:n])
        decoded.append(logits[n - 1 :])
    return Run(torch.cat(prefill), torch.stack(decoded))


def compare(got: Run, want: Run) -> tuple[float, int, int]:
    """(max |Δlogit| over every prompt and decode position, decode steps whose greedy token agrees,
    decode steps)."""
    diff = max((got.prefill - want.prefill).abs().max().item(), (got.decoded - want.decoded).abs().max().item())
    agree = (got.tokens == want.tokens).sum().item()
    return diff, int(agree), got.tokens.numel()


def build_family(name: str, plan: Plan, tmp: Path) -> tuple[Path, list[Path]]:
    """A tiny random model of the family and its two test adapters (families.FAMILIES' targets)."""
    import transformers
    from families import FAMILIES, LORA_KWARGS
    from tiny_models import make_lora_adapter, make_model

    config_name, model_name, overrides, targets = FAMILIES[name]
    config_cls, model_cls = getattr(transformers, config_name), getattr(transformers, model_name)
    base = make_model(config_cls, model_cls, tmp / name / "base", **{**overrides, **plan.family_shapes})
    adapters = [
        make_lora_adapter(
            base,
            tmp / name / f"lora{i}",
            i,
            r=4 * (i + 1),
            lora_alpha=8,
            target_modules=t,
            **LORA_KWARGS.get(model_name, {}),
        )
        for i, t in enumerate(targets)
    ]
    return base, adapters


def prompts_for(vocab: int, lens: Sequence[int]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, vocab, (n,), generator=g) for n in lens]


PARITY_HEADER = (
    "| family | dtype | ours vs peft: max abs dlogit | greedy tokens equal | "
    "torch vs triton backend: max abs dlogit | greedy tokens equal |\n|---|---|---|---|---|---|"
)


def parity_case(plan: Plan, report: Report, name: str, dtype: str, model: tuple[Path, list[Path]]) -> None:
    """One family in one dtype: our Triton run, peft on its tokens, our torch backend on its tokens."""
    base, adapters = model
    ours, _manager = load_ours(base, adapters, plan.device, dtype, plan.attention)
    prompts = prompts_for(ours.config.vocab_size, plan.prompt_lens)
    triton_run = run_ours(ours, prompts, plan.parity_steps)
    del ours, _manager
    cells, checks = [], []
    for label, reference in (
        ("peft", lambda: run_peft(base, adapters, plan.device, dtype, prompts, triton_run.tokens)),
        ("torch backend", lambda: _torch_backend_run(plan, base, adapters, dtype, prompts, triton_run.tokens)),
    ):
        try:
            diff, agree, total = compare(triton_run, reference())
        except Exception as e:  # one reference failing (a peft too old, say) leaves the other's result
            report.say(traceback.format_exc())
            report.verdict("ERROR", f"parity {name} {dtype} vs {label}: {type(e).__name__}: {e}")
            cells += ["error", "error"]
            continue
        cells += [f"{diff:.2e}", f"{agree}/{total}"]
        checks.append((label, diff, agree, total))
    report.say(f"| {name} | {dtype} | " + " | ".join(cells) + " |")
    for label, diff, agree, total in checks:
        text = f"parity {name} {dtype} vs {label}: max abs dlogit {diff:.2e}, greedy tokens {agree}/{total}"
        if dtype == "float32":
            ok = diff < FP32_TOLERANCE and agree == total
            report.verdict("PASS" if ok else "FAIL", text + f" (float32 needs < {FP32_TOLERANCE:g} and all equal)")
        else:
            report.verdict("INFO", text)


def _torch_backend_run(
    plan: Plan, base: Path, adapters: list[Path], dtype: str, prompts: list[torch.Tensor], tokens: torch.Tensor
) -> Run:
    model, _manager = load_ours(base, adapters, plan.device, dtype, "torch")
    return run_ours(model, prompts, plan.parity_steps, force=tokens)


def section_parity(plan: Plan, report: Report) -> None:
    if plan.device.type == "cuda":  # exact float32 matmuls on both sides: TF32 would cost ~1e-3 alone
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        report.say("TF32 off: float32 matmuls in full precision on both sides")
    deadline = plan.budget_s * plan.parity_share
    models: dict[str, tuple[Path, list[Path]]] = {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_parity_") as tmp:
        report.say(PARITY_HEADER)
        for dtype in plan.dtypes:  # every family in float32 (the hard checks) before any in bfloat16
            for name in plan.families:
                if report.past(deadline, f"parity {name} {dtype}"):
                    continue
                try:
                    if name not in models:
                        models[name] = build_family(name, plan, Path(tmp))
                    parity_case(plan, report, name, dtype, models[name])
                except Exception as e:  # the next family may still run
                    report.say(traceback.format_exc())
                    report.verdict("ERROR", f"parity {name} {dtype}: {type(e).__name__}: {e}")
                finally:
                    free_device_memory(plan.device)


def free_device_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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


# ---------------------------------------------------------------------------------------------- main
SECTIONS: dict[str, Callable[[Plan, Report], None]] = {
    "env": section_env,
    "parity": section_parity,
    "throughput": section_throughput,
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        default=os.environ.get("GPU_CHECK_DRY_RUN") == "1",
        help="CPU, tiny sizes, Triton's interpreter (env GPU_CHECK_DRY_RUN=1)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=float(os.environ.get("GPU_CHECK_BUDGET_S", "420")),
        help="sections skip what is left past this many seconds (env GPU_CHECK_BUDGET_S)",
    )
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, from: " + ",".join(SECTIONS))
    parser.add_argument("--families", default="llama,mixtral,gemma2")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--gpu-shapes", action="store_true", help="with --dry-run: the GPU's sizes, on the CPU")
    args = parser.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")
    return args


def hide_modules() -> None:
    """GPU_CHECK_HIDE_MODULES=a,b makes those packages fail to import, as they do on the GPU machine:
    the dry run's check that the stand-ins of `stub_missing` are enough."""
    for name in filter(None, os.environ.get("GPU_CHECK_HIDE_MODULES", "").split(",")):
        sys.modules[name] = None  # type: ignore[assignment]  # `import name` now raises ImportError


def quiet_libraries() -> None:
    """No progress bars or deprecation notices from transformers: they would bury the results."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        # Before any Triton kernel is defined: kernels bind to the interpreter when they are defined.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        print("error: no CUDA device here; `--dry-run` runs the check on the CPU", file=sys.stderr)
        return 2
    hide_modules()
    quiet_libraries()
    plan = make_plan(args)
    report = Report(plan.budget_s)
    mode = "DRY RUN on the CPU: no figure below is a measurement" if plan.dry_run else "GPU run"
    report.say(f"# gpu_check, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}: {mode}; budget {plan.budget_s:.0f}s")
    if plan.dry_run and "float16" in plan.dtypes:
        report.say("(float16 stands in for bfloat16 under Triton's interpreter, which misreads bfloat16 dots)")
    stub_missing(report)
    for name in args.sections.split(","):
        run_section(report, name, lambda name=name: SECTIONS[name](plan, report))
    return report.summary()


if __name__ == "__main__":
    sys.exit(main())
