"""Concurrent multipart uploads of ``S3ObjectStore``: bounded parts in flight, bounded memory,
exact part boundaries, and aborts on failures in worker threads (moto_server over HTTP).

Requests are observed (and one failure injected) with botocore's own event hooks.
"""

from __future__ import annotations

import hashlib
import threading
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any

import pytest

from registry.storage import open_store
from registry.storage.s3 import S3ObjectStore

PART = 5 * 1024 * 1024  # S3's minimum part size
CHUNK = 256 * 1024


def _store(url: str, endpoint: str, *, in_flight: int = 2) -> S3ObjectStore:
    store = open_store(
        url,
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        part_size=PART,
    )
    assert isinstance(store, S3ObjectStore)
    store.parts_in_flight = in_flight
    return store


def _stream(size: int, seed: int = 0) -> Iterator[bytes]:
    """``size`` bytes of distinct content in ``CHUNK`` pieces (the last one shorter)."""
    block = hashlib.sha256(str(seed).encode()).digest() * (CHUNK // 32)
    for index, offset in enumerate(range(0, size, CHUNK)):
        yield (index.to_bytes(8, "big") + block)[: min(CHUNK, size - offset)]


def _sha256(size: int, seed: int = 0) -> str:
    digest = hashlib.sha256()
    for chunk in _stream(size, seed):
        digest.update(chunk)
    return digest.hexdigest()


class _Calls:
    """Counts S3 operations and the most ``UploadPart`` requests seen running at once."""

    def __init__(self, store: S3ObjectStore, *, part_delay: float = 0.0) -> None:
        self.counts: dict[str, int] = {}
        self.active = self.most_active = 0
        self.part_sizes: list[int] = []
        self._lock = threading.Lock()
        self._delay = part_delay
        events = store.client.meta.events
        events.register("before-call.s3", self._before)
        events.register("after-call.s3", self._after)

    def _before(self, model: Any, params: dict[str, Any], **_: Any) -> None:
        with self._lock:
            self.counts[model.name] = self.counts.get(model.name, 0) + 1
            if model.name != "UploadPart":
                return
            self.active += 1
            self.most_active = max(self.most_active, self.active)
            self.part_sizes.append(len(params["body"]))
        time.sleep(self._delay)  # keep the part "on the wire" so overlap is observable

    def _after(self, model: Any, **_: Any) -> None:
        if model.name == "UploadPart":
            with self._lock:
                self.active -= 1


def _uploads_in_flight(store: S3ObjectStore) -> list[dict[str, Any]]:
    return list(store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []))


def test_parts_overlap_up_to_the_bound_and_round_trip(s3_store_url: str, s3_endpoint: str) -> None:
    store = _store(s3_store_url, s3_endpoint, in_flight=2)
    calls = _Calls(store, part_delay=0.2)
    size = 4 * PART + 12345
    info = store.put_stream(_stream(size))
    assert info.created and info.size == size and info.sha256 == _sha256(size)
    assert calls.counts["UploadPart"] == 5 and calls.most_active == 2
    assert calls.part_sizes.count(PART) == 4 and 12345 in calls.part_sizes
    data = b"".join(store.iter_bytes(info.key))
    assert hashlib.sha256(data).hexdigest() == info.sha256
    assert _uploads_in_flight(store) == []


def test_memory_is_bounded_by_parts_in_flight(s3_store_url: str, s3_endpoint: str) -> None:
    store = _store(s3_store_url, s3_endpoint, in_flight=2)
    tracemalloc.start()
    try:
        info = store.put_stream(_stream(6 * PART + 1))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.size == 6 * PART + 1
    # (in_flight + 1) part buffers (the first over-allocated while growing), a chunk, small change.
    assert peak < 3 * PART + 3 * 1024 * 1024, f"peak {peak} bytes"


@pytest.mark.parametrize(("size", "parts"), [(PART, 0), (PART + 1, 2), (2 * PART, 2)])
def test_part_boundaries(s3_store_url: str, s3_endpoint: str, size: int, parts: int) -> None:
    """Exactly one part's worth is one PutObject; a part is cut only once more bytes follow."""
    store = _store(s3_store_url, s3_endpoint)
    calls = _Calls(store)
    info = store.put_stream(_stream(size), expected_size=size)
    assert calls.counts.get("UploadPart", 0) == parts
    assert calls.counts.get("PutObject", 0) == (1 if parts == 0 else 0)
    assert all(part > 0 for part in calls.part_sizes) and sum(calls.part_sizes) in (0, size)
    assert info.sha256 == _sha256(size) and store.size(info.key) == size


def test_failed_part_in_a_worker_aborts_the_upload(s3_store_url: str, s3_endpoint: str) -> None:
    store = _store(s3_store_url, s3_endpoint, in_flight=2)

    def fail_third_part(params: dict[str, Any], **_: Any) -> None:
        if params.get("PartNumber") == 3:
            raise ConnectionError("part 3 lost")

    store.client.meta.events.register("before-parameter-build.s3.UploadPart", fail_third_part)
    with pytest.raises(ConnectionError, match="part 3 lost"):
        store.put_stream(_stream(6 * PART))
    assert _uploads_in_flight(store) == [] and list(store.list()) == []


@pytest.mark.parametrize("declared", [True, False])
def test_second_identical_upload_is_not_created(
    s3_store_url: str, s3_endpoint: str, declared: bool
) -> None:
    """Conditional completion still holds with parts in flight (declared: final key; else tmp/)."""
    store = _store(s3_store_url, s3_endpoint, in_flight=3)
    size = 2 * PART + 7
    digest = _sha256(size, seed=1) if declared else None
    first = store.put_stream(_stream(size, seed=1), expected_sha256=digest)
    again = store.put_stream(_stream(size, seed=1), expected_sha256=digest)
    assert first.created and not again.created and first.key == again.key
    assert list(store.list()) == [first.key] and _uploads_in_flight(store) == []
