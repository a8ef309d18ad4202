"""mergekit's tokenizer settings: the output vocabulary and where each input's rows go in it.

mergekit keys handled here: ``tokenizer_source: union | base | <model>``, the newer
``tokenizer:`` block (``source``, ``tokens: {tok: {source, force}}``, ``pad_to_multiple_of``)
and ``chat_template`` (a bundled name, ``auto`` or a literal Jinja template). Facts follow
mergekit 0.1.5 (``mergekit/tokenizer/``); where ckreg differs it says so below.

Interface used by the merge engine (``mergeops/mergekit`` planner)::

    settings = TokenizerSettings.from_mergekit(yaml_dict)     # None-safe: no keys -> inactive
    plan = plan_vocabulary(settings, model_dirs, base_model, out_dir)
    # plan is None when no tokenizer source is set: the donor's tokenizer files were copied
    # (re-serialised with the chat template when one is given) and no tensor changes.
    # Otherwise the output tokenizer is already saved in out_dir, config.json's vocab_size
    # must become plan.vocab_size, and every vocabulary tensor (embed_tokens, lm_head) goes
    # through remap_rows before merging:
    inputs = remap_rows({"ft-1": t1, "ft-2": t2, "base": t0}, plan, base_model="base")

``model_dirs`` maps each model's name as the YAML references it (``models[].model``,
``base_model``, ``tokens.<t>.source``) to its folder, in YAML order with the base included.
``plan.rows[name]`` is an int64 tensor: output token id -> that model's row, -1 when the model
lacks the token. Differences from mergekit: tokens new to the base are appended in the order
of the model that brings them (mergekit's order follows Python set/dict hashing and varies
between runs); a model whose tokenizer will not load is taken to share the base's (as
mergekit) but with a warning naming it.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, PositiveInt, model_validator

from mergeops.mergekit.chat_templates import resolve_chat_template
from mergeops.mergekit.vocab_rows import remap_rows

__all__ = [
    "ModelTokenEmbedding",
    "TokenEmbedding",
    "TokenizerSettings",
    "VocabPlan",
    "ZeroEmbedding",
    "plan_vocabulary",
    "remap_rows",
]

LOG = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


class ZeroEmbedding(BaseModel):
    """``source: {kind: zero}``: the token's row is all zeros."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["zero"]


class ModelTokenEmbedding(BaseModel):
    """``source: {kind: model_token, model: M, token: T | token_id: I}``: row of T (or I) in M."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["model_token"]
    model: str
    token_id: int | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _one_of_token_or_id(self) -> ModelTokenEmbedding:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("model_token source needs exactly one of 'token' or 'token_id'")
        return self


class TokenEmbedding(BaseModel):
    """One ``tokenizer.tokens`` entry: where the token's row comes from, and whether to force it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    source: ZeroEmbedding | ModelTokenEmbedding | str | None = None
    force: bool = False


class TokenizerSettings(BaseModel):
    """The tokenizer part of a mergekit config; ``source=None`` means keep the donor's tokenizer."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    source: str | None = None  # "union" | "base" | a model name
    tokens: dict[str, TokenEmbedding] = {}
    pad_to_multiple_of: PositiveInt | None = None
    chat_template: str | None = None

    @classmethod
    def from_mergekit(cls, config: Mapping[str, Any]) -> TokenizerSettings:
        """Read ``tokenizer_source`` / ``tokenizer`` / ``chat_template`` from a mergekit dict."""
        legacy, block = config.get("tokenizer_source"), config.get("tokenizer")
        if legacy and block:
            raise ValueError("give either 'tokenizer_source' or 'tokenizer', not both")
        if block is not None:
            if not isinstance(block, Mapping):
                raise ValueError(f"'tokenizer' must be a mapping, not {block!r}")
            unknown = set(block) - {"source", "tokens", "pad_to_multiple_of"}
            if unknown:
                raise ValueError(f"unknown key(s) in 'tokenizer': {sorted(unknown)}")
            return cls(
                source=block.get("source", "union"),
                tokens=block.get("tokens") or {},
                pad_to_multiple_of=block.get("pad_to_multiple_of"),
                chat_template=config.get("chat_template"),
            )
        return cls(source=legacy, chat_template=config.get("chat_template"))


@dataclass(frozen=True)
class VocabPlan:
    """The output vocabulary and, per input model, output token id -> input row (-1 missing)."""

    vocab: dict[str, int]
    vocab_size: int  # rows of embed_tokens / lm_head in the output (after pad_to_multiple_of)
    rows: dict[str, torch.Tensor]
    original_vocabs: dict[str, dict[str, int]]
    tokens: dict[str, TokenEmbedding] = field(default_factory=dict)
    base_model: str | None = None


def plan_vocabulary(
    settings: TokenizerSettings,
    model_dirs: Mapping[str, Path],
    base_model: str | None,
    out_dir: Path,
) -> VocabPlan | None:
    """Write the output tokenizer into ``out_dir``; return the row plan, or None if unchanged.

    ``base_model`` is the config's ``base_model`` name (a key of ``model_dirs``) or None; the
    tokenizer donor is the base, else the first model, as in mergekit.
    """
    if not model_dirs:
        raise ValueError("tokenizer: no models to take a tokenizer from")
    if base_model is not None and base_model not in model_dirs:
        raise ValueError(f"tokenizer: base_model {base_model!r} is not among {list(model_dirs)}")
    donor = base_model or next(iter(model_dirs))
    out_dir.mkdir(parents=True, exist_ok=True)
    if settings.source is None:
        _copy_donor_tokenizer(model_dirs, donor, out_dir, settings.chat_template)
        return None
    _check_model_refs(settings, model_dirs)
    tokenizers = _load_tokenizers(model_dirs, donor)
    out_tok = _output_tokenizer(settings.source, tokenizers, model_dirs, donor)
    existing = set(out_tok.get_vocab())
    for token in settings.tokens:
        if token not in existing:
            out_tok.add_tokens(token)
            existing.add(token)
    vocab = dict(out_tok.get_vocab())
    rows = {
        name: _row_map(vocab, tokenizers.get(name, tokenizers[donor]), model_dirs[name], name)
        for name in model_dirs
    }
    template = resolve_chat_template(settings.chat_template, model_dirs.values())
    if template is not None:
        out_tok.chat_template = template
    out_tok.save_pretrained(str(out_dir))
    return VocabPlan(
        vocab=vocab,
        vocab_size=_padded(len(vocab), settings.pad_to_multiple_of),
        rows=rows,
        original_vocabs={name: dict(tok.get_vocab()) for name, tok in tokenizers.items()},
        tokens=dict(settings.tokens),
        base_model=base_model,
    )


def _padded(n: int, multiple: int | None) -> int:
    return n if not multiple or n % multiple == 0 else (n // multiple + 1) * multiple


def _check_model_refs(settings: TokenizerSettings, model_dirs: Mapping[str, Path]) -> None:
    """Every model a setting names must be one of the merge's models."""
    refs: list[tuple[str, str]] = []
    if settings.source not in ("union", "base"):
        refs.append(("tokenizer.source", str(settings.source)))
    for token, cfg in settings.tokens.items():
        src = cfg.source
        model = src.model if isinstance(src, ModelTokenEmbedding) else src
        if isinstance(model, str):
            refs.append((f"tokenizer.tokens[{token!r}].source", model))
    for key, model in refs:
        if model not in model_dirs:
            raise ValueError(f"{key}: model {model!r} is not one of {list(model_dirs)}")


