"""Receive buffers for range reads that are reused once every tensor viewing them is gone.

A streamed merge fetches ~1 GB per 100M-parameter merge in windows of a few MiB. A fresh
buffer per window costs the kernel a page fault and a zeroed page for every 4 KiB of it (a
zero-filled ``bytearray`` costs a memset on top): ~0.5 s of CPU per GB on the 2-core test
machine, as much as receiving the bytes. ``ReceiveBuffers.take`` hands out a uint8 tensor over a
pooled numpy buffer; the tensor (and any view or slice of it) keeps the buffer alive, and when
the last of them is freed the buffer goes back to the pool (a ``weakref.finalize`` on the
numpy view the tensor wraps), so its pages stay mapped and warm for the next window. At most
``keep`` buffers wait in the pool; requests above ``max_bytes`` are not pooled.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np
import torch

MIB = 1024 * 1024
DEFAULT_KEEP = 16
"""Free buffers kept (five merge inputs x three open windows, plus one)."""
DEFAULT_MAX_BYTES = 16 * MIB
"""Largest request served from the pool (read-ahead windows are 8 MiB)."""


def size_class(nbytes: int) -> int:
    """The pooled size a request of ``nbytes`` gets: the next power of two, at least 1 MiB."""
    return max(MIB, 1 << max(0, nbytes - 1).bit_length())


class ReceiveBuffers:
    """A thread-safe pool of receive buffers, reused when their tensors are gone."""

    def __init__(self, *, keep: int = DEFAULT_KEEP, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if keep < 0 or max_bytes < 0:
            raise ValueError(f"receive buffers need keep >= 0 and max_bytes >= 0, got "
                             f"{keep} and {max_bytes}")  # fmt: skip
        self.keep, self.max_bytes = keep, max_bytes
        self.allocated = 0
        """Buffers allocated so far (pooled sizes only)."""
        self._free: dict[int, list[np.ndarray]] = {}
        self._lock = threading.RLock()  # a finalizer may run on a thread inside ``take``

    def take(self, nbytes: int) -> tuple[torch.Tensor, memoryview]:
        """A uint8 tensor of ``nbytes`` (contents undefined) and a writable memoryview of the same
        memory, to receive into; drop the memoryview once filled."""
        if nbytes > self.max_bytes:
            window = np.empty(nbytes, dtype=np.uint8)
            return torch.from_numpy(window), window.data
        size = size_class(nbytes)
        with self._lock:
            free = self._free.get(size)
            base = free.pop() if free else None
            if base is None:
                self.allocated += 1
        if base is None:
            base = np.empty(size, dtype=np.uint8)
        window = base[:nbytes]  # the tensor holds this view; its end hands ``base`` back
        weakref.finalize(window, self._give, base)
        return torch.from_numpy(window), window.data

    def pooled(self) -> int:
        """Buffers waiting in the pool."""
        with self._lock:
            return sum(len(free) for free in self._free.values())

    def _give(self, base: np.ndarray) -> None:
        with self._lock:
            if sum(len(free) for free in self._free.values()) < self.keep:
                self._free.setdefault(base.size, []).append(base)


SHARED = ReceiveBuffers()
"""The pool every range source of this process receives into by default."""
