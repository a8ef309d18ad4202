"""Where each tensor of a stored safetensors file lives: the entries range reads are planned from.

Two ways in: the TENSOR INDEX the registry stored on the file row at ``complete`` (name ->
``{"dtype", "shape", "start", "end"}``, absolute byte offsets in the original file), which costs
no request at all, or the file's own header read from the store (the fallback). Both are checked
the same way: a known dtype, a shape of non-negative ints, and a byte range inside the file that
holds exactly ``prod(shape) * itemsize`` bytes.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from registry.safetensors_check import TORCH_DTYPES
from registry.storage.base import ObjectStore, StorageError
from registry.storage.codecs import StoredBlob, read_original

DEFAULT_MAX_HEADER_BYTES = 100 * 1024 * 1024

DTYPES = TORCH_DTYPES
_NAMES = {dtype: name for name, dtype in DTYPES.items()}


class SafetensorsHeaderError(StorageError, ValueError):
    """A blob whose safetensors header is malformed, oversized or inconsistent."""


class TensorIndexError(SafetensorsHeaderError):
    """A stored tensor index entry that is malformed or does not fit its file."""


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor: dtype, shape and its bytes ``[begin, end)`` in the ORIGINAL file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (first dimension); the whole tensor for a scalar."""
        return math.prod(self.shape[1:]) * self.dtype.itemsize

    def as_json(self) -> dict[str, Any]:
        """The entry in the stored index's JSON form."""
        return {
            "dtype": _NAMES[self.dtype],
            "shape": list(self.shape),
            "start": self.begin,
            "end": self.end,
        }


def _dtype(error: type[SafetensorsHeaderError], where: str, name: str, raw: Any) -> torch.dtype:
    dtype = DTYPES.get(raw) if isinstance(raw, str) else None
    if dtype is None:
        raise error(
            f"{where}: tensor '{name}' has unsupported dtype {raw!r}; "
            f"supported: {', '.join(sorted(DTYPES))}"
        )
    return dtype


def _shape(error: type[SafetensorsHeaderError], where: str, name: str, raw: Any) -> tuple[int, ...]:
    ok = isinstance(raw, list) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in raw
    )
    if not ok:
        raise error(f"{where}: tensor '{name}' has invalid shape {raw!r}")
    return tuple(raw)


def _checked(
    error: type[SafetensorsHeaderError],
    where: str,
    name: str,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    span: tuple[int, int, int, int],
) -> TensorEntry:
    """The entry, once its byte range ``[begin, end)`` is sized right and inside ``[low, high]``."""
    begin, end, low, high = span
    expected = math.prod(shape) * dtype.itemsize
    if not low <= begin <= end <= high or end - begin != expected:
        raise error(
            f"{where}: tensor '{name}' byte range [{begin}, {end}) does not fit shape "
            f"{shape} ({expected} bytes) inside bytes [{low}, {high}) of the file"
        )
    return TensorEntry(dtype, shape, begin, end)


def _header_entry(where: str, name: str, raw: Any, data_start: int, total: int) -> TensorEntry:
    """One header entry (``data_offsets`` relative to the data section) as an absolute entry."""
    if not isinstance(raw, dict):
        raise SafetensorsHeaderError(f"{where}: entry for tensor '{name}' is not an object")
    dtype = _dtype(SafetensorsHeaderError, where, name, raw.get("dtype"))
    shape = _shape(SafetensorsHeaderError, where, name, raw.get("shape"))
    offsets = raw.get("data_offsets")
    if not (
        isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
    ):
        raise SafetensorsHeaderError(
            f"{where}: tensor '{name}' has invalid data_offsets {offsets!r}"
        )
    span = (data_start + offsets[0], data_start + offsets[1], data_start, total)
    try:
        return _checked(SafetensorsHeaderError, where, name, dtype, shape, span)
    except SafetensorsHeaderError:
        raise SafetensorsHeaderError(
            f"{where}: tensor '{name}' data_offsets {offsets} do not fit shape {shape} "
            f"({math.prod(shape) * dtype.itemsize} bytes) inside {total - data_start} data bytes"
        ) from None


def entries_from_index(where: str, index: Mapping[str, Any], size: int) -> dict[str, TensorEntry]:
    """Checked entries of a stored tensor index for a file of ``size`` bytes.

    Raises ``TensorIndexError`` naming the tensor and the bad value.
    """
    if not isinstance(index, Mapping):
        raise TensorIndexError(f"{where}: tensor index is not an object ({type(index).__name__})")
    entries: dict[str, TensorEntry] = {}
    for name, raw in index.items():
        if not isinstance(raw, Mapping):
            raise TensorIndexError(f"{where}: index entry for tensor '{name}' is not an object")
        dtype = _dtype(TensorIndexError, where, name, raw.get("dtype"))
        shape = _shape(TensorIndexError, where, name, raw.get("shape"))
        begin, end = raw.get("start"), raw.get("end")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (begin, end)):
            raise TensorIndexError(
                f"{where}: index entry for tensor '{name}' has invalid start/end {begin!r}/{end!r}"
            )
        assert isinstance(begin, int) and isinstance(end, int)
        entries[str(name)] = _checked(
            TensorIndexError, where, str(name), dtype, shape, (begin, end, 8, size)
        )
    return entries


def entries_from_header(
    store: ObjectStore, blob: StoredBlob, where: str, max_header_bytes: int
) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Entries and ``__metadata__`` read from the file's own header (two range reads)."""
    total = blob.size
    if total < 8:
        raise SafetensorsHeaderError(f"{where} is {total} bytes, too short for a header")
    (length,) = struct.unpack("<Q", read_original(store, blob, 0, 8))
    if length > max_header_bytes or 8 + length > total:
        raise SafetensorsHeaderError(
            f"{where}: header length {length} exceeds the limit {max_header_bytes} "
            f"or the blob size {total}"
        )
    try:
        header = json.loads(read_original(store, blob, 8, length))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise SafetensorsHeaderError(f"{where}: header is not valid JSON ({exc!r})") from None
    if not isinstance(header, dict):
        raise SafetensorsHeaderError(f"{where}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    entries = {
        name: _header_entry(where, name, raw, 8 + length, total) for name, raw in header.items()
    }
    return entries, {str(k): str(v) for k, v in dict(metadata).items()}
