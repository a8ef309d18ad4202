"""``S3ObjectStore.read_into`` on moto_server: exact ranges received in place, clear errors."""

from __future__ import annotations

import os

import pytest

from registry.storage import open_store
from registry.storage.base import BlobNotFound, InvalidRangeError
from registry.storage.s3 import S3ObjectStore

MIB = 1024 * 1024


@pytest.fixture
def s3(s3_store_url: str, s3_endpoint: str) -> S3ObjectStore:
    store = open_store(s3_store_url, endpoint_url=s3_endpoint, aws_access_key_id="testing",
                       aws_secret_access_key="testing")  # fmt: skip
    assert isinstance(store, S3ObjectStore)
    return store


def test_read_into_receives_exact_ranges(s3: S3ObjectStore) -> None:
    data = os.urandom(3 * MIB + 17)
    key = s3.put_bytes(data).key
    buffer = bytearray(MIB + 5)
    s3.read_into(key, 2 * MIB, memoryview(buffer))
    assert bytes(buffer) == data[2 * MIB : 3 * MIB + 5]
    tail = bytearray(17)
    s3.read_into(key, 3 * MIB, memoryview(tail))
    assert bytes(tail) == data[3 * MIB :]
    s3.read_into(key, len(data), memoryview(bytearray()))  # empty, at the end: fine
    with pytest.raises(InvalidRangeError, match="outside"):
        s3.read_into(key, 3 * MIB, memoryview(bytearray(18)))
    with pytest.raises(InvalidRangeError):
        s3.read_into(key, -1, memoryview(bytearray(1)))
    with pytest.raises(BlobNotFound):
        s3.read_into("blobs/sha256/" + "0" * 64, 0, memoryview(bytearray(1)))
    # every body was received in full: nothing is left half-read on a pooled connection
    again = bytearray(MIB)
    s3.read_into(key, 0, memoryview(again))
    assert bytes(again) == data[:MIB]


def test_a_range_source_reads_rows_through_read_into(s3: S3ObjectStore) -> None:
    import torch
    from safetensors.torch import save

    from registry.storage.range_source import BlobTensorSource

    weight = torch.randn(300, 64).to(torch.bfloat16)
    key = s3.put_bytes(save({"w": weight, "n": torch.ones(64)})).key
    source = BlobTensorSource(s3, key, "m", read_ahead_bytes=64 * 2 * 100)  # 100-row windows
    got = torch.cat([source.get_rows("w", start, start + 50) for start in range(0, 300, 50)])
    assert torch.equal(got, weight) and torch.equal(source.get("n"), torch.ones(64))
    assert source.stats.requests == 4 and source.stats.bytes == weight.numel() * 2 + 64 * 4
