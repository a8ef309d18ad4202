"""Uploading checkpoint files: streamed, from a local path, or by reference to a stored blob."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from registry.errors import IntegrityMismatch, InvalidInput, InvalidState, NotFound
from registry.models import FILE_ROLES, Artifact, ArtifactRole, Checkpoint
from registry.services.blobs import stored_blob
from registry.services.common import (
    check_file_name,
    check_sha256,
    checkpoint_files,
    load_checkpoint,
    load_pending_checkpoint,
    release_blobs,
)
from registry.storage import BlobInfo, BlobNotFound, ObjectStore, StorageIntegrityError, blob_key
from registry.storage.codecs import RAW, StoredBlob, iter_original


@dataclass(frozen=True)
class StoredFile:
    """A file attached to a checkpoint; ``deduplicated`` when its bytes were already stored."""

    artifact: Artifact
    deduplicated: bool


def file_role(name: str) -> ArtifactRole:
    """Safetensors files are weights; anything else (index, adapter config) is config."""
    return ArtifactRole.weights if name.endswith(".safetensors") else ArtifactRole.config


def _find_file(session: Session, checkpoint_id: int, name: str) -> Artifact | None:
    """The file row ``name`` of a checkpoint (weights or config), if uploaded."""
    query = select(Artifact).where(
        Artifact.checkpoint_id == checkpoint_id,
        Artifact.name == name,
        col(Artifact.role).in_(FILE_ROLES),
    )
    return session.exec(query).first()


def attach_file(
    *, session: Session, store: ObjectStore, checkpoint: Checkpoint, name: str, info: BlobInfo
) -> StoredFile:
    """Insert (or replace) the file row; a replaced blob is released if nothing else uses it."""
    artifact = _find_file(session, checkpoint.id or 0, name)
    old_key = artifact.blob_key if artifact is not None else None
    if artifact is None:
        artifact = Artifact(
            checkpoint_id=checkpoint.id or 0,
            role=file_role(name),
            name=name,
            blob_key="",
            sha256="",
            size=0,
        )
    artifact.blob_key, artifact.sha256, artifact.size = info.key, info.sha256, info.size
    session.add(artifact)
    try:
        session.commit()
    except IntegrityError as exc:
        session.rollback()
        raise InvalidState(
            f"file '{name}' of checkpoint {checkpoint.id} was uploaded concurrently"
        ) from exc
    session.refresh(artifact)
    if old_key is not None and old_key != info.key:
        release_blobs(session=session, store=store, keys=[old_key])
    return StoredFile(artifact=artifact, deduplicated=not info.created)


def add_file_from_stream(
    *,
    session: Session,
    store: ObjectStore,
    checkpoint_id: int,
    name: str,
    chunks: Iterable[bytes] | BinaryIO,
    declared_sha256: str | None = None,
    expected_size: int | None = None,
) -> StoredFile:
    """Stream one file into the store and attach it to a pending checkpoint.

    A declared sha256 that does not match raises ``IntegrityMismatch`` and stores nothing.
    """
    check_file_name(name)
    checkpoint = load_pending_checkpoint(session, checkpoint_id)
    expected = check_sha256(declared_sha256, what=f"file '{name}'") if declared_sha256 else None
    try:
        info = store.put_stream(chunks, expected_sha256=expected, expected_size=expected_size)
    except StorageIntegrityError as exc:
        raise IntegrityMismatch(
            f"file '{name}' of checkpoint {checkpoint_id}: {exc}", file=name
        ) from exc
    return attach_file(session=session, store=store, checkpoint=checkpoint, name=name, info=info)


def add_file_from_path(
    *, session: Session, store: ObjectStore, checkpoint_id: int, path: Path, name: str | None = None
) -> StoredFile:
    """Upload a local file (named ``name`` or its own file name) to a pending checkpoint."""
    file_name = check_file_name(name if name is not None else path.name)
    if not path.is_file():
        raise InvalidInput(f"'{path}' is not a regular file")
    with path.open("rb") as handle:
        return add_file_from_stream(
            session=session, store=store, checkpoint_id=checkpoint_id, name=file_name, chunks=handle
        )


def add_file_by_reference(
    *, session: Session, store: ObjectStore, checkpoint_id: int, name: str, sha256: str
) -> StoredFile:
    """Attach a blob already in the store (``blobs/sha256/<hex>``) without uploading bytes."""
    check_file_name(name)
    checkpoint = load_pending_checkpoint(session, checkpoint_id)
    digest = check_sha256(sha256, what=f"file '{name}'")
    key = blob_key(digest)
    try:
        # Touching (not just checking) keeps gc from deleting an old orphan we are adopting.
        store.touch(key)
        info = BlobInfo(key=key, sha256=digest, size=store.size(key), created=False)
    except BlobNotFound:
        info = _restore_compressed(session=session, store=store, key=key, name=name)
    return attach_file(session=session, store=store, checkpoint=checkpoint, name=name, info=info)


def _restore_compressed(*, session: Session, store: ObjectStore, key: str, name: str) -> BlobInfo:
    """Content kept only compressed (``registry.services.compression``) is written back raw, so
    the new file validates like an upload; ``complete`` then reuses the compressed object."""
    sha256 = key.rsplit("/", 1)[-1]
    query = select(Artifact).where(Artifact.sha256 == sha256, col(Artifact.codec) != RAW)
    twin = session.exec(query.limit(1)).first()
    if twin is None:
        raise NotFound(f"blob '{key}' for file '{name}' is not in the store")
    chunks = stream_artifact(store=store, artifact=twin, session=session)
    return store.put_stream(chunks, expected_sha256=sha256, expected_size=twin.size)


def get_checkpoint_file(*, session: Session, checkpoint_id: int, name: str) -> Artifact:
    """The file row ``name`` of a checkpoint (``NotFound`` naming both)."""
    check_file_name(name)
    checkpoint = load_checkpoint(session, checkpoint_id)
    artifact = _find_file(session, checkpoint_id, name)
    if artifact is None:
        there = ", ".join(f.name for f in checkpoint_files(session, checkpoint_id)) or "none"
        raise NotFound(
            f"checkpoint {checkpoint_id} '{checkpoint.name}' has no file '{name}'; files: {there}"
        )
    return artifact


def stream_artifact(
    *,
    store: ObjectStore,
    artifact: Artifact,
    session: Session | None = None,
    start: int = 0,
    end: int | None = None,
    chunk_size: int = 1 << 20,
) -> Iterator[bytes]:
    """The original bytes ``[start, end)`` of an artifact or file, decoded from however it is
    stored (``registry.storage.codecs``); a compressed row needs ``session`` to resolve refs."""
    if artifact.codec == RAW:
        blob = StoredBlob(artifact.blob_key, artifact.size)
    elif session is None:
        raise InvalidState(
            f"file '{artifact.name}' is stored as {artifact.codec!r}: pass a session"
        )
    else:
        blob = stored_blob(session, artifact)
    return iter_original(store, blob, start=start, end=end, chunk_size=chunk_size)
