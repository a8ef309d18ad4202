"""Tiny Llama checkpoints with different tokenizers, built in code (no hub), for tokenizer tests."""

from __future__ import annotations

import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = [f"w{i}" for i in range(20)]
SPECIALS = ["<unk>", "<s>", "</s>"]


def save_tokenizer(
    out: Path, words: list[str], added: list[str] = (), chat_template: str | None = None
) -> None:
    """A word-level fast tokenizer: specials first, then ``words``, then ``added`` special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    if added:
        tok.add_special_tokens({"additional_special_tokens": list(added)})
    if chat_template:
        tok.chat_template = chat_template
    tok.save_pretrained(str(out))


def save_llama(
    out: Path,
    *,
    seed: int,
    words: list[str],
    added: list[str] = (),
    chat_template: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A 1-layer Llama (hidden 16) whose vocabulary is exactly its tokenizer's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    n_vocab = len(SPECIALS) + len(words) + len(added)
    config = LlamaConfig(
        vocab_size=n_vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():  # distinct, non-trivial rows everywhere
        for param in model.parameters():
            param.normal_(0, 1)
    model.save_pretrained(str(out))
    save_tokenizer(out, words, added, chat_template)
    return out


def build_zoo(root: Path, dtype: torch.dtype = torch.float32) -> dict[str, Path]:
    """base: 20 words; chat: base + 3 added special tokens; other: 3 words dropped, 2 new ones."""
    other_words = [w for w in WORDS if w not in ("w3", "w7", "w19")] + ["x0", "x1"]
    return {
        "base": save_llama(root / "base", seed=0, words=WORDS, dtype=dtype),
        "chat": save_llama(
            root / "chat",
            seed=1,
            words=WORDS,
            added=["<|im_start|>", "<|im_end|>", "<tool>"],
            chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}",
            dtype=dtype,
        ),
        "other": save_llama(root / "other", seed=2, words=other_words, dtype=dtype),
    }


def save_bpe_llama(out: Path, *, seed: int, model_rows: int, vocab: dict[str, int] | None = None,
                   merges: list[tuple[str, str]] | None = None) -> Path:  # fmt: skip
    """A Llama with ``model_rows`` embedding rows and a BPE tokenizer, so the tokenizer's last
    tokens (ids >= model_rows) have no row, as in trimmed checkpoints."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = vocab or {"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4, "c": 5, "ab": 6,
                      "abc": 7, "<extra_0>": 8, "<extra_1>": 9}  # fmt: skip
    merges = merges or [("a", "b"), ("ab", "c")]
    core = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(str(out))
    config = LlamaConfig(vocab_size=model_rows, hidden_size=8, intermediate_size=16,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(str(out))
    return out
