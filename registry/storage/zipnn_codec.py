"""Lossless chunked compression of safetensors blobs with zipnn (float tensors: exponent bytes
separated and entropy-coded) and zstd (headers, integer tensors, sparse deltas).

Codecs ``zipnn`` (chunks stand alone) and ``zipnn-delta`` (some chunks are the XOR of the file's
bytes with the same tensor's bytes in the base file, ``StoredBlob.refs["base"]``) share one
reader: a range read fetches only the chunks it overlaps (``registry.storage.chunk_table``),
several neighbouring chunks in one request, and decodes them. Parsed chunk tables and recently
decoded chunks are cached per store key; keys are content-addressed, so entries never go stale.

``encode_chunk`` picks, per chunk, the smallest of its candidate encodings that decodes back to
the exact bytes (raw always qualifies).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import zipnn
import zstandard

from registry.storage.base import ObjectStore, StorageError
from registry.storage.chunk_table import (
    FOOTER_SIZE,
    Chunk,
    ChunkTable,
    Encoding,
    decode_footer,
    decode_table,
)
from registry.storage.codecs import StoredBlob, read_original

ZIPNN_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
MIN_ZIPNN_BYTES = 4096
ZSTD_LEVEL = 3
FETCH_BYTES = 8 << 20  # neighbouring chunks are fetched together up to this many stored bytes
GROUP_BYTES = 16 << 20  # ... and this many original bytes (what one group holds decoded)
THREADS = max(1, min(4, os.cpu_count() or 1))


class _Lru:
    """A small thread-safe LRU map."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


_Group = tuple[list[Chunk], bytes | None]  # chunks fetched together, or one cached chunk
_TABLES = _Lru(256)
_DECODED = _Lru(8)


def _xor(data: bytes, base: bytes) -> bytes:
    if len(data) != len(base):
        raise StorageError(f"delta chunk of {len(data)} bytes against {len(base)} base bytes")
    return np.bitwise_xor(np.frombuffer(data, np.uint8), np.frombuffer(base, np.uint8)).tobytes()


def _zipnn_compress(data: bytes, dtype: str) -> bytes:
    # zipnn reorders the buffer it is given in place (even a bytes object): hand it a copy.
    compressor = zipnn.ZipNN(input_format="byte", bytearray_dtype=dtype, threads=THREADS)
    return bytes(compressor.compress(bytearray(data)))


def _zipnn_decompress(payload: bytes) -> bytes:
    return bytes(zipnn.ZipNN(input_format="byte", threads=THREADS).decompress(bytearray(payload)))


def _decode_plain(encoding: Encoding, payload: bytes, length: int) -> bytes:
    if encoding == Encoding.RAW:
        return payload
    if encoding in (Encoding.ZSTD, Encoding.XOR_ZSTD):
        return zstandard.ZstdDecompressor().decompress(payload, max_output_size=length)
    return _zipnn_decompress(payload)


def decode_chunk(chunk: Chunk, payload: bytes, base: bytes | None) -> bytes:
    """The original bytes of ``chunk`` from its payload (and, for a delta, the base's bytes)."""
    data = _decode_plain(chunk.encoding, payload, chunk.length)
    if chunk.encoding.is_delta:
        if base is None:
            raise StorageError(f"chunk at byte {chunk.start} is a delta but no base was given")
        data = _xor(data, base)
    if len(data) != chunk.length:
        raise StorageError(
            f"chunk at byte {chunk.start} decoded to {len(data)} bytes, expected {chunk.length}"
        )
    return data


