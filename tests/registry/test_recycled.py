"""Receive buffers reused once their tensors are gone, and S3 ``read_into`` on moto_server."""

from __future__ import annotations

import gc
import os

import pytest
import torch

from registry.storage import open_store
from registry.storage.base import BlobNotFound, InvalidRangeError
from registry.storage.recycled import MIB, ReceiveBuffers, size_class
from registry.storage.s3 import S3ObjectStore


def test_a_buffer_returns_when_its_last_view_is_gone() -> None:
    pool = ReceiveBuffers(keep=2, max_bytes=4 * MIB)
    tensor, view = pool.take(3 * MIB)
    view[:4] = b"abcd"
    del view
    address = tensor.data_ptr()
    rows = tensor.view(torch.int16)[:10]  # a view outlives the tensor object
    del tensor
    gc.collect()
    assert pool.pooled() == 0
    assert bytes(rows.view(torch.uint8)[:4].tolist()) == b"abcd"
    del rows
    assert pool.pooled() == 1
    again, _ = pool.take(4 * MIB)  # same size class: the same memory
    assert again.data_ptr() == address and again.numel() == 4 * MIB and pool.allocated == 1
    assert size_class(1) == MIB and size_class(MIB + 1) == 2 * MIB


def test_the_pool_is_bounded_and_large_requests_are_not_pooled() -> None:
    pool = ReceiveBuffers(keep=1, max_bytes=MIB)
    first, second = pool.take(MIB)[0], pool.take(MIB)[0]
    big, _ = pool.take(MIB + 1)
    del first, second, big, _
    assert pool.pooled() == 1 and pool.allocated == 2
    with pytest.raises(ValueError, match="keep"):
        ReceiveBuffers(keep=-1)


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
