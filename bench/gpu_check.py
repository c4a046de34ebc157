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
               PASS/FAIL lines for the issue's targets; then an adapter joining running batches of
               adapters (its prompt step and the decode step after it against a steady step: the
               kernels' stacks take it into a free slot), as INFO lines.

Every section checks a time budget (default 420 s in all) and skips what is left, with a SKIP line,
once past it. `--dry-run` runs all of it on the CPU at tiny sizes (Triton's interpreter when triton
imports, else the torch backend): the proof, before device time is spent, that the script runs.

Section 3 is in gpu_check_throughput.py; the plan, the report and the constants all sections use are in
gpu_check_common.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import os
import platform
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

# gpu_check_common.py and gpu_check_throughput.py are beside this file, wherever it is run from.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check_common import (  # noqa: E402
    ATTN,
    BLOCK,
    FP32_TOLERANCE,
    HBM_BYTES_PER_S,
    IMPORT_ONLY,
    MLP,
    ROW_ADAPTERS,
    BenchSizes,
    Plan,
    Report,
    run_section,
    sync,
)
from gpu_check_throughput import (  # noqa: E402
    section_throughput,
)

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
