"""Row-chunked merging of large tensors for elementwise methods.

A method that sets ``chunkable = True`` (linear, task_arithmetic, ties, dare_*) is merged
slice by slice: ``tensor_stats`` first computes what needs the whole tensor (TIES cuts, one
model at a time; DARE keep masks), then each slice of at most ``CHUNK_BYTES`` float32 per input
is read on demand (``get_rows`` where the source has it), merged with the same per-element
arithmetic as the whole-tensor path, and written into a preallocated output in the output
dtype, or cast and written straight into the output file (``mergeops.slice_io``: the whole
output tensor is never held). Peak memory per tensor is a few slices, not a few whole float32
copies per input; the raw read buffers, the float32 input slices and the output slices are
reused from slice to slice (no fresh pages per slice).
Inputs the whole-tensor pass read are kept (raw, up to ``KEEP_BYTES`` per tensor) and sliced
from memory; remote inputs beyond it, and what a statistics method's first sweep fetched, are
spilled to a local scratch file (``mergeops.spill``) and read back from it: every input byte is
read or fetched once. Plain plans and routed plans (``ChunkJob``: any
source and tensor name per input) go through the same class.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from typing import Any

import torch

from mergeops import finite
from mergeops.methods import base as mb
from mergeops.plan import MergePlan
from mergeops.prefetch import MAX_DEPTH, Prefetcher, Read, StartedStream, then
from mergeops.slice_io import BufferPool, SliceOutput
from mergeops.slice_reads import FloatSlots, SliceRead, flat_read, owned_float, slice_read
from mergeops.slice_reads import InputRows as _Rows
from mergeops.sources import TensorMeta, TensorSource
from mergeops.spill import Spill

CHUNK_BYTES = 2 * 1024 * 1024
"""Float32 bytes per input slice (small slices stay in cache: 2 MiB beat 16 MiB on CPU time
and peak RSS in bench.merge_engine)."""

KEEP_BYTES = 256 * 1024 * 1024
"""Raw input bytes of one tensor a method's whole-tensor pass (TIES trims, DARE's L1 factors)
may keep for the merge pass, so remote inputs (S3) are fetched once, not twice; remote inputs
beyond it are spilled to a scratch file (``mergeops.spill``) and sliced from there; local files
(``rereads_cheaply``: a second read comes from the page cache, cheaper than holding the
tensor) are read again slice by slice."""

LOCAL_DEPTH = 2
"""Slices read ahead of the merge when every input is a local file (more only hold memory:
the page cache answers at once); remote inputs get the prefetcher's full depth."""

_ROW_ALIGN = 64
"""Row sizes must be a multiple of this: slices then start on the same vector-lane alignment
as the whole tensor, so reductions over models round every element exactly as unchunked."""


def chunk_rows(plan: MergePlan, key: str) -> int:
    """Rows per slice for ``key``, or 0 when it is merged whole."""
    shape = tuple(plan.metas[key].shape)
    return rows_for(plan.method, shape, side=bool(plan.side), ctx=plan.ctx)


