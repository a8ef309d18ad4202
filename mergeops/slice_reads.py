"""Reading one input's row slice for the row-chunked merge, in a prefetch thread.

On the CPU the reader thread does all of a slice's input work. A local file's rows are cast
straight from the file's pages (``map_rows``: no raw copy) into a pooled float32 buffer;
other sources' raw rows are read into a pooled buffer first (``get_rows_into`` or a spill
file's ``read_into``, no fresh pages), cast, and the raw buffer given back. The float32 values
are checked finite there too. The merging thread then only merges: it raises the finite error in input order (as a sequential read would) and gives the
float32 buffers back once the slice is merged. Elsewhere (CUDA) the thread reads the raw rows
and the merging thread copies them to the device (``FloatSlots``: one reused float32
buffer per input), as before.

``InputRows`` is one input of a chunked tensor: row reads from its source, from a whole tensor
held in memory, or from a spill file region (``mergeops.spill``) once a first pass recorded
every row of a remote input there.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from mergeops import finite, kernels
from mergeops.prefetch import Read
from mergeops.slice_io import BufferPool, typed
from mergeops.sources import TensorSource
from mergeops.spill import Spill, SpillRegion


class Mapped(Protocol):
    """Rows viewed in a file mapping (``mergeops.io.readers.MappedRows``)."""

    tensor: torch.Tensor

    def release(self) -> None: ...


class RowsInput(Protocol):
    """One input of a chunked tensor (``InputRows``)."""

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

    def rows_mapped(self) -> Callable[[int, int], Mapped] | None:
        """Rows ``start:stop`` viewed in a local file's pages, or None."""
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

    mapped = rows.rows_mapped()
    if mapped is not None:
        view = functools.partial(mapped, start, stop)
        return Read((stop - start) * row * dtype.itemsize,
                    lambda: _cast_mapped(view, pool, check, dtype))  # fmt: skip

    def fetch() -> SliceRead:
        raw = _raw(rows, start, stop, nbytes, pool)
        buffer = pool.take(raw.tensor.numel() * dtype.itemsize)
        try:
            out = typed(buffer, dtype, tuple(raw.tensor.shape))
            ok = cast_into(raw.tensor, out, check)
        except BaseException:
            pool.give(buffer)
            raise
        finally:
            if raw.buffer is not None:
                pool.give(raw.buffer)
        return SliceRead(out, buffer, True, ok, raw.tensor.numel() * raw.tensor.element_size())

    return Read((stop - start) * row * dtype.itemsize, fetch)


def flat_read(
    mapped: Callable[[int, int], Mapped],
    span: tuple[int, int],
    row: int,
    pool: BufferPool,
    *,
    check: bool,
    dtype: torch.dtype = torch.float32,
) -> Read:
    """The read of the flat entries ``span`` (any range; rows of ``row`` elements) of a local
    file's tensor (``mapped``: its ``rows_mapped()``), cast and checked on the CPU as
    ``slice_read`` does rows, into a ``(1, n)`` buffer."""
    start, stop = span
    first, last = start // row, -(-stop // row)  # the rows that hold the span
    skip = start - first * row

    def piece() -> Mapped:
        covering = mapped(first, last)
        return _FlatPiece(covering.tensor.reshape(1, -1)[:, skip : skip + stop - start], covering)

    return Read((stop - start) * dtype.itemsize, lambda: _cast_mapped(piece, pool, check, dtype))


@dataclass
class _FlatPiece:
    """Flat entries viewed inside mapped rows; ``release`` releases the rows."""

    tensor: torch.Tensor
    rows: Mapped

    def release(self) -> None:
        self.rows.release()


def _cast_mapped(
    view: Callable[[], Mapped], pool: BufferPool, check: bool, dtype: torch.dtype
) -> SliceRead:
    """A slice (``view()`` in the file's pages) cast straight from there into a pooled
    ``dtype`` buffer (one pass over the input bytes, no raw copy) and checked finite."""
    rows = view()
    try:
        raw = rows.tensor
        buffer = pool.take(raw.numel() * dtype.itemsize)
        out = typed(buffer, dtype, tuple(raw.shape))
        ok = cast_into(raw, out, check)
    finally:
        rows.release()
    return SliceRead(out, buffer, True, ok, raw.numel() * raw.element_size())


