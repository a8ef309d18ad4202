"""mergeops ``TensorSource`` adapters that read safetensors blobs from an object store by range.

A merge streams a checkpoint straight from S3: ``get_rows(name, start, stop)`` reads the byte
span of those rows, ``get(name)`` one tensor's bytes; reads smaller than a read-ahead window
come from windows laid over the file's bytes, so one range request serves several slices and
neighbouring small tensors (``registry.storage.read_ahead``), larger ones are fetched as exactly
their bytes. Where the
tensors are comes from the TENSOR INDEX stored on the file row at ``complete`` (no request at
all); without one, the file's header is read from the store once. Every byte goes through
``registry.storage.codecs`` (a blob stored compressed reads the same). Sources are safe to
share between threads (the engine's prefetch reads several inputs at once): they keep no
per-read state, and their fetch counters are locked. ``ShardedBlobTensorSource`` spans the
shards of one checkpoint.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Mapping
from typing import Any

import torch

from mergeops.sources import TensorMeta
from registry.storage.base import ObjectStore, StorageError
from registry.storage.codecs import RAW, StoredBlob, iter_original
from registry.storage.read_ahead import DEFAULT_WINDOW_BYTES, ReadAhead
from registry.storage.tensor_index import (
    DEFAULT_MAX_HEADER_BYTES,
    DTYPES,
    SafetensorsHeaderError,
    TensorEntry,
    TensorIndexError,
    entries_from_header,
    entries_from_index,
)

__all__ = [
    "DEFAULT_MAX_HEADER_BYTES",
    "DTYPES",
    "BlobTensorSource",
    "FetchStats",
    "SafetensorsHeaderError",
    "ShardedBlobTensorSource",
    "TensorIndexError",
]


class FetchStats:
    """Bytes and range requests a source (or all shards of one checkpoint) fetched; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes = 0
        self.requests = 0

    def add(self, size: int) -> None:
        with self._lock:
            self.bytes += size
            self.requests += 1