def _candidates(data: bytes, dtype: str, base: bytes | None) -> list[tuple[Encoding, bytes]]:
    """Encodings worth trying, cheapest first; ones that cannot win are skipped (zipnn beats
    zstd on float weights; an XOR delta far below the raw size beats compressing alone)."""
    found = [(Encoding.RAW, data)]
    zipnn_dtype = ZIPNN_DTYPES.get(dtype) if len(data) >= MIN_ZIPNN_BYTES else None
    smallest = len(data)
    if base is not None:
        delta = _xor(data, base)
        found.append((Encoding.XOR_ZSTD, zstandard.compress(delta, ZSTD_LEVEL)))
        smallest = len(found[-1][1])
        if zipnn_dtype and smallest > len(data) // 4:  # sparse deltas: zstd's zero runs win
            found.append((Encoding.XOR_ZIPNN, _zipnn_compress(delta, zipnn_dtype)))
            smallest = min(smallest, len(found[-1][1]))
    if smallest > len(data) * 3 // 5:  # alone can still win (bf16 zipnn alone: ~0.66)
        if zipnn_dtype:
            found.append((Encoding.ZIPNN, _zipnn_compress(data, zipnn_dtype)))
        else:
            found.append((Encoding.ZSTD, zstandard.compress(data, ZSTD_LEVEL)))
    return found


def encode_chunk(data: bytes, dtype: str, base: bytes | None = None) -> tuple[Encoding, bytes]:
    """The smallest encoding of ``data`` (a run of ``dtype`` elements, ``""`` for plain bytes)
    that decodes back to exactly ``data``; with ``base`` (same length) XOR deltas compete too."""
    for encoding, payload in sorted(_candidates(data, dtype, base), key=lambda c: len(c[1])):
        if encoding == Encoding.RAW:
            return encoding, payload
        try:
            chunk = Chunk(0, len(data), 0, len(payload), encoding, dtype)
            if decode_chunk(chunk, payload, base) == data:
                return encoding, payload
        except (zstandard.ZstdError, ValueError, StorageError):
            continue
    return Encoding.RAW, data


def load_table(store: ObjectStore, blob: StoredBlob) -> ChunkTable:
    """The chunk table of ``blob`` (cached per store and key)."""
    cache_key = (store.url, blob.key)
    table: ChunkTable | None = _TABLES.get(cache_key)
    if table is not None:
        return table
    where = f"compressed blob '{blob.key}'"
    span = blob.params.get("table")
    if isinstance(span, list | tuple) and len(span) == 2:
        offset, length = int(span[0]), int(span[1])
    else:
        stored = store.size(blob.key)
        footer = store.read_range(blob.key, stored - FOOTER_SIZE, FOOTER_SIZE)
        offset, length, size = decode_footer(footer, where=where)
        if size != blob.size:
            raise StorageError(f"{where} holds a {size}-byte file, the row says {blob.size}")
    table = decode_table(store.read_range(blob.key, offset, length), size=blob.size, where=where)
    _TABLES.put(cache_key, table)
    return table


class BaseWindow:
    """Reads of a base file's original bytes, served from one larger read where they are
    neighbours (a delta file's chunks usually follow the base's layout): one request per
    window instead of one per chunk."""

    def __init__(self, store: ObjectStore, base: StoredBlob, window: int) -> None:
        self.store, self.base, self.window = store, base, window
        self.start, self.data = 0, b""

    def read(self, start: int, length: int) -> bytes:
        """Exactly ``length`` original bytes of the base from ``start``."""
        offset = start - self.start
        if offset < 0 or offset + length > len(self.data):
            size = min(max(length, self.window), self.base.size - start)
            self.start, self.data, offset = (
                start,
                read_original(self.store, self.base, start, size),
                0,
            )
        return self.data[offset : offset + length]


def _base_span(chunks: list[Chunk]) -> int:
    """How much base to read at once for ``chunks``: their base bytes' extent when they sit
    close together (at most twice what they use), else one chunk at a time."""
    deltas = [c for c in chunks if c.encoding.is_delta and c.base_start is not None]
    if not deltas:
        return 0
    low = min(c.base_start or 0 for c in deltas)
    high = max((c.base_start or 0) + c.length for c in deltas)
    used = sum(c.length for c in deltas)
    return high - low if high - low <= 2 * used else 0


