"""Tiny random models and a tokenizer, built in the tests with transformers (no network)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention stores keys and values in fixed-size blocks.",
    "LoRA adapters add a low-rank update to frozen weights: W + B A.",
    "Zürich, São Paulo, 東京 and Kraków are cities; emoji 🙂🚀 are bytes too.",
    "def add(a, b):\n    return a + b\n",
    "1 + 1 = 2, 2 + 3 = 5, 10 - 4 = 6.",
] * 4


def make_tokenizer(out_dir: Path, vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with <s>/</s> specials that prepends <s> like Llama's."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(out_dir)
    return fast


def save_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "generation_config.json").write_text(
        json.dumps({"bos_token_id": tokenizer.bos_token_id, "eos_token_id": [tokenizer.eos_token_id]})
    )
    return out_dir


def tiny_config_kwargs(tokenizer: PreTrainedTokenizerFast) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def make_model(config_cls: type, model_cls: type, out_dir: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random model of any transformers family (GQA where the family has it), saved with our tokenizer.

    Tiny defaults the family's config does not know (GPT-2 has no `num_key_value_heads`, its MLP width is
    `n_inner`) are left out rather than saved as stray keys; `overrides` always apply."""
    tokenizer = make_tokenizer(out_dir)
    torch.manual_seed(seed)
    defaults = tiny_config_kwargs(tokenizer)
    if dataclasses.is_dataclass(config_cls):
        known = {f.name for f in dataclasses.fields(config_cls)} | set(config_cls.attribute_map)
        defaults = {k: v for k, v in defaults.items() if k in known}
    config = config_cls(**{**defaults, **overrides}, architectures=[model_cls.__name__])
    return save_model(model_cls(config).eval(), tokenizer, out_dir)


def make_llama(out_dir: Path, seed: int = 0, **overrides) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer(out_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(**{**tiny_config_kwargs(tokenizer), **overrides}, architectures=["LlamaForCausalLM"])
    return save_model(LlamaForCausalLM(config).eval(), tokenizer, out_dir)


def make_mistral(out_dir: Path, seed: int = 0, sliding_window: int = 6, **overrides) -> Path:
    from transformers import MistralConfig, MistralForCausalLM

    tokenizer = make_tokenizer(out_dir)
    torch.manual_seed(seed)
    config = MistralConfig(
        **{**tiny_config_kwargs(tokenizer), **overrides},
        sliding_window=sliding_window,
        architectures=["MistralForCausalLM"],
    )
    return save_model(MistralForCausalLM(config).eval(), tokenizer, out_dir)


def make_lora_adapter(
    base_dir: Path, out_dir: Path, seed: int, stored_dtype: torch.dtype | None = None, **lora_kwargs
) -> Path:
    """A peft LoRA adapter of `base_dir` with random, clearly non-zero A and B (saved to `out_dir`), its
    file's tensors in `stored_dtype` when given (as adapters trained in 16 bits are often shipped)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(init_lora_weights=False, **lora_kwargs))
    # Larger than peft's default init so adapters visibly change the greedy path.
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(out_dir)
    if stored_dtype is not None:
        from safetensors.torch import load_file, save_file

        path = Path(out_dir) / "adapter_model.safetensors"
        tensors = {k: v.to(stored_dtype).contiguous() for k, v in load_file(path).items()}
        save_file(tensors, path, metadata={"format": "pt"})
    return out_dir
