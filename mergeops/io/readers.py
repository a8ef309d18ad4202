"""Lazy tensor sources: a safetensors file, a sharded checkpoint folder, a PEFT adapter folder
and an in-memory state dict. Each implements ``mergeops.sources.TensorSource``.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mergeops.sources import TensorMeta

INDEX_NAME = "model.safetensors.index.json"

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SourceError(ValueError):
    """A tensor source cannot be opened or read; the message names the path or tensor."""


class SafetensorsFile:
    """One ``.safetensors`` file, read tensor by tensor (or row range by row range).

    The header is read once; whole tensors are read with ``os.pread`` into owned memory. The
    row-chunked merge reads its slices through ``map_rows`` instead: a view of the file's
    pages that a cast reads straight from the page cache (one pass over the input bytes, not a
    copy and then a cast), each slice's pages dropped from the resident set once cast. As with
    any mapped file (safetensors' own ``safe_open``), truncating the file while a merge reads
    it ends the process with SIGBUS; the pread paths report a truncated file instead.
    """

    rereads_cheaply = True
    """A second read of a tensor comes from the page cache: the chunked merge reads again
    rather than keeping a whole tensor in memory (``chunking.KEEP_BYTES`` is for remote
    sources, where a second read is a second fetch)."""

    def __init__(self, path: str | Path, name: str | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise SourceError(f"no safetensors file at '{self.path}'")
        self.name = name or self.path.stem
        try:
            handle: Any = safe_open(str(self.path), framework="pt")
            self._keys = list(handle.keys())
            self._file_metadata = dict(handle.metadata() or {})
            header, self._data_start = _read_header(self.path)
        except Exception as exc:  # safetensors raises its own error types
            raise SourceError(f"cannot read safetensors file '{self.path}': {exc}") from None
        del handle  # closes the mapping; data is read with pread
        self._entries: dict[str, dict[str, Any]] = {k: header[k] for k in self._keys}
        self._map: mmap.mmap | None = None  # made by the first map_rows
        self._map_lock = threading.Lock()

    def keys(self) -> list[str]:
        return list(self._keys)

    def _entry(self, key: str) -> dict[str, Any]:
        if key not in self._entries:
            raise KeyError(f"'{self.name}' has no tensor '{key}'")
        return self._entries[key]

    def get(self, key: str) -> torch.Tensor:
        shape = self.metadata(key).shape
        return self.get_rows(key, 0, shape[0]) if shape else self._read(key, 0, 1, ())

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (first dimension) of one tensor, read from disk on demand."""
        shape = self.metadata(key).shape
        if not shape:
            raise SourceError(f"tensor '{key}' of '{self.name}' is a scalar; it has no rows")
        start, stop = max(0, min(start, shape[0])), max(0, min(stop, shape[0]))
        stop = max(start, stop)
        row = math.prod(shape[1:])
        return self._read(key, start * row, stop * row, (stop - start, *shape[1:]))

    def get_rows_into(self, key: str, start: int, stop: int, buffer: torch.Tensor) -> torch.Tensor:
        """Rows ``start:stop`` read into ``buffer`` (uint8, exactly their byte size, e.g. a
        reused one); returns them as a typed view of ``buffer``."""
        meta = self.metadata(key)
        if not meta.shape or not 0 <= start <= stop <= meta.shape[0]:
            raise SourceError(f"rows {start}:{stop} are not in tensor '{key}' of '{self.name}'")
        row = math.prod(meta.shape[1:])
        shape = (stop - start, *meta.shape[1:])
        if buffer.dtype != torch.uint8 or buffer.numel() != math.prod(shape) * meta.dtype.itemsize:
            raise SourceError(f"buffer for rows {start}:{stop} of '{key}' has the wrong size")
        if buffer.numel():
            view = buffer.numpy().data
            self._read_at(key, start * row, view)
        return buffer.view(meta.dtype).view(shape)

    def map_rows(self, key: str, start: int, stop: int) -> MappedRows:
        """Rows ``start:stop`` as a view of the file's pages in the page cache (no copy: a cast
        reads them straight from there). ``release()`` once read drops the pages from this
        process's resident set (the page cache keeps them), so a merge's RSS stays a few slices
        whatever the input size."""
        meta = self.metadata(key)
        if not meta.shape or not 0 <= start <= stop <= meta.shape[0]:
            raise SourceError(f"rows {start}:{stop} are not in tensor '{key}' of '{self.name}'")
        begin, end = self._entry(key)["data_offsets"]
        size = meta.dtype.itemsize
        if end - begin != size * math.prod(meta.shape):
            raise SourceError(f"tensor '{key}' of '{self.name}' has a corrupt byte range")
        row = math.prod(meta.shape[1:])
        first = self._data_start + begin + start * row * size
        count = (stop - start) * row
        mapping = self._mapping()
        if first + count * size > len(mapping):
            raise SourceError(f"tensor '{key}' of '{self.name}' is truncated in '{self.path}'")
        shape = (stop - start, *meta.shape[1:])
        if not count:
            return MappedRows(torch.empty(shape, dtype=meta.dtype), mapping, first, 0)
        view = torch.frombuffer(mapping, dtype=meta.dtype, count=count, offset=first)
        return MappedRows(view.view(shape), mapping, first, count * size)

    def _mapping(self) -> mmap.mmap:
        """The whole file mapped copy-on-write (never written: a writable buffer torch can
        view without a warning; the pages are the page cache's until touched by a write)."""
        with self._map_lock:
            if self._map is None:
                with self.path.open("rb") as file:
                    self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY)
            return self._map

    def _read(self, key: str, first: int, last: int, shape: tuple[int, ...]) -> torch.Tensor:
        dtype = self.metadata(key).dtype
        buffer = bytearray((last - first) * dtype.itemsize)
        self._read_at(key, first, memoryview(buffer))
        if not buffer:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)

    def _read_at(self, key: str, first: int, view: memoryview) -> None:
        """Fill ``view`` with the tensor's bytes from element ``first`` on."""
        entry = self._entry(key)
        meta = self.metadata(key)
        size = meta.dtype.itemsize
        begin, end = entry["data_offsets"]
        if end - begin != size * math.prod(meta.shape):
            raise SourceError(f"tensor '{key}' of '{self.name}' has a corrupt byte range")
        if not len(view):
            return
        with self.path.open("rb", buffering=0) as file:
            got = _pread_into(file.fileno(), view, self._data_start + begin + first * size)
        if got != len(view):
            raise SourceError(f"tensor '{key}' of '{self.name}' is truncated in '{self.path}'")

    def metadata(self, key: str) -> TensorMeta:
        entry = self._entry(key)
        dtype = entry["dtype"]
        if dtype not in _DTYPES:
            raise SourceError(f"tensor '{key}' of '{self.name}' has unsupported dtype {dtype}")
        return TensorMeta(_DTYPES[dtype], tuple(entry["shape"]))

    def file_metadata(self) -> dict[str, str]:
        """The file's ``__metadata__`` header (empty when absent)."""
        return dict(self._file_metadata)


