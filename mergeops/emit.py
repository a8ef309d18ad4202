"""Handing merged tensors to the engine's sink: shape check, cast to the output dtype, finite
check on the tensor's device (``mergeops.finite``); shared by the plain and routed merges.
A row-chunked tensor goes to a sink that takes slices (``mergeops.slice_io.RowSink``: the
sharded writer) slice by slice, never whole; other sinks get it whole."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
from tqdm import tqdm

from mergeops import finite
from mergeops.chunking import ChunkedMerge
from mergeops.methods import base as mb
from mergeops.plan import MergePlan
from mergeops.slice_io import SliceOutput, row_sink

TensorSink = Callable[[str, str | None, torch.Tensor], None]
"""Receives (stream, tensor name, tensor); stream None is the merged model."""
_T = TypeVar("_T")


def out_dtype(plan: MergePlan, key: str) -> torch.dtype:
    """The dtype tensor ``key`` is written in: the plan's output dtype, else as stored."""
    return plan.ctx.out_dtype or plan.metas[key].dtype


def progress_bar(items: Iterable[_T], total: int, desc: str, enabled: bool) -> Iterable[_T]:
    return tqdm(items, total=total, desc=desc, unit="tensor", disable=not enabled, leave=False)


def emit(
    plan: MergePlan,
    sink: TensorSink,
    key: str | None,
    merged: torch.Tensor | None,
    extras: dict[str, dict[str, torch.Tensor]],
) -> None:
    """Cast, check (finite, on the tensor's device) and send one tensor and its extras."""
    if merged is not None:
        assert key is not None
        if tuple(merged.shape) != tuple(plan.metas[key].shape):
            raise mb.MergeError(
                f"method '{plan.method.name}' produced shape {tuple(merged.shape)} for '{key}', "
                f"expected {tuple(plan.metas[key].shape)}"
            )
        out = merged.to(out_dtype(plan, key))
        finite.check_output(plan.ctx, key, out)
        sink(key, None, out)
    for stream, tensors in extras.items():
        for name, tensor in tensors.items():
            finite.check_output(plan.ctx, f"{stream}/{name}", tensor)
            sink(name, stream, tensor)


def emit_chunked(plan: MergePlan, sink: TensorSink, chunked: ChunkedMerge) -> None:
    """Run a row-chunked merge into ``sink``: slice by slice when it takes slices, else
    assembled whole and sent as ``emit`` does."""
    key, dtype = chunked.key, out_dtype(plan, chunked.key)
    rows = row_sink(sink)
    if rows is None:
        emit(plan, sink, key, chunked.run(dtype), {})
        return
    shape = tuple(chunked.meta.shape)
    chunked.run(dtype, SliceOutput(plan.ctx, key, shape, dtype, rows, chunked.pool))
