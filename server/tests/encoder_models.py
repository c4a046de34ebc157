"""Tiny random encoders (BERT family) and sentence-transformers models, built in the tests (no network)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from transformers import BertTokenizerFast

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "zürich", "lives", "in", "london"]
VOCAB = SPECIALS + WORDS + [f"w{i}" for i in range(99 - len(SPECIALS) - len(WORDS))]  # 99 tokens
LABELS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}

_TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
_TINY_DISTILBERT = dict(dim=32, n_layers=2, n_heads=4, hidden_dim=48)

# architecture → (config class, overrides that make the family's variants bite)
ARCHITECTURES = {
    "BertModel": ("BertConfig", {"layer_norm_eps": 1e-5}),
    "BertForMaskedLM": ("BertConfig", {"hidden_act": "gelu_new"}),
    "BertForTokenClassification": ("BertConfig", {"hidden_act": "relu"}),
    "RobertaModel": ("RobertaConfig", {}),
    "RobertaForTokenClassification": ("RobertaConfig", {"layer_norm_eps": 1e-6}),
    "XLMRobertaModel": ("XLMRobertaConfig", {"hidden_act": "gelu_new"}),
    "XLMRobertaForTokenClassification": ("XLMRobertaConfig", {}),
    "DistilBertModel": ("DistilBertConfig", {"sinusoidal_pos_embds": True}),
    "DistilBertForTokenClassification": ("DistilBertConfig", {"activation": "relu"}),
}


def tokenizer(out_dir: Path) -> BertTokenizerFast:
    """A WordPiece tokenizer over VOCAB ([CLS] ... [SEP]), saved to `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tok = BertTokenizerFast(vocab_file=str(out_dir / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(out_dir)
    return tok


def make_encoder(architecture: str, out_dir: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random encoder of `architecture` (positions for 40 tokens) saved with a tokenizer. A
    token-classification head gets LABELS and a scaled-up classifier (confident, varied labels)."""
    config_name, variant = ARCHITECTURES[architecture]
    config_cls = getattr(transformers, config_name)
    tiny = _TINY_DISTILBERT if config_name == "DistilBertConfig" else _TINY
    kwargs = {**tiny, "vocab_size": len(VOCAB), "max_position_embeddings": 40, **variant, **overrides}
    if architecture.endswith("ForTokenClassification"):
        kwargs |= {"id2label": LABELS, "label2id": {v: k for k, v in LABELS.items()}}
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config_cls(**kwargs, architectures=[architecture])).eval()
    if hasattr(model, "classifier"):
        with torch.no_grad():
            model.classifier.weight.mul_(20.0)
    tokenizer(out_dir)
    model.save_pretrained(out_dir)
    return out_dir


def reference(model_dir: Path, inputs: list[list[int]]):  # noqa: ANN201 - a transformers ModelOutput
    """transformers' own forward of `inputs`, right-padded into one batch with an attention mask
    (hidden_states[-1] is the last hidden state for every head)."""
    config = transformers.AutoConfig.from_pretrained(model_dir)
    hf = getattr(transformers, config.architectures[0]).from_pretrained(model_dir, dtype=torch.float32).eval()
    longest, pad = max(len(ids) for ids in inputs), config.pad_token_id
    ids = torch.tensor([x + [pad] * (longest - len(x)) for x in inputs])
    mask = torch.tensor([[1] * len(x) + [0] * (longest - len(x)) for x in inputs])
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)


def make_sentence_transformer(out_dir: Path, base: Path, pooling_mode, dense=(), normalize: bool = False) -> Path:  # noqa: ANN001
    """A sentence-transformers model saved by sentence-transformers itself: the encoder at `base`, Pooling
    with `pooling_mode`, then a Dense module per (out_features, activation module, bias) in `dense`, then
    Normalize."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer

    encoder = Transformer(str(base))
    modules = [encoder, Pooling(encoder.get_embedding_dimension(), pooling_mode=pooling_mode)]
    width = modules[1].get_embedding_dimension()
    torch.manual_seed(1)
    for out_features, act, bias in dense:
        modules.append(Dense(width, out_features, bias=bias, activation_function=act))
        width = out_features
    if normalize:
        modules.append(Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(out_dir))
    return out_dir


def sentence_transformer_reference(model_dir: Path, inputs: list[list[int]]) -> torch.Tensor:
    """sentence-transformers' vectors for `inputs` (token ids), right-padded into one batch: [batch, dim]."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(model_dir), device="cpu").eval()
    longest = max(len(ids) for ids in inputs)
    features = {
        "input_ids": torch.tensor([x + [0] * (longest - len(x)) for x in inputs]),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (longest - len(x)) for x in inputs]),
    }
    with torch.no_grad():
        return st(features)["sentence_embedding"]