_SPAN = 2 * 1024 * 1024
"""``MappedRows.release`` drops whole aligned spans of this size: a read fault maps the page
cache's large folios whole, past the rows asked for (dropping just the rows' pages left ~37
MiB of inputs resident in a 270M merge; a neighbour slice mapped again costs a minor fault)."""
_DONTNEED = getattr(mmap, "MADV_DONTNEED", None)  # not on every platform


class MappedRows:
    """Rows viewed in a file mapping (``SafetensorsFile.map_rows``)."""

    def __init__(self, tensor: torch.Tensor, mapping: mmap.mmap, offset: int, nbytes: int) -> None:
        self.tensor = tensor
        self._mapping, self._offset, self._nbytes = mapping, offset, nbytes

    def release(self) -> None:
        """Drop the rows' pages from the process (read again, they are mapped again from the
        page cache); the tensor must not be read after this."""
        if not self._nbytes or _DONTNEED is None:
            return
        first = self._offset - self._offset % _SPAN
        last = min(len(self._mapping), -(-(self._offset + self._nbytes) // _SPAN) * _SPAN)
        self._mapping.madvise(_DONTNEED, first, last - first)


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The safetensors JSON header and the byte offset where tensor data starts."""
    with path.open("rb") as file:
        length = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(length))
    return header, 8 + length


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``fd`` at ``offset``; returns the bytes read (short at EOF)."""
    done = 0
    while done < len(view):
        count = os.preadv(fd, [view[done:]], offset + done)
        if count <= 0:
            break
        done += count
    return done


class ShardedCheckpoint:
    """A folder holding ``model.safetensors.index.json`` and its shards, or plain
    ``*.safetensors`` files (each tensor name must appear in exactly one file)."""

    rereads_cheaply = True  # local files, as SafetensorsFile

    def __init__(self, path: str | Path, name: str | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise SourceError(f"no checkpoint folder at '{self.path}'")
        self.name = name or self.path.name
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        index = self.path / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            for key, shard in weight_map.items():
                self._where[key] = self._shard_path(shard)
        else:
            shards = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not shards:
                raise SourceError(f"checkpoint folder '{self.path}' holds no .safetensors file")
            for shard in shards:
                for key in list(self._open(shard).keys()):
                    if key in self._where:
                        raise SourceError(f"tensor '{key}' appears twice in '{self.path}'")
                    self._where[key] = shard

    def _shard_path(self, shard: str) -> str:
        if "/" in shard or "\\" in shard or shard.startswith("."):
            raise SourceError(f"index of '{self.path}' names a shard outside it: '{shard}'")
        return shard

    def _open(self, shard: str) -> SafetensorsFile:
        if shard not in self._files:
            self._files[shard] = SafetensorsFile(self.path / shard, name=self.name)
        return self._files[shard]

    def keys(self) -> list[str]:
        return list(self._where)

    def get(self, key: str) -> torch.Tensor:
        if key not in self._where:
            raise KeyError(f"'{self.name}' has no tensor '{key}'")
        return self._open(self._where[key]).get(key)

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of one tensor, read from its shard on demand."""
        if key not in self._where:
            raise KeyError(f"'{self.name}' has no tensor '{key}'")
        return self._open(self._where[key]).get_rows(key, start, stop)

    def get_rows_into(self, key: str, start: int, stop: int, buffer: torch.Tensor) -> torch.Tensor:
        """Rows ``start:stop`` of one tensor read into ``buffer`` (``SafetensorsFile``'s)."""
        if key not in self._where:
            raise KeyError(f"'{self.name}' has no tensor '{key}'")
        return self._open(self._where[key]).get_rows_into(key, start, stop, buffer)

    def map_rows(self, key: str, start: int, stop: int) -> MappedRows:
        """Rows ``start:stop`` of one tensor viewed in its file (``SafetensorsFile``'s)."""
        if key not in self._where:
            raise KeyError(f"'{self.name}' has no tensor '{key}'")
        return self._open(self._where[key]).map_rows(key, start, stop)

    def metadata(self, key: str) -> TensorMeta:
        if key not in self._where:
            raise KeyError(f"'{self.name}' has no tensor '{key}'")
        return self._open(self._where[key]).metadata(key)


class StateDictSource:
    """An in-memory ``name -> tensor`` mapping as a source."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], name: str = "state_dict") -> None:
        self.name = name
        self._tensors = dict(tensors)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def get(self, key: str) -> torch.Tensor:
        if key not in self._tensors:
            raise KeyError(f"'{self.name}' has no tensor '{key}'")
        return self._tensors[key]

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of one tensor (a view, not a copy)."""
        return self.get(key)[start:stop]

    def metadata(self, key: str) -> TensorMeta:
        tensor = self.get(key)
        return TensorMeta(tensor.dtype, tuple(tensor.shape))
