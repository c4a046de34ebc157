"""A PEFT `adapter_config.json`, read once and checked for what this server can apply exactly."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class AdapterConfigError(ValueError):
    """The adapter cannot be served; the message says why."""


@dataclass(frozen=True)
class LoraAdapterConfig:
    r: int
    lora_alpha: float
    target_modules: tuple[str, ...] | str | None
    use_rslora: bool = False
    # peft stores lora_A [r, in] and lora_B [out, r] either way: fan_in_fan_out only transposes the dense
    # delta peft merges into a Conv1D weight stored [in, out] (GPT-2), so the factors apply as they are.
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    base_model_name_or_path: str | None = None

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> LoraAdapterConfig:
        peft_type = str(cfg.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise AdapterConfigError(f"only LoRA adapters are supported, got peft_type {peft_type}")
        if cfg.get("use_dora"):
            raise AdapterConfigError("DoRA adapters (use_dora) are not supported")
        if cfg.get("modules_to_save"):
            raise AdapterConfigError(
                f"adapters with modules_to_save ({cfg['modules_to_save']}) are not supported: "
                "they replace whole base modules"
            )
        if cfg.get("trainable_token_indices"):
            raise AdapterConfigError("adapters with trainable_token_indices are not supported")
        if cfg.get("target_parameters"):
            raise AdapterConfigError(
                f"adapters with target_parameters ({cfg['target_parameters']}) are not supported: only LoRA on "
                "linear modules (MoE experts in the per-expert layout, e.g. Mixtral's experts.N.w1)"
            )
        r = cfg.get("r")
        if not isinstance(r, int) or r < 1:
            raise AdapterConfigError(f"adapter rank r must be a positive integer, got {r!r}")
        targets = cfg.get("target_modules")
        return cls(
            r=r,
            lora_alpha=float(cfg.get("lora_alpha", r)),
            target_modules=tuple(targets) if isinstance(targets, list) else targets,
            use_rslora=bool(cfg.get("use_rslora", False)),
            fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)),
            rank_pattern=dict(cfg.get("rank_pattern") or {}),
            alpha_pattern=dict(cfg.get("alpha_pattern") or {}),
            base_model_name_or_path=cfg.get("base_model_name_or_path"),
        )

    @classmethod
    def from_dir(cls, adapter_dir: Path) -> LoraAdapterConfig:
        path = Path(adapter_dir) / "adapter_config.json"
        if not path.is_file():
            raise AdapterConfigError(f"{adapter_dir} has no adapter_config.json")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise AdapterConfigError(f"adapter_config.json is not valid JSON: {e}") from e

    def scale_for(self, module: str) -> float:
        """alpha / r for this module (alpha / sqrt(r) with rslora), honouring rank/alpha patterns."""
        r = self.rank_pattern.get(_pattern_key(self.rank_pattern, module), self.r)
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module), self.lora_alpha)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern_key(patterns: dict[str, Any], module: str) -> str:
    """PEFT's rule: a pattern key applies when the module name ends with it (as a regex)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module
