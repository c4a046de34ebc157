"""Read a PEFT LoRA adapter from a local directory and check it against the base model.

Compatibility is decided by what the adapter touches and the shapes it has, not by the base model
name it claims: every targeted module must be a linear this architecture can adapt, and every A/B
must fit that linear's input/output size.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..layers.linear import Linear
from .config import AdapterConfigError, LoraAdapterConfig
from .lora import LoraModuleWeights, kept_dtype
from .medusa import MedusaError, MedusaHeads, load_medusa
from .tensor_file import TensorFileError, read_tensor_file

MEDUSA = "medusa"  # the key of an adapter's Medusa heads among its modules (no module has that name)

_PREFIX = "base_model.model."


class AdapterLoadError(ValueError):
    """The adapter does not fit the base model; the message names the module and the problem."""


def _split_key(key: str) -> tuple[str, str]:
    """'base_model.model.<module>.lora_A[.default].weight' → (module, 'A')."""
    name = key.removeprefix(_PREFIX)
    for side in ("A", "B"):
        for marker in (f".lora_{side}.weight", f".lora_{side}.default.weight"):
            if name.endswith(marker):
                return name[: -len(marker)], side
    raise AdapterLoadError(f"unsupported tensor {key!r} in adapter (only lora_A/lora_B weights of linear layers)")


def read_lora_tensors(adapter_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """module name → {'A': tensor, 'B': tensor}, as stored (views of one mapping of the file: `read_tensor_file`)."""
    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise AdapterLoadError(f"{adapter_dir} has no adapter_model.safetensors")
    try:
        tensors = read_tensor_file(path)
    except TensorFileError as e:
        raise AdapterLoadError(f"adapter_model.safetensors is not a valid safetensors file: {e}") from e
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, side = _split_key(key)
        modules.setdefault(module, {})[side] = tensor
    return modules


def load_lora_adapter(
    adapter_dir: Path,
    targets: dict[str, tuple[Linear, int]],
    architecture: str,
    dtype: torch.dtype,
) -> dict[str, LoraModuleWeights]:
    """The adapter's factors on the host (in `lora.kept_dtype`: the model's, or the file's 16 bits on a
    float32 model), keyed by module name, checked against the base model's adaptable linears `targets`
    (module name → (linear, fused part))."""
    try:
        config = LoraAdapterConfig.from_dir(adapter_dir)
    except AdapterConfigError as e:
        raise AdapterLoadError(str(e)) from e
    tensors = read_lora_tensors(adapter_dir)
    if not tensors:
        raise AdapterLoadError("adapter_model.safetensors holds no LoRA weights")
    adaptable = sorted({name.rsplit(".", 1)[-1] for name in targets})
    out: dict[str, LoraModuleWeights] = {}
    for module, sides in sorted(tensors.items()):
        if module not in targets:
            short = module.rsplit(".", 1)[-1]
            if short in adaptable:
                raise AdapterLoadError(f"adapter module {module!r} does not exist in the base model")
            raise AdapterLoadError(
                f"adapter targets {short!r} ({module}), which {architecture} cannot adapt; "
                f"adaptable modules: {', '.join(adaptable)}"
            )
        if set(sides) != {"A", "B"}:
            raise AdapterLoadError(f"adapter module {module!r} lacks lora_{'B' if 'A' in sides else 'A'}")
        linear, part = targets[module]
        a, b = sides["A"], sides["B"]
        in_features, out_features = linear.full_in_features, linear.full_part_sizes[part]
        if (
            a.dim() != 2
            or b.dim() != 2
            or a.shape[1] != in_features
            or b.shape[0] != out_features
            or (a.shape[0] != b.shape[1])
        ):
            raise AdapterLoadError(
                f"shape mismatch for {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit "
                f"a base layer of {in_features} inputs and {out_features} outputs"
            )
        kept = kept_dtype(a.dtype, dtype) if a.dtype == b.dtype else dtype
        out[module] = LoraModuleWeights(a.to(kept).contiguous(), b.to(kept).contiguous(), config.scale_for(module))
    return out


def load_adapter(adapter_dir: Path, targets: dict[str, tuple[Linear, int]], config, dtype: torch.dtype) -> dict:  # noqa: ANN001
    """Everything an adapter directory holds for the base model (whose `config` is a ModelConfig): its
    LoRA factors by module name (`load_lora_adapter`), and its Medusa heads under `MEDUSA` when it has
    some. A directory of Medusa heads alone has no LoRA factors."""
    try:
        heads = load_medusa(adapter_dir, config.hidden_size, config.vocab_size, dtype)
    except MedusaError as e:
        raise AdapterLoadError(f"Medusa heads: {e}") from e
    has_lora = heads is None or (Path(adapter_dir) / "adapter_config.json").is_file()
    modules: dict = load_lora_adapter(adapter_dir, targets, config.architecture, dtype) if has_lora else {}
    if heads is not None:
        modules[MEDUSA] = heads
    return modules


def adapter_nbytes(modules: dict) -> int:
    return sum(m.nbytes if isinstance(m, MedusaHeads) else m.lora_a.nbytes + m.lora_b.nbytes for m in modules.values())
