"""The ``s3://bucket/prefix`` object store (AWS, MinIO, or any S3-compatible endpoint).

Writes stream while hashing. Up to ``part_size`` bytes go up in one ``PutObject`` to the
final key (the hash is known before the request). Larger streams go up as a multipart upload,
one part buffered at a time: straight to the final key when the caller declared the sha256,
otherwise to ``<prefix>/tmp/<uuid>`` followed by a server-side multipart copy to the final key.
Every write to a final key is conditional (``If-None-Match: *`` on ``PutObject`` and
``CompleteMultipartUpload``), so identical content is stored once even under concurrency, and a
failed upload is aborted so it leaves nothing behind.

``BlobInfo.created`` is exact on AWS S3, where conditional writes are atomic. On servers whose
check is not atomic (moto) several racing first uploads may each report ``created=True``; the
content is still stored once, under one key, with identical bytes.
"""

from __future__ import annotations

import contextlib
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
    ObjectStore,
    StorageError,
    blob_key,
    iter_chunks,
    resolve_range,
    validate_key,
)

MIN_PART_SIZE = 5 * 1024 * 1024  # S3's minimum for every part but the last
MAX_PARTS = 10_000
MAX_COPY_PART = 5 * 1024**3
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class _MultipartUpload:
    """One multipart upload; parts are numbered in the order they are added."""

    def __init__(self, client: Any, bucket: str, key: str) -> None:
        self.client, self.bucket, self.key = client, bucket, key
        self.upload_id: str = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        self.parts: list[dict[str, Any]] = []
        self.finished = False

    def _next_number(self) -> int:
        number = len(self.parts) + 1
        if number > MAX_PARTS:
            raise StorageError(
                f"upload to '{self.key}' needs more than {MAX_PARTS} parts; raise part_size"
            )
        return number

    def add(self, data: bytes) -> None:
        number = self._next_number()
        reply = self.client.upload_part(
            Bucket=self.bucket, Key=self.key, UploadId=self.upload_id, PartNumber=number, Body=data
        )
        self.parts.append({"ETag": reply["ETag"], "PartNumber": number})

    def add_copy(self, source_key: str, first: int, last: int) -> None:
        number = self._next_number()
        reply = self.client.upload_part_copy(
            Bucket=self.bucket,
            Key=self.key,
            UploadId=self.upload_id,
            PartNumber=number,
            CopySource={"Bucket": self.bucket, "Key": source_key},
            CopySourceRange=f"bytes={first}-{last}",
        )
        self.parts.append({"ETag": reply["CopyPartResult"]["ETag"], "PartNumber": number})

    def complete(self, *, if_absent: bool) -> bool:
        """Finish the upload; False (and aborted) when ``if_absent`` and the key already exists."""
        extra = {"IfNoneMatch": "*"} if if_absent else {}
        try:
            self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=self.key,
                UploadId=self.upload_id,
                MultipartUpload={"Parts": self.parts},
                **extra,
            )
        except ClientError as exc:
            if _code(exc) not in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise
            self.abort()
            return False
        self.finished = True
        return True

    def abort(self) -> None:
        if self.finished:
            return
        self.finished = True
        # Best effort: a bucket lifecycle rule reaps whatever an abort could not.
        with contextlib.suppress(ClientError):
            self.client.abort_multipart_upload(
                Bucket=self.bucket, Key=self.key, UploadId=self.upload_id
            )


class S3ObjectStore(ObjectStore):
    """Blobs as objects under ``s3://bucket/prefix``; keys are relative to the prefix."""

    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        part_size: int = 16 * 1024 * 1024,
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
        self.bucket = parts.netloc
        self.prefix = validate_key(parts.path.strip("/"), allow_empty=True)
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self.part_size = part_size
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
        if expected_sha256 is not None and self.exists(blob_key(expected_sha256)):
            # Already stored: only verify what the caller sent, do not upload it again.
            for chunk in iter_chunks(chunks):
                counter.update(chunk)
            counter.finish()
            return BlobInfo(blob_key(expected_sha256), expected_sha256, counter.size, False)
        buffer = bytearray()
        upload: _MultipartUpload | None = None
        try:
            for chunk in iter_chunks(chunks):
                counter.update(chunk)
                buffer += chunk
                # Upload whole parts but keep a remainder, so the last part is never empty.
                while len(buffer) > self.part_size:
                    upload = upload or self._start_upload(expected_sha256)
                    upload.add(bytes(buffer[: self.part_size]))
                    del buffer[: self.part_size]
            if upload is None:
                digest = counter.finish()
                created = self._put_small(bytes(buffer), blob_key(digest))
            else:
                upload.add(bytes(buffer))
                digest = counter.finish()
                created = self._finish_multipart(upload, blob_key(digest), counter.size)
        except BaseException:
            if upload is not None:
                upload.abort()
            raise
        return BlobInfo(blob_key(digest), digest, counter.size, created)

    def _start_upload(self, expected_sha256: str | None) -> _MultipartUpload:
        """Multipart upload straight to the final key when the hash is declared, else to tmp/."""
        target = blob_key(expected_sha256) if expected_sha256 else TMP_PREFIX + uuid.uuid4().hex
        return _MultipartUpload(self.client, self.bucket, self._full(target))

    def _put_small(self, data: bytes, key: str) -> bool:
        """One conditional ``PutObject``; False when the object already exists."""
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self._full(key), Body=data, IfNoneMatch="*"
            )
        except ClientError as exc:
            if _code(exc) == "PreconditionFailed":
                return False
            if _code(exc) == "ConditionalRequestConflict" and self.exists(key):
                return False
            raise
        return True

    def _finish_multipart(self, upload: _MultipartUpload, key: str, size: int) -> bool:
        """Complete ``upload`` and make its content live at ``key``; True when newly created."""
        if upload.key == self._full(key):
            return upload.complete(if_absent=True)
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
        if self.exists(key):
            return False
        step = min(max(self.part_size, -(-size // MAX_PARTS)), MAX_COPY_PART)
        copy = _MultipartUpload(self.client, self.bucket, self._full(key))
        try:
            for first in range(0, size, step):
                copy.add_copy(source_full_key, first, min(first + step, size) - 1)
            return copy.complete(if_absent=True)
        except BaseException:
            copy.abort()
            raise

    def size(self, key: str) -> int:
        validate_key(key)
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._full(key))
        except ClientError as exc:
            if _code(exc) in _NOT_FOUND:
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
        try:
            reply = self.client.get_object(
                Bucket=self.bucket, Key=self._full(key), Range=f"bytes={start}-{end - 1}"
            )
        except ClientError as exc:
            if _code(exc) in _NOT_FOUND:
                raise BlobNotFound(key, self.url) from None
            if _code(exc) == "InvalidRange":
                resolve_range(key, start, end, self.size(key))
            raise
        total = int(str(reply.get("ContentRange", "/0")).rpartition("/")[2] or 0)
        if total < end:  # S3 silently clamps a range that runs past the end
            reply["Body"].close()
            raise InvalidRangeError(
                f"byte range [{start}, {end}) is outside object '{key}' of {total} bytes"
            )
        return self._stream_body(reply["Body"], chunk_size)

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
