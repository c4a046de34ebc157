"""Encoder models over gRPC, as the router calls them: a real `lorax-server serve` subprocess serving a
sentence-transformers model (Info, Warmup, Health, Embed, the generation RPCs refused), an in-process
grpc.aio service for a token classifier (Classify, Health's failure), a generating model's answers to
Embed and Classify, and the start-up options an encoder refuses."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from encoder_models import LABELS, make_encoder, make_sentence_transformer, reference, sentence_transformer_reference
from shard_process import EXE, in_process, run_shard

from lorax_server.pb import generate_pb2 as pb
from lorax_server.pb import generate_pb2_grpc as pb_grpc

INPUTS = [[2, 7, 8, 9, 3], [2, 3], [2, 11, 12, 13, 14, 15, 16, 17, 18, 19, 3]]


def _inputs(inputs: list[list[int]], first_id: int = 0) -> list[pb.EncoderInput]:
    return [pb.EncoderInput(id=first_id + i, input_ids=x) for i, x in enumerate(inputs)]


def _status(call, request) -> tuple[grpc.StatusCode, str]:  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as err:
        result = call(request)
        if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):  # a stream: read it
            list(result)
    return err.value.code(), err.value.details()


@pytest.fixture(scope="module")
def embedder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """BERT, mean pooling, a Tanh Dense module to 16 values, L2 normalisation (saved by sentence-transformers)."""
    tmp = tmp_path_factory.mktemp("embedder")
    base = make_encoder("BertModel", tmp / "bert")
    return make_sentence_transformer(tmp / "st", base, "mean", [(16, torch.nn.Tanh(), True)], normalize=True)


@pytest.fixture(scope="module")
def embedder(embedder_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[pb_grpc.LoraxServiceStub]:
    with run_shard(embedder_dir, tmp_path_factory.mktemp("sock"), "--kv-cache-blocks", "8") as (stub, _, sock):
        stub.sock = sock
        yield stub


def test_info_of_an_encoder(embedder) -> None:  # noqa: ANN001
    info = embedder.Info(pb.InfoRequest())
    assert (info.supports_generation, info.supports_embeddings, info.supports_classification) == (False, True, False)
    assert info.embedding_dim == 16 and info.max_position_embeddings == 40 and info.vocab_size == 99
    assert info.architecture == "BertModel" and info.dtype == "float32" and info.device_type == "cpu"
    assert not info.supports_adapters and not info.prefix_caching and info.speculate == 0 and info.block_size == 0
    assert not info.requires_padding and not info.HasField("quantize") and not info.HasField("window_size")
    assert list(embedder.ServiceDiscovery(pb.ServiceDiscoveryRequest()).urls) == [f"unix://{embedder.sock}"]


def test_warmup_health_and_embed_match_sentence_transformers(embedder, embedder_dir: Path) -> None:  # noqa: ANN001
    warm = embedder.Warmup(pb.WarmupRequest(max_input_length=64, max_prefill_tokens=200, max_total_tokens=256))
    assert warm.max_supported_total_tokens == 200  # no KV cache: the prefill budget is the bound
    embedder.Health(pb.HealthRequest())
    response = embedder.Embed(pb.EmbedRequest(inputs=_inputs(INPUTS, first_id=7)))
    assert [e.request_id for e in response.embeddings] == [7, 8, 9]
    got = torch.tensor([list(e.values) for e in response.embeddings])
    want = sentence_transformer_reference(embedder_dir, INPUTS)
    assert got.shape == (3, 16) and (got - want).abs().max().item() < 1e-5


def test_generation_rpcs_are_refused_and_clear_cache_is_a_no_op(embedder) -> None:  # noqa: ANN001
    refused = [
        (embedder.Prefill, pb.PrefillRequest(batch=pb.Batch(id=1))),
        (embedder.Decode, pb.DecodeRequest()),
        (embedder.DecodeStream, iter([pb.DecodeRequest()])),
        (embedder.FilterBatch, pb.FilterBatchRequest(batch_id=1)),
        (embedder.DownloadAdapter, pb.DownloadAdapterRequest()),
        (embedder.LoadAdapter, pb.LoadAdapterRequest(adapter_index=1)),
        (embedder.OffloadAdapter, pb.OffloadAdapterRequest(adapter_index=1)),
        (embedder.CompileGrammar, pb.CompileGrammarRequest()),
    ]
    for call, request in refused:
        code, details = _status(call, request)
        assert code == grpc.StatusCode.FAILED_PRECONDITION, (call, details)
        assert "serves embeddings/classification, not text generation" in details
    code, details = _status(embedder.Classify, pb.ClassifyRequest(inputs=_inputs(INPUTS)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "no token-classification head" in details
    embedder.ClearCache(pb.ClearCacheRequest())
    embedder.ClearCache(pb.ClearCacheRequest(id=3))


def test_bad_inputs_are_invalid_argument_and_the_shard_keeps_serving(embedder) -> None:  # noqa: ANN001
    cases = [
        ([], "the call has no inputs"),
        ([pb.EncoderInput(id=4, input_ids=[2, 3]), pb.EncoderInput(id=5)], "input 5: empty input"),
        ([pb.EncoderInput(id=6, input_ids=[2] * 41)], "input 6: 41 tokens, more than the 40 this model takes"),
        ([pb.EncoderInput(id=7, input_ids=[2, 120, 3])], "input 7: token id 120 is outside the vocabulary (99)"),
    ]
    for inputs, message in cases:
        code, details = _status(embedder.Embed, pb.EmbedRequest(inputs=inputs))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details == message
    code, _ = _status(embedder.Warmup, pb.WarmupRequest(max_input_length=0, max_prefill_tokens=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    embedder.Health(pb.HealthRequest())
    response = embedder.Embed(pb.EmbedRequest(inputs=[pb.EncoderInput(id=8, input_ids=[2] * 40)]))
    assert len(response.embeddings[0].values) == 16


@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_encoder("RobertaForTokenClassification", tmp_path_factory.mktemp("tagger"))


def test_classify_over_grpc_matches_the_token_classifier(tagger_dir: Path, tmp_path: Path) -> None:
    from lorax_server.encoders.engine import EncoderEngine
    from lorax_server.encoders.service import EncoderService

    engine = EncoderEngine.load(tagger_dir, torch.device("cpu"))
    with in_process(EncoderService(engine, ["unix://x"], engine.architecture), tmp_path) as stub:
        info = stub.Info(pb.InfoRequest())
        assert info.supports_classification and info.supports_embeddings and not info.supports_generation
        assert info.max_position_embeddings == 38 and info.embedding_dim == 32  # RoBERTa: 40 - padding_idx - 1
        assert list(info.eos_token_ids) == [2]
        response = stub.Classify(pb.ClassifyRequest(inputs=_inputs(INPUTS, first_id=20)))
        lists = response.classify_prediction_lists
        assert [p.request_id for p in lists] == [20, 21, 22]
        probs = torch.softmax(reference(tagger_dir, INPUTS).logits, dim=-1)
        for i, (p, ids) in enumerate(zip(lists, INPUTS, strict=True)):
            scores, labels = probs[i, : len(ids)].max(dim=-1)
            assert list(p.predictions) == [LABELS[j] for j in labels.tolist()]
            assert torch.allclose(torch.tensor(list(p.scores)), scores, atol=1e-5)
        cls = torch.tensor([list(e.values) for e in stub.Embed(pb.EmbedRequest(inputs=_inputs(INPUTS))).embeddings])
        assert torch.allclose(cls, reference(tagger_dir, INPUTS).hidden_states[-1][:, 0], atol=1e-5)
        code, details = _status(stub.Classify, pb.ClassifyRequest(inputs=[pb.EncoderInput(id=1, input_ids=[0] * 39)]))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "more than the 38" in details
        # Health fails with UNAVAILABLE while the forward pass fails, and recovers with it.
        stub.Health(pb.HealthRequest())
        forward = engine.model.forward
        engine.model.forward = lambda batch: torch.full((1, 32), float("nan"))
        code, details = _status(stub.Health, pb.HealthRequest())
        assert code == grpc.StatusCode.UNAVAILABLE and "non-finite" in details
        engine.model.forward = forward
        stub.Health(pb.HealthRequest())


def test_a_generating_model_refuses_embed_and_classify(llama_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from lorax_server.engine import CacheConfig, Engine
    from lorax_server.layers.attention import TorchAttention
    from lorax_server.models.loader import load_model
    from lorax_server.server import LoraxService

    model = load_model(llama_dir, TorchAttention(16), torch.device("cpu"), "float32")
    engine = Engine(model, AutoTokenizer.from_pretrained(llama_dir), CacheConfig(16, num_blocks=8))
    with in_process(LoraxService(engine, ["unix://x"], "LlamaForCausalLM"), tmp_path) as stub:
        info = stub.Info(pb.InfoRequest())
        assert info.supports_generation and not info.supports_embeddings and not info.supports_classification
        assert info.embedding_dim == 0
        for call, request in [
            (stub.Embed, pb.EmbedRequest(inputs=_inputs(INPUTS))),
            (stub.Classify, pb.ClassifyRequest(inputs=_inputs(INPUTS))),
        ]:
            code, details = _status(call, request)
            assert code == grpc.StatusCode.FAILED_PRECONDITION
            assert "LlamaForCausalLM generates text: Embed and Classify are served for encoder models" in details
        stub.Health(pb.HealthRequest())


@pytest.mark.parametrize(
    "flags, env, message",
    [
        (["--quantize", "bitsandbytes"], {}, "--quantize bitsandbytes: it is served unquantized"),
        (["--default-adapter-id", "org/lora"], {}, "--default-adapter-id (the launcher's --adapter-id): it takes no"),
        (["--default-adapter-id", "org/lora", "--merge-adapter-weights"], {}, "--merge-adapter-weights: it takes no"),
        (["--speculative-tokens", "3"], {}, "--speculative-tokens: it generates no tokens"),
        (["--sharded"], {"WORLD_SIZE": "2", "RANK": "0"}, "it cannot be sharded"),
    ],
)
def test_options_an_encoder_refuses_at_start(flags, env, message, tagger_dir: Path, monkeypatch) -> None:  # noqa: ANN001
    from lorax_server import cli

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    cfg = cli._shard_config(cli._parser().parse_args(["serve", str(tagger_dir), *flags]))
    with pytest.raises(SystemExit, match="RobertaForTokenClassification is an encoder model") as err:
        cli._serve_encoder(cfg, tagger_dir, torch.device("cpu"))
    assert message in str(err.value)


def test_the_real_command_exits_with_the_reason(tagger_dir: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [EXE, "serve", str(tagger_dir), "--uds-path", str(tmp_path / "s"), "--quantize", "bitsandbytes"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode != 0 and "--quantize bitsandbytes: it is served unquantized" in done.stderr
    assert not (tmp_path / "s-0").exists()
