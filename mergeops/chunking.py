"""Row-chunked merging of large tensors for elementwise methods.

A method that sets ``chunkable = True`` (linear, task_arithmetic, ties, dare_*) is merged
slice by slice: ``tensor_stats`` first computes what needs the whole tensor (TIES cuts, one
model at a time; DARE keep masks), then each slice of at most ``CHUNK_BYTES`` float32 per input
is read on demand (``get_rows`` where the source has it), merged with the same per-element
arithmetic as the whole-tensor path, and written into a preallocated output in the output
dtype. Peak memory per tensor is a few slices, not a few whole float32 copies per input.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import closing
from typing import Any

import torch

from mergeops.methods import base as mb
from mergeops.plan import MergePlan
from mergeops.prefetch import Prefetcher, Read
from mergeops.sources import TensorSource

CHUNK_BYTES = 2 * 1024 * 1024
"""Float32 bytes per input slice (small slices stay in cache: 2 MiB beat 16 MiB on CPU time
and peak RSS in bench.merge_engine)."""

_ROW_ALIGN = 64
"""Row sizes must be a multiple of this: slices then start on the same vector-lane alignment
as the whole tensor, so reductions over models round every element exactly as unchunked."""


def chunk_rows(plan: MergePlan, key: str) -> int:
    """Rows per slice for ``key``, or 0 when it is merged whole."""
    method = plan.method
    shape = tuple(plan.metas[key].shape)
    if not getattr(method, "chunkable", False) or plan.side or len(shape) < 2:
        return 0
    row = math.prod(shape[1:])
    if row == 0 or row % _ROW_ALIGN or row * shape[0] * 4 <= CHUNK_BYTES:
        return 0
    return max(1, CHUNK_BYTES // (row * 4))


def row_ranges(count: int, rows: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of each slice of ``rows`` rows over ``count`` rows."""
    for start in range(0, count, rows):
        yield start, min(count, start + rows)


def read_rows(source: TensorSource, key: str, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of one tensor, via ``get_rows`` when the source has it."""
    get_rows = getattr(source, "get_rows", None)
    if get_rows is not None:
        return get_rows(key, start, stop)
    return source.get(key)[start:stop]


class _Rows:
    """Reads row slices of one tensor from one source; sources without ``get_rows`` are read
    whole once and sliced."""

    def __init__(self, source: TensorSource, key: str) -> None:
        self.source, self.key = source, key
        self._whole: torch.Tensor | None = None
        if getattr(source, "get_rows", None) is None:
            self._whole = source.get(key)

    def get(self, start: int, stop: int) -> torch.Tensor:
        if self._whole is not None:
            return self._whole[start:stop]
        return read_rows(self.source, self.key, start, stop)


def _owned_float(raw: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A fresh float32 copy of ``raw`` on ``device`` (never a view of the source)."""
    out = torch.empty(raw.shape, dtype=torch.float32, device=device)
    out.copy_(raw)
    return out


def _check_finite(tensor: torch.Tensor, key: str, role: str) -> None:
    if not tensor.numel():
        return
    low, high = torch.aminmax(tensor)
    if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
        raise mb.MergeError(f"tensor '{key}' of {role} contains NaN or Inf")


class ChunkedMerge:
    """Merges one tensor name in row slices; ``bytes_read`` counts the input bytes read.

    Slice k+1 of every input is read (in ``prefetcher``'s threads) while slice k is merged.
    """

    def __init__(self, plan: MergePlan, key: str, rows: int, prefetcher: Prefetcher) -> None:
        self.plan, self.key, self.rows = plan, key, rows
        self.prefetcher = prefetcher
        self.bytes_read = 0
        self.roles = [f"model '{m.name}'" for m in plan.models]
        self.sources: list[_Rows] = [_Rows(m, key) for m in plan.models]
        self.base = _Rows(plan.base, key) if plan.base is not None else None
        self._base_raw: torch.Tensor | None = None

    def _read(self, rows: _Rows, start: int, stop: int, role: str) -> torch.Tensor:
        return self._owned(rows.get(start, stop), role)

    def _owned(self, raw: torch.Tensor, role: str) -> torch.Tensor:
        self.bytes_read += raw.numel() * raw.element_size()
        out = _owned_float(raw, self.plan.ctx.device)
        _check_finite(out, self.key, role)
        return out

    def _task_vector(self, index: int) -> torch.Tensor:
        """The whole float32 τ_index (base read raw, in its own dtype: the cast is exact)."""
        assert self.base is not None
        count = self.plan.metas[self.key].shape[0]
        tau = self._read(self.sources[index], 0, count, self.roles[index])
        if self._base_raw is None:
            self._base_raw = self.base.get(0, count).to(self.plan.ctx.device)
            self.bytes_read += self._base_raw.numel() * self._base_raw.element_size()
        return tau.sub_(self._base_raw)

    def run(self, out_dtype: torch.dtype) -> torch.Tensor:
        """The merged tensor, in ``out_dtype``."""
        plan, key = self.plan, self.key
        method: Any = plan.method
        shape = tuple(plan.metas[key].shape)
        stats = method.tensor_stats(key, shape, self._task_vector, plan.ctx)
        self._base_raw = None
        out = torch.empty(shape, dtype=out_dtype, device=plan.ctx.device)
        row = math.prod(shape[1:])
        inputs_rows = [*self.sources, *([self.base] if self.base is not None else [])]
        roles = [*self.roles, *(["base"] if self.base is not None else [])]
        itemsize = plan.metas[key].dtype.itemsize
        ranges = list(row_ranges(shape[0], self.rows))
        batches = (
            [Read((stop - start) * row * itemsize, _slice(r, start, stop)) for r in inputs_rows]
            for start, stop in ranges
        )
        with closing(self.prefetcher.stream(batches)) as stream:
            for (start, stop), pending in zip(ranges, stream, strict=True):
                loaded = [self._owned(p.result(), r) for p, r in zip(pending, roles, strict=True)]
                self._merge_slice(method, loaded, stats, (start, stop), out)
                del loaded, pending
        return out

    def _merge_slice(
        self,
        method: Any,
        loaded: list[torch.Tensor],
        stats: list[Any],
        rows: tuple[int, int],
        out: torch.Tensor,
    ) -> None:
        """Merge one slice's owned float32 inputs (models then base) into ``out``."""
        key, (start, stop) = self.key, rows
        shape = tuple(self.plan.metas[key].shape)
        count = len(self.sources)
        base = loaded[count] if self.base is not None else None
        inputs = mb.TensorInputs(name=key, models=loaded[:count], base=base)
        merged = method.merge_rows(inputs, stats, start * math.prod(shape[1:]), self.plan.ctx)
        if tuple(merged.shape) != (stop - start, *shape[1:]):
            raise mb.MergeError(
                f"method '{method.name}' produced shape {tuple(merged.shape)} for rows "
                f"{start}:{stop} of '{key}', expected {(stop - start, *shape[1:])}"
            )
        out[start:stop].copy_(merged)


def _slice(rows: _Rows, start: int, stop: int) -> Any:
    return lambda: rows.get(start, stop)
