"""Permute vocabulary tensors (embed_tokens, lm_head) to the output vocabulary, as mergekit does.

A token every model has keeps each model's own row. A token some model lacks (or one listed in
``tokenizer.tokens`` with ``force: true``) gets one shared default row, chosen by mergekit's
rule: the configured source; else the one model that has it; else zeros if none has it; else
the base model's row if the base has it; else the mean of the rows of the models that have it.
Rows added by ``pad_to_multiple_of`` are the mean of the real rows
(https://nlp.stanford.edu/~johnhew/vocab-expansion.html). Sums and means run in the inputs'
promoted dtype, in model order, so bf16 results equal mergekit's bit for bit.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, TypeAlias

import torch

if TYPE_CHECKING:
    from mergeops.mergekit.tokenizer import ModelTokenEmbedding, VocabPlan, ZeroEmbedding

    Source: TypeAlias = str | ZeroEmbedding | ModelTokenEmbedding

LOG = logging.getLogger(__name__)


def remap_rows(
    tensors: Mapping[str, torch.Tensor],
    plan: VocabPlan,
    *,
    base_model: str | None = None,
    vocab_axis: int = 0,
) -> dict[str, torch.Tensor]:
    """Each model's tensor with ``plan.vocab_size`` rows along ``vocab_axis`` in output order.

    ``tensors`` holds one vocabulary tensor per model name (a key of ``plan.rows``), all of the
    models that enter this tensor's merge: missing rows are filled from the others, so they are
    remapped together. ``base_model`` defaults to ``plan.base_model``.
    """
    if not tensors:
        return {}
    base = plan.base_model if base_model is None else base_model
    names = list(tensors)
    views = _vocab_first(tensors, vocab_axis)
    for name in names:
        if name not in plan.rows:
            raise ValueError(f"vocabulary tensor of model {name!r}: not in the tokenizer plan")
        too_big = int(plan.rows[name].max()) >= views[name].shape[0]
        if too_big:
            raise ValueError(
                f"model {name!r}: vocabulary tensor has {views[name].shape[0]} rows but its "
                f"tokenizer needs row {int(plan.rows[name].max())}"
            )
    dtype = views[names[0]].dtype
    for view in views.values():
        dtype = torch.promote_types(dtype, view.dtype)
    views = {name: view.to(dtype) for name, view in views.items()}
    defaults = _default_rows(views, plan, base)
    return {
        name: _permuted(views[name], plan, name, defaults).movedim(0, vocab_axis) for name in names
    }


def _vocab_first(tensors: Mapping[str, torch.Tensor], axis: int) -> dict[str, torch.Tensor]:
    views = {name: t.movedim(axis, 0) for name, t in tensors.items()}
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(views.values()))
    if any(v.shape[1:] != first.shape[1:] for v in views.values()):
        raise ValueError(f"vocabulary tensors differ beyond the vocabulary axis {axis}: {shapes}")
    return views


def _token_sources(
    plan: VocabPlan, names: list[str], base: str | None
) -> tuple[dict[str, Source], set[str]]:
    """Configured sources plus mergekit's automatic ones; and the tokens to average."""
    from mergeops.mergekit.tokenizer import ZeroEmbedding

    sources: dict[str, Source] = {
        tok: cfg.source for tok, cfg in plan.tokens.items() if cfg.source is not None
    }
    present = torch.stack([plan.rows[name] >= 0 for name in names])  # [models, vocab]
    counts = present.sum(dim=0).tolist()
    first_holder = present.to(torch.uint8).argmax(dim=0).tolist()
    base_rows = plan.rows[base].tolist() if base in names else None
    average: set[str] = set()
    zero = ZeroEmbedding(kind="zero")
    for tok, out_id in plan.vocab.items():
        if tok in sources or counts[out_id] == len(names):
            continue  # forced tokens every model has take the base row or the mean below
        if counts[out_id] == 1:
            sources[tok] = names[first_holder[out_id]]
        elif counts[out_id] == 0:
            LOG.warning("token %r is in none of the models; its row is zero", tok)
            sources[tok] = zero
        elif base_rows is not None and base_rows[out_id] >= 0:
            sources[tok] = str(base)
        else:
            average.add(tok)
    for tok, cfg in plan.tokens.items():  # forced, present everywhere, no source given
        if cfg.force and tok in plan.vocab and tok not in sources and tok not in average:
            if base_rows is not None:
                sources[tok] = str(base)
            else:
                average.add(tok)
    return sources, average


