"""A local scratch file for the raw bytes of remote inputs that a chunked merge reads twice.

A row-chunked merge (``mergeops.chunking``) reads some inputs more than once: a method's
whole-tensor pass (TIES cuts, DARE's L1 factors) and then the merge pass, or a method's
statistics sweeps over the slices and then the merge pass. From a local file a second read is
answered by the page cache; from a remote source (S3) it would be a second fetch. So the first
read of a remote input also lands here, and every later read of that tensor is a ``pread``
into a pooled buffer (``SpillRegion.read_into``): fetched once, whatever the number of passes.

``Spill`` is one scratch file per chunked tensor, made on first write in ``scratch_dir()`` (the
merge's staging folder when ``scratch_under`` set it, else the system temp folder) and removed
by ``close()``, on success and on failure. Its pages are page cache, not process memory: the
bytes are written straight from the read buffers (no copy) and read back into reused ones.
Each input gets its own ``SpillRegion`` (a byte range of the file); regions are written from
the prefetch threads at disjoint offsets (``os.pwrite``), so no lock is held while writing.
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import torch

_SCRATCH: ContextVar[Path | None] = ContextVar("mergeops_spill_scratch", default=None)


@contextmanager
def scratch_under(directory: Path) -> Iterator[None]:
    """Spill files of merges run inside this block go to ``directory`` (a staging folder)."""
    token = _SCRATCH.set(Path(directory))
    try:
        yield
    finally:
        _SCRATCH.reset(token)


def scratch_dir() -> Path:
    """Where a spill file made now goes: ``scratch_under``'s folder, else the temp folder."""
    chosen = _SCRATCH.get()
    return chosen if chosen is not None else Path(tempfile.gettempdir())


class SpillError(OSError):
    """The scratch file could not be written or read back (names file and tensor)."""


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    flat = tensor.contiguous().reshape(-1).view(torch.uint8)
    return flat.numpy().data


class Spill:
    """One scratch file (made on first write), holding regions of input bytes."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory if directory is not None else scratch_dir()
        self.path: Path | None = None
        self.written = 0
        """Bytes written so far (tests and benches check what went through the file)."""
        self._fd: int | None = None
        self._end = 0
        self._lock = threading.Lock()
        self._closed = False

    def region(self, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> SpillRegion:
        """A byte range for one input's tensor ``key`` of ``shape`` stored as ``dtype``."""
        nbytes = math.prod(shape) * dtype.itemsize
        with self._lock:
            offset, self._end = self._end, self._end + nbytes
        return SpillRegion(self, key, offset, shape, dtype)

    def _file(self) -> int:
        with self._lock:
            if self._closed:
                raise SpillError(f"spill file in '{self.directory}' is closed")
            if self._fd is None:
                fd, name = tempfile.mkstemp(prefix=".ckreg-spill-", suffix=".tmp",
                                            dir=self.directory)  # fmt: skip
                self._fd, self.path = fd, Path(name)
            return self._fd

    def write(self, offset: int, data: memoryview, key: str) -> None:
        """``data`` at byte ``offset`` of the file."""
        fd, done = self._file(), 0
        try:
            while done < len(data):
                done += os.pwrite(fd, data[done:], offset + done)
        except OSError as exc:
            raise SpillError(f"spill of tensor '{key}' to '{self.path}' failed: {exc}") from exc
        with self._lock:
            self.written += done

    def read(self, offset: int, into: memoryview, key: str) -> None:
        """Fill ``into`` from byte ``offset`` of the file."""
        fd, done = self._file(), 0
        while done < len(into):
            got = os.preadv(fd, [into[done:]], offset + done)
            if got <= 0:
                raise SpillError(f"short read of tensor '{key}' from spill file '{self.path}': "
                                 f"{done} of {len(into)} bytes")  # fmt: skip
            done += got

    def close(self) -> None:
        """Close and remove the file (if one was made); later writes and reads raise."""
        with self._lock:
            fd, path, self._fd, self._closed = self._fd, self.path, None, True
        if fd is not None:
            os.close(fd)
        if path is not None:
            path.unlink(missing_ok=True)


class SpillRegion:
    """One input tensor's bytes in a ``Spill``: recorded row span by row span as it is first
    read, then read back by rows (``complete`` once every row was recorded)."""

    def __init__(
        self, spill: Spill, key: str, offset: int, shape: tuple[int, ...], dtype: torch.dtype
    ) -> None:
        self.spill, self.key, self.offset = spill, key, offset
        self.shape, self.dtype = shape, dtype
        self.row_bytes = math.prod(shape[1:]) * dtype.itemsize
        self._rows: set[tuple[int, int]] = set()
        self._lock = threading.Lock()

    @property
    def complete(self) -> bool:
        """Whether every row was recorded (spans never overlap: one pass reads each once)."""
        with self._lock:
            return sum(stop - start for start, stop in self._rows) == self.shape[0]

    def record(self, start: int, rows: torch.Tensor) -> torch.Tensor:
        """Write ``rows`` (raw, from row ``start``) into the file; returns them unchanged."""
        stop = start + int(rows.shape[0])
        with self._lock:
            if (start, stop) in self._rows:
                return rows
        self.spill.write(self.offset + start * self.row_bytes, _bytes_of(rows), self.key)
        with self._lock:
            self._rows.add((start, stop))
        return rows

    def read_into(self, start: int, stop: int, buffer: torch.Tensor) -> torch.Tensor:
        """Rows ``start:stop`` read into ``buffer`` (uint8, exactly their byte size, e.g. a
        pooled one); returns them as a typed view of ``buffer``."""
        shape = (stop - start, *self.shape[1:])
        if buffer.numel() != (stop - start) * self.row_bytes:
            raise SpillError(f"buffer for rows {start}:{stop} of '{self.key}' has the wrong size")
        if buffer.numel():
            self.spill.read(self.offset + start * self.row_bytes, _bytes_of(buffer), self.key)
        return buffer.view(self.dtype).view(shape)

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` in a fresh tensor."""
        buffer = torch.empty((stop - start) * self.row_bytes, dtype=torch.uint8)
        return self.read_into(start, stop, buffer)
