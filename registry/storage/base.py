"""The object-store protocol: content-addressed blobs, streamed in, range-read out.

Implementations provide a small core (``put_stream``, ``size``, ``iter_bytes``, ``list``,
``delete``); everything else (``put_bytes``, ``put_file``, ``exists``, ``read_range``) is built
on that core here, so the ``file://`` and ``s3://`` stores behave the same by construction.

For garbage collection (``registry.services.gc``) every store also lists objects with their
last-modified time (``list_info``, ``modified``), refreshes that time when an upload finds its
content already stored (``touch``), and deletes an object only if it was not modified since a
cutoff (``delete_if_older``).
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

BLOB_PREFIX = "blobs/sha256/"
TMP_PREFIX = "tmp/"
READ_CHUNK = 1 << 20
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")


class StorageError(Exception):
    """Base class for object-store failures."""


class BlobNotFound(StorageError):
    """The named key does not exist in the store."""

    def __init__(self, key: str, store_url: str = "") -> None:
        self.key = key
        self.store_url = store_url
        where = f" in {store_url}" if store_url else ""
        super().__init__(f"object '{key}' not found{where}")


class StorageIntegrityError(StorageError):
    """Uploaded content did not match the declared sha256 or size; nothing was stored."""


class UnsafeKeyError(StorageError, ValueError):
    """A key that could escape the store (absolute, ``..``, backslash, NUL, ...)."""


class InvalidRangeError(StorageError, ValueError):
    """A byte range outside the object's bounds."""


