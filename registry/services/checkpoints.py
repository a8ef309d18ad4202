"""Checkpoint rows: create, read, list with filters, and their public (API) form."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from pydantic import TypeAdapter
from sqlalchemy import func, literal
from sqlalchemy import select as sa_select
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, select

from registry.errors import InvalidInput, InvalidState
from registry.models import (
    FILE_ROLES,
    Artifact,
    ArtifactRole,
    Checkpoint,
    CheckpointCreate,
    CheckpointKind,
    CheckpointPublic,
    CheckpointStatus,
    CheckpointTag,
    FilePublic,
)
from registry.services.common import load_checkpoint
from registry.services.validation import check_json_size, check_json_values, check_text

MAX_PAGE = 1000


DEFAULT_MAX_METADATA_BYTES = 64 * 1024


def _clean_tags(tags: Sequence[str]) -> list[str]:
    cleaned: list[str] = []
    for tag in tags:
        value = tag.strip()
        if not value or len(value) > 255:
            raise InvalidInput(f"invalid tag {tag!r}: tags are 1-255 characters")
        check_text(value, what="tag")
        if value not in cleaned:
            cleaned.append(value)
    return cleaned


def _check_fields(data: CheckpointCreate, *, max_metadata_bytes: int) -> None:
    """Names without control characters; metadata finite, int64-safe and within its size limit."""
    check_text(data.name, what="checkpoint name")
    check_text(data.task, what="task")
    check_text(data.run, what="run")
    check_json_values(data.step, what="step")
    check_json_values(data.metadata, what="metadata")
    check_json_size(data.metadata, what="metadata", limit=max_metadata_bytes)


def _check_base(session: Session, base_id: int) -> None:
    """A checkpoint's base must be ready: a pending base may still fail, a failed one never fits."""
    base = load_checkpoint(session, base_id)
    if base.status != CheckpointStatus.ready:
        raise InvalidState(
            f"base checkpoint {base.id} '{base.name}' is {base.status}; "
            "complete the base before registering checkpoints on it"
        )


def create_checkpoint(
    *,
    session: Session,
    data: CheckpointCreate,
    max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES,
) -> Checkpoint:
    """Insert a pending checkpoint (files come next, then ``complete_checkpoint``)."""
    _check_fields(data, max_metadata_bytes=max_metadata_bytes)
    if data.base_id is not None:
        _check_base(session, data.base_id)
    tags = _clean_tags(data.tags)
    checkpoint = Checkpoint(
        name=data.name,
        kind=CheckpointKind(data.kind),
        base_id=data.base_id,
        task=data.task,
        run=data.run,
        step=data.step,
        tags=tags,
        meta=dict(data.metadata),
    )
    session.add(checkpoint)
    session.flush()
    assert checkpoint.id is not None
    for tag in tags:
        session.add(CheckpointTag(checkpoint_id=checkpoint.id, tag=tag))
    session.commit()
    session.refresh(checkpoint)
    return checkpoint


def get_checkpoint(*, session: Session, checkpoint_id: int) -> Checkpoint:
    """The checkpoint with ``checkpoint_id`` (``NotFound`` otherwise)."""
    return load_checkpoint(session, checkpoint_id)


def list_checkpoints(
    *,
    session: Session,
    base_id: int | None = None,
    kind: CheckpointKind | None = None,
    task: str | None = None,
    run: str | None = None,
    tag: str | None = None,
    status: CheckpointStatus | None = None,
    name: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[Checkpoint], int]:
    """One page of checkpoints (newest first) and the total count; deleted ones only on request."""
    if not 1 <= limit <= MAX_PAGE or offset < 0:
        raise InvalidInput(
            f"limit must be 1..{MAX_PAGE} and offset >= 0, got limit={limit}, offset={offset}"
        )
    conditions = []
    for column, value in (
        (Checkpoint.base_id, base_id),
        (Checkpoint.kind, kind),
        (Checkpoint.task, task),
        (Checkpoint.run, run),
        (Checkpoint.name, name),
    ):
        if value is not None:
            conditions.append(col(column) == value)
    if status is not None:
        conditions.append(col(Checkpoint.status) == status)
    else:
        conditions.append(col(Checkpoint.status) != CheckpointStatus.deleted)
    if tag is not None:
        tagged = select(CheckpointTag.checkpoint_id).where(CheckpointTag.tag == tag)
        conditions.append(col(Checkpoint.id).in_(tagged))
    total = session.exec(select(func.count()).select_from(Checkpoint).where(*conditions)).one()
    query = (
        select(Checkpoint)
        .where(*conditions)
        .order_by(col(Checkpoint.created_at).desc(), col(Checkpoint.id).desc())
        .limit(limit)
        .offset(offset)
    )
    return list(session.exec(query).all()), int(total)


