"""What garbage collection needs from the S3 store: listings with ``LastModified``, a
``touch`` (a copy onto itself, which sets ``LastModified`` to now), and the multipart uploads the
bucket holds open. ``S3ObjectStore`` builds on this class.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from datetime import UTC, datetime

from botocore.exceptions import ClientError

from registry.storage.base import BlobNotFound, ObjectInfo, OpenUpload, validate_key
from registry.storage.s3_multipart import error_code
from registry.storage.s3_presign import PresignedUploads

MAX_COPY_PART = 5 * 1024**3  # CopyObject and UploadPartCopy stop at 5 GiB
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}


class S3Lifecycle(PresignedUploads):
    """``ObjectStore``'s lifecycle methods for S3 (see ``registry.services.gc``)."""

    prefix: str

    @abstractmethod
    def _multipart_copy(
        self, source_full_key: str, key: str, size: int, *, if_absent: bool
    ) -> bool:
        """Server-side multipart copy of a bucket object to ``key``; False if the condition failed."""

    def _refresh(self, key: str) -> bool:
        """Touch ``key``; False when it does not exist (any more)."""
        try:
            self.touch(key)
        except BlobNotFound:
            return False
        return True

    def list_info(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_key(prefix, allow_empty=True, trailing_slash=True)
        full_prefix = self._full(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
            for item in page.get("Contents", []):
                yield ObjectInfo(item["Key"][strip:], int(item["Size"]), item["LastModified"])

    def modified(self, key: str) -> datetime:
        validate_key(key)
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._full(key))
        except ClientError as exc:
            if error_code(exc) in _NOT_FOUND:
                raise BlobNotFound(key, self.url) from None
            raise
        return head["LastModified"]  # type: ignore[no-any-return]

    def touch(self, key: str) -> None:
        """Copy ``key`` onto itself with fresh metadata, which sets ``LastModified`` to now."""
        size = self.size(key)
        full = self._full(key)
        if size > MAX_COPY_PART:  # CopyObject stops at 5 GiB
            if not self._multipart_copy(full, key, size, if_absent=False):
                raise BlobNotFound(key, self.url)
            return
        try:
            self.client.copy_object(
                Bucket=self.bucket,
                Key=full,
                CopySource={"Bucket": self.bucket, "Key": full},
                MetadataDirective="REPLACE",
                Metadata={"ckreg-touched": datetime.now(UTC).isoformat()},
            )
        except ClientError as exc:
            if error_code(exc) in _NOT_FOUND:
                raise BlobNotFound(key, self.url) from None
            raise

    def open_uploads(self) -> Iterator[OpenUpload]:
        strip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self.client.get_paginator("list_multipart_uploads")
        prefix = f"{self.prefix}/" if self.prefix else ""
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Uploads", []):
                active = self._last_active(item["Key"], str(item["UploadId"]), item["Initiated"])
                yield OpenUpload(item["Key"][strip:], str(item["UploadId"]), active)

    def _last_active(self, full_key: str, upload_id: str, initiated: datetime) -> datetime:
        """The newer of the upload's start and its newest part (some S3-compatible servers,
        moto among them, report a fixed ``Initiated``; parts carry real times)."""
        try:
            reply = self.client.list_parts(Bucket=self.bucket, Key=full_key, UploadId=upload_id)
        except ClientError as exc:
            if error_code(exc) != "NoSuchUpload":
                raise
            return initiated
        return max([initiated, *(part["LastModified"] for part in reply.get("Parts", []))])

    def abort_open_upload(self, upload: OpenUpload) -> None:
        try:
            self.client.abort_multipart_upload(
                Bucket=self.bucket, Key=self._full(upload.key), UploadId=upload.upload_id
            )
        except ClientError as exc:
            if error_code(exc) != "NoSuchUpload":
                raise
