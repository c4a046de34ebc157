"""Embedding throughput: the launcher serving an encoder over HTTP (`/embed`, many clients at once)
against sentence-transformers' `encode` in-process on the same texts, at its best batch size among 16,
32 and 64, measured in the same run.

The model is a random BERT of bge-small's shape (hidden 384, 12 layers, 12 heads, 33M parameters
without its embeddings), saved as a sentence-transformers model with CLS pooling and normalisation
(bge's modules). Texts are 16-128 tokens, like the generation benchmarks' prompts. Every served vector
is checked against sentence-transformers' before the times count.

    .venv/bin/python bench/embeddings.py --texts 256 --rounds 2
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
from transformers import BertConfig, BertModel, BertTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_server import serve  # noqa: E402

SHAPE = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=12, intermediate_size=1536)
BATCH_SIZES = (16, 32, 64)


def make_embedder(out: Path, words: list[str]) -> Path:
    """A random bge-small-shaped BERT whose WordPiece vocabulary holds `words` whole."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *letters, *(f"##{c}" for c in letters)]
    tokenizer = BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(vocab), max_position_embeddings=512, **SHAPE)).eval()
    model.save_pretrained(out / "bert")
    tokenizer.save_pretrained(out / "bert")
    encoder = Transformer(str(out / "bert"))
    pooling = Pooling(encoder.get_embedding_dimension(), pooling_mode="cls")
    SentenceTransformer(modules=[encoder, pooling, Normalize()], device="cpu").save(str(out / "st"))
    return out / "st"


def make_texts(count: int, words: list[str], seed: int = 0) -> list[str]:
    """`count` texts of 14-126 known words (16-128 tokens with [CLS] and [SEP])."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(words, k=rng.randint(14, 126))) for _ in range(count)]


def time_encode(model: SentenceTransformer, texts: list[str], batch_size: int) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    vectors = model.encode(texts, batch_size=batch_size, convert_to_numpy=True)
    return time.perf_counter() - start, vectors


def time_http(url: str, texts: list[str], clients: int) -> tuple[float, np.ndarray]:
    """Every text a `/embed` request, `clients` in flight at once."""
    session = requests.Session()
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=clients))

    def embed(text: str) -> list[float]:
        r = session.post(f"{url}/embed", json={"inputs": text}, timeout=600)
        r.raise_for_status()
        return r.json()["embeddings"]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        vectors = list(pool.map(embed, texts))
    return time.perf_counter() - start, np.array(vectors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2, help="rounds in turns; each system's best counts")
    parser.add_argument("--clients", type=int, default=64, help="HTTP requests in flight at once")
    args = parser.parse_args()
    rng = random.Random(1)
    words = sorted({"".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 8))) for _ in range(3000)})
    texts = make_texts(args.texts, words)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_embedder(Path(tmp), words)
        reference = SentenceTransformer(str(model_dir), device="cpu")
        tokens = sum(len(ids) for ids in reference.tokenizer(texts).input_ids)
        best: dict[str, float] = {}
        flags = ("--max-input-length", "512", "--max-total-tokens", "512", "--max-batch-prefill-tokens", "4096")
        with serve(model_dir, *flags, log_dir=Path(tmp)) as url:
            time_http(url, texts[:16], args.clients)  # the first calls' one-time costs
            for _ in range(args.rounds):
                for b in BATCH_SIZES:
                    seconds, want = time_encode(reference, texts, b)
                    name = f"sentence-transformers encode, batch {b}"
                    best[name] = min(best.get(name, float("inf")), seconds)
                seconds, got = time_http(url, texts, args.clients)
                error = float(np.abs(got - want).max())
                assert error < 1e-4, f"served vectors differ from sentence-transformers' by {error}"
                name = f"lorax /embed over HTTP, {args.clients} clients"
                best[name] = min(best.get(name, float("inf")), seconds)
    baseline = min(v for k, v in best.items() if k.startswith("sentence"))
    print(f"{args.texts} texts, {tokens} tokens (16-128 each), best of {args.rounds} rounds; largest error {error:.1e}")
    print("| system | seconds | texts/s | tokens/s | vs best sentence-transformers |")
    print("|---|---:|---:|---:|---:|")
    for name, seconds in best.items():
        n = args.texts / seconds
        print(f"| {name} | {seconds:.2f} | {n:.1f} | {tokens / seconds:.0f} | {baseline / seconds:.2f} |")


if __name__ == "__main__":
    main()
