"""The ``tall`` codec: a family member rebuilt from TALL masks (arXiv 2405.07813), lossy.

A member of a family compressed with TALL masks keeps no bytes of its own file: it is served as
``θ0 + m_t ⊙ τ_MTL`` from three stored blobs, the codec refs ``base`` (the base checkpoint's file
with the same tensors), ``merged`` (the family's multi-task vector τ_MTL) and ``mask`` (this
member's bit-packed mask, ``mergeops.ops.masks.pack_masks``). The served file is an ordinary
safetensors file whose layout is fixed by the codec params alone (``tensors``: ``[name, dtype,
shape]`` in file order, ``metadata``: its ``__metadata__``), so its sha256 is stable and any byte
range ``[start, end)`` is produced by computing only the tensors it overlaps.
"""

from __future__ import annotations

import json
import math
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from mergeops.ops.masks import reconstruct_task, unpack_mask
from registry.safetensors_check import TORCH_DTYPES
from registry.storage.base import READ_CHUNK, ObjectStore, resolve_range
from registry.storage.codecs import StoredBlob

if TYPE_CHECKING:
    from registry.storage.range_source import BlobTensorSource

CODEC = "tall"
REFS = ("base", "merged", "mask")
RECONSTRUCTED_KEY = "ckreg.reconstructed"
ORIGINAL_SHA_KEY = "ckreg.original_sha256"
_SOURCE_CACHE_SIZE = 32
ROW_BLOCK_BYTES = 16 << 20  # rebuilt bytes computed at once (whole rows)


@dataclass(frozen=True)
class TensorSpan:
    """One tensor of the rebuilt file: its dtype name, shape and absolute byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class Layout:
    """The rebuilt file: header bytes (length prefix included) and every tensor's span."""

    header: bytes
    spans: tuple[TensorSpan, ...]

    @property
    def size(self) -> int:
        return self.spans[-1].end if self.spans else len(self.header)

    def tensor_index(self) -> dict[str, dict[str, Any]]:
        """The file row's tensor index (absolute offsets) for this layout."""
        return {
            s.name: {"dtype": s.dtype, "shape": list(s.shape), "start": s.start, "end": s.end}
            for s in self.spans
        }


def layout(tensors: Sequence[Sequence[Any]], metadata: Mapping[str, str]) -> Layout:
    """The deterministic safetensors layout of ``tensors`` (``[name, dtype, shape]``, in order).

    The header is compact JSON, ``__metadata__`` first with sorted keys, padded with spaces so
    tensor data starts 8-byte aligned.
    """
    header: dict[str, Any] = {"__metadata__": {str(k): str(metadata[k]) for k in sorted(metadata)}}
    offset, entries = 0, []
    for name, dtype, shape in tensors:
        if dtype not in TORCH_DTYPES:
            raise ValueError(f"tall layout: tensor '{name}' has unknown dtype {dtype!r}")
        length = math.prod(int(d) for d in shape) * TORCH_DTYPES[dtype].itemsize
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + length],
        }
        entries.append(
            (str(name), str(dtype), tuple(int(d) for d in shape), offset, offset + length)
        )
        offset += length
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % 8)
    prefix = struct.pack("<Q", len(raw)) + raw
    start = len(prefix)
    spans = tuple(TensorSpan(n, d, s, start + a, start + b) for n, d, s, a, b in entries)
    return Layout(prefix, spans)


def blob_layout(blob: StoredBlob) -> Layout:
    """The layout a ``tall`` blob's params describe, checked against its recorded size."""
    params = blob.params
    if "tensors" not in params or "lambda" not in params:
        raise ValueError(f"tall blob '{blob.key}' lacks codec params 'tensors'/'lambda'")
    found = layout(params["tensors"], params.get("metadata") or {})
    if found.size != blob.size:
        raise ValueError(
            f"tall blob '{blob.key}': its params describe {found.size} bytes, the row says {blob.size}"
        )
    missing = [ref for ref in REFS if ref not in blob.refs]
    if missing:
        raise ValueError(f"tall blob '{blob.key}' lacks codec refs {missing}")
    return found


# ---- reading the referenced blobs ------------------------------------------------------------

_sources: OrderedDict[tuple[int, str, int], BlobTensorSource] = OrderedDict()
_sources_lock = threading.Lock()


def _source(store: ObjectStore, blob: StoredBlob, role: str) -> BlobTensorSource:
    """A header-parsed reader of a referenced blob, kept in a small LRU (headers are re-used
    by every range read of every member)."""
    from registry.storage.range_source import BlobTensorSource  # range_source imports codecs

    key = (id(store), blob.key, blob.size)
    with _sources_lock:
        if key in _sources:
            _sources.move_to_end(key)
            return _sources[key]
    source = BlobTensorSource(store, blob, f"tall {role}")
    with _sources_lock:
        _sources[key] = source
        while len(_sources) > _SOURCE_CACHE_SIZE:
            _sources.popitem(last=False)
    return source


