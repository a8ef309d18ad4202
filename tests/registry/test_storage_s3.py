"""``s3://`` store specifics, against the session's moto_server over HTTP."""

from __future__ import annotations

import os
import threading

import boto3
import pytest
from botocore.config import Config

from registry.storage import open_store
from registry.storage.s3 import S3ObjectStore, _MultipartUpload

PART = 5 * 1024 * 1024


def _store(url: str, endpoint: str, part_size: int = 16 * 1024 * 1024) -> S3ObjectStore:
    store = open_store(
        url,
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        part_size=part_size,
    )
    assert isinstance(store, S3ObjectStore)
    return store


def _uploads_in_flight(store: S3ObjectStore) -> list[dict]:
    return list(store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []))


def test_prefixes_are_isolated(s3_store_url: str, s3_endpoint: str) -> None:
    bucket = s3_store_url.split("/")[2]
    one = _store(f"s3://{bucket}/one", s3_endpoint)
    root = _store(f"s3://{bucket}", s3_endpoint)
    key = one.put_bytes(b"x").key
    assert one.url == f"s3://{bucket}/one" and root.url == f"s3://{bucket}"
    assert list(one.list()) == [key]
    assert list(root.list()) == [f"one/{key}"]
    assert not root.exists(key) and root.exists(f"one/{key}")


def test_conditional_complete_refuses_existing_key(s3_store_url: str, s3_endpoint: str) -> None:
    store = _store(s3_store_url, s3_endpoint)
    key = store.put_bytes(b"already here").key
    upload = _MultipartUpload(store.client, store.bucket, f"{store.prefix}/{key}")
    upload.add(b"other bytes")
    assert upload.complete(if_absent=True) is False
    assert store.read_range(key, 0, 12) == b"already here"
    assert _uploads_in_flight(store) == []


def test_failed_multipart_is_aborted(s3_store_url: str, s3_endpoint: str) -> None:
    store = _store(s3_store_url, s3_endpoint, part_size=PART)

    def broken():  # type: ignore[no-untyped-def]
        yield os.urandom(2 * PART + 1)
        raise ConnectionError("upload interrupted")

    with pytest.raises(ConnectionError):
        store.put_stream(broken())
    assert _uploads_in_flight(store) == [] and list(store.list()) == []


def test_settings_validated(s3_store_url: str, s3_endpoint: str) -> None:
    with pytest.raises(ValueError, match="minimum part size"):
        _store(s3_store_url, s3_endpoint, part_size=1024)
    with pytest.raises(ValueError, match="not an s3"):
        S3ObjectStore("s3:///nobucket")


def test_default_credential_chain(
    s3_store_url: str, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    store = open_store(s3_store_url, endpoint_url=s3_endpoint)
    assert store.put_bytes(b"via env").created  # no explicit keys: boto3's chain found them


def test_concurrent_touches_keep_the_bytes(s3_store_url: str, s3_endpoint: str) -> None:
    """Writers that find their blob stored touch it (a copy onto itself) while others ask its
    size; every request succeeds at once (no retries here) and the object keeps its bytes.
    Plain moto_server failed this (500s, once an empty object); the session's endpoint runs
    with ``bench.moto_server``'s fixes."""
    store = _store(s3_store_url, s3_endpoint)
    data = os.urandom(PART + 1)
    key = store.put_bytes(data).key
    failures: list[BaseException] = []

    def touch_and_size() -> None:
        own = _store(s3_store_url, s3_endpoint)
        own.client = boto3.session.Session().client(
            "s3",
            endpoint_url=s3_endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            config=Config(retries={"mode": "standard", "max_attempts": 1}),
        )
        try:
            for _ in range(25):
                assert own.size(key) == len(data)
                own.touch(key)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=touch_and_size) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert store.read_range(key, 0, len(data)) == data
