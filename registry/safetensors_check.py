"""Validation of safetensors files and sharded-checkpoint indexes, without trusting their content.

Everything here reads through a ``read_range(offset, length) -> bytes`` callable, so the same
checks run on a local file, an uploaded temp file or a range-read from the object store.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry.text import shown, text_problem

if TYPE_CHECKING:
    import torch

ReadRange = Callable[[int, int], bytes]
"""``read_range(offset, length)`` returns exactly ``length`` bytes starting at ``offset``."""

DEFAULT_MAX_HEADER_BYTES = 100 * 1024 * 1024
INDEX_FILE_NAME = "model.safetensors.index.json"

DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
"""Every safetensors dtype name and its item size in bytes."""
FLOAT_DTYPE_NAMES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})

if TYPE_CHECKING:
    #: Every safetensors dtype name and its torch dtype (built on first use, so that clients
    #: checking headers do not load torch): the one table the registry reads dtypes from.
    TORCH_DTYPES: dict[str, torch.dtype]
    FLOAT_TORCH_DTYPES: dict[str, torch.dtype]


@cache
def _torch_dtypes() -> dict[str, torch.dtype]:
    import torch

    table = {name: getattr(torch, attr) for name, attr in _TORCH_NAMES.items()}
    assert all(table[n].itemsize == size for n, size in DTYPE_SIZES.items())
    return table


_TORCH_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32",
    "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16",
    "U8": "uint8", "BOOL": "bool",
}  # fmt: skip


def __getattr__(name: str) -> Any:
    if name == "TORCH_DTYPES":
        return _torch_dtypes()
    if name == "FLOAT_TORCH_DTYPES":
        return {n: d for n, d in _torch_dtypes().items() if n in FLOAT_DTYPE_NAMES}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class HeaderError(ValueError):
    """A safetensors file or index is malformed; names the file and, when known, the tensor."""

    def __init__(self, file: str, tensor: str | None, message: str) -> None:
        self.file = file
        self.tensor = tensor
        self.message = message
        where = f"file '{file}'" + (f", tensor '{tensor}'" if tensor is not None else "")
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file; ``start``/``end`` are absolute byte offsets in the file."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: tensors by name, ``__metadata__``, and where the data section starts."""

    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_offset: int


def inspect_safetensors_header(
    read_range: ReadRange,
    total_size: int,
    *,
    name: str,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
) -> SafetensorsHeader:
    """Parse and fully validate a safetensors header; returns tensors with absolute byte ranges.

    Raises ``HeaderError`` naming ``name`` (the file) and the offending tensor.
    """
    if total_size < 8:
        raise HeaderError(
            name, None, f"file is {total_size} bytes, shorter than the 8-byte header length"
        )
    (header_len,) = struct.unpack("<Q", _read_exact(read_range, 0, 8, name))
    if header_len > max_header_bytes:
        raise HeaderError(
            name, None, f"header length {header_len} exceeds the limit of {max_header_bytes} bytes"
        )
    if header_len > total_size - 8:
        raise HeaderError(
            name, None, f"header length {header_len} exceeds the file size {total_size} - 8"
        )
    raw = _parse_header_json(_read_exact(read_range, 8, header_len, name), name)
    data_offset = 8 + header_len
    metadata = _parse_metadata(raw.pop("__metadata__", None), name)
    for tensor in raw:
        _check_text(tensor, name, None, "tensor name")
    tensors = {key: _parse_entry(key, value, data_offset, name) for key, value in raw.items()}
    _check_layout(tensors, data_offset, total_size, name)
    return SafetensorsHeader(tensors=tensors, metadata=metadata, data_offset=data_offset)


def inspect_safetensors_file(
    path: Path, *, max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
) -> SafetensorsHeader:
    """``inspect_safetensors_header`` on a local file (the file name is used in errors)."""
    with path.open("rb") as handle:
        return inspect_safetensors_header(
            file_range_reader(handle),
            path.stat().st_size,
            name=path.name,
            max_header_bytes=max_header_bytes,
        )


def file_range_reader(handle: Any) -> ReadRange:
    """A ``read_range`` over an open binary file object."""

    def read_range(offset: int, length: int) -> bytes:
        handle.seek(offset)
        return bytes(handle.read(length))

    return read_range


def _read_exact(read_range: ReadRange, offset: int, length: int, name: str) -> bytes:
    data = read_range(offset, length)
    if len(data) != length:
        raise HeaderError(
            name, None, f"short read at offset {offset}: wanted {length} bytes, got {len(data)}"
        )
    return data


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key '{shown(key)}'")
        result[key] = value
    return result