class ChunkedCodec:
    """Reader of the chunked container; ``needs_base`` for ``zipnn-delta``."""

    def __init__(self, name: str, *, needs_base: bool) -> None:
        self.name = name
        self.needs_base = needs_base

    def iter_original(
        self, store: ObjectStore, blob: StoredBlob, *, start: int, end: int, chunk_size: int
    ) -> Iterator[bytes]:
        """Bytes ``[start, end)`` of the original file, decoding only the chunks they touch."""
        table = load_table(store, blob)
        base = blob.refs.get("base")
        if table.uses_base and base is None:
            raise StorageError(f"blob '{blob.key}' is a delta but its base blob is not known")
        for chunk, data in self._decoded(store, blob, base, table.overlapping(start, end)):
            low, high = max(start, chunk.start) - chunk.start, min(end, chunk.end) - chunk.start
            view = memoryview(data)
            for offset in range(low, high, chunk_size):
                yield bytes(view[offset : min(offset + chunk_size, high)])

    def _groups(self, store: ObjectStore, blob: StoredBlob, chunks: list[Chunk]) -> list[_Group]:
        """Neighbouring chunks fetched in one request (bounded in stored and original bytes);
        a chunk already decoded in the cache is a group of its own, with its bytes."""
        groups: list[_Group] = []
        pending: list[Chunk] = []
        for chunk in chunks:
            hit = _DECODED.get((store.url, blob.key, chunk.start))
            if hit is not None:
                groups += [(pending, None)] if pending else []
                groups.append(([chunk], hit))
                pending = []
                continue
            pending.append(chunk)
            stored, original = sum(c.stored for c in pending), sum(c.length for c in pending)
            if stored >= FETCH_BYTES or original >= GROUP_BYTES:
                groups.append((pending, None))
                pending = []
        return groups + ([(pending, None)] if pending else [])

    def _load(
        self, store: ObjectStore, blob: StoredBlob, base: StoredBlob | None, group: _Group
    ) -> list[tuple[Chunk, bytes]]:
        chunks, hit = group
        return (
            [(chunks[0], hit)] if hit is not None else list(self._fetch(store, blob, base, chunks))
        )

    def _decoded(
        self, store: ObjectStore, blob: StoredBlob, base: StoredBlob | None, chunks: list[Chunk]
    ) -> Iterator[tuple[Chunk, bytes]]:
        """Decoded chunks in order. From a remote store, the next group is fetched and decoded
        on a helper thread while one is consumed (request latency overlaps decoding and
        sending); a local store is read in line (CPU-bound: a helper thread measured no gain)."""
        groups = self._groups(store, blob, chunks)
        if len(groups) < 2 or store.local_path(blob.key) is not None:
            for group in groups:
                yield from self._load(store, blob, base, group)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckreg-decode") as pool:
            ahead = pool.submit(self._load, store, blob, base, groups[0])
            for group in groups[1:]:
                current, ahead = ahead.result(), pool.submit(self._load, store, blob, base, group)
                yield from current
            yield from ahead.result()

    def _fetch(
        self, store: ObjectStore, blob: StoredBlob, base: StoredBlob | None, chunks: list[Chunk]
    ) -> Iterator[tuple[Chunk, bytes]]:
        if not chunks:
            return
        first = chunks[0].offset
        span = store.read_range(blob.key, first, chunks[-1].offset + chunks[-1].stored - first)
        window = BaseWindow(store, base, _base_span(chunks)) if base is not None else None
        for chunk in chunks:
            payload = span[chunk.offset - first : chunk.offset - first + chunk.stored]
            base_bytes = None
            if chunk.encoding.is_delta and window is not None and chunk.base_start is not None:
                base_bytes = window.read(chunk.base_start, chunk.length)
            data = decode_chunk(chunk, payload, base_bytes)
            _DECODED.put((store.url, blob.key, chunk.start), data)
            yield chunk, data


ZIPNN = ChunkedCodec("zipnn", needs_base=False)
ZIPNN_DELTA = ChunkedCodec("zipnn-delta", needs_base=True)
