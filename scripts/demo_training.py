"""How the demo model is made (the training half of `train_demo.py`): the byte-level BPE tokenizer
trained on the corpus, the tiny Llama, packing documents into rows, and the seeded training loop."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from demo_data import BOS, CHAT_TEMPLATE, EOS, PAD, ROLE_TOKENS, SPECIAL_TOKENS, UNK, Segment

# ---------------------------------------------------------------------------------------------------
# Tokenizer.
# ---------------------------------------------------------------------------------------------------


def train_tokenizer(docs: list[list[Segment]], vocab_size: int):
    """Byte-level BPE (GPT-2 style: a word's leading space is part of its token) with Llama-style
    specials; returns a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def plain(doc: list[Segment]):  # merges are learnt on the text around special tokens only
        doc = "".join(text for text, _ in doc)
        for special in SPECIAL_TOKENS:
            doc = doc.replace(special, "\n")
        return doc

    tok.train_from_iterator((plain(d) for d in docs), trainer=trainer)
    # The corpus may saturate the merges below `vocab_size`: pad with reserved special tokens to a
    # multiple of 64, so the vocabulary splits evenly across tensor-parallel shards.
    tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(-tok.get_vocab_size() % 64)])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS}:0 $A:0",
                pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
                special_tokens=[(BOS, bos_id)],
            ),
        ]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens=ROLE_TOKENS,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    assert [fast.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    return fast


# ---------------------------------------------------------------------------------------------------
# Model and training.
# ---------------------------------------------------------------------------------------------------


def make_model(vocab_size: int, args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        initializer_range=0.02,
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config)


def pack(docs: list[list[Segment]], tokenizer, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize documents segment by segment (specials are in the text) and cut the concatenation
    into rows; returns ids [n, block] and a mask [n, block] of the tokens the loss is taken on."""
    ids: list[int] = []
    mask: list[bool] = []
    texts = [text for doc in docs for text, _ in doc]
    trained = [flag for doc in docs for _, flag in doc]
    for enc, flag in zip(tokenizer(texts, add_special_tokens=False)["input_ids"], trained, strict=True):
        ids.extend(enc)
        mask.extend([flag] * len(enc))
    n = len(ids) // block
    return (
        torch.tensor(ids[: n * block], dtype=torch.long).view(n, block),
        torch.tensor(mask[: n * block], dtype=torch.bool).view(n, block),
    )


def check_segmentation(docs: list[list[Segment]], tokenizer) -> None:
    """Segments must cut at token boundaries: per-segment tokenization equals whole-document."""
    for doc in docs:
        whole = tokenizer("".join(t for t, _ in doc), add_special_tokens=False)["input_ids"]
        parts = [i for t, _ in doc for i in tokenizer(t, add_special_tokens=False)["input_ids"]]
        assert whole == parts, doc


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, rows: torch.Tensor, mask: torch.Tensor, args) -> float:
    """AdamW + warmup/cosine over `args.steps` batches of packed rows; returns wall seconds.

    The loss weights answer tokens (`mask`) 1 and prompt tokens `args.prompt_loss_weight`."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(rows.shape[0], generator=gen)
    model.train()
    start, cursor = time.time(), 0
    for step in range(args.steps):
        if cursor + args.batch > len(order):
            order, cursor = torch.randperm(rows.shape[0], generator=gen), 0
        picked = order[cursor : cursor + args.batch]
        batch = rows[picked]  # [batch, block]
        weights = torch.where(mask[picked, 1:], 1.0, args.prompt_loss_weight)  # [batch, block - 1]
        cursor += args.batch
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        logits = model(input_ids=batch).logits  # [batch, block, vocab]
        token_loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch[:, 1:], reduction="none")
        loss = (token_loss * weights).sum() / weights.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == args.steps - 1:
            answer_loss = token_loss.detach()[mask[picked, 1:]].mean().item()
            print(f"step {step:4d}  loss {loss.item():.4f}  answer loss {answer_loss:.4f}  ", end="")
            print(f"lr {lr_at(step, args):.2e}  {time.time() - start:6.1f}s", flush=True)
    model.eval()
    return time.time() - start
