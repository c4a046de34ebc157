"""Which checkpoints are encoders, what their config.json says, and where each family keeps its weights."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class EncoderLayout:
    """Weight names of one family, relative to the encoder's root (`{i}`: the layer index).

    `prefix` is the base model's name in task checkpoints (`bert.`, `roberta.`, `distilbert.`); a
    checkpoint of the bare base model stores the same names without it. `token_type` is None where the
    family has no token-type embedding. Every linear and LayerNorm here has a bias."""

    prefix: str
    word: str = "embeddings.word_embeddings"
    position: str = "embeddings.position_embeddings"
    token_type: str | None = "embeddings.token_type_embeddings"
    embed_norm: str = "embeddings.LayerNorm"
    layer: str = "encoder.layer.{i}"
    query: str = "attention.self.query"
    key: str = "attention.self.key"
    value: str = "attention.self.value"
    attn_out: str = "attention.output.dense"
    attn_norm: str = "attention.output.LayerNorm"
    up: str = "intermediate.dense"
    down: str = "output.dense"
    out_norm: str = "output.LayerNorm"
    classifier: str = "classifier"  # the token-classification head, outside the prefix


BERT = EncoderLayout(prefix="bert.")
ROBERTA = EncoderLayout(prefix="roberta.")  # XLM-RoBERTa's checkpoints use the same names
DISTILBERT = EncoderLayout(
    prefix="distilbert.",
    token_type=None,
    layer="transformer.layer.{i}",
    query="attention.q_lin",
    key="attention.k_lin",
    value="attention.v_lin",
    attn_out="attention.out_lin",
    attn_norm="sa_layer_norm",
    up="ffn.lin1",
    down="ffn.lin2",
    out_norm="output_layer_norm",
)
LAYOUTS = {"bert": BERT, "roberta": ROBERTA, "distilbert": DISTILBERT}

# `architectures[0]` → family. Every checkpoint that holds the whole encoder: the bare model, the
# masked-LM and pre-training ones, and the classifiers (whose sequence-classification head goes unused:
# they serve embeddings only). `*ForTokenClassification` also serves Classify.
_CLASSES = {"Bert": "bert", "Roberta": "roberta", "XLMRoberta": "roberta", "DistilBert": "distilbert"}
_HEADS = ("Model", "ForMaskedLM", "ForTokenClassification", "ForSequenceClassification")
ENCODER_ARCHITECTURES: dict[str, str] = {
    **{name + head: family for name, family in _CLASSES.items() for head in _HEADS},
    "BertForPreTraining": "bert",
}
# A config.json without `architectures`: its model_type decides (the bare model).
_MODEL_TYPES = {
    "bert": "BertModel",
    "roberta": "RobertaModel",
    "xlm-roberta": "XLMRobertaModel",
    "distilbert": "DistilBertModel",
}


def encoder_architecture(cfg: dict[str, Any]) -> str | None:
    """The architecture name when config.json (`cfg`) describes an encoder served here, else None."""
    archs = cfg.get("architectures") or []
    if archs:
        return archs[0] if archs[0] in ENCODER_ARCHITECTURES else None
    return _MODEL_TYPES.get(cfg.get("model_type", ""))


def read_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json")
    return json.loads(path.read_text())


def is_encoder_dir(model_dir: str | Path) -> bool:
    """Whether the model directory holds an encoder that `lorax_server.encoders` serves."""
    return encoder_architecture(read_config(model_dir)) is not None


@dataclass(frozen=True)
class EncoderConfig:
    """The hyper-parameters of an encoder, in one vocabulary for every family."""

    architecture: str
    family: str  # "bert" | "roberta" | "distilbert" (a LAYOUTS key)
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    hidden_act: str
    layer_norm_eps: float
    max_position_embeddings: int
    pad_token_id: int
    # RoBERTa numbers its positions from padding_idx + 1 (and gives pad tokens padding_idx): the first
    # rows of its position table are never a real token's.
    position_offset: int
    sinusoidal_positions: bool  # DistilBERT's sinusoidal_pos_embds: the table is computed when not stored
    token_classification: bool  # a *ForTokenClassification checkpoint: Classify is served
    id2label: dict[int, str]
    eos_token_ids: tuple[int, ...]
    torch_dtype: str | None

    @property
    def layout(self) -> EncoderLayout:
        return LAYOUTS[self.family]

    @property
    def max_input_length(self) -> int:
        """The most tokens one input may have (the positions the table holds past the offset)."""
        return self.max_position_embeddings - self.position_offset

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> EncoderConfig:
        return cls.from_hf(read_config(model_dir))

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> EncoderConfig:
        """ValueError with the reason for a config that is no encoder served here."""
        arch = encoder_architecture(cfg)
        if arch is None:
            raise ValueError(f"{(cfg.get('architectures') or [cfg.get('model_type')])[0]} is not an encoder model")
        family = ENCODER_ARCHITECTURES[arch]
        keys = _distilbert_keys(cfg) if family == "distilbert" else cfg
        _check_supported(keys, arch)
        required = ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers")
        missing = [k for k in required if k not in keys]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}")
        if keys["hidden_size"] % keys["num_attention_heads"]:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        pad = keys.get("pad_token_id")
        pad = int(pad) if pad is not None else (1 if family == "roberta" else 0)
        eos = keys.get("eos_token_id")
        return cls(
            architecture=arch,
            family=family,
            vocab_size=int(keys["vocab_size"]),
            hidden_size=int(keys["hidden_size"]),
            num_layers=int(keys["num_hidden_layers"]),
            num_heads=int(keys["num_attention_heads"]),
            intermediate_size=int(keys.get("intermediate_size") or 4 * keys["hidden_size"]),
            hidden_act=keys.get("hidden_act") or "gelu",
            layer_norm_eps=float(keys.get("layer_norm_eps", 1e-12)),
            max_position_embeddings=int(keys.get("max_position_embeddings", 512)),
            pad_token_id=pad,
            position_offset=pad + 1 if family == "roberta" else 0,
            sinusoidal_positions=bool(keys.get("sinusoidal_pos_embds", False)),
            token_classification=arch.endswith("ForTokenClassification"),
            id2label={int(k): str(v) for k, v in (keys.get("id2label") or {}).items()},
            eos_token_ids=tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None),
            torch_dtype=keys.get("torch_dtype") or keys.get("dtype"),
        )


def _distilbert_keys(cfg: dict[str, Any]) -> dict[str, Any]:
    """DistilBERT's own config names → BERT's; its LayerNorms' epsilon is fixed at 1e-12."""
    renamed = {"dim": "hidden_size", "n_heads": "num_attention_heads", "n_layers": "num_hidden_layers"}
    out = {**cfg, **{ours: cfg[theirs] for theirs, ours in renamed.items() if theirs in cfg}}
    out["intermediate_size"] = cfg.get("hidden_dim")
    out["hidden_act"] = cfg.get("activation", "gelu")
    out["layer_norm_eps"] = 1e-12
    return out


def _check_supported(cfg: dict[str, Any], arch: str) -> None:
    """Refuse the variants this encoder does not compute (rather than compute them wrong)."""
    kind = cfg.get("position_embedding_type", "absolute")
    if kind not in (None, "absolute"):
        raise ValueError(f"{arch}: position_embedding_type {kind!r} is not supported (only absolute positions)")
    if cfg.get("is_decoder"):
        raise ValueError(f"{arch}: a decoder configuration (is_decoder) is not an encoder served here")
