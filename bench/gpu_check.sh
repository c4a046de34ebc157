#!/usr/bin/env bash
# The prepared GPU check of issue 14 (item 4): environment, parity of our Triton kernels against
# transformers + peft on CUDA, decode throughput with many adapters against the memory-bandwidth
# bound. Paste its output into bench/RESULTS-gpu.md. bench/gpu_check.py says what each section does.
#
# On the device machine (one NVIDIA H200), from a session whose task was lent one, call the `run` tool
# with exactly:
#
#     command:   bash bench/gpu_check.sh
#     timeout_s: 500
#
# and no `carry`: the machine's own python3 has torch, triton, transformers and peft, and the script
# imports lorax_server straight from server/ (no `make install` there, no downloads: nothing outside
# the machine can be reached). Then call `give_back`. The whole log is also written to
# $OUT/gpu_check.log, so it comes back even if the output tail is cut or the run is killed. The
# sections stop starting new work after GPU_CHECK_BUDGET_S (420 s), and this wrapper kills the run
# at GPU_CHECK_HARD_LIMIT_S (470 s), both inside the 500 s timeout, which leaves room in a 15-minute
# lease for the machine's start and one rerun of a single section, e.g.
#     bash bench/gpu_check.sh --sections throughput
#
# Here, without a GPU (a couple of minutes on 2 cores; no figure it prints is a measurement):
#     bash bench/gpu_check.sh --dry-run
# with GPU_CHECK_HIDE_MODULES=xgrammar to fail that import as the device machine's image does.
#
# Other arguments go to bench/gpu_check.py (--sections env,parity,throughput, --families, --dtypes,
# --budget-s). Env: PYTHON picks the interpreter (default: .venv/bin/python when it imports torch,
# transformers and peft, else python3); GPU_CHECK_TMP is where the ~1.6 GB random checkpoint is written.
set -uo pipefail
cd "$(dirname "$0")/.."

pick_python() {
    if [[ -n "${PYTHON:-}" ]]; then
        echo "$PYTHON"
        return
    fi
    local candidate
    for candidate in .venv/bin/python python3 python; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import torch, transformers, peft' 2>/dev/null; then
            echo "$candidate"
            return
        fi
    done
    echo python3  # fails below with the import error, which says what is missing
}

PY="$(pick_python)"
# Unbuffered: a run killed at its limit keeps everything it printed. Offline: there is no network on
# the device machine, and a lookup that waits for one would eat the time budget.
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
for arg in "$@"; do
    if [[ "$arg" == "--dry-run" ]]; then
        export TRITON_INTERPRET=1  # before Python defines any kernel: the CPU runs them interpreted
    fi
done

LOG=/dev/null
if [[ -n "${OUT:-}" && -d "${OUT}" && -w "${OUT}" ]]; then
    LOG="$OUT/gpu_check.log"
fi

{
    echo "# python: $(command -v "$PY")"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,clocks.mem \
            --format=csv 2>&1 || true
    fi
    if command -v timeout >/dev/null 2>&1; then
        timeout -k 15 "${GPU_CHECK_HARD_LIMIT_S:-470}" "$PY" bench/gpu_check.py "$@"
    else  # the sections' own budget still applies
        "$PY" bench/gpu_check.py "$@"
    fi
    status=$?
    if [[ $status -eq 124 || $status -eq 137 ]]; then
        echo "KILLED: bench/gpu_check.py ran past GPU_CHECK_HARD_LIMIT_S=${GPU_CHECK_HARD_LIMIT_S:-470}s"
    fi
    exit $status
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
