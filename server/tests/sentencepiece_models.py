"""A real SentencePiece tokenizer (the Llama/Mistral kind) and a tiny Llama that generates chosen text.

The tokenizer is Mistral 7B's `tokenizer.model` (SentencePiece BPE, 32000 pieces, `▁` word starts,
`<0xNN>` byte-fallback pieces), shipped as a data file by the `mistral_common` package and converted
to `tokenizer.json` by transformers' own converter, as a Llama/Mistral repo on the Hub ships it.

The model is a `LlamaForCausalLM` whose greedy output is chosen in advance: attention and MLP outputs
are zeroed (o_proj, down_proj), so the last hidden state is the current token's embedding; the tokens
that matter get orthogonal embeddings, and the LM head maps each one to its successor with a wide
margin. The server still runs every layer, the paged cache, sampling and detokenization for real;
only the weights are arranged so that the output contains the pieces a test wants (leading and
repeated spaces, accents, CJK, emoji, byte-fallback pieces, EOS).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

SPECIALS = {"<unk>": 0, "<s>": 1, "</s>": 2}
EOS = SPECIALS["</s>"]
HIDDEN = 64
MARGIN = 80.0  # logit of the chosen successor; every other token gets 0


@dataclass(frozen=True)
class Case:
    """A prompt, the pieces the forced model generates after it (then `</s>`), and the text they make."""

    name: str
    prompt: str
    pieces: tuple[str, ...]
    text: str  # generated_text: the pieces read after the prompt, so a word's leading space stays


CASES = (
    Case("spaces", "Say:", ("▁end", "▁▁"), " end  "),
    Case(
        "accents",
        "  Some  accents,   très",
        ("▁café", "▁na", "ï", "ve", "▁—", "▁déjà", "▁vu"),
        " café naïve — déjà vu",
    ),
    Case("cjk", "Q: 東京?", ("▁", "你", "好", "，", "世", "界", "。"), " 你好，世界。"),
    # The prompt ends inside byte-fallback pieces (ǅ is <0xC7> <0x85>); 🦙 is four byte pieces.
    Case("emoji_bytes", "ǅ", ("😀", "<0xF0>", "<0x9F>", "<0xA6>", "<0x99>", "☃"), "😀🦙☃"),
)
# With ignore_eos the generation goes on after </s>: "Say:" → ▁end ▁▁ </s> ▁again </s> ▁again ...
AFTER_EOS = "▁again"
IGNORE_EOS_TEXT = {5: " end   again", 7: " end   again again"}  # by max_new_tokens; </s> left out
CUT_SHORT = {3: "😀\ufffd\ufffd"}  # the emoji case stopped two bytes into 🦙 (by max_new_tokens)


def sentencepiece_model_file() -> Path:
    """Mistral's SentencePiece model as the `mistral_common` wheel ships it (a test dependency)."""
    spec = importlib.util.find_spec("mistral_common")  # the file only: the package is never imported
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the test extras are not installed: pip install -e 'server[test]' (mistral_common)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: mistral_common no longer ships Mistral's tokenizer.model.v1")
    return path


def convert_tokenizer(out_dir: Path):  # noqa: ANN201 - a transformers tokenizer
    """Convert the SentencePiece model to `tokenizer.json` (+ `tokenizer_config.json`) in `out_dir`,
    adding `<s>` to encoded prompts as Llama's does; returns the tokenizer loaded from those files."""
    import shutil

    from transformers import AutoTokenizer, LlamaTokenizer

    source = out_dir / "sentencepiece"
    source.mkdir(parents=True, exist_ok=True)
    shutil.copy(sentencepiece_model_file(), source / "tokenizer.model")
    LlamaTokenizer.from_pretrained(source, add_bos_token=True, legacy=False).save_pretrained(out_dir)
    (out_dir / "tokenizer.model").unlink(missing_ok=True)  # the server reads tokenizer.json only
    shutil.rmtree(source)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<unk>", "<s>", "</s>", "<0x00>"]
    return tokenizer


def successor_map(chains: Sequence[Sequence[int]]) -> dict[int, int]:
    """token → the token generated after it, from chains `[start, t1, t2, ...]` (start: a prompt's
    last token). Every token leads to one successor only, so chains may meet but never fork."""
    successors: dict[int, int] = {}
    for chain in chains:
        for current, following in zip(chain, chain[1:], strict=False):
            if successors.setdefault(current, following) != following:
                raise ValueError(f"token {current} would need two successors: {successors[current]}, {following}")
    if len(successors) > HIDDEN:
        raise ValueError(f"{len(successors)} tokens with a successor; the model has room for {HIDDEN}")
    return successors


def prompt_ids(model_dir: Path, prompt: str) -> list[int]:
    """The prompt as the router tokenizes it: `tokenizer.json` with the `tokenizers` library, `<s>` added."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(prompt).ids


def make_forced_llama(out_dir: Path, cases: Sequence[Case] = CASES, seed: int = 0) -> Path:
    """A tiny Llama over the converted tokenizer that greedily answers each case's prompt with its
    pieces and `</s>`, and `AFTER_EOS` after every `</s>`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = convert_tokenizer(out_dir)
    chains = [
        [prompt_ids(out_dir, case.prompt)[-1], *tokenizer.convert_tokens_to_ids(list(case.pieces)), EOS]
        for case in cases
    ]
    again = tokenizer.convert_tokens_to_ids(AFTER_EOS)
    successors = successor_map([*chains, [EOS, again, EOS]])
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=SPECIALS["<s>"],
        eos_token_id=EOS,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # the residual stream keeps the token's own embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        basis = torch.eye(HIDDEN)
        embed, head = model.model.embed_tokens.weight, model.lm_head.weight
        head.zero_()
        for k, (token, following) in enumerate(sorted(successors.items())):
            embed[token] = basis[k] * HIDDEN**0.5  # RMSNorm turns it into 8 * basis[k]
            head[following] += basis[k] * (MARGIN / HIDDEN**0.5)
    model.save_pretrained(out_dir)
    (out_dir / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [EOS]}))
    return out_dir