def rows_for(
    method: mb.MergeMethod,
    shape: tuple[int, ...],
    *,
    side: bool = False,
    ctx: mb.MergeContext | None = None,
) -> int:
    """Rows per slice of a tensor of ``shape`` merged by ``method``, or 0: merged whole (not
    chunkable or not for ``ctx``'s params, side inputs, 1-D, rows not lane-aligned, or at
    most one slice)."""
    if not getattr(method, "chunkable", False) or side or len(shape) < 2:
        return 0
    if isinstance(method, mb.SliceStatsMethod) and ctx is not None and not method.can_chunk(ctx):
        return 0
    row = math.prod(shape[1:])
    if row == 0 or row % _ROW_ALIGN or row * shape[0] * 4 <= CHUNK_BYTES:
        return 0
    return max(1, CHUNK_BYTES // (row * 4))


def any_dtype(method: mb.MergeMethod, ctx: mb.MergeContext) -> bool:
    """Whether ``method`` may merge slices in a compute dtype other than float32 (mergekit
    configs compute in their ``dtype``): an elementwise method whose ``merge_rows`` is its
    ``merge_tensor`` of the slice, so each element sees the same operations either way, or one
    that says so for ``ctx``'s params (``StreamingMethod.slices_in_dtype``)."""
    if isinstance(method, mb.StreamingMethod) and method.slices_in_dtype(ctx):
        return True
    return (
        isinstance(method, mb.ElementwiseMethod)
        and type(method).merge_rows is mb.ElementwiseMethod.merge_rows
    )


def row_ranges(count: int, rows: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of each slice of ``rows`` rows over ``count`` rows."""
    for start in range(0, count, rows):
        yield start, min(count, start + rows)


def _check_finite(tensor: torch.Tensor, key: str, role: str) -> None:
    if not finite.all_finite(tensor):
        raise mb.MergeError(f"tensor '{key}' of {role} contains NaN or Inf")


@dataclass(frozen=True)
class ChunkJob:
    """One output tensor to merge in slices: its inputs (source, tensor name, role for
    errors), base (source, tensor name), method and context."""

    key: str
    meta: TensorMeta
    models: list[tuple[TensorSource, str, str]]
    base: tuple[TensorSource, str] | None
    method: mb.MergeMethod
    ctx: mb.MergeContext
    base_role: str = "base"


class ChunkedMerge:
    """Merges one tensor name in row slices; ``bytes_read`` counts the input bytes read.

    Slice k+1 of every input is read (in ``prefetcher``'s threads) while slice k is merged.
    """

    def __init__(
        self, job: ChunkJob, rows: int, prefetcher: Prefetcher, pool: BufferPool | None = None
    ) -> None:
        self.key, self.rows, self.prefetcher = job.key, rows, prefetcher
        self.pool = pool if pool is not None else BufferPool()
        self.compute = job.ctx.compute_dtype or job.meta.dtype  # float32 but for any_dtype
        self._slots = FloatSlots(job.ctx.device, self.compute)
        self.method, self.ctx, self.meta = job.method, job.ctx, job.meta
        self.bytes_read = 0
        self.roles = [role for _, _, role in job.models]
        self.sources: list[_Rows] = [_Rows(source, name) for source, name, _ in job.models]
        self.base = _Rows(*job.base) if job.base is not None else None
        self.base_role = job.base_role
        self._keep_left = KEEP_BYTES
        self._base_over_budget = False  # then held through the stats pass only
        self._swept = False  # True once a statistics sweep has checked every slice
        self._spill = Spill()  # remote inputs read twice: the first read lands here
        self._sweep: mb.TensorStatsPass | None = None
        self._sweep_made = False  # the method was asked for its statistics sweep
        self._primed: _SliceStream | None = None  # first pass's reads started by ``prime``
        self._reads_done = False  # the merge pass's last read is submitted
        self._after_reads: Callable[[], None] | None = None

    def _owned(
        self, raw: torch.Tensor, role: str, *, counted: bool = True, slot: int | None = None
    ) -> torch.Tensor:
        if counted:
            self.bytes_read += raw.numel() * raw.element_size()
        device = self.ctx.device
        out = (
            owned_float(raw, device, self.compute) if slot is None else self._slots.owned(slot, raw)
        )
        if not self._swept:  # a later sweep reads the same values again
            _check_finite(out, self.key, role)
        return out

    def _read_whole(self, rows: _Rows) -> torch.Tensor:
        """One input's whole raw tensor, held for the merge pass while ``KEEP_BYTES`` lasts,
        else (remote inputs) spilled to the scratch file; the base is held through the stats
        pass in any case."""
        count = self.meta.shape[0]
        if rows.held:
            return rows.get(0, count)
        spilled = rows.replayed
        nbytes = math.prod(self.meta.shape) * rows.itemsize
        kept = not rows.cheap and not spilled and nbytes <= self._keep_left
        if not kept:
            rows.record(self._spill)  # no-op for local files and what is in memory already
        raw = rows.get(0, count)
        rows.replay()
        if not spilled:
            self.bytes_read += nbytes
        raw = raw.to(self.ctx.device)
        if kept:
            self._keep_left -= nbytes
        if kept or rows is self.base:
            rows.hold(raw)
        if rows is self.base:
            self._base_over_budget = not kept
        return raw

    def _task_vector(self, index: int) -> torch.Tensor:
        """The whole float32 τ_index (base read raw, in its own dtype: the cast is exact)."""
        assert self.base is not None
        tau = self._owned(self._read_whole(self.sources[index]), self.roles[index], counted=False)
        return tau.sub_(self._read_whole(self.base))

    def run(self, out_dtype: torch.dtype, output: SliceOutput | None = None) -> torch.Tensor | None:
        """The merged tensor in ``out_dtype``; or, with ``output``, each merged slice handed to
        it (cast, checked and written there) and None."""
        try:
            return self._run(out_dtype, output)
        finally:
            self.close()

    def close(self) -> None:
        """Release what this tensor holds: reads started and not merged (they are cancelled
        or waited for), held inputs, the spill file, a statistics sweep made and not run."""
        primed, self._primed = self._primed, None
        try:
            if primed is not None:
                primed.reads.close()
            if self._sweep is not None:
                sweep, self._sweep = self._sweep, None
                sweep.close()
        finally:
            for rows in self._inputs():
                rows.release()
            self._spill.close()

    def prime(self) -> None:
        """Start this tensor's first slice reads now, before ``run``: the engine calls it
        once the previous tensor's last read is under way (``after_reads``), so this tensor's
        first slices arrive while that one is still merging instead of after it. The first
        pass is the statistics sweep, or the merge pass of a method with no statistics; a
        method whose ``tensor_stats`` reads whole tensors first is not primed (its slices
        would be read before it and again after). CPU merges of remote inputs only: a local
        file's first slice comes from the page cache in microseconds, and reads held ahead
        only raise the peak (270M: same times, +10-25 MiB)."""
        if self._primed is not None or self.ctx.device.type != "cpu":
            return
        if all(rows.local for rows in self._inputs()):
            return
        sweep = self._first_sweep()
        stats_first = not isinstance(self.method, mb.SliceStatsMethod)
        if sweep is None and stats_first and mb.stats_read_inputs(self.method):
            return
        if sweep is not None:
            self._record()
        self._primed = self._open_slices(sweep.flat_block if sweep is not None else 0,
                                         last=sweep is None)  # fmt: skip
        self._primed.reads.start()

    def after_reads(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the merge pass's last slice read is submitted (at once if
        it already is): reads of the next tensor may then start without delaying this one's."""
        if self._reads_done:
            callback()
        else:
            self._after_reads = callback

    def _last_read_submitted(self) -> None:
        self._reads_done = True
        callback, self._after_reads = self._after_reads, None
        if callback is not None:
            callback()

    def _first_sweep(self) -> mb.TensorStatsPass | None:
        """The method's statistics sweep of this tensor (made once), or None."""
        if not self._sweep_made:
            method, shape = self.method, tuple(self.meta.shape)
            assert isinstance(method, mb.StreamingMethod)
            if isinstance(method, mb.SliceStatsMethod):
                self._sweep = method.stats_pass(self.key, shape, self.ctx)
            else:
                self._sweep = method.stats_sweep(self.key, shape, self.ctx)
            self._sweep_made = True
        return self._sweep

    def _record(self) -> None:
        """Spill what the first sweep fetches from remote inputs (a no-op for the rest)."""
        for rows in self._inputs():
            rows.record(self._spill)

    def _inputs(self) -> list[_Rows]:
        return [*self.sources, *([self.base] if self.base is not None else [])]

    def _run(self, out_dtype: torch.dtype, output: SliceOutput | None) -> torch.Tensor | None:
        key, method = self.key, self.method
        assert isinstance(method, mb.StreamingMethod)
        shape = tuple(self.meta.shape)
        sweep = self._first_sweep()
        if sweep is not None:
            self._sweep = None  # closed by sweep_stats from here on
            stats = mb.sweep_stats(sweep, functools.partial(self._slices, sweep.flat_block))
        elif isinstance(method, mb.SliceStatsMethod):
            stats = None
        else:
            stats = method.tensor_stats(key, shape, self._task_vector, self.ctx)
        if self.base is not None and self._base_over_budget:
            self.base.release()
        out = (
            None
            if output is not None
            else torch.empty(shape, dtype=out_dtype, device=self.ctx.device)
        )
        for _, (start, stop), loaded in self._loaded_slices(last=True):
            merged = self._merge_slice(method, loaded, stats, (start, stop))
            if output is not None:
                output.put(start, merged)
            else:
                assert out is not None
                out[start:stop].copy_(merged)
            del loaded, merged
        if output is not None:
            output.finish()
        return out

    def _open_slices(self, flat: int, *, last: bool) -> _SliceStream:
        """The reads of one pass over every slice, handed to the prefetcher as it pulls them:
        row slices (span in rows), or with ``flat`` flat pieces of that many entries (span in
        entries) where every input is a mapped local file on the CPU. ``last``: the merge
        pass, whose final submitted read calls ``after_reads``'s callback."""
        shape = tuple(self.meta.shape)
        row = math.prod(shape[1:])
        inputs_rows = self._inputs()
        on_cpu, check = self.ctx.device.type == "cpu", not self._swept
        mapped = [r.rows_mapped() for r in inputs_rows] if flat and on_cpu else []
        maps = [m for m in mapped if m is not None]
        batches: Iterable[Sequence[Read]]
        if mapped and len(maps) == len(mapped):
            unit, ranges = 1, list(row_ranges(shape[0] * row, flat))
            batches = ([flat_read(m, span, row, self.pool, check=check, dtype=self.compute)
                        for m in maps] for span in ranges)  # fmt: skip
        else:
            unit, ranges = row, list(row_ranges(shape[0], self.rows))
            batches = ([slice_read(r, span, row, self.pool, on_cpu=on_cpu,
                                   check=check, dtype=self.compute) for r in inputs_rows]
                       for span in ranges)  # fmt: skip
        if last:
            batches = then(batches, self._last_read_submitted)
        local = all(r.local for r in inputs_rows)
        # local: a few slices ahead are enough (one flat piece: a block is two slices' size)
        depth = (1 if unit == 1 else LOCAL_DEPTH) if local else MAX_DEPTH
        stream = self.prefetcher.stream(batches, depth=depth)
        return _SliceStream(flat, unit, ranges, StartedStream(stream))

    def _loaded_slices(
        self, flat: int = 0, *, last: bool = False
    ) -> Iterator[tuple[int, tuple[int, int], list[torch.Tensor]]]:
        """(first flat entry, span, inputs) of every slice: its owned float32 inputs (models
        then base), slice k+1 read ahead (see ``_open_slices``). The first pass takes the
        reads ``prime`` started, when it did."""
        inputs_rows = self._inputs()
        roles = [*self.roles, *([self.base_role] if self.base is not None else [])]
        slices, self._primed = self._primed, None
        if slices is not None and slices.flat != flat:  # not what this pass reads
            slices.reads.close()
            slices = None
        if slices is None:
            slices = self._open_slices(flat, last=last)
        with closing(slices.reads):
            for (start, stop), pending in zip(slices.ranges, slices.reads, strict=True):
                loaded, buffers = [], []
                for slot, (p, role, rows) in enumerate(zip(pending, roles, inputs_rows, strict=True)):  # fmt: skip
                    got: SliceRead = p.result()
                    loaded.append(self._take(got, role, rows, slot))
                    if got.buffer is not None:
                        buffers.append(got.buffer)
                del pending
                yield start * slices.unit, (start, stop), loaded
                del loaded
                for buffer in buffers:  # the slice is merged: its buffers are free again
                    self.pool.give(buffer)

    def _take(self, got: SliceRead, role: str, rows: _Rows, slot: int) -> torch.Tensor:
        """One input's owned float32 slice (counted, checked) from its read."""
        if not got.float32:
            tensor = self._owned(got.tensor, role, counted=not rows.local_copy, slot=slot)
            if got.buffer is not None:
                self.pool.give(got.buffer)
                got.buffer = None
            return tensor
        if not rows.local_copy:
            self.bytes_read += got.nbytes
        if got.finite is False:
            raise mb.MergeError(f"tensor '{self.key}' of {role} contains NaN or Inf")
        return got.tensor

    def _slices(self, flat: int = 0) -> Iterator[tuple[int, mb.TensorInputs]]:
        """One statistics sweep: (flat offset, inputs) of every slice (flat pieces of ``flat``
        entries where ``_loaded_slices`` can read them so). The first sweep checks every input
        slice for NaN/Inf, and spills what it fetched from remote inputs, so later sweeps and
        the merge pass read it back locally."""
        count = len(self.sources)
        if not self._swept:
            self._record()
        for offset, _, loaded in self._loaded_slices(flat):
            base = loaded[count] if self.base is not None else None
            yield offset, mb.TensorInputs(name=self.key, models=loaded[:count], base=base)
        self._swept = True
        for rows in self._inputs():
            rows.replay()

    def _merge_slice(
        self,
        method: Any,
        loaded: list[torch.Tensor],
        stats: list[Any],
        rows: tuple[int, int],
    ) -> torch.Tensor:
        """The merged rows of one slice's owned float32 inputs (models then base)."""
        key, (start, stop) = self.key, rows
        shape = tuple(self.meta.shape)
        count = len(self.sources)
        base = loaded[count] if self.base is not None else None
        inputs = mb.TensorInputs(name=key, models=loaded[:count], base=base)
        merged = method.merge_rows(inputs, stats, start * math.prod(shape[1:]), self.ctx)
        if tuple(merged.shape) != (stop - start, *shape[1:]):
            raise mb.MergeError(
                f"method '{method.name}' produced shape {tuple(merged.shape)} for rows "
                f"{start}:{stop} of '{key}', expected {(stop - start, *shape[1:])}"
            )
        return merged


@dataclass
class _SliceStream:
    """One pass's slice reads (``reads``), with what they cover: flat pieces of ``flat``
    entries or row slices, ``ranges`` in units of ``unit`` entries."""

    flat: int
    unit: int
    ranges: list[tuple[int, int]]
    reads: StartedStream