@dataclass(frozen=True)
class BlobInfo:
    """Where a blob lives; ``created`` is False when identical content was already stored."""

    key: str
    sha256: str
    size: int
    created: bool


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object as listed: its key, size in bytes and last-modified time (UTC)."""

    key: str
    size: int
    modified: datetime


@dataclass(frozen=True)
class OpenUpload:
    """A multipart upload the store still holds open: store key, upload id, and when it was
    last active (started, or received its newest part), in UTC."""

    key: str
    upload_id: str
    last_active: datetime


@dataclass(frozen=True)
class PresignedUpload:
    """A multipart upload the client sends straight to the store with presigned part URLs.

    ``key`` is the bucket key (``<prefix>/tmp/<upload_id>``), ``temp_key`` the store key.
    """

    upload_id: str
    key: str
    temp_key: str
    part_size: int
    urls: tuple[str, ...]


def blob_key(sha256: str) -> str:
    """The content-addressed key ``blobs/sha256/<hex>`` for a lowercase sha256 hex digest."""
    if not isinstance(sha256, str) or not _SHA256_HEX.match(sha256):
        raise ValueError(
            f"invalid sha256 hex digest {sha256!r}: expected 64 lowercase hex characters"
        )
    return BLOB_PREFIX + sha256


def validate_key(key: str, *, allow_empty: bool = False, trailing_slash: bool = False) -> str:
    """Return ``key`` unchanged if it is a safe relative key, else raise ``UnsafeKeyError``.

    Safe means: relative ``/``-separated segments, none empty, ``.`` or ``..``, and no
    backslash or NUL. ``trailing_slash`` allows one final ``/`` (listing prefixes).
    """
    if not isinstance(key, str):
        raise UnsafeKeyError(f"object key must be a string, got {type(key).__name__}")
    if key == "":
        if allow_empty:
            return key
        raise UnsafeKeyError("object key is empty")
    if "\\" in key or "\x00" in key:
        raise UnsafeKeyError(f"object key {key!r} contains a backslash or NUL")
    if key.startswith("/"):
        raise UnsafeKeyError(f"object key {key!r} is absolute")
    body = key[:-1] if trailing_slash and key.endswith("/") else key
    for segment in body.split("/"):
        if segment in ("", ".", ".."):
            raise UnsafeKeyError(f"object key {key!r} has an empty, '.' or '..' segment")
    return key


def iter_chunks(
    source: Iterable[bytes] | BinaryIO, chunk_size: int = READ_CHUNK
) -> Iterator[bytes]:
    """Yield non-empty byte chunks from an iterable of bytes or a binary file object."""
    read = getattr(source, "read", None)
    if callable(read):
        while chunk := read(chunk_size):
            yield bytes(chunk)
        return
    for chunk in source:  # type: ignore[union-attr]
        if chunk:
            yield bytes(chunk)


class HashingCounter:
    """Running sha256 and byte count of a stream, checked against what the caller declared."""

    def __init__(self, *, expected_sha256: str | None, expected_size: int | None) -> None:
        if expected_sha256 is not None:
            blob_key(expected_sha256)  # validates the hex
        if expected_size is not None and expected_size < 0:
            raise ValueError(f"expected_size must be >= 0, got {expected_size}")
        self.expected_sha256 = expected_sha256
        self.expected_size = expected_size
        self._hash = hashlib.sha256()
        self.size = 0

    def update(self, chunk: bytes) -> None:
        """Account for one chunk; fail early once the stream is longer than declared."""
        self._hash.update(chunk)
        self.size += len(chunk)
        if self.expected_size is not None and self.size > self.expected_size:
            raise StorageIntegrityError(
                f"upload is longer than the declared size: more than {self.expected_size} bytes received"
            )

    def finish(self) -> str:
        """The hex digest, after checking the declared size and sha256."""
        digest = self._hash.hexdigest()
        if self.expected_size is not None and self.size != self.expected_size:
            raise StorageIntegrityError(
                f"upload size mismatch: declared {self.expected_size} bytes, received {self.size}"
            )
        if self.expected_sha256 is not None and digest != self.expected_sha256:
            raise StorageIntegrityError(
                f"upload sha256 mismatch: declared {self.expected_sha256}, received {digest}"
            )
        return digest


def resolve_range(key: str, start: int, end: int | None, size: int) -> tuple[int, int]:
    """Check ``[start, end)`` against an object of ``size`` bytes; ``end=None`` means to the end."""
    stop = size if end is None else end
    if start < 0 or stop < start or stop > size:
        raise InvalidRangeError(
            f"byte range [{start}, {end}) is outside object '{key}' of {size} bytes"
        )
    return start, stop


class ObjectStore(ABC):
    """A content-addressed blob store; keys are ``/``-separated and relative to the store root."""

    url: str

    @abstractmethod
    def put_stream(
        self,
        chunks: Iterable[bytes] | BinaryIO,
        *,
        expected_sha256: str | None = None,
        expected_size: int | None = None,
    ) -> BlobInfo:
        """Store a stream under ``blobs/sha256/<hex>``, hashing as it goes.

        On a sha256/size mismatch raises ``StorageIntegrityError`` and leaves nothing behind.
        Identical content is stored once: a second put returns ``created=False``.
        """

    @abstractmethod
    def size(self, key: str) -> int:
        """Size in bytes of ``key`` (``BlobNotFound`` when absent)."""

    @abstractmethod
    def iter_bytes(
        self, key: str, *, start: int = 0, end: int | None = None, chunk_size: int = READ_CHUNK
    ) -> Iterator[bytes]:
        """Stream bytes ``[start, end)`` of ``key`` (``end`` exclusive, ``None`` = to the end)."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys starting with ``prefix``, in sorted order (in-flight temp objects included)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; deleting a missing key is not an error."""

    # -- lifecycle: what garbage collection needs ------------------------------------------

    @abstractmethod
    def list_info(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """``ObjectInfo`` (key, size, last-modified) of every key starting with ``prefix``."""

    @abstractmethod
    def modified(self, key: str) -> datetime:
        """When ``key`` was last written or touched, in UTC (``BlobNotFound`` when absent)."""

    @abstractmethod
    def touch(self, key: str) -> None:
        """Set ``key``'s last-modified time to now (``BlobNotFound`` when absent).

        Uploads that find their content already stored call this, so garbage collection treats
        the blob as freshly written for a whole grace period.
        """

    def delete_if_older(self, key: str, *, cutoff: datetime) -> bool:
        """Delete ``key`` only if it was last modified before ``cutoff``; True if deleted.

        This default checks, then deletes; stores that can do better (the file store moves the
        object aside first) close the gap between the two.
        """
        try:
            if self.modified(key) >= cutoff:
                return False
        except BlobNotFound:
            return False
        self.delete(key)
        return True

    def open_uploads(self) -> Iterator[OpenUpload]:
        """Multipart uploads the store holds open (none for stores without them)."""
        return iter(())

    def abort_open_upload(self, upload: OpenUpload) -> None:
        """Abort one of ``open_uploads()`` (stores without multipart uploads have none)."""
        raise NotImplementedError(f"{self!r} holds no multipart uploads; got {upload.key!r}")

    def put_bytes(self, data: bytes) -> BlobInfo:
        """Store ``data``; returns its ``BlobInfo``.

        The digest is computed up front so a remote store can write straight to the final key.
        """
        digest = hashlib.sha256(data).hexdigest()
        return self.put_stream([data], expected_sha256=digest, expected_size=len(data))

    def put_file(self, path: Path) -> BlobInfo:
        """Stream a local file into the store; returns its ``BlobInfo``."""
        with open(path, "rb") as handle:
            return self.put_stream(handle)

    def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""
        try:
            self.size(key)
        except BlobNotFound:
            return False
        return True

    def read_range(self, key: str, start: int, length: int) -> bytes:
        """Exactly ``length`` bytes of ``key`` from ``start`` (``InvalidRangeError`` if short)."""
        if length < 0:
            raise InvalidRangeError(f"negative length {length} for object '{key}'")
        return b"".join(self.iter_bytes(key, start=start, end=start + length))

    def local_path(self, key: str) -> Path | None:
        """A real filesystem path for zero-copy reads, or None when the store is remote."""
        return None

    # -- presigned multipart uploads (remote stores only) -----------------------------------

    def supports_presigned_uploads(self) -> bool:
        """Whether clients can upload straight to this store with presigned URLs."""
        return False

    def start_presigned_upload(
        self,
        *,
        size: int,
        part_size: int | None,
        metadata: Mapping[str, str],
        expires: int,
        upload_id: str | None = None,
    ) -> PresignedUpload:
        """Open a multipart upload to ``tmp/<upload_id>`` (a new random id unless given: 32
        lowercase hex characters) and presign one URL per part."""
        raise NotImplementedError(f"{self!r} cannot hand out presigned upload URLs")

    def finish_presigned_upload(
        self, upload_id: str, parts: Sequence[tuple[int, str]]
    ) -> tuple[str, dict[str, str]]:
        """Complete the upload from (part number, ETag) pairs; returns its temp key and metadata."""
        raise NotImplementedError(f"{self!r} cannot hand out presigned upload URLs")

    def adopt_temp_object(self, key: str, *, expected_sha256: str, expected_size: int) -> BlobInfo:
        """Hash the temp object ``key``, move it content-addressed and delete it (always)."""
        raise NotImplementedError(f"{self!r} cannot hand out presigned upload URLs")

    def abort_presigned_upload(self, upload_id: str) -> None:
        """Abort the multipart upload and delete whatever it left under ``tmp/``."""
        raise NotImplementedError(f"{self!r} cannot hand out presigned upload URLs")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"
