"""What bench/gpu_check.py's sections share: where the tree's packages are, the device's bound, the plan
(sizes and budget) and the report every section prints to."""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable
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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
