"""Compile the Triton attention and multi-LoRA kernels for CUDA targets on a machine without a GPU:
Triton's compiler and its bundled ptxas run on the host. The interpreter (TRITON_INTERPRET=1, which the
kernel tests use) accepts code a GPU build refuses (matrix tiles under 16, unsupported casts), so this is
the check that the kernels also build for the hardware.

`python triton_cuda_compile.py` prints one line per configuration, `ok ...` or `FAIL ...: error`, or a
single `SKIP reason` when this Triton has no CUDA backend. It must run in a process of its own without
TRITON_INTERPRET: kernels defined under the interpreter cannot be compiled.
"""

from __future__ import annotations

import os

assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET"

import triton  # noqa: E402

from lorax_server.layers.triton import attention, lora  # noqa: E402

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


# The multi-LoRA kernels (`layers.triton.lora`) in every activation dtype on sm_90, and bfloat16 on
# sm_80, with the tile sizes their launchers pick for small and large ranks and widths. bfloat16 SGMV
# is only checked here: the interpreter's bfloat16 tl.dot is wrong, so its numbers wait for a GPU.
LORA_CASES = [
    (kernel, sm, dtype, tiles)
    for sm, dtype in ((90, "f32"), (90, "f16"), (90, "bf16"), (80, "bf16"))
    for kernel, tiles in (
        ("_sgmv_kernel", dict(ACCUMULATE=False, BLOCK_M=16, BLOCK_K=64, BLOCK_N=16)),  # shrinks
        ("_sgmv_kernel", dict(ACCUMULATE=False, BLOCK_M=64, BLOCK_K=64, BLOCK_N=64)),
        ("_sgmv_kernel", dict(ACCUMULATE=True, BLOCK_M=16, BLOCK_K=16, BLOCK_N=64)),  # expands
        ("_sgmv_kernel", dict(ACCUMULATE=True, BLOCK_M=64, BLOCK_K=64, BLOCK_N=64)),
        ("_bgmv_kernel", dict(ACCUMULATE=False, BLOCK_K=64, BLOCK_N=16)),
        ("_bgmv_kernel", dict(ACCUMULATE=True, BLOCK_K=64, BLOCK_N=64)),
    )
]


def lora_signature(kernel, dtype: str, constants: dict) -> dict[str, str]:  # noqa: ANN001
    """Segment and slot tensors are int32; activations and factors `dtype`; sizes and strides i32."""
    types = {}
    for name in kernel.arg_names:
        if name in constants:
            types[name] = "constexpr"
        elif name.startswith(("seg_", "row_slot")):
            types[name] = "*i32"
        elif name.endswith("_ptr"):
            types[name] = POINTER[dtype]
        else:
            types[name] = "i32"
    return types


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
            compile_for(source, sm, label, GPUTarget)
    for name, sm, dtype, tiles in LORA_CASES:
        kernel = getattr(lora, name)
        source = ASTSource(
            fn=kernel,
            signature=lora_signature(kernel, dtype, tiles),
            constexprs={(kernel.arg_names.index(k),): v for k, v in tiles.items()},
        )
        compile_for(source, sm, f"{name} sm_{sm} {dtype} {tiles}", GPUTarget)


def compile_for(source, sm: int, label: str, target_cls) -> None:  # noqa: ANN001
    try:
        triton.compile(source, target=target_cls("cuda", sm, 32))
    except Exception as e:  # the compiler's own error types vary between stages
        print(f"FAIL {label}: {type(e).__name__}: {e}".replace("\n", " ")[:2000])
    else:
        print(f"ok {label}")


if __name__ == "__main__":
    main()
