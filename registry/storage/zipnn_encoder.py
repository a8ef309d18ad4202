"""Writing a blob in the chunked container of ``registry.storage.zipnn_codec``.

``plan_segments`` cuts a safetensors file into chunks along its tensor layout: neighbouring
tensors of one dtype (and, for a delta, whose base bytes are contiguous too) share chunks of at
most ``CHUNK_BYTES``; the header and any gaps are plain bytes. ``write_compressed`` streams the
original once, encodes chunk by chunk and stores the object content-addressed
(``blobs/sha256/<hex of the compressed object>``), so memory stays at a few chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from registry.storage.base import READ_CHUNK, BlobInfo, ObjectStore, StorageError
from registry.storage.chunk_table import (
    DTYPE_CODES,
    Chunk,
    encode_footer,
    encode_table,
)
from registry.storage.codecs import StoredBlob, iter_original
from registry.storage.zipnn_codec import BaseWindow, encode_chunk

CHUNK_BYTES = 2 << 20
BASE_WINDOW = 16 << 20  # base bytes read per request while encoding a delta


@dataclass(frozen=True)
class TensorSpan:
    """One tensor's absolute bytes ``[start, end)`` in the file, its safetensors dtype and where
    the same tensor's bytes start in the base file (None: no delta for it)."""

    start: int
    end: int
    dtype: str
    base_start: int | None = None


@dataclass(frozen=True)
class Segment:
    """Original bytes ``[start, start + length)`` encoded as one chunk."""

    start: int
    length: int
    dtype: str
    base_start: int | None = None


@dataclass(frozen=True)
class CompressedBlob:
    """A stored chunked object: where it is, where its table is, whether it needs the base."""

    info: BlobInfo
    table: tuple[int, int]
    chunks: int
    uses_base: bool


def _joins(prev: Segment, span: Segment) -> bool:
    if prev.dtype != span.dtype or prev.start + prev.length != span.start:
        return False
    if prev.base_start is None or span.base_start is None:
        return prev.base_start is None and span.base_start is None
    return prev.base_start + prev.length == span.base_start


def _runs(size: int, spans: Iterable[TensorSpan]) -> list[Segment]:
    runs: list[Segment] = []
    position = 0
    for span in sorted((s for s in spans if s.end > s.start), key=lambda s: s.start):
        if span.start < position or span.end > size:
            raise StorageError(
                f"tensor bytes [{span.start}, {span.end}) overlap or exceed the file"
            )
        pieces = [Segment(position, span.start - position, "")] if span.start > position else []
        dtype = span.dtype if span.dtype in DTYPE_CODES else ""
        pieces.append(Segment(span.start, span.end - span.start, dtype, span.base_start))
        for piece in pieces:
            if runs and _joins(runs[-1], piece):
                last = runs[-1]
                runs[-1] = Segment(
                    last.start, last.length + piece.length, last.dtype, last.base_start
                )
            else:
                runs.append(piece)
        position = span.end
    if position < size:
        runs.append(Segment(position, size - position, ""))
    return runs


def plan_segments(
    size: int, spans: Iterable[TensorSpan], *, chunk_bytes: int | None = None
) -> list[Segment]:
    """Segments tiling ``[0, size)``: runs of one dtype split into pieces of ``chunk_bytes``
    (default ``CHUNK_BYTES``)."""
    chunk_bytes = CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    if chunk_bytes <= 0 or chunk_bytes % 8:
        raise ValueError(f"chunk_bytes must be a positive multiple of 8, got {chunk_bytes}")
    segments: list[Segment] = []
    for run in _runs(size, spans):
        for offset in range(0, run.length, chunk_bytes):
            base = None if run.base_start is None else run.base_start + offset
            length = min(chunk_bytes, run.length - offset)
            segments.append(Segment(run.start + offset, length, run.dtype, base))
    return segments


class _SequentialReader:
    """Hands out consecutive exact-length pieces of a byte stream."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = bytearray()

    def take(self, length: int) -> bytes:
        while len(self._buffer) < length:
            chunk = next(self._chunks, None)
            if chunk is None:
                raise StorageError(f"original ended {length - len(self._buffer)} bytes early")
            self._buffer += chunk
        piece = bytes(self._buffer[:length])
        del self._buffer[:length]
        return piece


def write_compressed(
    store: ObjectStore,
    *,
    original: StoredBlob,
    segments: list[Segment],
    base: StoredBlob | None = None,
    progress: Callable[[int], None] | None = None,
) -> CompressedBlob:
    """Encode ``original`` segment by segment (deltas against ``base`` where a segment names
    base bytes) and store the container; ``progress`` gets each segment's original length."""
    chunks: list[Chunk] = []

    def payloads() -> Iterator[bytes]:
        reader = _SequentialReader(iter_original(store, original, chunk_size=READ_CHUNK))
        window = BaseWindow(store, base, BASE_WINDOW) if base is not None else None
        offset = 0
        for segment in segments:
            data = reader.take(segment.length)
            base_bytes = None
            if window is not None and segment.base_start is not None:
                base_bytes = window.read(segment.base_start, segment.length)
            encoding, payload = encode_chunk(data, segment.dtype, base_bytes)
            delta_base = segment.base_start if encoding.is_delta else None
            chunks.append(
                Chunk(
                    segment.start,
                    segment.length,
                    offset,
                    len(payload),
                    encoding,
                    segment.dtype,
                    delta_base,
                )
            )
            offset += len(payload)
            if progress is not None:
                progress(segment.length)
            yield payload
        table = encode_table(chunks)
        yield table
        yield encode_footer(offset, len(table), original.size)

    info = store.put_stream(payloads())
    table_offset = sum(chunk.stored for chunk in chunks)
    table_length = info.size - table_offset - len(encode_footer(0, 0, 0))
    uses_base = any(chunk.encoding.is_delta for chunk in chunks)
    return CompressedBlob(info, (table_offset, table_length), len(chunks), uses_base)
