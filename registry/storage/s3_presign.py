"""Presigned multipart uploads for the S3 store: the client sends parts straight to S3.

The upload goes to ``<prefix>/tmp/<upload_id>`` and carries the caller's metadata (checkpoint,
file name, declared sha256 and size) as S3 object metadata, so the server keeps no state between
handing out the URLs and completing. Completing hashes the temp object once, then moves it to
its content-addressed key with the store's conditional multipart copy and deletes it.
"""

from __future__ import annotations

import re
import uuid
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

from botocore.exceptions import ClientError

from registry.storage.base import (
    TMP_PREFIX,
    BlobInfo,
    BlobNotFound,
    HashingCounter,
    ObjectStore,
    PresignedUpload,
    StorageIntegrityError,
    UnsafeKeyError,
    blob_key,
)
from registry.storage.s3_multipart import MAX_PARTS, error_code

S3_MIN_PART = 5 * 1024 * 1024  # S3's minimum for every part but the last
_UPLOAD_ID = re.compile(r"^[0-9a-f]{32}$")
_CLIENT_FAULTS = {"InvalidPart", "InvalidPartOrder", "EntityTooSmall", "MalformedXML"}


def temp_key(upload_id: str) -> str:
    """The store key ``tmp/<upload_id>`` of a presigned upload (32 lowercase hex characters)."""
    if not isinstance(upload_id, str) or not _UPLOAD_ID.match(upload_id):
        raise UnsafeKeyError(
            f"invalid upload id {upload_id!r}: expected 32 lowercase hex characters"
        )
    return TMP_PREFIX + upload_id


class PresignedUploads(ObjectStore):
    """``ObjectStore``'s presigned-upload methods for S3; ``S3ObjectStore`` builds on this class
    and provides the client, the bucket and the conditional-write primitives declared here."""

    client: Any
    bucket: str
    part_size: int

    @abstractmethod
    def _full(self, key: str) -> str:
        """The bucket key of store key ``key``."""

    @abstractmethod
    def _put_small(self, data: bytes | bytearray, key: str) -> bool:
        """Write ``data`` to ``key`` unless it exists; True if this call created it."""

    @abstractmethod
    def _copy_if_absent(self, source_full_key: str, key: str, size: int) -> bool:
        """Copy a bucket object to ``key`` unless it exists; True if this call created it."""

    def supports_presigned_uploads(self) -> bool:
        return True

    def start_presigned_upload(
        self,
        *,
        size: int,
        part_size: int | None,
        metadata: Mapping[str, str],
        expires: int,
        upload_id: str | None = None,
    ) -> PresignedUpload:
        """Create the multipart upload and presign one ``UploadPart`` URL per part."""
        step = part_size or self.part_size
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        if step < S3_MIN_PART and size > step:
            raise ValueError(f"part_size {step} is below S3's minimum part size {S3_MIN_PART}")
        count = max(1, -(-size // step))
        if count > MAX_PARTS:
            raise ValueError(f"{size} bytes in parts of {step} needs {count} > {MAX_PARTS} parts")
        upload_id = upload_id or uuid.uuid4().hex
        key = temp_key(upload_id)
        full = self._full(key)
        reply = self.client.create_multipart_upload(
            Bucket=self.bucket, Key=full, Metadata=dict(metadata)
        )
        urls = tuple(
            self.client.generate_presigned_url(
                "upload_part",
                Params={
                    "Bucket": self.bucket,
                    "Key": full,
                    "UploadId": reply["UploadId"],
                    "PartNumber": number,
                },
                ExpiresIn=expires,
            )
            for number in range(1, count + 1)
        )
        return PresignedUpload(upload_id, full, key, step, urls)

    def _s3_upload_id(self, full_key: str) -> str | None:
        reply = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=full_key)
        for upload in reply.get("Uploads", []):
            if upload["Key"] == full_key:
                return str(upload["UploadId"])
        return None

    def finish_presigned_upload(
        self, upload_id: str, parts: Sequence[tuple[int, str]]
    ) -> tuple[str, dict[str, str]]:
        """Complete the upload; returns its temp key and its metadata (keys lowercased)."""
        key = temp_key(upload_id)
        full = self._full(key)
        s3_id = self._s3_upload_id(full)
        if s3_id is None:
            raise BlobNotFound(f"upload {upload_id}", self.url)
        listed = [{"PartNumber": number, "ETag": etag} for number, etag in sorted(parts)]
        try:
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=full, UploadId=s3_id, MultipartUpload={"Parts": listed}
            )
        except ClientError as exc:
            if error_code(exc) not in _CLIENT_FAULTS:
                raise
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=s3_id)
            raise StorageIntegrityError(
                f"upload {upload_id}: S3 refused the listed parts ({error_code(exc)}); upload aborted"
            ) from exc
        head = self.client.head_object(Bucket=self.bucket, Key=full)
        return key, {name.lower(): value for name, value in head.get("Metadata", {}).items()}

    def adopt_temp_object(self, key: str, *, expected_sha256: str, expected_size: int) -> BlobInfo:
        """Verify the temp object ``key`` by hashing it, copy it content-addressed, delete it."""
        if not key.startswith(TMP_PREFIX):
            raise UnsafeKeyError(f"object key {key!r} is not a temp key under '{TMP_PREFIX}'")
        counter = HashingCounter(expected_sha256=expected_sha256, expected_size=expected_size)
        try:
            for chunk in self.iter_bytes(key):
                counter.update(chunk)
            digest = counter.finish()
            final = blob_key(digest)
            if counter.size == 0:
                created = self._put_small(b"", final)
            else:
                created = self._copy_if_absent(self._full(key), final, counter.size)
        finally:
            self.delete(key)
        return BlobInfo(final, digest, counter.size, created)

    def abort_presigned_upload(self, upload_id: str) -> None:
        """Abort the multipart upload (if still open) and delete its temp object (if completed)."""
        key = temp_key(upload_id)
        full = self._full(key)
        s3_id = self._s3_upload_id(full)
        if s3_id is None and not self.exists(key):
            raise BlobNotFound(f"upload {upload_id}", self.url)
        if s3_id is not None:
            try:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=s3_id)
            except ClientError as exc:
                if error_code(exc) != "NoSuchUpload":
                    raise
        self.delete(key)
