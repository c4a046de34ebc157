"""Encoder models (BERT family) through the real launcher, as LoRAX users call them: `/embed` and
`/classify`/`/classify_batch` with `lorax-client`, `/v1/embeddings` with the `openai` client. The
references are sentence-transformers (embeddings: its pooling and normalisation) and transformers'
token-classification pipeline with `aggregation_strategy="simple"` (entities)."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from conftest import launch
from lorax import Client
from openai import OpenAI
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
from transformers import BertConfig, BertForTokenClassification, BertModel, BertTokenizerFast, pipeline

TEXTS = [
    "Johnny lives in London and works for Acme.",
    "Maria Keller visited São Paulo in May.",
    "The quick brown fox",
    "Zürich",
]
WORDS = ["johnny", "lives", "in", "london", "and", "works", "for", "acme", "maria", "keller", "visited", "são",
         "paulo", "may", "the", "quick", "brown", "fox", "zürich"]  # fmt: skip
LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]


def bert_dir(out: Path, seed: int, head: bool) -> Path:
    """A tiny random BERT (with a token-classification head when `head`) and a WordPiece tokenizer."""
    out.mkdir(parents=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = sorted({c for w in WORDS for c in w} | set(".,"))
    vocab = specials + WORDS + letters + [f"##{c}" for c in letters] + ["##er", "##ing"]
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, do_lower_case=True)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, id2label=dict(enumerate(LABELS)),
                        label2id={label: i for i, label in enumerate(LABELS)})  # fmt: skip
    model = (BertForTokenClassification if head else BertModel)(config).eval()
    if head:  # confident, varied labels, so the entities have several groups of several tokens
        with torch.no_grad():
            model.classifier.weight.mul_(40.0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def embedder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sentence-transformers model: BERT, mean pooling, L2 normalisation (modules.json and all)."""
    tmp = tmp_path_factory.mktemp("embedder")
    encoder = Transformer(str(bert_dir(tmp / "bert", 1, head=False)))
    pooling = Pooling(encoder.get_embedding_dimension(), pooling_mode="mean")
    SentenceTransformer(modules=[encoder, pooling, Normalize()], device="cpu").save(str(tmp / "st"))
    return tmp / "st"


@pytest.fixture(scope="module")
def embedder(embedder_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    with launch(embedder_dir, tmp_path_factory.mktemp("embed-run"), "--max-input-length", "32",
                "--max-total-tokens", "32") as server:  # fmt: skip
        yield server


def reference_embeddings(model_dir: Path, texts: list[str]) -> np.ndarray:
    return SentenceTransformer(str(model_dir), device="cpu").encode(texts, convert_to_numpy=True)


def test_embed_equals_sentence_transformers(embedder, embedder_dir: Path) -> None:
    want = reference_embeddings(embedder_dir, TEXTS)
    client = Client(embedder.url)
    for text, expected in zip(TEXTS, want, strict=True):
        got = np.array(client.embed(text).embeddings)
        np.testing.assert_allclose(got, expected, atol=1e-5)
    info = requests.get(f"{embedder.url}/info", timeout=10).json()
    assert (info["supports_generation"], info["supports_embeddings"]) == (False, True), info
    assert info["embedding_dim"] == 32


def test_concurrent_embeds_are_each_their_own(embedder, embedder_dir: Path) -> None:
    """Requests batched into shared shard calls still get exactly their own vector."""
    texts = TEXTS * 6
    want = reference_embeddings(embedder_dir, texts)
    client = Client(embedder.url)
    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(lambda t: client.embed(t).embeddings, texts))
    np.testing.assert_allclose(np.array(got), want, atol=1e-5)


def test_openai_embeddings_float_and_base64(embedder, embedder_dir: Path) -> None:
    want = reference_embeddings(embedder_dir, TEXTS)
    client = OpenAI(base_url=f"{embedder.url}/v1", api_key="-")
    default = client.embeddings.create(model="embedder", input=TEXTS)  # the client asks for base64
    assert [d.index for d in default.data] == list(range(len(TEXTS)))
    np.testing.assert_allclose(np.array([d.embedding for d in default.data]), want, atol=1e-5)
    one = client.embeddings.create(model="embedder", input=TEXTS[0], encoding_format="float")
    np.testing.assert_allclose(np.array(one.data[0].embedding), want[0], atol=1e-5)
    assert one.usage.prompt_tokens > 0
    raw = requests.post(f"{embedder.url}/v1/embeddings", timeout=30,
                        json={"model": "m", "input": [TEXTS[1]], "encoding_format": "base64"}).json()  # fmt: skip
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, want[1], atol=1e-5)
    assert raw["embeddings"] == raw["data"]  # LoRAX's key beside OpenAI's


def test_encoder_limits_and_refusals(embedder) -> None:
    url = embedder.url
    too_long = " ".join(["fox"] * 40)
    r = requests.post(f"{url}/embed", json={"inputs": too_long}, timeout=30)
    assert r.status_code == 422 and "32" in r.json()["error"], r.text
    r = requests.post(f"{url}/embed", json={"inputs": ""}, timeout=30)
    assert r.status_code == 422, r.text
    r = requests.post(f"{url}/v1/embeddings", json={"model": "m", "input": []}, timeout=30)
    assert r.status_code == 422, r.text
    r = requests.post(f"{url}/generate", json={"inputs": "The fox", "parameters": {"max_new_tokens": 2}}, timeout=30)
    assert r.status_code == 422 and "/embed" in r.json()["error"], r.text
    r = requests.post(f"{url}/classify", json={"inputs": "The fox"}, timeout=30)
    assert r.status_code == 422, r.text
    # The server is unharmed.
    assert len(Client(url).embed("The fox").embeddings) == 32


@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return bert_dir(tmp_path_factory.mktemp("tagger") / "bert-ner", 2, head=True)


def reference_entities(model_dir: Path, text: str) -> list[dict]:
    ner = pipeline("token-classification", model=str(model_dir), aggregation_strategy="simple", device="cpu")
    return ner(text)


def test_classify_equals_the_token_classification_pipeline(tagger_dir: Path, tmp_path: Path) -> None:
    with launch(tagger_dir, tmp_path, "--max-input-length", "32", "--max-total-tokens", "32") as server:
        client = Client(server.url)
        groups = 0
        for text in TEXTS:
            got = client.classify(text).entities
            want = reference_entities(tagger_dir, text)
            assert [(e["entity_group"], e["start"], e["end"]) for e in got] == [
                (w["entity_group"], w["start"], w["end"]) for w in want
            ], (text, got, want)
            for e, w in zip(got, want, strict=True):
                assert e["score"] == pytest.approx(float(w["score"]), abs=1e-5)
                assert e["word"] == text[e["start"] : e["end"]]
            groups += len(got)
        assert groups >= len(TEXTS)  # the random head found entities to group
        batch = client.classify_batch(TEXTS)
        assert [b.entities for b in batch] == [client.classify(t).entities for t in TEXTS]
        info = requests.get(f"{server.url}/info", timeout=10).json()
        assert info["supports_classification"] is True, info