class BlobTensorSource:
    """One safetensors file in the store as a ``TensorSource`` with row reads.

    ``blob`` is the file's ``StoredBlob`` (a bare key is read raw, its size asked from the
    store); ``index`` is the stored tensor index (then no header is read). Row reads smaller
    than ``read_ahead_bytes`` are served from read-ahead windows of that size
    (``registry.storage.read_ahead``; 0: one range request per read).
    """

    def __init__(
        self,
        store: ObjectStore,
        blob: StoredBlob | str,
        name: str,
        *,
        index: Mapping[str, Any] | None = None,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        stats: FetchStats | None = None,
        read_ahead_bytes: int = DEFAULT_WINDOW_BYTES,
    ) -> None:
        if sys.byteorder != "little":
            raise StorageError(
                "safetensors data is little-endian; big-endian hosts are unsupported"
            )
        if isinstance(blob, str):
            blob = StoredBlob(blob, store.size(blob))
        self.name = name
        self.store = store
        self.blob = blob
        self.key = blob.key
        self.stats = stats if stats is not None else FetchStats()
        self._where = f"safetensors blob '{blob.key}' (source '{name}')"
        self.file_metadata: dict[str, str] = {}
        self.read_ahead_bytes = read_ahead_bytes
        self._ahead = (
            ReadAhead(self._receive, blob.size, window_bytes=read_ahead_bytes)
            if read_ahead_bytes
            else None
        )
        if index is not None:
            self._entries = entries_from_index(self._where, index, blob.size)
        else:
            self._entries, self.file_metadata = entries_from_header(
                store, blob, self._where, max_header_bytes
            )

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickles (to Dask workers) as where to read from, not as an open client.
        return (_reopen_blob, (store_spec(self.store), self.blob, self.name, self.index()))

    def _entry(self, key: str) -> TensorEntry:
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(f"tensor '{key}' not found in source '{self.name}'") from None

    def keys(self) -> list[str]:
        """Tensor names, sorted."""
        return sorted(self._entries)

    def index(self) -> dict[str, dict[str, Any]]:
        """The tensor index this source reads by (stored-index JSON form)."""
        return {name: entry.as_json() for name, entry in self._entries.items()}

    def metadata(self, key: str) -> TensorMeta:
        """Dtype and shape from the index; no data is read."""
        entry = self._entry(key)
        return TensorMeta(dtype=entry.dtype, shape=entry.shape)

    def get(self, key: str) -> torch.Tensor:
        """One whole tensor: what open read-ahead windows hold of it comes from them, the rest
        is fetched as exactly its bytes (it opens no window: the engine reads small whole
        tensors ahead of the slices around them)."""
        entry = self._entry(key)
        return self._tensor(entry.begin, entry.end, entry.dtype, entry.shape, ahead=False)

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (first dimension, clamped like a slice) of one tensor: from
        read-ahead windows, or fetched as exactly their byte span with one range request."""
        entry = self._entry(key)
        if not entry.shape:
            raise ValueError(f"tensor '{key}' of source '{self.name}' is a scalar; it has no rows")
        count = entry.shape[0]
        start, stop = max(0, min(start, count)), max(0, min(stop, count))
        stop = max(start, stop)
        first = entry.begin + start * entry.row_bytes
        last = entry.begin + stop * entry.row_bytes
        return self._tensor(first, last, entry.dtype, (stop - start, *entry.shape[1:]))

    def _tensor(
        self,
        first: int,
        last: int,
        dtype: torch.dtype,
        shape: tuple[int, ...],
        *,
        ahead: bool = True,
    ) -> torch.Tensor:
        """Bytes ``[first, last)`` of the original file as a tensor of ``dtype`` and ``shape``;
        with ``ahead`` False no window is opened for them."""
        if first == last:
            return torch.empty(shape, dtype=dtype)
        if self._ahead is None:
            raw = self._receive(first, last)
        else:
            raw = self._ahead.read(first, last, open_windows=ahead)
        return raw.view(dtype).reshape(shape)

    def _receive(self, first: int, last: int) -> torch.Tensor:
        """Bytes ``[first, last)`` of the original file, fetched with one range request into
        one new buffer (a 1-D uint8 tensor)."""
        size = last - first
        tensor = torch.empty(size, dtype=torch.uint8)  # not zero-filled: received over at once
        view = tensor.numpy().data
        read_into = getattr(self.store, "read_into", None)
        if self.blob.codec == RAW and read_into is not None:  # received in place (S3)
            read_into(self.key, first, view)
        else:
            self._read_chunks(first, last, view)
        del view
        self.stats.add(size)
        return tensor

    def _read_chunks(self, first: int, last: int, view: memoryview) -> None:
        """Bytes ``[first, last)`` of the original file streamed (decoded) into ``view``."""
        filled, size = 0, len(view)
        for chunk in iter_original(self.store, self.blob, start=first, end=last):
            if filled + len(chunk) > size:
                raise StorageError(f"long read of bytes [{first}, {last}) from {self._where}")
            view[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
        if filled != size:
            raise StorageError(
                f"short read of bytes [{first}, {last}) from {self._where}: "
                f"{filled} of {size} bytes"
            )


class ShardedBlobTensorSource:
    """A sharded checkpoint (tensor name -> shard) as one ``TensorSource`` with row reads.

    Shards are given as ``StoredBlob``s (or bare keys) with their stored tensor indexes
    (``indexes``, blob key -> index); a shard without one has its header read when first used.
    """

    def __init__(
        self,
        store: ObjectStore,
        weight_map: Mapping[str, StoredBlob | str],
        name: str,
        *,
        indexes: Mapping[str, Mapping[str, Any]] | None = None,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        read_ahead_bytes: int = DEFAULT_WINDOW_BYTES,
    ) -> None:
        self.name = name
        self.read_ahead_bytes = read_ahead_bytes
        self.store = store
        self.stats = FetchStats()
        self._weight_map = dict(weight_map)
        self._indexes = dict(indexes or {})
        self._max_header_bytes = max_header_bytes
        self._shards: dict[str, BlobTensorSource] = {}
        self._lock = threading.Lock()
        for tensor, shard in self._weight_map.items():
            index = self._indexes.get(_key(shard))
            if index is not None and tensor not in index:
                raise TensorIndexError(
                    f"source '{name}': tensor '{tensor}' is mapped to shard '{_key(shard)}' "
                    "whose tensor index does not list it"
                )

    def __reduce__(self) -> tuple[Any, ...]:
        state = (self._weight_map, self.name, self._indexes, self._max_header_bytes)
        return (_reopen_sharded, (store_spec(self.store), *state))

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
        with self._lock:  # two prefetch threads must not open the same shard twice
            shard = self._shards.get(_key(blob))
            if shard is None:
                shard = BlobTensorSource(
                    self.store,
                    blob,
                    self.name,
                    index=self._indexes.get(_key(blob)),
                    max_header_bytes=self._max_header_bytes,
                    stats=self.stats,
                    read_ahead_bytes=self.read_ahead_bytes,
                )
                self._shards[_key(blob)] = shard
        return shard

    def keys(self) -> list[str]:
        """Tensor names, in the weight map's order (a sharded checkpoint's index order)."""
        return list(self._weight_map)

    def metadata(self, key: str) -> TensorMeta:
        """Dtype and shape from the owning shard's index."""
        return self._shard_for(key).metadata(key)

    def get(self, key: str) -> torch.Tensor:
        """One whole tensor from the shard that holds it."""
        return self._shard_for(key).get(key)

    def get_rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of one tensor from the shard that holds it."""
        return self._shard_for(key).get_rows(key, start, stop)


def _key(blob: StoredBlob | str) -> str:
    return blob if isinstance(blob, str) else blob.key


_STORES: dict[tuple[Any, ...], ObjectStore] = {}
_STORES_LOCK = threading.Lock()


def store_spec(store: ObjectStore) -> tuple[Any, ...]:
    """How to open ``store`` again in another process: its URL and, for S3, endpoint, region
    and part size. Credentials are not part of it (the other side uses boto3's usual chain)."""
    client = getattr(store, "client", None)
    if client is None:
        return (store.url,)
    return (store.url, client.meta.endpoint_url, client.meta.region_name, store.part_size)  # type: ignore[attr-defined]


def open_spec(spec: tuple[Any, ...]) -> ObjectStore:
    """The store ``spec`` names; one per process and spec, so every source shares its client."""
    from registry.storage import open_store

    with _STORES_LOCK:
        store = _STORES.get(spec)
        if store is None:
            options = dict(zip(("endpoint_url", "region", "part_size"), spec[1:], strict=False))
            store = _STORES[spec] = open_store(spec[0], **options)
        return store


def _reopen_blob(
    spec: tuple[Any, ...], blob: StoredBlob, name: str, index: Mapping[str, Any]
) -> BlobTensorSource:
    return BlobTensorSource(open_spec(spec), blob, name, index=index)


def _reopen_sharded(
    spec: tuple[Any, ...],
    weight_map: Mapping[str, StoredBlob | str],
    name: str,
    indexes: Mapping[str, Mapping[str, Any]],
    max_header_bytes: int,
) -> ShardedBlobTensorSource:
    return ShardedBlobTensorSource(
        open_spec(spec), weight_map, name, indexes=indexes, max_header_bytes=max_header_bytes
    )
