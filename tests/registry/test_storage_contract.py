"""One contract for every object store: the same tests run on ``file://`` and on ``s3://``.

The S3 run talks HTTP to the session's ``moto_server`` (fixture ``s3_endpoint``).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from registry.storage import (
    BlobNotFound,
    InvalidRangeError,
    ObjectStore,
    StorageIntegrityError,
    UnsafeKeyError,
    blob_key,
    open_store,
)

PART = 5 * 1024 * 1024  # S3's minimum part size, to exercise multipart with little data


def open_test_store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "file":
        return open_store(f"file://{tmp_path / 'store'}", part_size=PART)
    return open_store(
        request.getfixturevalue("s3_store_url"),
        endpoint_url=request.getfixturevalue("s3_endpoint"),
        part_size=PART,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    return open_test_store(request, tmp_path)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_round_trip_is_content_addressed(store: ObjectStore) -> None:
    data = b"hello ckreg"
    info = store.put_bytes(data)
    assert info.key == blob_key(sha(data)) == f"blobs/sha256/{sha(data)}"
    assert (info.sha256, info.size, info.created) == (sha(data), len(data), True)
    assert store.exists(info.key)
    assert store.size(info.key) == len(data)
    assert b"".join(store.iter_bytes(info.key)) == data


def test_identical_content_is_stored_once(store: ObjectStore) -> None:
    first = store.put_bytes(b"same")
    second = store.put_stream(iter([b"sa", b"me"]), expected_sha256=sha(b"same"))
    assert first.created and not second.created
    assert second.key == first.key
    assert list(store.list("blobs/")) == [first.key]


def test_put_file_and_file_object(store: ObjectStore, tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(3000))
    info = store.put_file(path)
    assert info.sha256 == sha(path.read_bytes())
    again = store.put_stream(io.BytesIO(path.read_bytes()))
    assert again.key == info.key and not again.created


def test_empty_blob(store: ObjectStore) -> None:
    info = store.put_bytes(b"")
    assert info.size == 0 and store.size(info.key) == 0
    assert b"".join(store.iter_bytes(info.key)) == b""
    assert store.read_range(info.key, 0, 0) == b""


@pytest.mark.parametrize(
    ("declared_sha", "declared_size"),
    [("0" * 64, None), (None, 5), (None, 50)],
    ids=["bad-sha", "too-long", "too-short"],
)
def test_integrity_mismatch_leaves_nothing(
    store: ObjectStore, declared_sha: str | None, declared_size: int | None
) -> None:
    with pytest.raises(StorageIntegrityError):
        store.put_stream([b"0123456789"], expected_sha256=declared_sha, expected_size=declared_size)
    assert list(store.list()) == []


def test_integrity_mismatch_in_multipart_leaves_nothing(store: ObjectStore) -> None:
    data = os.urandom(2 * PART + 1000)
    with pytest.raises(StorageIntegrityError):
        store.put_stream(_chunked(data), expected_sha256="f" * 64)
    with pytest.raises(StorageIntegrityError):
        store.put_stream(_chunked(data), expected_size=len(data) - 1)
    assert list(store.list()) == []


def _chunked(data: bytes, size: int = 1 << 20) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_multipart_upload_round_trip(store: ObjectStore) -> None:
    data = os.urandom(2 * PART + 1024 * 1024)  # ~11 MiB: three parts, the last one short
    info = store.put_stream(_chunked(data))
    assert (info.sha256, info.size, info.created) == (sha(data), len(data), True)
    assert store.size(info.key) == len(data)
    assert store.read_range(info.key, PART - 3, 10) == data[PART - 3 : PART + 7]
    assert list(store.list()) == [info.key]  # temp object gone
    again = store.put_stream(_chunked(data))
    assert not again.created and list(store.list()) == [info.key]


def test_multipart_with_declared_sha(store: ObjectStore) -> None:
    data = os.urandom(PART + 17)
    info = store.put_stream([data], expected_sha256=sha(data), expected_size=len(data))
    assert info.created and b"".join(store.iter_bytes(info.key)) == data
    again = store.put_stream([data], expected_sha256=sha(data))
    assert not again.created and list(store.list()) == [info.key]


def test_range_reads_and_edges(store: ObjectStore) -> None:
    data = bytes(range(256)) * 4
    key = store.put_bytes(data).key
    assert store.read_range(key, 0, 1) == data[:1]
    assert store.read_range(key, 100, 50) == data[100:150]
    assert store.read_range(key, len(data) - 1, 1) == data[-1:]
    assert store.read_range(key, len(data), 0) == b""
    assert b"".join(store.iter_bytes(key, start=1000)) == data[1000:]
    assert b"".join(store.iter_bytes(key, start=10, end=20, chunk_size=3)) == data[10:20]
    assert list(store.iter_bytes(key, start=5, end=5)) == []
    for start, length in [(len(data), 1), (len(data) - 1, 2), (-1, 1), (2000, 0)]:
        with pytest.raises(InvalidRangeError):
            store.read_range(key, start, length)
    with pytest.raises(InvalidRangeError):
        list(store.iter_bytes(key, start=10, end=5))


def test_missing_key(store: ObjectStore) -> None:
    key = blob_key("a" * 64)
    assert not store.exists(key)
    for call in (
        lambda: store.size(key),
        lambda: store.iter_bytes(key),
        lambda: store.read_range(key, 0, 1),
    ):
        with pytest.raises(BlobNotFound, match=key):
            call()


def test_listing_by_prefix(store: ObjectStore) -> None:
    keys = sorted(store.put_bytes(bytes([i])).key for i in range(3))
    assert list(store.list()) == keys
    assert list(store.list("blobs/sha256/")) == keys
    assert list(store.list("blobs/sha256")) == keys
    first = keys[0]
    assert list(store.list(first[:-50])) == [k for k in keys if k.startswith(first[:-50])]
    assert list(store.list("nothing/")) == []


def test_delete_is_idempotent(store: ObjectStore) -> None:
    key = store.put_bytes(b"short-lived").key
    store.delete(key)
    store.delete(key)
    assert not store.exists(key) and list(store.list()) == []
    assert store.put_bytes(b"short-lived").created  # can be stored again


@pytest.mark.parametrize("size", [64 * 1024, PART + 1], ids=["single", "multipart"])
def test_concurrent_puts_store_once(store: ObjectStore, size: int) -> None:
    data = os.urandom(size)
    with ThreadPoolExecutor(max_workers=4) as pool:
        infos = list(pool.map(lambda _: store.put_stream(_chunked(data)), range(4)))
    assert {info.key for info in infos} == {blob_key(sha(data))}
    # Exactly one writer wins on the file store and on AWS; moto's conditional checks are
    # not atomic, so there several concurrent writers may each report created=True.
    created = sum(info.created for info in infos)
    assert created == 1 if store.local_path(infos[0].key) is not None else created >= 1
    assert list(store.list()) == [blob_key(sha(data))]  # one object, no temp leftovers
    assert b"".join(store.iter_bytes(infos[0].key)) == data


@pytest.mark.parametrize(
    "key",
    ["", "/etc/passwd", "../outside", "blobs/../../x", "a//b", "a/./b", "a\\b", "a\x00b", "blobs/"],
)
def test_unsafe_keys_rejected(store: ObjectStore, key: str) -> None:
    with pytest.raises(UnsafeKeyError):
        store.exists(key)
    with pytest.raises(UnsafeKeyError):
        store.delete(key)


def test_bad_digest_and_scheme() -> None:
    with pytest.raises(ValueError, match="invalid sha256"):
        blob_key("ABC")
    with pytest.raises(ValueError, match="available: file, s3"):
        open_store("ftp://host/x")


def test_failing_stream_leaves_nothing(store: ObjectStore) -> None:
    def broken() -> Iterator[bytes]:
        yield os.urandom(PART + 1)  # enough to start a multipart upload on S3
        yield b"more"
        raise OSError("client went away")

    with pytest.raises(OSError, match="client went away"):
        store.put_stream(broken())
    assert list(store.list()) == []


# -- lifecycle: what garbage collection relies on ---------------------------------------------


def test_list_info_and_modified(store: ObjectStore) -> None:
    from datetime import UTC, datetime, timedelta

    before = datetime.now(UTC) - timedelta(seconds=2)  # S3 reports whole seconds
    info = store.put_bytes(b"listed with a time")
    listed = list(store.list_info("blobs/"))
    assert [(i.key, i.size) for i in listed] == [(info.key, len(b"listed with a time"))]
    assert before <= listed[0].modified <= datetime.now(UTC) + timedelta(seconds=2)
    assert store.modified(info.key) == listed[0].modified
    assert list(store.list_info("nothing/")) == []
    with pytest.raises(BlobNotFound):
        store.modified(blob_key("0" * 64))
    with pytest.raises(BlobNotFound):
        store.touch(blob_key("0" * 64))
    assert list(store.open_uploads()) == []


def test_touch_and_duplicate_put_refresh_the_modified_time(store: ObjectStore) -> None:
    import time

    key = store.put_bytes(b"old content").key
    first = store.modified(key)
    time.sleep(1.1)  # S3's Last-Modified has one-second resolution
    store.touch(key)
    touched = store.modified(key)
    assert touched > first
    time.sleep(1.1)
    again = store.put_bytes(b"old content")  # already stored: refreshed, not rewritten
    assert not again.created and store.modified(key) > touched
    assert b"".join(store.iter_bytes(key)) == b"old content"


def test_delete_if_older(store: ObjectStore) -> None:
    from datetime import timedelta

    key = store.put_bytes(b"maybe garbage").key
    written = store.modified(key)
    assert not store.delete_if_older(key, cutoff=written), "modified at the cutoff: kept"
    assert store.exists(key) and b"".join(store.iter_bytes(key)) == b"maybe garbage"
    assert store.delete_if_older(key, cutoff=written + timedelta(seconds=1))
    assert not store.exists(key) and list(store.list()) == []
    assert not store.delete_if_older(key, cutoff=written + timedelta(seconds=1)), "already gone"
    assert store.put_bytes(b"maybe garbage").created, "a re-upload after gc stores it again"
