"""ckreg's object store: content-addressed blobs behind ``file://`` or ``s3://`` URLs.

``open_store(url)`` picks the implementation from the URL scheme; both implement
``ObjectStore`` (see ``base.py``) and pass the same contract tests.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import urlsplit

from registry.storage.base import (
    BlobInfo,
    BlobNotFound,
    InvalidRangeError,
    ObjectStore,
    StorageError,
    StorageIntegrityError,
    UnsafeKeyError,
    blob_key,
    validate_key,
)

__all__ = [
    "BlobInfo",
    "BlobNotFound",
    "InvalidRangeError",
    "ObjectStore",
    "StorageError",
    "StorageIntegrityError",
    "UnsafeKeyError",
    "blob_key",
    "open_store",
    "validate_key",
]


def _open_file(url: str, **_: object) -> ObjectStore:
    from registry.storage.local import LocalObjectStore, root_from_file_url

    return LocalObjectStore(root_from_file_url(url))


def _open_s3(url: str, **options: object) -> ObjectStore:
    from registry.storage.s3 import S3ObjectStore

    return S3ObjectStore(url, **options)  # type: ignore[arg-type]


STORES: dict[str, Callable[..., ObjectStore]] = {"file": _open_file, "s3": _open_s3}


def open_store(
    url: str,
    *,
    endpoint_url: str | None = None,
    region: str = "us-east-1",
    part_size: int = 16 * 1024 * 1024,
    aws_access_key_id: str | None = None,
    aws_secret_access_key: str | None = None,
) -> ObjectStore:
    """The store that ``url`` names: ``file:///abs/dir``, ``file://rel/dir`` or ``s3://bucket/prefix``.

    S3 options are ignored by the file store. Credentials default to boto3's usual chain.
    """
    scheme = urlsplit(url).scheme
    factory = STORES.get(scheme)
    if factory is None:
        raise ValueError(
            f"unknown object store scheme {scheme!r} in {url!r}; available: {', '.join(sorted(STORES))}"
        )
    return factory(
        url,
        endpoint_url=endpoint_url,
        region=region,
        part_size=part_size,
        aws_access_key_id=aws_access_key_id,
        aws_secret_access_key=aws_secret_access_key,
    )