def config_vocab_size(model_dir: Path) -> int | None:
    """``vocab_size`` from a model folder's config.json (top level or ``text_config``)."""
    path = model_dir / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(size) if size else None


def _auto_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), use_fast=True)


def _load_tokenizers(model_dirs: Mapping[str, Path], donor: str) -> dict[str, Any]:
    """The donor's tokenizer (stripped to its model's rows) and every other one that loads."""
    from mergeops.mergekit.tokenizer_build import stripped_tokenizer

    tokenizers = {donor: stripped_tokenizer(model_dirs[donor], config_vocab_size)}
    for name, path in model_dirs.items():
        if name == donor:
            continue
        try:
            tokenizers[name] = _auto_tokenizer(path)
        except Exception as exc:  # mergekit too falls back to the base's tokenizer
            LOG.warning("no tokenizer for model %r (%s); assuming the same as %r", name, exc, donor)
    return tokenizers


def _output_tokenizer(
    source: str, tokenizers: Mapping[str, Any], model_dirs: Mapping[str, Path], donor: str
) -> Any:
    if source == "base":
        return tokenizers[donor]
    if source == "union":
        from mergeops.mergekit.tokenizer_build import union_tokenizer

        sizes = {name: config_vocab_size(model_dirs[name]) for name in tokenizers}
        return union_tokenizer(tokenizers, donor, sizes)
    return _auto_tokenizer(model_dirs[source])


def _row_map(vocab: Mapping[str, int], tokenizer: Any, model_dir: Path, name: str) -> torch.Tensor:
    """Output id -> the model's row for that token; -1 when absent or beyond its vocab_size."""
    model_vocab = tokenizer.get_vocab()
    limit = config_vocab_size(model_dir) or len(model_vocab)
    rows = torch.full((len(vocab),), -1, dtype=torch.int64)
    for token, out_id in vocab.items():
        row = model_vocab.get(token)
        if row is None:
            continue
        if row >= limit:
            LOG.warning("model %r: token %r has row %d >= vocab_size %d", name, token, row, limit)
            continue
        rows[out_id] = row
    return rows


def _copy_donor_tokenizer(
    model_dirs: Mapping[str, Path], donor: str, out_dir: Path, chat_template: str | None
) -> None:
    """No tokenizer source: copy the donor's files, or re-serialise them with a chat template."""
    src = model_dirs[donor]
    has_tok = (src / "tokenizer.json").is_file() or (src / "tokenizer.model").is_file()
    if chat_template is None and has_tok and (src / "tokenizer_config.json").is_file():
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, out_dir / name)
        return
    if chat_template is None and not any((src / name).is_file() for name in TOKENIZER_FILES):
        return  # no tokenizer to copy: skip importing transformers (seconds per merge)
    try:
        tokenizer = _auto_tokenizer(src)
    except Exception as exc:
        if chat_template is not None:
            LOG.warning("chat_template given but model %r has no tokenizer: %s", donor, exc)
        return
    template = resolve_chat_template(chat_template, model_dirs.values())
    if template is not None:
        tokenizer.chat_template = template
    with tempfile.TemporaryDirectory() as tmp:  # nothing half-written in out_dir
        tokenizer.save_pretrained(tmp)
        for item in Path(tmp).iterdir():
            shutil.copyfile(item, out_dir / item.name)
