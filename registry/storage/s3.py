"""The ``s3://bucket/prefix`` object store (AWS, MinIO, or any S3-compatible endpoint).

Writes stream while hashing. Up to ``part_size`` bytes go up in one ``PutObject`` to the
final key (the hash is known before the request). Larger streams go up as a multipart upload
with up to ``parts_in_flight`` parts uploading at once (memory: ``parts_in_flight + 1``
recycled buffers of ``part_size``): straight to the final key when the caller declared the sha256,
otherwise to ``<prefix>/tmp/<uuid>`` followed by a server-side multipart copy to the final key.
Every write to a final key is conditional (``If-None-Match: *`` on ``PutObject`` and
``CompleteMultipartUpload``), so identical content is stored once even under concurrency, and a
failed upload is aborted so it leaves nothing behind. A write that finds its content already
stored touches it (a copy onto itself refreshes ``LastModified``) so garbage collection sees it
as freshly written; if it is gone by then, the write is made again.

``BlobInfo.created`` is exact on AWS S3, where conditional writes are atomic. On servers whose
check is not atomic (moto) several racing first uploads may each report ``created=True``; the
content is still stored once, under one key, with identical bytes.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

from registry.storage.base import (
    READ_CHUNK,
    TMP_PREFIX,
    BlobInfo,
    BlobNotFound,
    HashingCounter,
    InvalidRangeError,
    StorageError,
    blob_key,
    iter_chunks,
    resolve_range,
    validate_key,
)
from registry.storage.s3_lifecycle import MAX_COPY_PART, S3Lifecycle
from registry.storage.s3_multipart import (
    MAX_PARTS,
    MultipartUpload,
    PartPipeline,
    PartReader,
    error_code,
)

MIN_PART_SIZE = 5 * 1024 * 1024  # S3's minimum for every part but the last
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_WRITE_TRIES = 3

# Kept for callers and tests that reach the multipart helpers through this module.
_MultipartUpload = MultipartUpload


class S3ObjectStore(S3Lifecycle):
    """Blobs as objects under ``s3://bucket/prefix``; keys are relative to the prefix."""

    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        part_size: int = 16 * 1024 * 1024,
        parts_in_flight: int = 4,
        aws_access_key_id: str | None = None,
        aws_secret_access_key: str | None = None,
        aws_session_token: str | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"not an s3://bucket[/prefix] URL: {url!r}")
        if part_size < MIN_PART_SIZE:
            raise ValueError(
                f"part_size {part_size} is below S3's minimum part size {MIN_PART_SIZE}"
            )
        if parts_in_flight < 1:
            raise ValueError(f"parts_in_flight must be >= 1, got {parts_in_flight}")
        self.bucket = parts.netloc
        self.prefix = validate_key(parts.path.strip("/"), allow_empty=True)
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.part_size = part_size
        self.parts_in_flight = parts_in_flight
        credentials = {
            "aws_access_key_id": aws_access_key_id,
            "aws_secret_access_key": aws_secret_access_key,
            "aws_session_token": aws_session_token,
        }
        config = Config(
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"mode": "standard", "max_attempts": 5},
            max_pool_connections=32,
        )
        # A private session: boto3's default session is not safe to share across threads.
        self.client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            config=config,
            **{name: value for name, value in credentials.items() if value is not None},
        )

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put_stream(
        self,
        chunks: Iterable[bytes] | BinaryIO,
        *,
        expected_sha256: str | None = None,
        expected_size: int | None = None,
    ) -> BlobInfo:
        counter = HashingCounter(expected_sha256=expected_sha256, expected_size=expected_size)
        if expected_sha256 is not None and self._refresh(blob_key(expected_sha256)):
            # Already stored: only verify what the caller sent, do not upload it again.
            for chunk in iter_chunks(chunks):
                counter.update(chunk)
            counter.finish()
            return BlobInfo(blob_key(expected_sha256), expected_sha256, counter.size, False)
        reader = PartReader(iter_chunks(chunks), counter)
        first = reader.fill(bytearray(), self.part_size)  # grows: small files stay small
        if reader.at_end():  # the whole stream fits in one part: one conditional PutObject
            digest = counter.finish()
            created = self._put_small(first, blob_key(digest))
            return BlobInfo(blob_key(digest), digest, counter.size, created)
        upload = self._start_upload(expected_sha256)
        try:
            with PartPipeline(
                upload, in_flight=self.parts_in_flight, part_size=self.part_size
            ) as pipeline:
                pipeline.submit(first)
                del first  # the pipeline owns it now and recycles it
                # A part goes up only once more bytes follow, so the last part is never empty.
                while not reader.at_end():
                    pipeline.submit(reader.fill(pipeline.take_buffer(), self.part_size))
                pipeline.drain()
            digest = counter.finish()
            created = self._finish_multipart(upload, blob_key(digest), counter.size)
        except BaseException:
            upload.abort()
            raise
        return BlobInfo(blob_key(digest), digest, counter.size, created)

    def _start_upload(self, expected_sha256: str | None) -> MultipartUpload:
        """Multipart upload straight to the final key when the hash is declared, else to tmp/."""
        target = blob_key(expected_sha256) if expected_sha256 else TMP_PREFIX + uuid.uuid4().hex
        return MultipartUpload(self.client, self.bucket, self._full(target))

    def _put_small(self, data: bytes | bytearray, key: str) -> bool:
        """One conditional ``PutObject``; False (object touched) when it already exists."""
        for _ in range(_WRITE_TRIES):
            try:
                self.client.put_object(
                    Bucket=self.bucket, Key=self._full(key), Body=data, IfNoneMatch="*"
                )
            except ClientError as exc:
                if error_code(exc) not in ("PreconditionFailed", "ConditionalRequestConflict"):
                    raise
                if self._refresh(key):
                    return False
                continue  # deleted by garbage collection just now: write it again
            return True
        raise StorageError(f"could not store '{key}' in {self.url}: it kept disappearing")

    def _finish_multipart(self, upload: MultipartUpload, key: str, size: int) -> bool:
        """Complete ``upload`` and make its content live at ``key``; True when newly created."""
        if upload.key == self._full(key):
            if upload.complete(if_absent=True) is True:
                return True
            if self._refresh(key):
                return False
            raise StorageError(
                f"'{key}' was garbage-collected while this upload completed; upload it again"
            )
        upload.complete(if_absent=False)
        try:
            return self._copy_if_absent(upload.key, key, size)
        finally:
            self.client.delete_object(Bucket=self.bucket, Key=upload.key)

    def _copy_if_absent(self, source_full_key: str, key: str, size: int) -> bool:
        """Server-side copy to ``key`` as a multipart copy, completed with ``If-None-Match: *``.

        A plain ``CopyObject`` is not conditional on every S3-compatible server (moto ignores
        ``IfNoneMatch`` there) and stops at 5 GiB; a multipart copy has neither problem.
        """
        for _ in range(_WRITE_TRIES):
            if self._refresh(key):
                return False
            if self._multipart_copy(source_full_key, key, size, if_absent=True):
                return True
        raise StorageError(f"could not store '{key}' in {self.url}: it kept disappearing")

    def _multipart_copy(
        self, source_full_key: str, key: str, size: int, *, if_absent: bool
    ) -> bool:
        step = min(max(self.part_size, -(-size // MAX_PARTS)), MAX_COPY_PART)
        copy = MultipartUpload(self.client, self.bucket, self._full(key))
        try:
            for first in range(0, size, step):
                copy.add_copy(source_full_key, first, min(first + step, size) - 1)
            return copy.complete(if_absent=if_absent)
        except BaseException:
            copy.abort()
            raise

    def size(self, key: str) -> int:
        validate_key(key)
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._full(key))
        except ClientError as exc:
            if error_code(exc) in _NOT_FOUND:
                raise BlobNotFound(key, self.url) from None
            raise
        return int(head["ContentLength"])

    def iter_bytes(
        self, key: str, *, start: int = 0, end: int | None = None, chunk_size: int = READ_CHUNK
    ) -> Iterator[bytes]:
        validate_key(key)
        if end is None or end <= start or start < 0:
            # Need the size (open-ended range), or an empty/invalid range that S3 cannot express.
            start, end = resolve_range(key, start, end, self.size(key))
            if start == end:
                return iter(())
        return self._stream_body(self._get_range(key, start, end)["Body"], chunk_size)

    def read_into(self, key: str, start: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with bytes ``[start, start + len(buffer))`` of ``key``: one ranged GET
        whose body is received straight into ``buffer`` (no chunk objects, no extra copy)."""
        validate_key(key)
        size = len(buffer)
        if size == 0:
            resolve_range(key, start, start, self.size(key))
            return
        if start < 0:
            raise InvalidRangeError(f"byte range starts at {start} in object '{key}'")
        body = self._get_range(key, start, start + size)["Body"]
        try:
            filled = _receive_into(body, buffer)
        finally:
            _finish_body(body)
        if filled != size:
            raise StorageError(
                f"short read of object '{key}' at byte {start}: {filled} of {size} bytes"
            )

    def _get_range(self, key: str, start: int, end: int) -> Any:
        """The ``GetObject`` reply for bytes ``[start, end)`` (``0 <= start < end``), checked
        to lie inside the object."""
        try:
            reply = self.client.get_object(
                Bucket=self.bucket, Key=self._full(key), Range=f"bytes={start}-{end - 1}"
            )
        except ClientError as exc:
            if error_code(exc) in _NOT_FOUND:
                raise BlobNotFound(key, self.url) from None
            if error_code(exc) == "InvalidRange":
                resolve_range(key, start, end, self.size(key))
            raise
        total = int(str(reply.get("ContentRange", "/0")).rpartition("/")[2] or 0)
        if total < end:  # S3 silently clamps a range that runs past the end
            reply["Body"].close()
            raise InvalidRangeError(
                f"byte range [{start}, {end}) is outside object '{key}' of {total} bytes"
            )
        return reply

    @staticmethod
    def _stream_body(body: Any, chunk_size: int) -> Iterator[bytes]:
        try:
            yield from body.iter_chunks(chunk_size)
        finally:
            body.close()

    def list(self, prefix: str = "") -> Iterator[str]:
        validate_key(prefix, allow_empty=True, trailing_slash=True)
        return self._list_pages(
            self._full(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        )

    def _list_pages(self, full_prefix: str) -> Iterator[str]:
        strip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
            for item in page.get("Contents", []):
                yield item["Key"][strip:]

    def delete(self, key: str) -> None:
        validate_key(key)
        self.client.delete_object(Bucket=self.bucket, Key=self._full(key))


def _receive_into(body: Any, buffer: memoryview) -> int:
    """Receive a reply body into ``buffer``; returns the bytes received (at most its length).

    An identity-encoded body is read with the HTTP response's own ``readinto`` (the socket
    fills ``buffer``); anything else goes through botocore's chunk iterator and is copied.
    """
    raw = getattr(body, "_raw_stream", None)
    fp = getattr(raw, "_fp", None)
    filled, size = 0, len(buffer)
    if callable(getattr(fp, "readinto", None)) and not raw.headers.get("content-encoding"):  # type: ignore[union-attr]
        while filled < size:
            got = fp.readinto(buffer[filled:])  # type: ignore[union-attr]
            if not got:
                break
            filled += got
        return filled
    for chunk in body.iter_chunks(READ_CHUNK):
        if filled + len(chunk) > size:
            raise StorageError(f"reply body longer than the {size} bytes asked for")
        buffer[filled : filled + len(chunk)] = chunk
        filled += len(chunk)
    return filled


def _finish_body(body: Any) -> None:
    """Hand a fully received body's connection back to the pool (kept alive for the next
    request); close a partly read one."""
    raw = getattr(body, "_raw_stream", None)
    fp = getattr(raw, "_fp", None)
    if fp is not None and getattr(fp, "isclosed", lambda: False)():
        raw.release_conn()  # type: ignore[union-attr]
    else:
        body.close()
