"""Presigned multipart uploads: the client sends a large file's parts straight to S3.

``start_presigned_upload`` hands out one presigned ``UploadPart`` URL per part for a temp object
whose upload id names its checkpoint (the first 16 hex digits), so an upload can only be completed
or aborted through the checkpoint it was opened for (any other: 404, the upload untouched);
``complete_presigned_upload`` completes it, verifies size and sha256 by hashing the object once,
moves it content-addressed and attaches it exactly like a streamed ``PUT`` would.
``expire_uploads`` (run by garbage collection) aborts uploads never completed within the upload
TTL (``CKREG_UPLOAD_TTL_S``) and removes the temp objects they left.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlmodel import Session

from registry.errors import IntegrityMismatch, InvalidInput, InvalidState, NotFound
from registry.services.common import (
    check_file_name,
    check_sha256,
    load_checkpoint,
    load_pending_checkpoint,
)
from registry.services.files import StoredFile, attach_file
from registry.storage import ObjectStore, StorageIntegrityError
from registry.storage.base import TMP_PREFIX, ObjectInfo, OpenUpload, PresignedUpload

PRESIGN_EXPIRES = 3600
_UPLOAD_ID = re.compile(r"^[0-9a-f]{32}$")


class PresignedUnsupported(InvalidState):
    """The store cannot take presigned uploads (a ``file://`` store): stream the file instead."""

    code = "presigned_unsupported"


def start_presigned_upload(
    *,
    session: Session,
    store: ObjectStore,
    checkpoint_id: int,
    name: str,
    size: int,
    sha256: str,
    part_size: int | None = None,
    expires: int = PRESIGN_EXPIRES,
) -> PresignedUpload:
    """Open a presigned multipart upload of file ``name`` to a pending checkpoint."""
    if not store.supports_presigned_uploads():
        raise PresignedUnsupported(
            "presigned uploads need an S3 store and this registry's store is not one; "
            "PUT the file instead"
        )
    check_file_name(name)
    load_pending_checkpoint(session, checkpoint_id)
    digest = check_sha256(sha256, what=f"file '{name}'")
    metadata = {"checkpoint": str(checkpoint_id), "name": name, "sha256": digest, "size": str(size)}
    try:
        return store.start_presigned_upload(
            size=size,
            part_size=part_size,
            metadata=metadata,
            expires=expires,
            upload_id=new_upload_id(checkpoint_id),
        )
    except ValueError as exc:
        raise InvalidInput(f"presigned upload of file '{name}': {exc}") from exc


def new_upload_id(checkpoint_id: int) -> str:
    """A fresh upload id: the checkpoint id in 16 hex digits, then 64 random bits."""
    return f"{checkpoint_id:016x}{uuid.uuid4().hex[:16]}"


def check_upload_owner(*, checkpoint_id: int, upload_id: str) -> None:
    """``NotFound`` unless ``upload_id`` was opened for ``checkpoint_id`` (checked before the
    store is touched, so another checkpoint's upload is never completed, aborted or deleted)."""
    if not isinstance(upload_id, str) or not _UPLOAD_ID.fullmatch(upload_id):
        raise InvalidInput(f"invalid upload id {upload_id!r}: expected 32 lowercase hex characters")
    if int(upload_id[:16], 16) != checkpoint_id:
        raise NotFound(f"checkpoint {checkpoint_id} has no upload {upload_id}")


def complete_presigned_upload(
    *,
    session: Session,
    store: ObjectStore,
    checkpoint_id: int,
    upload_id: str,
    parts: Sequence[tuple[int, str]],
) -> StoredFile:
    """Complete the upload, verify it and attach it; a mismatch stores nothing (422)."""
    checkpoint = load_pending_checkpoint(session, checkpoint_id)
    check_upload_owner(checkpoint_id=checkpoint_id, upload_id=upload_id)
    try:
        key, metadata = store.finish_presigned_upload(upload_id, parts)
    except StorageIntegrityError as exc:
        raise IntegrityMismatch(f"checkpoint {checkpoint_id}: {exc}") from exc
    name = metadata.get("name", "")
    if metadata.get("checkpoint") != str(checkpoint_id):
        store.delete(key)
        raise NotFound(f"checkpoint {checkpoint_id} has no upload {upload_id}; it was discarded")
    try:
        info = store.adopt_temp_object(
            key, expected_sha256=metadata["sha256"], expected_size=int(metadata["size"])
        )
    except StorageIntegrityError as exc:
        raise IntegrityMismatch(
            f"file '{name}' of checkpoint {checkpoint_id} (upload {upload_id}): {exc}", file=name
        ) from exc
    return attach_file(session=session, store=store, checkpoint=checkpoint, name=name, info=info)


def abort_presigned_upload(
    *, session: Session, store: ObjectStore, checkpoint_id: int, upload_id: str
) -> None:
    """Abort a presigned upload and delete whatever it left in the store."""
    if not store.supports_presigned_uploads():
        raise PresignedUnsupported(
            "presigned uploads need an S3 store and this registry's store is not one"
        )
    load_checkpoint(session, checkpoint_id)
    check_upload_owner(checkpoint_id=checkpoint_id, upload_id=upload_id)
    store.abort_presigned_upload(upload_id)


def expire_uploads(
    *, store: ObjectStore, cutoff: datetime, dry_run: bool
) -> tuple[list[OpenUpload], list[ObjectInfo]]:
    """Abort multipart uploads last active (started, or sent a part) before ``cutoff`` and
    remove temp objects (``tmp/``) last written before it; returns both lists (with
    ``dry_run``, what would go)."""
    stale_uploads = [upload for upload in store.open_uploads() if upload.last_active < cutoff]
    stale_temps = [info for info in store.list_info(TMP_PREFIX) if info.modified < cutoff]
    if dry_run:
        return stale_uploads, stale_temps
    for upload in stale_uploads:
        store.abort_open_upload(upload)
    removed = [info for info in stale_temps if store.delete_if_older(info.key, cutoff=cutoff)]
    return stale_uploads, removed
