"""The encoder forward pass (BERT, RoBERTa, XLM-RoBERTa, DistilBERT) against transformers in float32:
every token's last hidden state, ragged batches against each input alone, RoBERTa's positions and
length limit, DistilBERT's sinusoidal table, older checkpoints' names, token classification, and the
engine's checks of a call's inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from encoder_models import ARCHITECTURES, LABELS, make_encoder, reference
from safetensors.torch import load_file, save_file

from lorax_server.encoders.config import EncoderConfig, is_encoder_dir
from lorax_server.encoders.engine import EncoderEngine, EncoderInput, NotServed
from lorax_server.encoders.model import MAX_PADDING, EncoderBatch, load_encoder, sinusoidal_positions
from lorax_server.engine import HealthCheckFailed, RequestError
from lorax_server.layers.packed import PackedWeight

CPU = torch.device("cpu")
# Lengths 1 to 13 in one batch; ids from every part of the vocabulary, specials included.
INPUTS = [[2, 7, 8, 9, 3], [2, 3], [4], [2] + list(range(10, 98, 8)) + [3], [2, 15, 1, 16, 3]]
TOLERANCE = 1e-5


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def encoder_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_encoder(request.param, tmp_path_factory.mktemp(request.param))


def _unpadded(padded: torch.Tensor, inputs: list[list[int]]) -> torch.Tensor:
    """[batch, longest, ...] → [num_tokens, ...]: each input's own tokens, one input after the other."""
    return torch.cat([padded[i, : len(x)] for i, x in enumerate(inputs)])


def _caller_order(batch: EncoderBatch) -> torch.Tensor:
    """The packed rows of input 0's tokens, then input 1's, and so on (the batch packs longest first)."""
    spans = zip(batch.starts.tolist(), batch.lengths.tolist(), strict=True)
    return torch.cat([torch.arange(start, start + n) for start, n in spans])


def _forward(model, inputs: list[list[int]]) -> torch.Tensor:  # noqa: ANN001
    """Every token's final hidden state, input 0's tokens first."""
    batch = EncoderBatch.build(inputs, model.config, CPU)
    return model.forward(batch).index_select(0, _caller_order(batch))


def test_every_token_matches_transformers(encoder_dir: Path) -> None:
    model = load_encoder(encoder_dir, CPU)
    assert model.dtype == torch.float32  # float32 on the CPU
    assert any(isinstance(linear.weight, PackedWeight) for linear in model.linears())  # oneDNN's layout
    want = _unpadded(reference(encoder_dir, INPUTS).hidden_states[-1], INPUTS)
    got = _forward(model, INPUTS)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < TOLERANCE


def test_a_ragged_batch_gives_each_input_what_it_gets_alone(encoder_dir: Path) -> None:
    model = load_encoder(encoder_dir, CPU)
    together = _forward(model, INPUTS)
    alone = torch.cat([_forward(model, [x]) for x in INPUTS])
    assert (together - alone).abs().max().item() < 1e-6
    same_length = _forward(model, [INPUTS[0], INPUTS[0][::-1]])  # no padding: the grid is the tokens
    assert torch.allclose(same_length[:5], alone[:5], atol=1e-6)


def test_ragged_inputs_are_attended_in_runs_of_similar_length(encoder_dir: Path) -> None:
    config = load_encoder(encoder_dir, CPU).config
    lens = [16, 128, 40, 127, 100, 17, 64, 90, 33, 128]
    batch = EncoderBatch.build([[5] * n for n in lens], config, CPU)
    assert len(batch.runs) > 1
    assert [r.first for r in batch.runs] == [sum(r.tokens for r in batch.runs[:i]) for i in range(len(batch.runs))]
    assert sum(r.tokens for r in batch.runs) == sum(lens) and sum(r.inputs for r in batch.runs) == len(lens)
    for run in batch.runs:
        assert run.inputs * run.longest - run.tokens <= MAX_PADDING * run.inputs * run.longest
    assert _caller_order(batch).tolist() != list(range(sum(lens)))  # packed longest first
    assert sorted(_caller_order(batch).tolist()) == list(range(sum(lens)))


