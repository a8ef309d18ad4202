"""Safetensors header validation: real files from safetensors.torch and handcrafted malformed bytes."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from registry.safetensors_check import (
    HeaderError,
    inspect_safetensors_file,
    inspect_safetensors_header,
    scan_nonfinite,
    validate_index_json,
)


def build(header: Any, data: bytes = b"", *, raw_header: bytes | None = None) -> bytes:
    """Handcraft a safetensors file from a header object (or raw header bytes) and a data section."""
    encoded = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def inspect(blob: bytes, **kwargs: Any) -> Any:
    return inspect_safetensors_header(
        lambda offset, length: blob[offset : offset + length],
        len(blob),
        name="w.safetensors",
        **kwargs,
    )


def reject(blob: bytes, match: str, **kwargs: Any) -> HeaderError:
    with pytest.raises(HeaderError, match=match) as info:
        inspect(blob, **kwargs)
    assert "w.safetensors" in str(info.value)
    return info.value


def f32(shape: list[int], begin: int) -> dict[str, Any]:
    count = 1
    for dim in shape:
        count *= dim
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, begin + 4 * count]}


def test_accepts_file_from_safetensors_torch(tmp_path: Path) -> None:
    tensors = {
        "b.weight": torch.randn(3, 4),
        "a.bias": torch.zeros(4, dtype=torch.bfloat16),
        "c.steps": torch.arange(5, dtype=torch.int64),
        "d.mask": torch.tensor([True, False]),
        "e.empty": torch.zeros(0, 3),
        "f.fp8": torch.ones(2, dtype=torch.float8_e4m3fn),
        "g.half": torch.ones(2, 2, dtype=torch.float16),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    header = inspect_safetensors_file(path)
    assert set(header.tensors) == set(tensors)
    assert header.metadata == {"format": "pt"}
    blob = path.read_bytes()
    for tensor_name, entry in header.tensors.items():
        expected = tensors[tensor_name]
        assert entry.shape == tuple(expected.shape)
        raw = bytearray(blob[entry.start : entry.end])
        if raw:
            got = torch.frombuffer(raw, dtype=expected.dtype).reshape(expected.shape)
            assert torch.equal(got.float(), expected.float())
    scan_nonfinite(lambda o, n: blob[o : o + n], header, name=path.name)


def test_accepts_empty_header_and_metadata_only() -> None:
    assert inspect(build({})).tensors == {}
    header = inspect(build({"__metadata__": {"k": "v"}, "x": f32([2], 0)}, b"\0" * 8))
    assert header.metadata == {"k": "v"}
    assert header.tensors["x"].start == header.data_offset


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (b"\x01\x02", "shorter than the 8-byte"),
        (struct.pack("<Q", 1000) + b"{}", "exceeds the file size"),
        (build(None, raw_header=b"\xff\xfe{}"), "not valid UTF-8"),
        (build(None, raw_header=b"{not json"), "not valid JSON"),
        (build([1, 2]), "must be a JSON object"),
        (build(None, raw_header=b'{"a": 1, "a": 2}'), "duplicate key"),
        (build(None, raw_header=b'{"x": NaN}'), "not valid JSON"),
        (build({"__metadata__": ["x"]}), "__metadata__"),
        (build({"__metadata__": {"k": 1}}), "value of 'k' must be a string"),
        (build({"x": [1]}), "entry must be an object"),
        (
            build({"x": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}, b"\0"),
            "unknown dtype 'Q7'",
        ),
        (
            build({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
            "shape must be",
        ),
        (
            build({"x": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}, b"\0" * 4),
            "shape must be",
        ),
        (
            build({"x": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4),
            "shape must be",
        ),
        (
            build({"x": {"dtype": "F32", "shape": "2", "data_offsets": [0, 4]}}, b"\0" * 4),
            "shape must be",
        ),
        (
            build({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, b"\0" * 4),
            "data_offsets must be",
        ),
        (
            build({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4),
            "before begin",
        ),
        (
            build({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8),
            "needs 4",
        ),
        (
            build({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "z": 1}}, b"\0" * 4),
            "unknown fields",
        ),
        (build({"x": f32([2], 0)}, b"\0" * 4), "past the end of the file"),
        (build({"x": f32([1], 0), "y": f32([2], 0)}, b"\0" * 8), "overlaps"),
        (build({"x": f32([1], 0), "y": f32([1], 8)}, b"\0" * 12), "gap of 4 bytes"),
        (build({"x": f32([1], 4)}, b"\0" * 8), "gap of 4 bytes"),
        (build({"x": f32([1], 0)}, b"\0" * 6), "2 trailing bytes"),
        (build({}, b"\0\0"), "2 trailing bytes"),
    ],
)
def test_rejects_malformed(blob: bytes, match: str) -> None:
    reject(blob, match)


def test_error_names_the_tensor() -> None:
    error = reject(build({"good": f32([1], 0), "bad.weight": f32([1], 8)}, b"\0" * 12), "gap")
    assert error.tensor == "bad.weight"
    assert "tensor 'bad.weight'" in str(error)


def test_header_cap() -> None:
    blob = build({"x": f32([1], 0)}, b"\0" * 4)
    reject(blob, "exceeds the limit of 10 bytes", max_header_bytes=10)


def test_short_read_is_an_error() -> None:
    blob = build({"x": f32([1], 0)}, b"\0" * 4)
    with pytest.raises(HeaderError, match="short read"):
        inspect_safetensors_header(
            lambda o, n: blob[o : o + n - 1], len(blob), name="w.safetensors"
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e5m2])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_scan_nonfinite_names_tensor(tmp_path: Path, dtype: torch.dtype, bad: float) -> None:
    values = torch.zeros(40)
    values[37] = bad
    path = tmp_path / "x.safetensors"
    save_file(
        {"fine": torch.ones(3, dtype=dtype), "broken": values.to(dtype), "ints": torch.arange(3)},
        str(path),
    )
    blob = path.read_bytes()
    header = inspect_safetensors_file(path)
    with pytest.raises(HeaderError, match=r"tensor 'broken'.*element 37"):
        scan_nonfinite(lambda o, n: blob[o : o + n], header, name=path.name, chunk_bytes=8)


def test_scan_nonfinite_passes_finite(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.randn(100), "b": torch.randn(7, dtype=torch.float64)}, str(path))
    blob = path.read_bytes()
    scan_nonfinite(
        lambda o, n: blob[o : o + n], inspect_safetensors_file(path), name="x", chunk_bytes=12
    )


def test_validate_index_json() -> None:
    index = {"metadata": {"total_size": 8}, "weight_map": {"a": "model-00001-of-00002.safetensors"}}
    uploaded = {"model-00001-of-00002.safetensors", "config.json"}
    assert validate_index_json(json.dumps(index).encode(), uploaded=uploaded) == index["weight_map"]


@pytest.mark.parametrize(
    ("index", "match"),
    [
        (b"[]", "must be a JSON object"),
        (b"{bad", "not valid JSON"),
        (json.dumps({"weight_map": {}}).encode(), "non-empty object"),
        (
            json.dumps({"weight_map": {"a": "../x.safetensors"}}).encode(),
            "plain '.safetensors' file name",
        ),
        (json.dumps({"weight_map": {"a": "x.bin"}}).encode(), "plain '.safetensors' file name"),
        (
            json.dumps({"weight_map": {"a": "missing.safetensors"}}).encode(),
            "'missing.safetensors' was not uploaded",
        ),
    ],
)
def test_validate_index_json_rejects(index: bytes, match: str) -> None:
    with pytest.raises(HeaderError, match=match):
        validate_index_json(index, uploaded={"present.safetensors"})
