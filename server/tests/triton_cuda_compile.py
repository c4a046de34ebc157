"""Compile the Triton attention kernel for CUDA targets on a machine without a GPU: Triton's compiler
and its bundled ptxas run on the host. The interpreter (TRITON_INTERPRET=1, which the kernel tests use)
accepts code a GPU build refuses (matrix tiles under 16, unsupported casts), so this is the check that
the kernel also builds for the hardware.

`python triton_cuda_compile.py` prints one line per configuration, `ok ...` or `FAIL ...: error`, or a
single `SKIP reason` when this Triton has no CUDA backend. It must run in a process of its own without
TRITON_INTERPRET: kernels defined under the interpreter cannot be compiled.
"""

from __future__ import annotations

import os

assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET"

import triton  # noqa: E402

from lorax_server.layers.triton import attention  # noqa: E402

POINTER = {"f32": "*fp32", "f16": "*fp16", "bf16": "*bf16", "f8": "*fp8e4nv"}
# (sm, q dtype, cache dtype, table dtype, shape constants): GQA, MHA with long query tiles, MQA with a
# 32-head group and 4-token pages, float8 caches, head_dim 80 padded to 128. Each with window,
# soft-capping and ALiBi on; the first also with them off.
CASES = [
    (90, "f32", "f32", "*i64", dict(PAGE=16, GROUP=2, GROUP_PAD=2, BLOCK_Q=32, HEAD_PAD=128, TILE=16)),
    (90, "f16", "f16", "*i32", dict(PAGE=32, GROUP=4, GROUP_PAD=4, BLOCK_Q=4, HEAD_PAD=128, TILE=32)),
    (80, "bf16", "bf16", "*i64", dict(PAGE=16, GROUP=1, GROUP_PAD=1, BLOCK_Q=64, HEAD_PAD=128, TILE=16)),
    (90, "bf16", "f8", "*i64", dict(PAGE=16, GROUP=8, GROUP_PAD=8, BLOCK_Q=2, HEAD_PAD=64, TILE=16)),
    (90, "f16", "f16", "*i64", dict(PAGE=4, GROUP=32, GROUP_PAD=32, BLOCK_Q=1, HEAD_PAD=16, TILE=16)),
]


def signature(q: str, cache: str, table: str, constants: dict) -> dict[str, str]:
    names = attention._paged_attention_kernel.arg_names
    types = {name: "i32" for name in names if name.startswith("stride") or name == "head_dim"}
    types.update(out_ptr=POINTER[q], q_ptr=POINTER[q], k_cache_ptr=POINTER[cache], v_cache_ptr=POINTER[cache])
    types.update(tables_ptr=table, query_start_ptr="*i64", query_lens_ptr="*i32", context_lens_ptr="*i64")
    types.update(work_seq_ptr="*i32", work_first_ptr="*i32", slopes_ptr="*fp32", window="i32")
    types.update({name: "fp32" for name in ("scale", "softcap", "k_scale", "v_scale")})
    types.update({name: "constexpr" for name in constants})
    return {name: types[name] for name in names}


def main() -> None:
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        print(f"SKIP this Triton cannot compile ahead of time: {e}")
        return
    kernel = attention._paged_attention_kernel
    names = kernel.arg_names
    for i, (sm, q, cache, table, shape) in enumerate(CASES):
        for features in (False, True) if i == 0 else (True,):
            constants = dict(shape, USE_WINDOW=features, USE_SOFTCAP=features, USE_ALIBI=features)
            constants.update(FP8=cache == "f8", PRECISION="ieee" if q == "f32" else "tf32", WIDEN=False)
            label = f"sm_{sm} q={q} cache={cache} {shape} features={features}"
            source = ASTSource(
                fn=kernel,
                signature=signature(q, cache, table, constants),
                constexprs={(names.index(k),): v for k, v in constants.items()},
            )
            try:
                triton.compile(source, target=GPUTarget("cuda", sm, 32))
            except Exception as e:  # the compiler's own error types vary between stages
                print(f"FAIL {label}: {type(e).__name__}: {e}".replace("\n", " ")[:2000])
            else:
                print(f"ok {label}")


if __name__ == "__main__":
    main()
