"""Checkpoint rows: create, read, list with filters, and their public (API) form."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from sqlalchemy import func
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

MAX_PAGE = 1000


def _clean_tags(tags: Sequence[str]) -> list[str]:
    cleaned: list[str] = []
    for tag in tags:
        value = tag.strip()
        if not value or len(value) > 255:
            raise InvalidInput(f"invalid tag {tag!r}: tags are 1-255 characters")
        if value not in cleaned:
            cleaned.append(value)
    return cleaned


def create_checkpoint(*, session: Session, data: CheckpointCreate) -> Checkpoint:
    """Insert a pending checkpoint (files come next, then ``complete_checkpoint``)."""
    if data.base_id is not None:
        base = load_checkpoint(session, data.base_id)
        if base.status in (CheckpointStatus.failed, CheckpointStatus.deleted):
            raise InvalidState(f"base checkpoint {base.id} '{base.name}' is {base.status}")
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
    )


def checkpoints_public(
    *, session: Session, checkpoints: Sequence[Checkpoint]
) -> list[CheckpointPublic]:
    """API forms of several checkpoints, loading their files in one query."""
    ids = [c.id for c in checkpoints]
    files: dict[int, list[FilePublic]] = defaultdict(list)
    if ids:
        query = (
            select(Artifact)
            .where(col(Artifact.checkpoint_id).in_(ids), col(Artifact.role).in_(FILE_ROLES))
            .order_by(col(Artifact.name))
        )
        for artifact in session.exec(query).all():
            files[artifact.checkpoint_id].append(file_public(artifact))
    return [
        CheckpointPublic.model_validate(
            checkpoint,
            update={"metadata": checkpoint.meta, "files": files.get(checkpoint.id or 0, [])},
        )
        for checkpoint in checkpoints
    ]


def checkpoint_public(*, session: Session, checkpoint: Checkpoint) -> CheckpointPublic:
    """The API form of one checkpoint, with its files."""
    return checkpoints_public(session=session, checkpoints=[checkpoint])[0]
