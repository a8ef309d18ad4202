"""Reused buffers and sliced output for the row-chunked merge (``mergeops.chunking``).

``BufferPool`` hands out byte buffers (uint8 tensors) and takes them back, so the raw reads
of every slice, and the output slices cast to the output dtype, reuse the same few pages
instead of allocating (and page-faulting) fresh memory per slice. It is thread-safe: reads
take buffers in the prefetch threads, the merging thread gives them back.

``SliceOutput`` sends a tensor's merged slices to a ``RowSink`` (the sharded writer): each
slice is cast to the output dtype into a pooled buffer, checked finite on its device and
written at its byte offset in the tensor's declared slot; the whole output tensor is never
held. A non-finite slice is not written; the remaining slices are still counted so the error
(raised by ``finish``) names the tensor and its whole non-finite count, as for whole tensors.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Protocol

import torch

from mergeops import finite, kernels
from mergeops.methods import base as mb

_MIN_BUFFER = 64 * 1024
_KEEP = 64
"""Buffers the pool keeps at most (the rest are dropped when given back)."""


class RowSink(Protocol):
    """A sink that takes slices of declared tensors at byte offsets (``ShardedWriter``).

    ``write_rows`` owns ``data`` until it calls ``release`` (maybe later, on another
    thread); ``rows_done`` says every byte of the tensor was sent; ``takes_rows`` may be
    false (then it gets whole tensors, e.g. a writer without a declared layout)."""

    takes_rows: bool

    def write_rows(
        self,
        name: str,
        byte_offset: int,
        data: torch.Tensor,
        release: Callable[[], None] | None = None,
    ) -> None: ...

    def rows_done(self, name: str) -> None: ...


def row_sink(sink: object) -> RowSink | None:
    """``sink`` as a ``RowSink`` when it takes slices, else None (it takes whole tensors)."""
    takes = callable(getattr(sink, "write_rows", None)) and callable(
        getattr(sink, "rows_done", None)
    )
    if takes and getattr(sink, "takes_rows", False):
        return sink  # type: ignore[return-value]
    return None


class BufferPool:
    """Reusable byte buffers on the CPU (thread-safe)."""

    def __init__(self) -> None:
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()
        self.allocated = 0
        """Buffers created so far (a test checks slices reuse them)."""

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer of exactly ``nbytes`` (a prefix of a pooled one)."""
        with self._lock:
            for index, buffer in enumerate(self._free):
                if buffer.numel() >= nbytes:
                    return self._free.pop(index)[:nbytes]
            self.allocated += 1
        size = max(_MIN_BUFFER, 1 << max(0, nbytes - 1).bit_length())
        return torch.empty(size, dtype=torch.uint8)[:nbytes]

    def give(self, buffer: torch.Tensor) -> None:
        """Return a buffer from ``take`` (its whole allocation goes back)."""
        whole = torch.empty(0, dtype=torch.uint8).set_(buffer.untyped_storage())
        with self._lock:
            if len(self._free) < _KEEP:
                self._free.append(whole)


def typed(buffer: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """``buffer``'s bytes as a ``dtype`` tensor of ``shape``."""
    return buffer.view(dtype).view(shape)


class SliceOutput:
    """Casts, checks and writes one tensor's merged slices into a ``RowSink``."""

    def __init__(
        self,
        ctx: mb.MergeContext,
        key: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        sink: RowSink,
        pool: BufferPool,
    ) -> None:
        self.ctx, self.key, self.shape, self.dtype = ctx, key, shape, dtype
        self.sink, self.pool = sink, pool
        self.row_bytes = math.prod(shape[1:]) * dtype.itemsize
        self.bad = 0

    def put(self, start: int, merged: torch.Tensor) -> None:
        """Rows ``start:`` (``merged``, any float dtype and device) into the output."""
        buffer = self.pool.take(merged.numel() * self.dtype.itemsize)
        out = typed(buffer, self.dtype, tuple(merged.shape))
        finite_now: bool | None = None
        if merged.device.type == "cpu":
            finite_now = kernels.cast_checked(merged, out)  # cast and check in one pass
            if finite_now is None:
                out.copy_(merged)
            cast = out
        else:  # cast and check on the device, then one copy of output-dtype bytes
            cast = merged.to(self.dtype)
        if finite_now is None:
            finite_now = finite.all_finite(cast)
        if self.bad or not finite_now:
            self.bad += max(int(finite.nonfinite_count(cast)), int(not finite_now))
            self.pool.give(buffer)
            return
        if cast is not out:
            out.copy_(cast)
        self.sink.write_rows(self.key, start * self.row_bytes, buffer,
                             lambda: self.pool.give(buffer))  # fmt: skip

    def finish(self) -> None:
        """Raise naming the tensor if a slice was not finite, else mark it complete."""
        if self.bad:
            raise finite.output_error(self.ctx, self.key, self.bad, math.prod(self.shape))
        self.sink.rows_done(self.key)
