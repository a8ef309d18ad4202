"""Building output tokenizers as mergekit 0.1.5 does: the donor stripped to its model's rows,
and the union of several tokenizers (donor's vocabulary first, new tokens appended)."""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

LOG = logging.getLogger(__name__)


def stripped_tokenizer(model_dir: Path, vocab_size_of: Callable[[Path], int | None]) -> Any:
    """The model's fast tokenizer without the tokens whose id is >= the model's vocab_size.

    Only BPE tokenizers can be stripped (merges that read or produce a dropped token go too).
    """
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tokenizer: Any = AutoTokenizer.from_pretrained(str(model_dir), use_fast=True)
    vocab = tokenizer.get_vocab()
    size = vocab_size_of(model_dir) or len(vocab)
    unused = {tok for tok, idx in vocab.items() if idx >= size}
    if not unused:
        return tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"tokenizer of {model_dir} has tokens beyond vocab_size {size} and no fast version"
        )
    spec = json.loads(tokenizer._tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise ValueError(
            f"tokenizer of {model_dir} has tokens beyond vocab_size {size}; only a BPE "
            f"tokenizer can be stripped for a tokenizer merge, this one is {spec['model']['type']}"
        )
    spec["added_tokens"] = [e for e in spec["added_tokens"] if e["id"] < size]
    for tok in unused:
        spec["model"]["vocab"].pop(tok, None)
    spec["model"]["merges"] = [m for m in spec["model"]["merges"] if not _uses(m, unused)]
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(spec))
    return tokenizer


def _uses(merge: Any, tokens: set[str]) -> bool:
    """A merge that reads or produces a dropped token (mergekit checks only what it reads, and
    then fails to load a tokenizer whose kept merge produces a dropped token)."""
    parts = merge.split(" ") if isinstance(merge, str) else list(merge)
    return any(part in tokens for part in parts) or "".join(parts) in tokens


def union_tokenizer(
    tokenizers: Mapping[str, Any], donor: str, vocab_sizes: Mapping[str, int | None]
) -> Any:
    """A copy of the donor's tokenizer plus every other model's tokens it lacks.

    Plain tokens are appended first (model by model, each in its id order), then added tokens
    (first model's settings win when two models add the same token differently). Tokens at
    ids >= a model's vocab_size are left out.
    """
    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    order = [donor, *(name for name in tokenizers if name != donor)]
    for name in order:
        tokenizer = tokenizers[name]
        size = vocab_sizes.get(name) or tokenizer.vocab_size
        for tok, idx in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
            if idx < size:
                plain.setdefault(tok, None)
        for idx, info in sorted(tokenizer.added_tokens_decoder.items()):
            if idx >= size:
                continue
            if info.content in added and added[info.content] != info:
                LOG.warning(
                    "token %r is added with different settings; using the first", info.content
                )
            added.setdefault(info.content, info)
    result = _copy_tokenizer(tokenizers[donor])
    donor_vocab = tokenizers[donor].get_vocab()
    new_plain = [tok for tok in plain if tok not in added and tok not in donor_vocab]
    if new_plain:  # one call each: per-token calls rebuild the added-token trie every time
        result.add_tokens(new_plain)
    if added:
        result.add_tokens(list(added.values()))
    return result


def _copy_tokenizer(tokenizer: Any) -> Any:
    """A fresh tokenizer object from a save/load round trip (the donor stays untouched)."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return AutoTokenizer.from_pretrained(tmp, use_fast=True)
