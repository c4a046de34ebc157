"""An architecture without a native spec (OPT) is served through transformers over HTTP: greedy
tokens equal transformers, and a request naming an adapter gets a clear 422."""

from __future__ import annotations

from pathlib import Path

import requests
import torch
import transformers
from conftest import launch
from tiny_models import make_model
from transformers import AutoModelForCausalLM, AutoTokenizer


def test_opt_is_served_by_the_fallback(tmp_path: Path) -> None:
    model_dir = make_model(
        transformers.OPTConfig,
        transformers.OPTForCausalLM,
        tmp_path / "opt",
        ffn_dim=128,
        word_embed_proj_dim=64,
        num_key_value_heads=None,
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = "The quick brown fox"
    with torch.no_grad():
        seq = torch.tensor([tok(prompt).input_ids])
        for _ in range(6):
            seq = torch.cat([seq, ref(seq).logits[:, -1:].argmax(-1)], dim=1)
    want = seq[0, -6:].tolist()
    with launch(model_dir, tmp_path) as server:
        body = {"inputs": prompt, "parameters": {"max_new_tokens": 6, "ignore_eos_token": True, "details": True}}
        r = requests.post(f"{server.url}/generate", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert [t["id"] for t in r.json()["details"]["tokens"]] == want
        body["parameters"]["adapter_id"] = "org/some-lora"
        r = requests.post(f"{server.url}/generate", json=body, timeout=60)
        assert r.status_code == 422 and "does not support dynamic adapter loading" in r.json()["error"], r.text
