"""Dense float32 weights packed for oneDNN on the CPU (`layers.packed`): the same products as the dense
weight, every linear of a loaded model packed except a tied LM head, and the switch that turns it off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_models import make_llama

from lorax_server.layers.attention import TorchAttention
from lorax_server.layers.linear import Linear
from lorax_server.layers.packed import PackedWeight, make_primitives, pack_dense_weights, packing_applies
from lorax_server.models.loader import load_model

pytestmark = pytest.mark.skipif(
    not packing_applies(torch.device("cpu"), torch.float32), reason="this PyTorch cannot pack weights for oneDNN"
)


def _load(model_dir: Path, dtype: str = "float32"):  # noqa: ANN202
    return load_model(model_dir, TorchAttention(16), torch.device("cpu"), dtype)


@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_packed_linear_computes_the_dense_product(rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(96, 80, generator=g), torch.randn(96, generator=g)
    x = torch.randn(rows, 80, generator=g)
    dense = Linear(w.clone(), b, [96])
    packed = Linear(w.clone(), b, [96])
    assert pack_dense_weights([packed]) == 1 and isinstance(packed.weight, PackedWeight)
    assert not packed.quantized and packed.in_features == 80
    assert torch.equal(packed.weight.dequantize(), w)
    reference = (x.double() @ w.double().t() + b.double()).float()
    assert (packed(x) - reference).abs().max() < 1e-4
    assert (packed(x) - dense(x)).abs().max() < 1e-4
    strided = torch.randn(rows, 160, generator=g)[:, ::2]  # a view, as callers may pass
    assert (packed(strided) - F.linear(strided, w, b)).abs().max() < 1e-4


def test_a_loaded_model_packs_every_linear_and_computes_the_same_products(llama_dir: Path, monkeypatch) -> None:
    packed = _load(llama_dir)
    assert all(isinstance(linear.weight, PackedWeight) for linear in packed.linears())
    monkeypatch.setenv("LORAX_PACKED_WEIGHTS", "0")
    dense = _load(llama_dir)
    assert all(isinstance(linear.weight, torch.Tensor) for linear in dense.linears())
    for ours, theirs in zip(packed.linears(), dense.linears(), strict=True):
        assert torch.equal(ours.weight.dequantize(), theirs.weight)
        x = torch.randn(5, ours.in_features)
        assert (ours(x) - theirs(x)).abs().max() < 1e-4


def test_a_tied_lm_head_stays_the_embedding(tmp_path: Path) -> None:
    model = _load(make_llama(tmp_path / "tied", tie_word_embeddings=True))
    assert model.lm_head.weight is model.embed  # a packed copy would double the vocabulary's memory
    assert all(isinstance(linear.weight, PackedWeight) for linear in model.linears()[:-1])


def test_other_dtypes_stay_dense(llama_dir: Path) -> None:
    model = _load(llama_dir, "bfloat16")
    assert all(isinstance(linear.weight, torch.Tensor) for linear in model.linears())
    assert not packing_applies(torch.device("cpu"), torch.bfloat16)
    assert not packing_applies(torch.device("cuda"), torch.float32)


def test_primitives_are_made_once_a_shape_and_change_no_product() -> None:
    """`make_primitives` (run at warm-up) multiplies once by each distinct weight shape at every small row
    count; products after it are bit for bit those before it."""
    g = torch.Generator().manual_seed(3)
    linears = [Linear(torch.randn(o, i, generator=g), None, [o]) for o, i in [(48, 32), (48, 32), (16, 32)]]
    pack_dense_weights(linears)
    x = torch.randn(9, 32, generator=g)
    before = [linear(x) for linear in linears]
    assert make_primitives([*linears, Linear(torch.randn(8, 8), None, [8])], max_rows=12) == 2  # dense: skipped
    assert all(torch.equal(linear(x), out) for linear, out in zip(linears, before, strict=True))
