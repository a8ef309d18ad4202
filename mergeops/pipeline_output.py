"""Where the device pipeline's finished slices go (``mergeops.pipeline``), on the host.

With a sink that takes slices (``mergeops.slice_io.RowSink``: the sharded writer of a merge
into a folder), each slice's pinned output buffer is handed to ``write_rows`` at the slice's
byte offset, as it is; the writer (its background thread) writes it while the device merges
the next slices and releases the buffer once written, and the pipeline waits for that release
before it copies another slice into the buffer (``PinnedRelease``). The whole output tensor is
never held on the host: host memory is the pipeline's few pinned slices.

Without one (in-memory merges, a writer without a declared layout), the slices are copied into
a host tensor and the finished tensor is handed over whole.

Either way a slice with NaN/Inf is not written, the rest of the tensor is still counted, and
the error (after its last slice) names the tensor and its whole non-finite count, as
``SliceOutput`` does on the CPU path; the caller then discards the staged output.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import torch

from mergeops import finite
from mergeops.methods import base as mb
from mergeops.slice_io import RowSink


class PinnedRelease:
    """Whether a pinned output buffer is free: taken while a writer holds it, set again by
    the writer's release (possibly on its thread). ``wait`` blocks the host until then."""

    def __init__(self) -> None:
        self._free = threading.Event()
        self._free.set()

    def take(self) -> Callable[[], None]:
        """Mark the buffer held; returns the release to hand the writer."""
        self._free.clear()
        return self._free.set

    @property
    def held(self) -> bool:
        """Whether a writer holds the buffer now."""
        return not self._free.is_set()

    def wait(self) -> None:
        """Block until the writer released the buffer (at once if it is not held)."""
        self._free.wait()


class PipelineOutput:
    """Collects finished slices of each tensor, in order, for one merge pass."""

    def __init__(
        self,
        ctx: mb.MergeContext,
        sink: Callable[[str, torch.Tensor], None],
        rows: RowSink | None = None,
        written: Callable[[str], None] | None = None,
    ) -> None:
        self.ctx, self.sink, self.rows, self.written = ctx, sink, rows, written
        self._outputs: dict[str, torch.Tensor] = {}
        self._bad: dict[str, int] = {}
        self.slices_written = 0

    def put(
        self,
        key: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        start: int,
        data: torch.Tensor,
        *,
        bad: int,
        first: bool,
        last: bool,
        release: PinnedRelease,
    ) -> None:
        """Rows ``start:`` of ``key`` (``data``: their bytes in the output ``dtype``, a view
        of a pinned buffer) with ``bad`` non-finite values; ``release`` guards the buffer."""
        if first:
            self._bad[key] = 0
            if self.rows is None:
                self._outputs[key] = torch.empty(shape, dtype=dtype)
        self._bad[key] += bad
        offset = start * math.prod(shape[1:])
        if self.rows is None:
            values = data.view(dtype)
            self._outputs[key].view(-1)[offset : offset + values.numel()].copy_(values)
        elif not self._bad[key]:  # after a bad slice nothing more is written, only counted
            self.rows.write_rows(key, offset * dtype.itemsize, data, release.take())
            self.slices_written += 1
        if last:
            self._finish(key, shape)

    def _finish(self, key: str, shape: tuple[int, ...]) -> None:
        out = self._outputs.pop(key, None)
        bad = self._bad.pop(key)
        if bad:
            raise finite.output_error(self.ctx, key, bad, math.prod(shape))
        if self.rows is not None:
            self.rows.rows_done(key)
            if self.written is not None:
                self.written(key)
        else:
            assert out is not None
            self.sink(key, out)