def file_public(artifact: Artifact, *, deduplicated: bool = False) -> FilePublic:
    """The API form of one checkpoint file."""
    return FilePublic(
        name=artifact.name,
        sha256=artifact.sha256,
        size=artifact.size,
        role=ArtifactRole(artifact.role),
        deduplicated=deduplicated,
        codec=artifact.codec,
        stored_size=artifact.stored_size if artifact.stored_size is not None else artifact.size,
    )


def shared_blob_keys(session: Session, keys: Sequence[str]) -> set[str]:
    """The ``keys`` that more than one artifact row references.

    This is what a file's ``deduplicated`` flag means everywhere (upload answers and listings
    alike): its bytes are stored once and shared with another file or artifact.
    """
    if not keys:
        return set()
    query = (
        sa_select(col(Artifact.blob_key))
        .where(col(Artifact.blob_key).in_(set(keys)))
        .group_by(col(Artifact.blob_key))
        .having(func.count() > 1)
    )
    return {key for (key,) in session.connection().execute(query).all()}


def files_public(*, session: Session, artifacts: Sequence[Artifact]) -> list[FilePublic]:
    """API forms of file rows, ``deduplicated`` when their blob is shared (``shared_blob_keys``)."""
    shared = shared_blob_keys(session, [artifact.blob_key for artifact in artifacts])
    return [file_public(a, deduplicated=a.blob_key in shared) for a in artifacts]


_PUBLIC_PAGE = TypeAdapter(list[CheckpointPublic])


def _files_by_checkpoint(session: Session, ids: list[int]) -> dict[int, list[dict[str, Any]]]:
    """File dicts (API shape) of the checkpoints ``ids``, by checkpoint id, in name order.

    Selects only the listed columns: whole ``Artifact`` rows would decode every file's tensor
    index, which for a real model is thousands of entries nobody asked for.
    """
    files: dict[int, list[dict[str, Any]]] = defaultdict(list)
    if not ids:
        return files
    rows = session.connection().execute(_files_query(ids)).all()
    for checkpoint_id, name, sha256, size, role, codec, stored, shared in rows:
        files[checkpoint_id].append(
            {
                "name": name,
                "sha256": sha256,
                "size": size,
                "role": role,
                "deduplicated": bool(shared),
                "codec": codec,
                "stored_size": size if stored is None else stored,
            }
        )
    return files


_OTHER = aliased(Artifact)
_SHARED = (
    sa_select(literal(1))
    .where(col(_OTHER.blob_key) == col(Artifact.blob_key), col(_OTHER.id) != col(Artifact.id))
    .exists()
)


def _files_query(ids: list[int]) -> Any:
    """The file columns of checkpoints ``ids`` and whether another row shares each file's blob
    (``shared_blob_keys``, as a correlated ``EXISTS`` on the blob_key index: one query)."""
    return (
        sa_select(
            col(Artifact.checkpoint_id),
            col(Artifact.name),
            col(Artifact.sha256),
            col(Artifact.size),
            col(Artifact.role),
            col(Artifact.codec),
            col(Artifact.stored_size),
            _SHARED,
        )
        .where(col(Artifact.checkpoint_id).in_(ids), col(Artifact.role).in_(FILE_ROLES))
        .order_by(col(Artifact.name))
    )


def _public_fields(checkpoint: Checkpoint, files: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": checkpoint.id,
        "name": checkpoint.name,
        "kind": checkpoint.kind,
        "base_id": checkpoint.base_id,
        "task": checkpoint.task,
        "run": checkpoint.run,
        "step": checkpoint.step,
        "tags": checkpoint.tags,
        "metadata": checkpoint.meta,
        "status": checkpoint.status,
        "error": checkpoint.error,
        "total_bytes": checkpoint.total_bytes,
        "created_at": checkpoint.created_at,
        "files": files,
    }


def checkpoints_public(
    *, session: Session, checkpoints: Sequence[Checkpoint]
) -> list[CheckpointPublic]:
    """API forms of several checkpoints, loading their files in one query.

    The forms are validated in one batch from plain dicts, which is several times cheaper than
    one ``model_validate`` per ORM row on a 1000-row page.
    """
    files = _files_by_checkpoint(session, [c.id for c in checkpoints if c.id is not None])
    return _PUBLIC_PAGE.validate_python(
        [_public_fields(c, files.get(c.id or 0, [])) for c in checkpoints]
    )


def checkpoint_public(*, session: Session, checkpoint: Checkpoint) -> CheckpointPublic:
    """The API form of one checkpoint, with its files."""
    return checkpoints_public(session=session, checkpoints=[checkpoint])[0]
