"""mergeops ``TensorSource`` adapters that read safetensors blobs from an object store by range.

Only the header and the requested tensor's bytes are fetched, so a merge can stream a checkpoint
from S3 without downloading it. ``ShardedBlobTensorSource`` spans the shards of one checkpoint.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Mapping
from typing import Any

import torch

from mergeops.sources import TensorMeta
from registry.safetensors_check import TORCH_DTYPES
from registry.storage.base import ObjectStore, StorageError

DEFAULT_MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES = TORCH_DTYPES


class SafetensorsHeaderError(StorageError, ValueError):
    """A blob whose safetensors header is malformed, oversized or inconsistent."""


class _Entry:
    __slots__ = ("begin", "dtype", "end", "shape")

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...], begin: int, end: int) -> None:
        self.dtype, self.shape, self.begin, self.end = dtype, shape, begin, end


def _parse_entry(where: str, name: str, raw: Any, data_size: int) -> _Entry:
    """Validate one header entry: known dtype, int shape, offsets inside the data and sized right."""
    if not isinstance(raw, dict):
        raise SafetensorsHeaderError(f"{where}: entry for tensor '{name}' is not an object")
    dtype = DTYPES.get(raw.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise SafetensorsHeaderError(
            f"{where}: tensor '{name}' has unsupported dtype {raw.get('dtype')!r}; "
            f"supported: {', '.join(sorted(DTYPES))}"
        )
    shape, offsets = raw.get("shape"), raw.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise SafetensorsHeaderError(f"{where}: tensor '{name}' has invalid shape {shape!r}")
    if not (
        isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
    ):
        raise SafetensorsHeaderError(
            f"{where}: tensor '{name}' has invalid data_offsets {offsets!r}"
        )
    begin, end = offsets
    expected = math.prod(shape) * dtype.itemsize
    if not 0 <= begin <= end <= data_size or end - begin != expected:
        raise SafetensorsHeaderError(
            f"{where}: tensor '{name}' data_offsets {offsets} do not fit shape {tuple(shape)} "
            f"({expected} bytes) inside {data_size} data bytes"
        )
    return _Entry(dtype, tuple(shape), begin, end)


class BlobTensorSource:
    """One safetensors blob as a ``TensorSource``; the header is read once, tensors on demand."""

    def __init__(
        self,
        store: ObjectStore,
        key: str,
        name: str,
        *,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    ) -> None:
        if sys.byteorder != "little":
            raise StorageError(
                "safetensors data is little-endian; big-endian hosts are unsupported"
            )
        self.name = name
        self.store = store
        self.key = key
        self._where = f"safetensors blob '{key}' (source '{name}')"
        self._entries, self.file_metadata = self._read_header(max_header_bytes)

    def _read_header(self, max_header_bytes: int) -> tuple[dict[str, _Entry], dict[str, str]]:
        total = self.store.size(self.key)
        if total < 8:
            raise SafetensorsHeaderError(f"{self._where} is {total} bytes, too short for a header")
        (length,) = struct.unpack("<Q", self.store.read_range(self.key, 0, 8))
        if length > max_header_bytes or 8 + length > total:
            raise SafetensorsHeaderError(
                f"{self._where}: header length {length} exceeds the limit {max_header_bytes} "
                f"or the blob size {total}"
            )
        try:
            header = json.loads(self.store.read_range(self.key, 8, length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SafetensorsHeaderError(
                f"{self._where}: header is not valid JSON ({exc})"
            ) from None
        if not isinstance(header, dict):
            raise SafetensorsHeaderError(f"{self._where}: header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + length
        data_size = total - self._data_start
        entries = {
            name: _parse_entry(self._where, name, raw, data_size) for name, raw in header.items()
        }
        return entries, {str(k): str(v) for k, v in dict(metadata).items()}

    def _entry(self, key: str) -> _Entry:
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(f"tensor '{key}' not found in source '{self.name}'") from None

    def keys(self) -> list[str]:
        """Tensor names, sorted."""
        return sorted(self._entries)

    def metadata(self, key: str) -> TensorMeta:
        """Dtype and shape from the header; no data is read."""
        entry = self._entry(key)
        return TensorMeta(dtype=entry.dtype, shape=entry.shape)

    def get(self, key: str) -> torch.Tensor:
        """Range-read one tensor's bytes and return it as a CPU tensor."""
        entry = self._entry(key)
        if entry.end == entry.begin:
            return torch.empty(entry.shape, dtype=entry.dtype)
        # Fill one preallocated buffer chunk by chunk: peak memory is the tensor plus one chunk.
        raw = bytearray(entry.end - entry.begin)
        view, filled = memoryview(raw), 0
        start = self._data_start + entry.begin
        for chunk in self.store.iter_bytes(self.key, start=start, end=start + len(raw)):
            view[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
        if filled != len(raw):
            raise StorageError(f"short read of tensor '{key}' from {self._where}")
        return torch.frombuffer(raw, dtype=entry.dtype).reshape(entry.shape)


class ShardedBlobTensorSource:
    """A sharded checkpoint (tensor name -> blob key) as one ``TensorSource``."""

    def __init__(
        self,
        store: ObjectStore,
        weight_map: Mapping[str, str],
        name: str,
        *,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    ) -> None:
        self.name = name
        self.store = store
        self._weight_map = dict(weight_map)
        self._max_header_bytes = max_header_bytes
        self._shards: dict[str, BlobTensorSource] = {}

    @classmethod
    def from_index(
        cls, store: ObjectStore, index: Mapping[str, Any], shard_keys: Mapping[str, str], name: str
    ) -> ShardedBlobTensorSource:
        """Build from a ``model.safetensors.index.json`` dict and shard filename -> blob key."""
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, Mapping):
            raise SafetensorsHeaderError(f"index of source '{name}' has no 'weight_map' object")
        missing = sorted(set(weight_map.values()) - set(shard_keys))
        if missing:
            raise SafetensorsHeaderError(
                f"index of source '{name}' names shards with no blob: {missing}"
            )
        return cls(store, {tensor: shard_keys[file] for tensor, file in weight_map.items()}, name)

    def _shard_for(self, key: str) -> BlobTensorSource:
        blob = self._weight_map.get(key)
        if blob is None:
            raise KeyError(f"tensor '{key}' not found in source '{self.name}'")
        shard = self._shards.get(blob)
        if shard is None:
            shard = BlobTensorSource(
                self.store, blob, self.name, max_header_bytes=self._max_header_bytes
            )
            self._shards[blob] = shard
        return shard

    def keys(self) -> list[str]:
        """Tensor names, sorted."""
        return sorted(self._weight_map)

    def metadata(self, key: str) -> TensorMeta:
        """Dtype and shape from the owning shard's header."""
        return self._shard_for(key).metadata(key)

    def get(self, key: str) -> torch.Tensor:
        """Range-read one tensor from the shard that holds it."""
        return self._shard_for(key).get(key)
