"""Per-request adapter merging against peft's `add_weighted_adapter` on a tiny random Llama."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.utils import merge_utils
from transformers import LlamaConfig, LlamaForCausalLM

from lorax_server.adapters import merge
from lorax_server.adapters.merge import LoraModuleWeights, MergeSpec, merge_adapters, merge_module

ATTN = ["q_proj", "v_proj"]
ATTN_O = ["v_proj", "o_proj"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NAMES = ["first", "second", "third"]  # not substrings of peft's "lora_" prefix


def _peft_model(adapters: list[dict]) -> PeftModel:
    """A tiny random Llama with one non-zero LoRA adapter per kwargs dict, named first, second, ..."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    )
    base = LlamaForCausalLM(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, LoraConfig(init_lora_weights=False, **adapters[0]), adapter_name=NAMES[0])
        for name, kwargs in zip(NAMES[1:], adapters[1:], strict=False):
            model.add_adapter(name, LoraConfig(init_lora_weights=False, **kwargs))
    return model


def _extract(model: PeftModel, name: str) -> dict[str, LoraModuleWeights]:
    """One adapter's factors from peft's state dict, with the scale its config implies."""
    config = model.peft_config[name]
    scale = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
    sides: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in get_peft_model_state_dict(model, adapter_name=name).items():
        module, side, _ = key.removeprefix("base_model.model.").rsplit(".", 2)
        sides.setdefault(module, {})[side] = tensor.detach().clone()
    return {m: LoraModuleWeights(s["lora_A"], s["lora_B"], scale) for m, s in sides.items()}


def _peft_deltas(model: PeftModel, name: str) -> dict[str, torch.Tensor]:
    """The effective update scaling·B·A of every module of a (merged) peft adapter, in model order."""
    out = {}
    for module_name, module in model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and name in module.lora_A:
            a = module.lora_A[name].weight.detach()  # [rank, in_features]
            b = module.lora_B[name].weight.detach()  # [out_features, rank]
            out[module_name] = module.scaling[name] * (b @ a)  # [out_features, in_features]
    return out


def _peft_merge(model: PeftModel, count: int, spec: MergeSpec) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.base_model.add_weighted_adapter(
            NAMES[:count],
            list(spec.weights),
            "merged",
            combination_type=spec.strategy,
            density=spec.density,
            majority_sign_method=spec.majority_sign_method,
        )
    return _peft_deltas(model, "merged")


