"""Reading one input's row slice for the row-chunked merge, in a prefetch thread.

On the CPU the reader thread does all of a slice's input work: it reads the raw rows into a
pooled buffer (``get_rows_into`` or a spill file's ``read_into``, no fresh pages), casts them into a pooled float32 buffer,
gives the raw buffer back and checks the float32 values finite. The merging thread then only
merges: it raises the finite error in input order (as a sequential read would) and gives the
float32 buffers back once the slice is merged. Elsewhere (CUDA) the thread reads the raw rows
and the merging thread copies them to the device (``FloatSlots``: one reused float32
buffer per input), as before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from mergeops import finite
from mergeops.prefetch import Read
from mergeops.slice_io import BufferPool, typed
from mergeops.sources import TensorSource


class RowsInput(Protocol):
    """One input of a chunked tensor (``chunking._Rows``)."""

    source: TensorSource
    key: str
    held: bool
    itemsize: int
    """Bytes per element as stored in ``source``."""

    @property
    def whole(self) -> torch.Tensor | None: ...

    def get(self, start: int, stop: int) -> torch.Tensor: ...

    def rows_into(self) -> Callable[[int, int, torch.Tensor], torch.Tensor] | None:
        """A read of rows ``start:stop`` into a pooled uint8 buffer, or None (then ``get``)."""
        ...


@dataclass
class SliceRead:
    """What a slice's read of one input returns to the merging thread."""

    tensor: torch.Tensor
    """Raw rows (``float32`` False) or their owned float32 copy (``float32`` True)."""
    buffer: torch.Tensor | None
    """The pooled buffer ``tensor`` lives in, to give back once used (None: not pooled)."""
    float32: bool = False
    finite: bool | None = None
    """The float32 copy's finite check (None: not checked)."""
    nbytes: int = 0
    """Raw bytes read (float32 reads; raw reads count their tensor)."""


def _raw(rows: RowsInput, start: int, stop: int, nbytes: int, pool: BufferPool) -> SliceRead:
    into = rows.rows_into()
    if into is None:
        return SliceRead(rows.get(start, stop), None)
    buffer = pool.take(nbytes)
    try:
        return SliceRead(into(start, stop, buffer), buffer)
    except BaseException:
        pool.give(buffer)
        raise


def slice_read(
    rows: RowsInput,
    span: tuple[int, int],
    row: int,
    pool: BufferPool,
    *,
    on_cpu: bool,
    check: bool,
    dtype: torch.dtype = torch.float32,
) -> Read:
    """The read of rows ``span`` of one input whose rows have ``row`` elements;
    ``on_cpu``: cast to ``dtype`` (the compute dtype: float32 unless a mergekit config computes
    an elementwise method in its own dtype) and, with ``check``, checked finite in the reader
    thread.
    Its size counts what it keeps in memory until merged (nothing for a held raw slice read
    on the merging thread's device)."""
    start, stop = span
    nbytes = (stop - start) * row * rows.itemsize
    if not on_cpu:
        return Read(0 if rows.held else nbytes, lambda: _raw(rows, start, stop, nbytes, pool))

    def fetch() -> SliceRead:
        raw = _raw(rows, start, stop, nbytes, pool)
        buffer = pool.take(raw.tensor.numel() * dtype.itemsize)
        try:
            out = typed(buffer, dtype, tuple(raw.tensor.shape))
            out.copy_(raw.tensor)
        except BaseException:
            pool.give(buffer)
            raise
        finally:
            if raw.buffer is not None:
                pool.give(raw.buffer)
        ok = finite.all_finite(out) if check else None
        return SliceRead(out, buffer, True, ok, raw.tensor.numel() * raw.tensor.element_size())

    return Read((stop - start) * row * dtype.itemsize, fetch)


def owned_float(
    raw: torch.Tensor, device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A fresh ``dtype`` (float32) copy of ``raw`` on ``device`` (never a view of the source)."""
    out = torch.empty(raw.shape, dtype=dtype, device=device)
    out.copy_(raw)
    return out


class FloatSlots:
    """One reused float32 buffer per input: slice k+1's owned copy overwrites slice k's
    (the merge of slice k is done with them by then)."""

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self.device, self.dtype = device, dtype
        self._buffers: dict[int, torch.Tensor] = {}

    def owned(self, index: int, raw: torch.Tensor) -> torch.Tensor:
        numel = raw.numel()
        buffer = self._buffers.get(index)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=self.dtype, device=self.device)
            self._buffers[index] = buffer
        out = buffer[:numel].view(raw.shape)
        out.copy_(raw)
        return out