def cast_into(raw: torch.Tensor, out: torch.Tensor, check: bool) -> bool | None:
    """``out.copy_(raw)``, and with ``check`` whether every value is finite (None: not
    checked): one fused pass for bfloat16/float32 into float32 (``kernels.cast_checked``),
    else a torch copy and ``finite.all_finite``."""
    ok = kernels.cast_checked(raw, out)
    if ok is None:
        out.copy_(raw)
        ok = finite.all_finite(out) if check else None
    return ok if check else None


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


def read_rows(source: TensorSource, key: str, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of one tensor, via ``get_rows`` when the source has it."""
    get_rows = getattr(source, "get_rows", None)
    if get_rows is not None:
        return get_rows(key, start, stop)
    return source.get(key)[start:stop]


class InputRows:
    """Reads row slices of one tensor from one source; sources without ``get_rows`` are read
    whole once and sliced. ``hold(raw)`` keeps a whole tensor already read, so its slices come
    from memory; ``record(spill)`` writes what is read next into a spill file region, and
    ``replay()`` then serves every later read from it (neither counted as read)."""

    def __init__(self, source: TensorSource, key: str) -> None:
        self.source, self.key = source, key
        self.meta = source.metadata(key)
        self.itemsize = self.meta.dtype.itemsize  # as stored: may differ per input
        self.cheap = bool(getattr(source, "rereads_cheaply", False))  # local: page cache
        self._whole: torch.Tensor | None = None
        self.held = False
        self._region: SpillRegion | None = None
        self.replayed = False  # reads come from the spill region
        if getattr(source, "get_rows", None) is None:
            self._whole = source.get(key)

    @property
    def whole(self) -> torch.Tensor | None:
        return self._whole

    @property
    def local_copy(self) -> bool:
        """Whether reads come from a copy (held in memory or spilled): not counted as read."""
        return self.held or self.replayed

    @property
    def local(self) -> bool:
        """Whether a read costs no fetch: held, whole in memory, spilled or a local file."""
        return self.held or self._whole is not None or self.replayed or self.cheap

    def get(self, start: int, stop: int) -> torch.Tensor:
        if self._whole is not None:
            return self._whole[start:stop]
        if self._region is not None and self.replayed:
            return self._region.read(start, stop)
        got = read_rows(self.source, self.key, start, stop)
        return got if self._region is None else self._region.record(start, got)

    def rows_into(self) -> Callable[[int, int, torch.Tensor], torch.Tensor] | None:
        """A read of rows into a pooled uint8 buffer, or None (then ``get``)."""
        if self.held or self._whole is not None:
            return None
        if self._region is not None and self.replayed:
            return self._region.read_into
        into = getattr(self.source, "get_rows_into", None)
        if into is None:
            return None
        region = self._region
        if region is None:
            return functools.partial(into, self.key)
        return lambda start, stop, buffer: region.record(start, into(self.key, start, stop, buffer))

    def rows_mapped(self) -> Callable[[int, int], Mapped] | None:
        """Rows viewed in a local file's pages (``map_rows``), or None: held or whole inputs,
        spill replays and sources without file mappings."""
        if self.held or self._whole is not None or self._region is not None or not self.cheap:
            return None
        mapped = getattr(self.source, "map_rows", None)
        return None if mapped is None else functools.partial(mapped, self.key)

    def record(self, spill: Spill) -> None:
        """Write the rows read from now on into ``spill`` (remote inputs not in memory)."""
        if not self.local and self._region is None:
            self._region = spill.region(self.key, tuple(self.meta.shape), self.meta.dtype)

    def replay(self) -> None:
        """Read from the spill from now on, if every row was recorded (else from the source)."""
        if self._region is not None and not self.replayed:
            self.replayed = self._region.complete
            if not self.replayed:
                self._region = None

    def hold(self, raw: torch.Tensor) -> None:
        self._whole, self.held = raw, True

    def release(self) -> None:
        if self.held:
            self._whole, self.held = None, False