def _default_rows(
    views: Mapping[str, torch.Tensor], plan: VocabPlan, base: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared row of every token some model lacks or that is forced: (output id -> index
    into the rows, -1 where there is none; the rows)."""
    from mergeops.mergekit.tokenizer import ZeroEmbedding

    names = list(views)
    sources, average = _token_sources(plan, names, base)
    needed = torch.stack([plan.rows[name] < 0 for name in names]).any(dim=0)
    for tok, cfg in plan.tokens.items():
        if cfg.force and tok in plan.vocab:
            needed[plan.vocab[tok]] = True
    ids = needed.nonzero().squeeze(1)
    tokens = _tokens_by_id(plan)
    first = views[names[0]]
    rows = first.new_zeros((len(ids), *first.shape[1:]))
    position = torch.full((len(plan.vocab),), -1, dtype=torch.int64)
    position[ids] = torch.arange(len(ids))
    by_model: dict[str, list[int]] = {}
    averaged: list[int] = []
    for pos, out_id in enumerate(ids.tolist()):
        tok = tokens[out_id]
        src = sources.get(tok)
        if tok in average:
            averaged.append(pos)
        elif isinstance(src, str) and src in views and int(plan.rows[src][out_id]) >= 0:
            by_model.setdefault(src, []).append(pos)
        elif src is not None and not isinstance(src, ZeroEmbedding):
            rows[pos] = _configured_row(tok, src, views, plan)
        elif src is None:
            position[out_id] = -1
    for model, positions in by_model.items():
        index = torch.tensor(positions)
        source_rows = plan.rows[model][ids[index]]
        rows[index.to(rows.device)] = views[model][source_rows.to(rows.device)]
    if averaged:
        index = torch.tensor(averaged)
        rows[index.to(rows.device)] = _mean_rows(views, plan, ids[index])
    return position, rows


def _tokens_by_id(plan: VocabPlan) -> list[str]:
    tokens = [""] * len(plan.vocab)
    for tok, out_id in plan.vocab.items():
        tokens[out_id] = tok
    return tokens


def _mean_rows(
    views: Mapping[str, torch.Tensor], plan: VocabPlan, ids: torch.Tensor
) -> torch.Tensor:
    """Per output id, the mean of the rows of the models that have it: summed model by model
    in the tensors' dtype from zeros, then divided by the count, as mergekit does."""
    first = next(iter(views.values()))
    total = first.new_zeros((len(ids), *first.shape[1:]))
    count = first.new_zeros((len(ids), *([1] * (first.ndim - 1))))
    for name, view in views.items():
        source = plan.rows[name][ids].to(view.device)
        present = (source >= 0).view(-1, *([1] * (first.ndim - 1)))
        total = total + torch.where(present, view[source.clamp(min=0)], 0)
        count = count + present.to(count.dtype)
    return total / count


def _configured_row(
    tok: str, src: Source, views: Mapping[str, torch.Tensor], plan: VocabPlan
) -> torch.Tensor:
    from mergeops.mergekit.tokenizer import ModelTokenEmbedding, ZeroEmbedding

    if isinstance(src, ZeroEmbedding):
        first = next(iter(views.values()))
        return first.new_zeros(first.shape[1:])
    model = src.model if isinstance(src, ModelTokenEmbedding) else str(src)
    if model not in views:
        raise ValueError(
            f"token {tok!r} takes its row from model {model!r}, which lacks this tensor"
        )
    if isinstance(src, ModelTokenEmbedding):
        row = src.token_id
        if row is None:
            vocab = plan.original_vocabs.get(model, {})
            if src.token not in vocab:
                raise ValueError(
                    f"token {tok!r}: source token {src.token!r} not in model {model!r}"
                )
            row = vocab[str(src.token)]
    else:
        row = int(plan.rows[model][plan.vocab[tok]])
    if not 0 <= row < views[model].shape[0]:
        raise ValueError(f"token {tok!r}: model {model!r} has no row {row} for it")
    return views[model][row]


def _permuted(
    view: torch.Tensor,
    plan: VocabPlan,
    name: str,
    defaults: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    n_tokens = len(plan.vocab)
    out = torch.zeros((plan.vocab_size, *view.shape[1:]), dtype=view.dtype, device=view.device)
    rows = plan.rows[name]
    keep = rows >= 0
    for tok, cfg in plan.tokens.items():
        if cfg.force and tok in plan.vocab:
            keep[plan.vocab[tok]] = False
    kept = keep.nonzero().squeeze(1)
    out[kept.to(view.device)] = view[rows[kept].to(view.device)]
    position, default_rows = defaults
    filled = (~keep).nonzero().squeeze(1)
    found = position[filled] >= 0
    out[filled[found].to(view.device)] = default_rows[position[filled[found]].to(view.device)]
    if not bool(found.all()):
        tokens = _tokens_by_id(plan)
        lost = [tokens[i] for i in filled[~found].tolist()]
        LOG.error("no row for tokens %s in model %r; left zero", lost[:10], name)
    if plan.vocab_size > n_tokens:
        out[n_tokens:] = torch.mean(out[:n_tokens], dim=0)
    return out