def rebuild_tensor(
    base: torch.Tensor, merged: torch.Tensor | None, mask: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """``θ0 + m ⊙ τ_MTL`` in ``dtype`` (float32 arithmetic); the base itself without a mask."""
    if mask is None or merged is None:
        return base.to(dtype)
    return reconstruct_task(base, merged, mask).to(dtype)


def _has_tensor(source: BlobTensorSource, name: str) -> bool:
    try:
        source.metadata(name)
    except KeyError:
        return False
    return True


def _mask_rows(source: BlobTensorSource, span: TensorSpan, rows: tuple[int, int]) -> torch.Tensor:
    """Rows ``[r0, r1)`` of a packed mask: only the bytes holding their bits are read."""
    per_row = math.prod(span.shape[1:])
    first, last = rows[0] * per_row, rows[1] * per_row
    packed = source.get_rows(span.name, first // 8, (last + 7) // 8)
    bits = unpack_mask(packed, [packed.numel() * 8])
    skip = first - (first // 8) * 8
    return bits[skip : skip + last - first].reshape((rows[1] - rows[0], *span.shape[1:]))


def _rows_bytes(
    store: ObjectStore, blob: StoredBlob, span: TensorSpan, rows: tuple[int, int] | None
) -> bytes:
    """The rebuilt bytes of rows ``[r0, r1)`` of one tensor (``None``: all of a scalar)."""
    base_source = _source(store, blob.refs["base"], "base")
    mask_source = _source(store, blob.refs["mask"], "mask")
    base_shape = tuple(base_source.metadata(span.name).shape)
    if base_shape != span.shape:
        raise ValueError(
            f"tall blob '{blob.key}', tensor '{span.name}': base has shape "
            f"{base_shape}, the layout {span.shape}"
        )
    masked = _has_tensor(mask_source, span.name)
    merged_source = _source(store, blob.refs["merged"], "merged") if masked else None
    if rows is None:
        base = base_source.get(span.name)
        mask = unpack_mask(mask_source.get(span.name), span.shape) if masked else None
        merged = merged_source.get(span.name) if merged_source is not None else None
    else:
        base = base_source.get_rows(span.name, *rows)
        mask = _mask_rows(mask_source, span, rows) if masked else None
        merged = merged_source.get_rows(span.name, *rows) if merged_source is not None else None
    rebuilt = rebuild_tensor(base, merged, mask, TORCH_DTYPES[span.dtype])
    return rebuilt.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _tensor_pieces(
    store: ObjectStore, blob: StoredBlob, span: TensorSpan, first: int, last: int
) -> Iterator[tuple[bytes, int]]:
    """The rebuilt bytes covering ``[first, last)`` of a tensor (offsets inside it), in blocks
    of whole rows (at most ~``ROW_BLOCK_BYTES``), each with the offset it starts at."""
    if not span.shape:
        yield _rows_bytes(store, blob, span, None), 0
        return
    row_bytes = math.prod(span.shape[1:]) * TORCH_DTYPES[span.dtype].itemsize
    if row_bytes == 0:
        return
    step = max(1, ROW_BLOCK_BYTES // row_bytes)
    row, stop = first // row_bytes, -(-last // row_bytes)
    while row < stop:
        upto = min(stop, row + step)
        yield _rows_bytes(store, blob, span, (row, upto)), row * row_bytes
        row = upto


def iter_tall(
    store: ObjectStore,
    blob: StoredBlob,
    *,
    start: int = 0,
    end: int | None = None,
    chunk_size: int = READ_CHUNK,
) -> Iterator[bytes]:
    """Bytes ``[start, end)`` of the rebuilt file, computing only the rows they overlap."""
    found = blob_layout(blob)
    start, end = resolve_range(blob.key, start, end, found.size)
    return _iter_spans(store, blob, found, start, end, chunk_size)


def _iter_spans(
    store: ObjectStore, blob: StoredBlob, found: Layout, start: int, end: int, chunk_size: int
) -> Iterator[bytes]:
    header = found.header
    if start < len(header):
        yield header[start : min(end, len(header))]
    for span in found.spans:
        if span.end <= start or span.start >= end or span.start == span.end:
            continue
        first, last = max(start, span.start) - span.start, min(end, span.end) - span.start
        for data, at in _tensor_pieces(store, blob, span, first, last):
            lo, hi = max(first, at) - at, min(last, at + len(data)) - at
            for offset in range(lo, hi, chunk_size):
                yield data[offset : min(offset + chunk_size, hi)]


class TallCodec:
    """The ``tall`` codec for ``registry.storage.codecs`` (registered there lazily)."""

    name = CODEC

    def iter_original(
        self, store: ObjectStore, blob: StoredBlob, *, start: int, end: int, chunk_size: int
    ) -> Iterator[bytes]:
        """Bytes ``[start, end)`` of the rebuilt member file."""
        return iter_tall(store, blob, start=start, end=end, chunk_size=chunk_size)


TALL = TallCodec()
