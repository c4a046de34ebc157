"""The supported-architecture table of docs/models/base_models.md, generated from the registry.

`python -m lorax_server.models.catalog > docs/models/base_models.md` rewrites the page; a test checks
that the committed page equals this output.
"""

from __future__ import annotations

from ..encoders.config import ENCODER_ARCHITECTURES
from .registry import REGISTRY

FAMILY_NOTES = {
    "llama": "Llama 1/2/3, CodeLlama, Solar (llama layout); Mistral, Zephyr (sliding window)",
    "qwen2": "Qwen2 (q/k/v bias; sliding window where configured)",
    "gemma": "Gemma (GeGLU, (1+w) RMSNorm, scaled embeddings)",
    "gemma2": "Gemma2 (sandwich norms, logit soft-capping, alternating sliding/global layers)",
    "phi3": "Phi-3 (fused qkv_proj / gate_up_proj)",
    "phi": "Phi-2 (parallel block, partial rotary, biases, LayerNorm)",
    "mixtral": "Mixtral (sparse top-2 MoE; adapters on attention and on each expert's w1/w2/w3)",
    "qwen": "Qwen v1 (remote-code layout: fused c_attn with bias; context capped at seq_length)",
    "dbrx": "DBRX (sparse MoE with stacked experts, clip_qkv, bias-free LayerNorm; adapters on attention)",
    "cohere": "Command-R (parallel block, bias-free LayerNorm, logit_scale, optional q/k norm)",
    "gpt2": "GPT-2 (learned positions, Conv1D weights, fused c_attn; adapters use fan_in_fan_out)",
    "bloom": "BLOOM (ALiBi, embedding LayerNorm, per-head interleaved query_key_value)",
}

ENCODER_NOTES = {
    "bert": "BERT (learned positions, token type 0)",
    "roberta": "RoBERTa / XLM-RoBERTa (positions from padding_idx + 1)",
    "distilbert": "DistilBERT (no token types; learned or sinusoidal positions)",
}


def render() -> str:
    lines = [
        "# Supported base models",
        "",
        "Generated from the shard's architecture registry (`python -m lorax_server.models.catalog`).",
        "A model is served when `architectures[0]` of its `config.json` is listed here; LoRA adapters may",
        "target the modules in the last column.",
        "",
        "| `architectures[0]` | family | adaptable modules |",
        "|---|---|---|",
    ]
    for name, spec in sorted(REGISTRY.items()):
        modules = ", ".join(f"`{m}`" for m in spec.adaptable_modules)
        lines.append(f"| `{name}` | {FAMILY_NOTES.get(spec.family, spec.family)} | {modules} |")
    lines += [
        "",
        "## Encoder models",
        "",
        "Served for embeddings and token classification, not for generation and without adapters; see",
        "[Embeddings and token classification](../embeddings.md).",
        "",
        "| `architectures[0]` | family | serves |",
        "|---|---|---|",
    ]
    for name, family in sorted(ENCODER_ARCHITECTURES.items()):
        serves = "`/embed`, `/classify`" if name.endswith("ForTokenClassification") else "`/embed`"
        lines.append(f"| `{name}` | {ENCODER_NOTES[family]} | {serves} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