def _assert_same_deltas(ours: dict[str, LoraModuleWeights], theirs: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(theirs)
    for name, delta in theirs.items():
        torch.testing.assert_close(ours[name].delta(), delta, atol=1e-5, rtol=1e-5, msg=name)
        assert ours[name].scale == 1.0


@pytest.fixture
def replay_dare_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Record the DARE masks our merge draws and make peft's random pruning use the same ones."""
    recorded: list[tuple[torch.Tensor, torch.Tensor]] = []
    draw = merge._random_keep_mask

    def record(t: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
        mask = draw(t, density, generator)
        recorded.append((t.clone(), mask))
        return mask

    def replay(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
        (mask,) = [m for t, m in recorded if torch.equal(t, tensor)]
        pruned = tensor * mask
        return pruned / density if rescale else pruned

    monkeypatch.setattr(merge, "_random_keep_mask", record)
    monkeypatch.setattr(merge_utils, "random_pruning", replay)


# Three rank-4 adapters, alpha != r, overlapping but different target modules: q_proj is in the first
# and third only, o_proj in the second and third, the MLP in the third only.
THREE = [
    dict(r=4, lora_alpha=8, target_modules=ATTN),
    dict(r=4, lora_alpha=3, target_modules=ATTN_O),
    dict(r=4, lora_alpha=4, target_modules=ALL),
]

SPECS = [
    MergeSpec("linear", (0.7, -0.4, 1.3)),
    MergeSpec("ties", (0.7, 0.4, 1.3), density=0.5, majority_sign_method="total"),
    MergeSpec("ties", (0.7, -0.4, 1.3), density=0.7, majority_sign_method="frequency"),
    MergeSpec("ties", (0.5, 1.0, 0.25), density=1.0),
    MergeSpec("dare_linear", (0.7, -0.4, 1.3), density=0.5, seed=3),
    MergeSpec("dare_ties", (0.7, 0.4, 1.3), density=0.7, majority_sign_method="total", seed=4),
    MergeSpec("dare_ties", (0.7, -0.4, 1.3), density=0.5, majority_sign_method="frequency", seed=5),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.strategy}-{s.density}-{s.majority_sign_method}")
def test_merge_adapters_equals_peft(spec: MergeSpec, replay_dare_masks: None) -> None:
    model = _peft_model(THREE)
    adapters = [_extract(model, name) for name in NAMES]
    ours = merge_adapters(adapters, spec)
    _assert_same_deltas(ours, _peft_merge(model, 3, spec))


@pytest.mark.parametrize("strategy", ["dare_linear", "dare_ties"])
def test_shared_generator_in_model_order_reproduces_peft_global_rng(
    strategy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """merge_module draws masks as peft does (A's, then B's): one generator shared across modules in
    model order yields peft's masks from torch's global RNG under the same seed. (peft's random init
    of the new adapter consumes the global RNG first, so the seed is set at peft's first mask draw.)"""
    model = _peft_model(THREE[:2])
    adapters = [_extract(model, name) for name in NAMES[:2]]
    spec = MergeSpec(strategy, (0.8, 0.6), density=0.6, majority_sign_method="frequency")
    original, calls = merge_utils.random_pruning, []

    def seeded_on_first_draw(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
        if not calls:
            torch.manual_seed(1234)
        calls.append(tensor.shape)
        return original(tensor, density, rescale=rescale)

    monkeypatch.setattr(merge_utils, "random_pruning", seeded_on_first_draw)
    theirs = _peft_merge(model, 2, spec)
    generator = torch.Generator().manual_seed(1234)
    ours = {}
    for name in theirs:  # peft's module order
        present = [i for i, adapter in enumerate(adapters) if name in adapter]
        sub = MergeSpec(strategy, tuple(spec.weights[i] for i in present), spec.density, spec.majority_sign_method)
        ours[name] = merge_module([adapters[i][name] for i in present], sub, generator)
    _assert_same_deltas(ours, theirs)


def test_single_adapter_is_merged_linearly_like_peft() -> None:
    model = _peft_model([dict(r=4, lora_alpha=6, target_modules=ALL)])
    spec = MergeSpec("ties", (0.8,), density=0.5)
    ours = merge_adapters([_extract(model, NAMES[0])], spec)
    _assert_same_deltas(ours, _peft_merge(model, 1, spec))


def test_rslora_adapter_scale_is_folded_in() -> None:
    model = _peft_model(
        [dict(r=8, lora_alpha=4, target_modules=ALL), dict(r=8, lora_alpha=4, target_modules=ATTN, use_rslora=True)]
    )
    spec = MergeSpec("ties", (1.0, 0.5), density=0.7)
    ours = merge_adapters([_extract(model, name) for name in NAMES[:2]], spec)
    _assert_same_deltas(ours, _peft_merge(model, 2, spec))


def test_rslora_first_differs_from_peft_by_sqrt_rank() -> None:
    """Documented deviation: peft gives the merged adapter alpha = r plus the first adapter's rslora,
    i.e. scale sqrt(r); we keep scale 1."""
    model = _peft_model(
        [dict(r=4, lora_alpha=4, target_modules=ATTN, use_rslora=True), dict(r=4, lora_alpha=2, target_modules=ATTN)]
    )
    spec = MergeSpec("linear", (1.0, 1.0))
    ours = merge_adapters([_extract(model, name) for name in NAMES[:2]], spec)
    theirs = _peft_merge(model, 2, spec)
    for name, delta in theirs.items():
        torch.testing.assert_close(ours[name].delta() * math.sqrt(4), delta, atol=1e-5, rtol=1e-5)


def test_different_ranks_are_refused_as_peft_does() -> None:
    model = _peft_model([dict(r=4, lora_alpha=8, target_modules=ATTN), dict(r=8, lora_alpha=8, target_modules=ATTN)])
    spec = MergeSpec("ties", (1.0, 1.0), density=0.5)
    with pytest.raises(ValueError, match="same r"):
        _peft_merge(model, 2, spec)
    with pytest.raises(ValueError, match=r"different ranks \[4, 8\]"):
        merge_adapters([_extract(model, name) for name in NAMES[:2]], spec)


def _random_adapter(modules: list[str], rank: int = 4, seed: int = 0) -> dict[str, LoraModuleWeights]:
    g = torch.Generator().manual_seed(seed)
    return {
        m: LoraModuleWeights(torch.randn(rank, 16, generator=g), torch.randn(24, rank, generator=g), 0.5)
        for m in modules
    }


def test_dare_is_deterministic_per_request_and_independent_of_module_order() -> None:
    a, b = _random_adapter(["x", "y", "z"], seed=1), _random_adapter(["x", "y", "z"], seed=2)
    spec = MergeSpec("dare_ties", (1.0, 0.5), density=0.5, seed=7)
    first = merge_adapters([a, b], spec)
    shuffled = [dict(reversed(a.items())), dict(reversed(b.items()))]
    again = merge_adapters(shuffled, spec)
    other_seed = merge_adapters([a, b], MergeSpec("dare_ties", (1.0, 0.5), density=0.5, seed=8))
    for name in first:
        torch.testing.assert_close(first[name].lora_a, again[name].lora_a, rtol=0, atol=0)
        torch.testing.assert_close(first[name].lora_b, again[name].lora_b, rtol=0, atol=0)
    assert any(not torch.equal(first[n].lora_a, other_seed[n].lora_a) for n in first)
    assert not torch.equal(first["x"].lora_a, first["y"].lora_a)  # each module draws its own masks


def test_result_keeps_input_dtype() -> None:
    def half(adapter: dict[str, LoraModuleWeights]) -> dict[str, LoraModuleWeights]:
        return {k: LoraModuleWeights(v.lora_a.half(), v.lora_b.half(), v.scale) for k, v in adapter.items()}

    a, b = half(_random_adapter(["x"])), half(_random_adapter(["x"], seed=3))
    out = merge_adapters([a, b], MergeSpec("ties", (1.0, 1.0), density=0.5))
    assert out["x"].lora_a.dtype == torch.float16 and out["x"].lora_b.dtype == torch.float16
    assert out["x"].lora_a.shape == (4, 16) and out["x"].lora_b.shape == (24, 4)


@pytest.mark.parametrize(
    ("spec", "count", "message"),
    [
        (MergeSpec("linear", ()), 0, "at least one adapter"),
        (MergeSpec("svd", (1.0, 1.0)), 2, "merge_strategy must be one of linear, ties, dare_linear, dare_ties"),
        (MergeSpec("linear", (1.0,)), 2, r"weights has 1 value\(s\) for 2 adapter\(s\)"),
        (MergeSpec("linear", (1.0, float("nan"))), 2, r"weights\[1\] must be a finite number"),
        (MergeSpec("linear", (1.0, "2")), 2, r"weights\[1\] must be a finite number"),  # type: ignore[arg-type]
        (MergeSpec("ties", (1.0, 1.0), density=0.0), 2, r"density must be in \(0, 1\], got 0.0"),
        (MergeSpec("dare_ties", (1.0, 1.0), density=1.5), 2, r"density must be in \(0, 1\], got 1.5"),
        (MergeSpec("ties", (1.0, 1.0), majority_sign_method="mean"), 2, "majority_sign_method must be one of"),
        (MergeSpec("linear", (1.0, 1.0), seed=1.5), 2, "seed must be an integer"),  # type: ignore[arg-type]
    ],
)
def test_validation_errors(spec: MergeSpec, count: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        spec.validate(count)
    with pytest.raises(ValueError, match=message):
        merge_adapters([_random_adapter(["x"], seed=i) for i in range(count)], spec)


def test_spec_is_hashable_with_list_weights() -> None:
    spec = MergeSpec("ties", [0.5, 0.5], density=0.5)  # type: ignore[arg-type]
    assert spec.weights == (0.5, 0.5)
    assert {spec: 1}[MergeSpec("ties", (0.5, 0.5), density=0.5)] == 1


def test_bad_adapters_are_refused_with_the_module_named() -> None:
    spec = MergeSpec("linear", (1.0, 1.0))
    with pytest.raises(ValueError, match=r"ids\[1\] has no LoRA modules"):
        merge_adapters([_random_adapter(["x"]), {}], spec)
    narrow = {"x": LoraModuleWeights(torch.zeros(4, 8), torch.zeros(24, 4), 1.0)}  # in_features 8, not 16
    with pytest.raises(ValueError, match="cannot merge module x: factor shapes differ"):
        merge_adapters([_random_adapter(["x"]), narrow], spec)
