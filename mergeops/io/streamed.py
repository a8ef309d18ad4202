"""Shards written in place at bounded memory: header first, each tensor at its offset.

When every output tensor's name, shape and dtype is known before any is merged (the plan
knows them), the shard partition and each shard's safetensors header can be computed up
front. ``StreamedShards`` then writes a shard's header when its first tensor arrives and
``pwrite``s every tensor straight to its offset, so nothing is held between tensors whatever
the shard size. The partition and the header are the ones ``ShardedWriter`` computes for the
same tensors added in the same order, so the files are byte-identical to the buffered ones.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

_PWRITE_CHUNK = 1 << 30  # Linux writes at most ~2 GiB per call


@dataclass(frozen=True)
class TensorSpec:
    """One output tensor as the plan knows it before merging."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class HeaderEntry:
    """A tensor's safetensors header fields (``tag`` is the safetensors dtype name)."""

    name: str
    tag: str
    shape: tuple[int, ...]
    nbytes: int
    item_size: int


def layout_order(entries: Sequence[HeaderEntry]) -> list[HeaderEntry]:
    """Data order in a shard: largest element size first (keeps alignment), then by name."""
    return sorted(entries, key=lambda e: (-e.item_size, e.name))


def header_bytes(order: Sequence[HeaderEntry], metadata: Mapping[str, str]) -> bytes:
    """Sorted-key header JSON (data in ``order``), space-padded to 8 bytes, with its length."""
    bad = {k: v for k, v in metadata.items() if not isinstance(v, str)}
    if bad:
        raise ValueError(f"safetensors metadata values must be strings, got {bad!r}")
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for entry in order:
        header[entry.name] = {
            "dtype": entry.tag,
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def partition(entries: Sequence[HeaderEntry], max_shard_size: int) -> list[list[HeaderEntry]]:
    """Greedy shards in arrival order: a new shard when the next tensor would overflow."""
    shards: list[list[HeaderEntry]] = []
    current: list[HeaderEntry] = []
    size = 0
    for entry in entries:
        if current and size + entry.nbytes > max_shard_size:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += entry.nbytes
    if current:
        shards.append(current)
    return shards


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (looping over short writes)."""
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done : done + _PWRITE_CHUNK], offset + done)


@dataclass
class _Slot:
    shard: int
    offset: int
    entry: HeaderEntry
    written: bool = False


class StreamedShards:
    """Writes declared tensors in place into ``shard-<i>.tmp`` files of ``directory``."""

    def __init__(
        self,
        directory: Path,
        entries: Sequence[HeaderEntry],
        max_shard_size: int,
        metadata: Mapping[str, str],
    ) -> None:
        self.directory = directory
        self.shards = partition(entries, max_shard_size)
        self._headers: list[bytes] = []
        self._slots: dict[str, _Slot] = {}
        self._left: list[int] = []
        self._fds: dict[int, int] = {}
        self._opened: set[int] = set()
        for index, shard in enumerate(self.shards):
            order = layout_order(shard)
            header = header_bytes(order, metadata)
            self._headers.append(header)
            self._left.append(len(shard))
            offset = len(header)
            for entry in order:
                self._slots[entry.name] = _Slot(index, offset, entry)
                offset += entry.nbytes

    def path(self, index: int) -> Path:
        return self.directory / f"shard-{index + 1}.tmp"

    def slot(self, name: str) -> _Slot | None:
        return self._slots.get(name)

    def write(self, name: str, tensor: torch.Tensor) -> int:
        """Write one declared tensor at its offset; returns its byte count."""
        # torch tensors are little-endian on every platform torch supports
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        self.write_rows(name, 0, flat.view(torch.uint8))
        return self.finish(name)

    def write_rows(self, name: str, byte_offset: int, data: torch.Tensor) -> None:
        """Write ``data`` (contiguous uint8 on the CPU) at ``byte_offset`` into ``name``'s slot
        (the caller checked it fits)."""
        slot = self._slots[name]
        fd = self._fd(slot.shard)
        if data.numel():
            pwrite_all(fd, data.numpy().data, slot.offset + byte_offset)

    def finish(self, name: str) -> int:
        """Mark ``name`` written (its shard's file is closed after its last tensor); returns
        its byte count."""
        slot = self._slots[name]
        self._fd(slot.shard)  # an empty tensor still gets its shard's header
        slot.written = True
        self._left[slot.shard] -= 1
        if self._left[slot.shard] == 0:
            os.close(self._fds.pop(slot.shard))
        return slot.entry.nbytes

    def _fd(self, index: int) -> int:
        if index not in self._fds:
            path = self.path(index)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._opened.add(index)
            self._fds[index] = fd
            pwrite_all(fd, memoryview(self._headers[index]), 0)
        return self._fds[index]

    def missing(self) -> list[str]:
        """Declared tensors not written yet."""
        return [name for name, slot in self._slots.items() if not slot.written]

    def discard(self) -> None:
        """Close and remove every shard file this writer created."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        for index in self._opened:
            self.path(index).unlink(missing_ok=True)