def _parse_header_json(raw: bytes, name: str) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderError(
            name, None, f"header is not valid UTF-8 ({exc.reason} at byte {exc.start})"
        ) from exc
    try:
        parsed = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_no_constant)
    except RecursionError:  # '[' x 10000: the decoder recursed past Python's limit
        raise HeaderError(name, None, "header JSON is nested too deeply") from None
    except ValueError as exc:
        raise HeaderError(name, None, f"header is not valid JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise HeaderError(name, None, f"header must be a JSON object, got {type(parsed).__name__}")
    return parsed


def _no_constant(token: str) -> Any:
    raise ValueError(f"non-standard JSON constant {token}")


def _parse_metadata(value: Any, name: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise HeaderError(
            name, "__metadata__", f"must be an object of strings, got {type(value).__name__}"
        )
    for key, item in value.items():
        _check_text(key, name, "__metadata__", "key")
        if isinstance(item, str):
            _check_text(item, name, "__metadata__", f"value of '{shown(key)}'")
        if not isinstance(item, str):
            raise HeaderError(
                name,
                "__metadata__",
                f"value of '{key}' must be a string, got {type(item).__name__}",
            )
    return dict(value)


def _check_text(text: str, name: str, tensor: str | None, what: str) -> None:
    """Header text is stored and listed: it must be valid Unicode without NUL."""
    problem = text_problem(text)
    if problem is not None:
        raise HeaderError(name, tensor, f"{what} '{shown(text)}' {problem}")


def _parse_entry(tensor: str, value: Any, data_offset: int, name: str) -> TensorEntry:
    if not isinstance(value, dict):
        raise HeaderError(name, tensor, f"entry must be an object, got {type(value).__name__}")
    extra = set(value) - {"dtype", "shape", "data_offsets"}
    if extra:
        raise HeaderError(name, tensor, f"unknown fields {sorted(extra)}")
    dtype = value.get("dtype")
    if dtype not in DTYPE_SIZES:
        raise HeaderError(name, tensor, f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_SIZES)}")
    shape = value.get("shape")
    if not isinstance(shape, list) or not all(_is_count(dim) for dim in shape):
        raise HeaderError(
            name, tensor, f"shape must be a list of non-negative integers, got {shape!r}"
        )
    offsets = value.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise HeaderError(
            name,
            tensor,
            f"data_offsets must be [begin, end] non-negative integers, got {offsets!r}",
        )
    begin, end = offsets
    if end < begin:
        raise HeaderError(name, tensor, f"data_offsets end {end} is before begin {begin}")
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise HeaderError(
            name,
            tensor,
            f"data_offsets span {end - begin} bytes but {dtype} {tuple(shape)} needs {expected}",
        )
    return TensorEntry(
        dtype=dtype, shape=tuple(shape), start=data_offset + begin, end=data_offset + end
    )


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_layout(
    tensors: dict[str, TensorEntry], data_offset: int, total_size: int, name: str
) -> None:
    """Tensors sorted by offset must tile the data section exactly: no gap, overlap or trailing bytes."""
    cursor = data_offset
    previous: str | None = None
    for tensor, entry in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if entry.end > total_size:
            raise HeaderError(
                name,
                tensor,
                f"data ends at byte {entry.end}, past the end of the file ({total_size} bytes)",
            )
        if entry.start < cursor:
            raise HeaderError(
                name,
                tensor,
                f"data at bytes {entry.start}-{entry.end} overlaps tensor '{previous}'",
            )
        if entry.start > cursor:
            raise HeaderError(
                name,
                tensor,
                f"gap of {entry.start - cursor} bytes before its data at byte {entry.start}",
            )
        cursor, previous = entry.end, tensor
    if cursor != total_size:
        raise HeaderError(
            name, previous, f"{total_size - cursor} trailing bytes after the last tensor's data"
        )


def scan_nonfinite(
    read_range: ReadRange,
    header: SafetensorsHeader,
    *,
    name: str,
    chunk_bytes: int = 16 * 1024 * 1024,
) -> None:
    """Raise ``HeaderError`` naming the first floating-point tensor (by offset) holding NaN or Inf."""
    import torch

    ordered = sorted(header.tensors.items(), key=lambda item: item[1].start)
    for tensor, entry in ordered:
        if entry.dtype not in FLOAT_DTYPE_NAMES:
            continue
        dtype = _torch_dtypes()[entry.dtype]
        itemsize = DTYPE_SIZES[entry.dtype]
        step = max(itemsize, chunk_bytes - chunk_bytes % itemsize)
        for offset in range(entry.start, entry.end, step):
            length = min(step, entry.end - offset)
            values = torch.frombuffer(
                bytearray(_read_exact(read_range, offset, length, name)), dtype=dtype
            )
            if values.itemsize == 1:  # float8 has no isfinite kernel on every backend
                values = values.to(torch.float32)
            if not bool(torch.isfinite(values).all()):
                element = (offset - entry.start) // itemsize + int(
                    (~torch.isfinite(values)).nonzero()[0]
                )
                raise HeaderError(
                    name, tensor, f"contains NaN or Inf (first at flat element {element})"
                )


def validate_index_json(data: bytes, *, uploaded: set[str]) -> dict[str, str]:
    """Validate a ``model.safetensors.index.json``; returns its ``weight_map`` (tensor -> shard file).

    Every shard named must be among ``uploaded`` (the checkpoint's file names).
    """
    name = INDEX_FILE_NAME
    parsed = _parse_header_json(data, name)
    weight_map = parsed.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise HeaderError(
            name, None, "'weight_map' must be a non-empty object of tensor name -> shard file"
        )
    for tensor, shard in weight_map.items():
        if (
            not isinstance(shard, str)
            or not shard.endswith(".safetensors")
            or "/" in shard
            or "\\" in shard
        ):
            raise HeaderError(
                name, tensor, f"shard must be a plain '.safetensors' file name, got {shard!r}"
            )
        if shard not in uploaded:
            raise HeaderError(
                name, tensor, f"shard '{shard}' was not uploaded; uploaded: {sorted(uploaded)}"
            )
    return dict(weight_map)
