"""bench/gpu_check.py (with gpu_check_common.py and gpu_check_throughput.py beside it), the check prepared
for a GPU session, must not rot while no GPU runs it: its dry
run (CPU, toy sizes, the torch backend for speed) runs every section here, one family, a few steps,
and its time budget skips what is left."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from lorax_server.adapters import lora

GPU_CHECK = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", GPU_CHECK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def lora_kernels() -> Iterator[None]:
    before = lora.kernels()  # the sections choose kernels globally: leave the other tests' choice alone
    yield
    lora.set_kernels(before)


def tiny_plan(gpu_check: ModuleType, budget_s: float = 600):  # noqa: ANN201
    args = gpu_check.parse_args(
        ["--dry-run", "--families", "llama", "--dtypes", "float32", "--budget-s", str(budget_s)]
    )
    bench = dataclasses.replace(
        gpu_check.DRY_BENCH,
        dtype="float32",
        batches=(2,),
        adapter_counts=(0, 2),
        warmup_steps=1,
        timed_steps=1,
        forward_steps=1,
    )
    return dataclasses.replace(gpu_check.make_plan(args), attention="torch", parity_steps=2, bench=bench)


def run_all(gpu_check: ModuleType, plan) -> object:  # noqa: ANN001
    report = gpu_check.Report(plan.budget_s)
    for name, section in gpu_check.SECTIONS.items():
        gpu_check.run_section(report, name, lambda section=section: section(plan, report))
    return report


def test_every_section_of_the_dry_run_runs(gpu_check: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    report = run_all(gpu_check, tiny_plan(gpu_check))
    out = capsys.readouterr().out
    statuses = [status for status, _ in report.verdicts]
    skipped = [text for status, text in report.verdicts if status == "SKIP"]
    assert "ERROR" not in statuses and len(skipped) == 1, out
    assert skipped[0].startswith("decode graphs vs eager: --compile does not apply"), out  # torch attention
    # float32 llama against peft and against the torch backend (here: itself), exact to float32 rounding
    assert statuses.count("PASS") == 2, out
    assert "| llama | float32 |" in out
    assert "| 2 | 0 |" in out and "| 2 | 2 |" in out  # the throughput table's rows
    targets = [text for status, text in report.verdicts if "dry run, would be" in text]
    assert len(targets) == 3, out  # the adapters-vs-base ratio and two bandwidth-bound shares
    joins = [text for status, text in report.verdicts if status == "INFO" and "an adapter joining" in text]
    assert len(joins) == 1 and joins[0].startswith("an adapter joining 1 running (2 rows)"), out
    assert report.summary() == 0


def test_the_time_budget_skips_what_is_left(gpu_check: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    report = run_all(gpu_check, tiny_plan(gpu_check, budget_s=0))
    out = capsys.readouterr().out
    skipped = [text for status, text in report.verdicts if status == "SKIP"]
    assert any(t.startswith("parity llama float32") for t in skipped), out
    assert any(t.startswith("throughput") for t in skipped), out
    assert "ERROR" not in [status for status, _ in report.verdicts], out


def test_bandwidth_bound_arithmetic(gpu_check: ModuleType) -> None:
    throughput = sys.modules["gpu_check_throughput"]  # imported by gpu_check, from beside it
    cfg = gpu_check.GPU_BENCH.model  # hidden 2048, 16 layers, MLP 5632, 8 of 16 heads for keys/values
    per_layer = 2 * 2048 * 2048 + 2 * 2048 * 1024 + 3 * 2048 * 5632 + 2 * 2048
    assert throughput.model_bytes_read_per_step(cfg, 2) == 2 * (16 * per_layer + 2048 + 32000 * 2048)
    # 2 (K and V) * 16 layers * 8 kv heads * 128 dims * 2 bytes = 64 KiB per token of context
    assert throughput.kv_bytes_read_per_step(cfg, [100, 28], 2) == 128 * 65536
    rank16 = throughput.adapter_bytes(cfg, 16, ["q_proj", "down_proj"], 2)
    assert rank16 == 2 * 16 * 16 * ((2048 + 2048) + (5632 + 2048))
    configs = [(1, 0), (1, 1), (8, 0), (8, 8), (64, 0), (64, 8), (64, 64)]
    assert throughput.bench_configs(gpu_check.GPU_BENCH) == configs
