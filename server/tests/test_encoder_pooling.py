"""Embeddings against sentence-transformers itself, loading the same tiny directories that it saved:
every pooling mode and combinations of them, Dense modules (identity, Tanh, no bias), Normalize, the
older Pooling flags and Dense `.bin` weights, and the layouts that are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from encoder_models import make_encoder, make_sentence_transformer, sentence_transformer_reference
from safetensors.torch import load_file

from lorax_server.encoders.engine import EncoderEngine, EncoderInput
from lorax_server.encoders.pooling import PoolingError, load_embedding_head

CPU = torch.device("cpu")
INPUTS = [[2, 7, 8, 9, 3], [2, 3], [2, 11, 12, 13, 14, 15, 16, 17, 18, 19, 3], [2, 40, 50, 3]]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_encoder("BertModel", tmp_path_factory.mktemp("bert"))


def _embed(model_dir: Path) -> tuple[torch.Tensor, EncoderEngine]:
    engine = EncoderEngine.load(model_dir, CPU)
    return torch.tensor(engine.embed([EncoderInput(i, x) for i, x in enumerate(INPUTS)])), engine


@pytest.mark.parametrize(
    "modes",
    ["cls", "mean", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken", ("mean", "cls", "max", "lasttoken")],
)
def test_each_pooling_mode_matches_sentence_transformers(modes, bert_dir: Path, tmp_path: Path) -> None:  # noqa: ANN001
    model_dir = make_sentence_transformer(tmp_path / "st", bert_dir, modes)
    want = sentence_transformer_reference(model_dir, INPUTS)
    got, engine = _embed(model_dir)
    assert engine.embedding_dim == want.shape[1] == 32 * (1 if isinstance(modes, str) else len(modes))
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    "dense",
    [
        [(16, torch.nn.Identity(), True)],
        [(24, torch.nn.Tanh(), True), (8, torch.nn.Identity(), False)],
    ],
    ids=["identity", "tanh-then-no-bias"],
)
def test_dense_modules_and_normalize_match_sentence_transformers(dense, bert_dir: Path, tmp_path: Path) -> None:  # noqa: ANN001
    model_dir = make_sentence_transformer(tmp_path / "st", bert_dir, ("mean", "cls"), dense, normalize=True)
    want = sentence_transformer_reference(model_dir, INPUTS)
    got, engine = _embed(model_dir)
    assert engine.embedding_dim == dense[-1][0]
    assert (got - want).abs().max().item() < 1e-5
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(INPUTS)), atol=1e-6)


def test_distilbert_mean_pooling_and_normalize(tmp_path: Path) -> None:
    base = make_encoder("DistilBertModel", tmp_path / "distilbert")
    model_dir = make_sentence_transformer(tmp_path / "st", base, "mean", normalize=True)
    want = sentence_transformer_reference(model_dir, INPUTS)
    assert (_embed(model_dir)[0] - want).abs().max().item() < 1e-5


def test_older_pooling_flags_and_dense_bin_weights(bert_dir: Path, tmp_path: Path) -> None:
    """sentence-transformers 2.x files: `pooling_mode_*` flags (concatenated cls, max, mean whatever their
    order in the file) and a Dense module's weights in pytorch_model.bin."""
    model_dir = make_sentence_transformer(tmp_path / "st", bert_dir, "mean", [(12, torch.nn.Tanh(), True)])
    pooling = model_dir / "1_Pooling" / "config.json"
    flags = {"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True, "pooling_mode_cls_token": True}
    pooling.write_text(json.dumps({"word_embedding_dimension": 32, **flags}))
    dense = model_dir / "2_Dense"
    config = json.loads((dense / "config.json").read_text())
    (dense / "config.json").write_text(json.dumps({**config, "in_features": 96}))
    torch.manual_seed(3)
    tensors = {"linear.weight": torch.randn(12, 96) * 0.1, "linear.bias": torch.randn(12) * 0.1}
    (dense / "model.safetensors").unlink()
    torch.save(tensors, dense / "pytorch_model.bin")
    want = sentence_transformer_reference(model_dir, INPUTS)
    assert want.shape == (len(INPUTS), 12)
    assert (_embed(model_dir)[0] - want).abs().max().item() < 1e-5


def test_layouts_that_cannot_be_served_exactly_are_refused(bert_dir: Path, tmp_path: Path) -> None:
    model_dir = make_sentence_transformer(tmp_path / "st", bert_dir, "mean", [(12, torch.nn.Tanh(), True)])
    listing = json.loads((model_dir / "modules.json").read_text())

    def refused(modules: list[dict], message: str) -> None:
        (model_dir / "modules.json").write_text(json.dumps(modules))
        with pytest.raises(PoolingError, match=message):
            load_embedding_head(model_dir, 32, CPU, torch.float32)

    extra = {"idx": 3, "name": "3", "path": "3_LayerNorm", "type": "sentence_transformers.models.LayerNorm"}
    refused([*listing, extra], "module 'sentence_transformers.models.LayerNorm' is not supported")
    refused([listing[0], listing[2]], "must start with Transformer and Pooling")
    refused([{**listing[0], "path": "0_BERT"}, *listing[1:]], "lives in 0_BERT/")
    (model_dir / "modules.json").write_text(json.dumps(listing))
    dense_config = model_dir / "2_Dense" / "config.json"
    config = json.loads(dense_config.read_text())
    dense_config.write_text(json.dumps({**config, "activation_function": "my_package.Swish"}))
    with pytest.raises(PoolingError, match="activation 'my_package.Swish' is not supported"):
        load_embedding_head(model_dir, 32, CPU, torch.float32)
    pooling = model_dir / "1_Pooling" / "config.json"
    dense_config.write_text(json.dumps(config))
    pooling.write_text(json.dumps({"embedding_dimension": 32, "pooling_mode": "median"}))
    with pytest.raises(PoolingError, match="unknown pooling mode"):
        load_embedding_head(model_dir, 32, CPU, torch.float32)


def test_dense_weights_are_the_saved_ones(bert_dir: Path, tmp_path: Path) -> None:
    """The Dense module really is applied: its weights change the vector."""
    model_dir = make_sentence_transformer(tmp_path / "st", bert_dir, "mean", [(16, torch.nn.Identity(), True)])
    head = load_embedding_head(model_dir, 32, CPU, torch.float32)
    saved = load_file(model_dir / "2_Dense" / "model.safetensors")
    dense = head.steps[0]
    assert torch.equal(dense.weight, saved["linear.weight"]) and torch.equal(dense.bias, saved["linear.bias"])


def test_sentence_transformers_max_seq_length_caps_the_input_length(bert_dir: Path, tmp_path: Path) -> None:
    """sentence-transformers truncates at `max_seq_length`: a longer input is refused, not given another
    vector than sentence-transformers' encode would give."""
    from lorax_server.engine import RequestError

    model_dir = make_sentence_transformer(tmp_path / "st", bert_dir, "mean")
    assert EncoderEngine.load(model_dir, CPU).max_input_length == 40  # the model's positions
    config = model_dir / "sentence_bert_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "max_seq_length": 8}))
    engine = EncoderEngine.load(model_dir, CPU)
    assert engine.max_input_length == 8
    with pytest.raises(RequestError, match="input 1: 9 tokens, more than the 8 this model takes"):
        engine.embed([EncoderInput(1, [2] + list(range(10, 17)) + [3])])
    assert len(engine.embed([EncoderInput(2, [2] + list(range(10, 16)) + [3])])[0]) == 32
