"""Range-read ``TensorSource`` adapters over safetensors blobs, on both object stores."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergeops.sources import TensorMeta, TensorSource
from registry.storage import ObjectStore
from registry.storage.range_source import (
    BlobTensorSource,
    SafetensorsHeaderError,
    ShardedBlobTensorSource,
)
from tests.registry.test_storage_contract import open_test_store


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    return open_test_store(request, tmp_path)


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "w.bf16": torch.randn(3, 4, generator=gen).to(torch.bfloat16),
        "w.f16": torch.randn(5, generator=gen).to(torch.float16),
        "w.f32": torch.randn(2, 3, 2, generator=gen),
        "w.f64": torch.randn(2, generator=gen, dtype=torch.float64),
        "i.i64": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "i.i32": torch.tensor([-1, 2], dtype=torch.int32),
        "i.i16": torch.tensor([7], dtype=torch.int16),
        "i.i8": torch.tensor([-8, 8], dtype=torch.int8),
        "i.u8": torch.tensor([255, 0], dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }


def _put_safetensors(
    store: ObjectStore, tmp_path: Path, tensors: dict[str, torch.Tensor], name: str
) -> str:
    path = tmp_path / name
    save_file(tensors, str(path), metadata={"format": "pt"})
    return store.put_file(path).key


def test_blob_source_reads_every_dtype(store: ObjectStore, tmp_path: Path) -> None:
    tensors = _tensors()
    source = BlobTensorSource(
        store, _put_safetensors(store, tmp_path, tensors, "m.safetensors"), "model-a"
    )
    assert isinstance(source, TensorSource)
    assert source.keys() == sorted(tensors)
    assert source.file_metadata == {"format": "pt"}
    for name, tensor in tensors.items():
        assert source.metadata(name) == TensorMeta(tensor.dtype, tuple(tensor.shape))
        got = source.get(name)
        assert got.dtype == tensor.dtype and got.shape == tensor.shape
        assert torch.equal(got, tensor), name
    with pytest.raises(KeyError, match="'missing' not found in source 'model-a'"):
        source.get("missing")


def test_sharded_source(store: ObjectStore, tmp_path: Path) -> None:
    tensors = _tensors()
    names = sorted(tensors)
    shard_a = {n: tensors[n] for n in names[:5]}
    shard_b = {n: tensors[n] for n in names[5:]}
    keys = {
        "model-00001-of-00002.safetensors": _put_safetensors(
            store, tmp_path, shard_a, "a.safetensors"
        ),
        "model-00002-of-00002.safetensors": _put_safetensors(
            store, tmp_path, shard_b, "b.safetensors"
        ),
    }
    files = sorted(keys)
    index = {"weight_map": {n: files[0] for n in shard_a} | {n: files[1] for n in shard_b}}
    source = ShardedBlobTensorSource.from_index(store, index, keys, "sharded")
    assert isinstance(source, TensorSource) and source.keys() == names
    for name, tensor in tensors.items():
        assert source.metadata(name).shape == tuple(tensor.shape)
        assert torch.equal(source.get(name), tensor)
    with pytest.raises(KeyError, match="sharded"):
        source.metadata("nope")
    with pytest.raises(SafetensorsHeaderError, match="no blob"):
        ShardedBlobTensorSource.from_index(store, index, {files[0]: keys[files[0]]}, "x")


def _raw_blob(
    store: ObjectStore, header: object, data: bytes = b"", length: int | None = None
) -> str:
    body = json.dumps(header).encode()
    return store.put_bytes(
        struct.pack("<Q", len(body) if length is None else length) + body + data
    ).key


@pytest.mark.parametrize(
    ("header", "data", "length", "match"),
    [
        ({}, b"", 10**9, "exceeds the limit"),
        ({}, b"", 10**6, "or the blob size"),
        ([1, 2], b"", None, "not a JSON object"),
        (
            {"t": {"dtype": "X9", "shape": [1], "data_offsets": [0, 1]}},
            b"\0",
            None,
            "unsupported dtype",
        ),
        (
            {"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}},
            b"\0" * 8,
            None,
            "do not fit",
        ),
        (
            {"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
            b"\0" * 4,
            None,
            "do not fit",
        ),
        (
            {"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}},
            b"\0" * 4,
            None,
            "invalid shape",
        ),
    ],
)
def test_malformed_headers_rejected(
    store: ObjectStore, header: object, data: bytes, length: int | None, match: str
) -> None:
    key = _raw_blob(store, header, data, length)
    with pytest.raises(SafetensorsHeaderError, match=match):
        BlobTensorSource(store, key, "bad", max_header_bytes=10**8)


def test_too_short_blob(store: ObjectStore) -> None:
    key = store.put_bytes(b"abc").key
    with pytest.raises(SafetensorsHeaderError, match="too short"):
        BlobTensorSource(store, key, "tiny")