def test_token_classification_matches_transformers_softmax(encoder_dir: Path) -> None:
    engine = EncoderEngine.load(encoder_dir, CPU)
    inputs = [EncoderInput(10 + i, x) for i, x in enumerate(INPUTS)]
    if not EncoderConfig.from_dir(encoder_dir).token_classification:
        assert not engine.supports_classification
        with pytest.raises(NotServed, match="no token-classification head"):
            engine.classify(inputs)
        return
    probs = _unpadded(torch.softmax(reference(encoder_dir, INPUTS).logits, dim=-1), INPUTS)
    want_scores, want_labels = probs.max(dim=-1)
    got = engine.classify(inputs)
    assert [r.request_id for r in got] == [10, 11, 12, 13, 14]
    assert [len(r.labels) for r in got] == [len(x) for x in INPUTS] == [len(r.scores) for r in got]
    assert [label for r in got for label in r.labels] == [LABELS[i] for i in want_labels.tolist()]
    scores = torch.tensor([s for r in got for s in r.scores])
    assert (scores - want_scores).abs().max().item() < TOLERANCE
    assert len(set(want_labels.tolist())) > 1  # the head is not constant: labels are really compared


def test_packed_and_dense_weights_agree(encoder_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    packed = _forward(load_encoder(encoder_dir, CPU), INPUTS)
    monkeypatch.setenv("LORAX_PACKED_WEIGHTS", "0")
    dense_model = load_encoder(encoder_dir, CPU)
    assert not any(isinstance(linear.weight, PackedWeight) for linear in dense_model.linears())
    assert (packed - _forward(dense_model, INPUTS)).abs().max().item() < TOLERANCE


@pytest.mark.parametrize("architecture", ["RobertaModel", "XLMRobertaForTokenClassification"])
def test_roberta_positions_start_after_the_padding_index(architecture: str, tmp_path: Path) -> None:
    """40 positions, padding_idx 1: at most 38 tokens, numbered from 2; a pad token inside an input keeps
    position 1 and the tokens after it do not advance, as in transformers."""
    model_dir = make_encoder(architecture, tmp_path)
    engine = EncoderEngine.load(model_dir, CPU)
    assert engine.max_input_length == 38
    longest = [2] + [10 + i % 80 for i in range(36)] + [3]
    inputs = [longest, [2, 15, 1, 1, 16, 3]]
    want = _unpadded(reference(model_dir, inputs).hidden_states[-1], inputs)
    assert (_forward(engine.model, inputs) - want).abs().max().item() < TOLERANCE
    with pytest.raises(RequestError, match="input 7: 39 tokens, more than the 38 this model takes"):
        engine.embed([EncoderInput(6, [2, 3]), EncoderInput(7, longest + [3])])


def test_distilbert_computes_its_sinusoidal_table_when_the_checkpoint_leaves_it_out(tmp_path: Path) -> None:
    model_dir = make_encoder("DistilBertModel", tmp_path)
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    stored = tensors.pop("embeddings.position_embeddings.weight")
    assert torch.equal(sinusoidal_positions(*stored.shape), stored)  # transformers' own table, bit for bit
    save_file(tensors, path, metadata={"format": "pt"})
    want = _unpadded(reference(model_dir, INPUTS).hidden_states[-1], INPUTS)
    assert (_forward(load_encoder(model_dir, CPU), INPUTS) - want).abs().max().item() < TOLERANCE


def test_older_checkpoint_names_load(tmp_path: Path) -> None:
    """LayerNorm gamma/beta (bert-base-uncased's checkpoint), the base model's prefix on a bare model's
    weights, and stray buffers."""
    model_dir = make_encoder("BertModel", tmp_path)
    want = _forward(load_encoder(model_dir, CPU), INPUTS)
    path = model_dir / "model.safetensors"
    renamed = {}
    for name, tensor in load_file(path).items():
        if "LayerNorm" in name:
            name = name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        renamed["bert." + name] = tensor
    renamed["bert.embeddings.position_ids"] = torch.arange(40)[None]
    save_file(renamed, path, metadata={"format": "pt"})
    assert torch.equal(_forward(load_encoder(model_dir, CPU), INPUTS), want)


def test_embed_without_modules_json_is_the_cls_hidden_state(encoder_dir: Path) -> None:
    engine = EncoderEngine.load(encoder_dir, CPU)
    hidden = reference(encoder_dir, INPUTS).hidden_states[-1]
    assert engine.embedding_dim == 32
    got = torch.tensor(engine.embed([EncoderInput(i, x) for i, x in enumerate(INPUTS)]))
    assert (got - hidden[:, 0]).abs().max().item() < TOLERANCE


def test_the_engine_refuses_inputs_it_cannot_compute(tmp_path: Path) -> None:
    engine = EncoderEngine.load(make_encoder("BertForTokenClassification", tmp_path), CPU)
    cases = [
        ([], "the call has no inputs"),
        ([EncoderInput(1, [2, 3]), EncoderInput(2, [])], "input 2: empty input"),
        ([EncoderInput(3, [2] * 41)], "input 3: 41 tokens, more than the 40 this model takes"),
        ([EncoderInput(4, [2, 99, 3])], r"input 4: token id 99 is outside the vocabulary \(99\)"),
    ]
    for inputs, message in cases:
        for call in (engine.embed, engine.classify):
            with pytest.raises(RequestError, match=message):
                call(inputs)
    assert len(engine.embed([EncoderInput(5, [2] * 40)])[0]) == 32  # the longest allowed, after the refusals


def test_warmup_and_health(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = EncoderEngine.load(make_encoder("RobertaForTokenClassification", tmp_path), CPU)
    seen: list[list[int]] = []
    build = EncoderBatch.build

    def recording(inputs: list[list[int]], *args) -> EncoderBatch:  # noqa: ANN002
        seen.append([len(x) for x in inputs])
        return build(inputs, *args)

    monkeypatch.setattr(EncoderBatch, "build", recording)
    assert engine.warmup(max_input_length=64, max_prefill_tokens=100, max_total_tokens=128) == 100
    assert seen[-1] == [38, 38, 24]  # capped at the 38 tokens an input may have
    assert engine.warmup(max_input_length=16, max_prefill_tokens=40, max_total_tokens=64) == 40
    assert seen[-1] == [16, 16, 8]
    with pytest.raises(RequestError, match="must be positive"):
        engine.warmup(0, 10, 10)
    engine.health()
    assert seen[-1] == [1]
    engine.model.layers[0].out_norm.weight[0] = float("nan")
    with pytest.raises(HealthCheckFailed, match="non-finite"):
        engine.health()


def test_which_checkpoints_are_encoders(tmp_path: Path) -> None:
    from lorax_server.models.fallback import UnsupportedArchitecture
    from lorax_server.models.loader import load_model

    bert = make_encoder("BertForMaskedLM", tmp_path / "bert")
    assert is_encoder_dir(bert)
    with pytest.raises(UnsupportedArchitecture, match="holds an encoder model"):
        load_model(bert, None, CPU)  # type: ignore[arg-type] - refused before the backend is used
    config = json.loads((bert / "config.json").read_text())
    for arch in ("BertLMHeadModel", "RobertaForCausalLM"):  # decoders of the family: not encoders
        assert not is_encoder_dir(_with(tmp_path / arch, config, architectures=[arch]))
    bare = {k: v for k, v in config.items() if k != "architectures"}
    assert EncoderConfig.from_dir(_with(tmp_path / "bare", bare)).architecture == "BertModel"
    for change, message in [
        ({"position_embedding_type": "relative_key"}, "only absolute positions"),
        ({"is_decoder": True}, "decoder configuration"),
        ({"num_attention_heads": 5}, "multiple of num_attention_heads"),
    ]:
        with pytest.raises(ValueError, match=message):
            EncoderConfig.from_dir(_with(tmp_path / message.replace(" ", "_"), config, **change))


def _with(out_dir: Path, config: dict, **changes) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps({**config, **changes}))
    return out_dir
