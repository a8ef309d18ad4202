"""Artifacts: safetensors objects a checkpoint owns besides its weights (second moments, Fisher,
masks, task vectors, merge state), validated against the checkpoint's weights."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from sqlmodel import Session, col, select

from registry.errors import (
    IntegrityMismatch,
    InvalidInput,
    InvalidState,
    NotFound,
    RegistryError,
    ValidationFailed,
)
from registry.models import FILE_ROLES, Artifact, ArtifactPublic, ArtifactRole, CheckpointStatus
from registry.safetensors_check import SafetensorsHeader
from registry.services.common import check_file_name, check_sha256, load_checkpoint, release_blobs
from registry.services.compatibility import tensor_shapes
from registry.services.features import check_features
from registry.services.validation import inspect_artifact, tensor_index
from registry.settings import Settings
from registry.storage import BlobInfo, ObjectStore, StorageIntegrityError

Content = Path | bytes | Iterable[bytes] | BinaryIO
# Roles whose tensors must be weights of the checkpoint, with the same shapes.
SHAPED_ROLES = (
    ArtifactRole.second_moment,
    ArtifactRole.fisher,
    ArtifactRole.task_vector,
    ArtifactRole.mask,
    ArtifactRole.gram,
)


def _put(store: ObjectStore, content: Content, expected_sha256: str | None, name: str) -> BlobInfo:
    try:
        if isinstance(content, Path):
            with content.open("rb") as handle:
                return store.put_stream(handle, expected_sha256=expected_sha256)
        if isinstance(content, bytes):
            return store.put_stream([content], expected_sha256=expected_sha256)
        return store.put_stream(content, expected_sha256=expected_sha256)
    except StorageIntegrityError as exc:
        raise IntegrityMismatch(f"artifact '{name}': {exc}", file=name) from exc


def _expected_shape(role: ArtifactRole, weight: tuple[int, ...]) -> tuple[int, ...] | None:
    """The artifact tensor's shape for a weight: the weight's own, or (in, in) for a gram
    (None: this weight can have no such tensor)."""
    if role != ArtifactRole.gram:
        return weight
    return (weight[1], weight[1]) if len(weight) == 2 else None


def _check_against_weights(
    session: Session, checkpoint_id: int, header: SafetensorsHeader, name: str, role: ArtifactRole
) -> None:
    checkpoint = load_checkpoint(session, checkpoint_id)
    weights = tensor_shapes(session, checkpoint)
    for tensor, entry in header.tensors.items():
        if tensor not in weights:
            raise ValidationFailed(
                f"file '{name}', tensor '{tensor}': not a weight of checkpoint {checkpoint_id} '{checkpoint.name}'",
                file=name,
                tensor=tensor,
            )
        expected = _expected_shape(role, weights[tensor])
        if tuple(entry.shape) != expected:
            what = "its gram must be (in, in)" if role == ArtifactRole.gram else "they must match"
            raise ValidationFailed(
                f"file '{name}', tensor '{tensor}': shape {tuple(entry.shape)} but the weight is {weights[tensor]} ({what})",
                file=name,
                tensor=tensor,
            )


def _check_target(session: Session, checkpoint_id: int, role: ArtifactRole) -> None:
    """Shape-checked roles need a ready checkpoint; no role may target a failed or deleted one."""
    checkpoint = load_checkpoint(session, checkpoint_id)
    needs_ready = role in SHAPED_ROLES
    if checkpoint.status in (CheckpointStatus.failed, CheckpointStatus.deleted) or (
        needs_ready and checkpoint.status != CheckpointStatus.ready
    ):
        raise InvalidState(
            f"checkpoint {checkpoint_id} '{checkpoint.name}' is {checkpoint.status}; cannot add a {role} artifact"
        )


def _upsert(
    session: Session, checkpoint_id: int, role: ArtifactRole, name: str
) -> tuple[Artifact, str | None]:
    query = select(Artifact).where(
        Artifact.checkpoint_id == checkpoint_id, Artifact.role == role, Artifact.name == name
    )
    row = session.exec(query).first()
    if row is None:
        return Artifact(
            checkpoint_id=checkpoint_id, role=role, name=name, blob_key="", sha256="", size=0
        ), None
    return row, row.blob_key


def add_artifact(
    *,
    session: Session,
    store: ObjectStore,
    settings: Settings,
    checkpoint_id: int,
    role: ArtifactRole | str,
    content: Content,
    name: str | None = None,
    declared_sha256: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Artifact:
    """Store and validate a safetensors artifact; replaces an artifact of the same role and name.

    Invalid content raises ``ValidationFailed`` naming file and tensor, and leaves no blob behind.
    """
    role = ArtifactRole(role)
    if role in FILE_ROLES:
        raise InvalidInput(
            f"role '{role}' is for checkpoint files; upload those with PUT .../files/{{name}}"
        )
    name = check_file_name(name or f"{role.value}.safetensors")
    _check_target(session, checkpoint_id, role)
    expected = check_sha256(declared_sha256, what=f"artifact '{name}'") if declared_sha256 else None
    info = _put(store, content, expected, name)
    probe = Artifact(
        checkpoint_id=checkpoint_id,
        role=role,
        name=name,
        blob_key=info.key,
        sha256=info.sha256,
        size=info.size,
    )
    try:
        header = inspect_artifact(store=store, settings=settings, artifact=probe)
        if role in SHAPED_ROLES:
            _check_against_weights(session, checkpoint_id, header, name, role)
        elif role == ArtifactRole.features:
            check_features(session, checkpoint_id, header, name)
    except RegistryError:
        release_blobs(session=session, store=store, keys=[info.key])
        raise
    row, old_key = _upsert(session, checkpoint_id, role, name)
    row.blob_key, row.sha256, row.size = info.key, info.sha256, info.size
    row.tensor_index = tensor_index(header)
    row.meta = {**header.metadata, **(metadata or {})}
    session.add(row)
    session.commit()
    session.refresh(row)
    if old_key is not None and old_key != info.key:
        release_blobs(session=session, store=store, keys=[old_key])
    return row


def list_artifacts(
    *, session: Session, checkpoint_id: int, role: ArtifactRole | None = None
) -> list[Artifact]:
    """A checkpoint's artifacts other than its files (optionally one role), oldest first."""
    load_checkpoint(session, checkpoint_id)
    query = select(Artifact).where(
        Artifact.checkpoint_id == checkpoint_id, col(Artifact.role).not_in(FILE_ROLES)
    )
    if role is not None:
        query = query.where(Artifact.role == role)
    return list(session.exec(query.order_by(col(Artifact.id))).all())


def get_artifact(*, session: Session, checkpoint_id: int, artifact_id: int) -> Artifact:
    """One artifact of a checkpoint (``NotFound`` naming both ids)."""
    artifact = session.get(Artifact, artifact_id)
    if artifact is None or artifact.checkpoint_id != checkpoint_id:
        raise NotFound(f"artifact {artifact_id} of checkpoint {checkpoint_id} not found")
    return artifact


def find_artifact(*, session: Session, checkpoint_id: int, role: ArtifactRole) -> Artifact | None:
    """The newest artifact of ``role`` for a checkpoint, if any."""
    query = (
        select(Artifact)
        .where(Artifact.checkpoint_id == checkpoint_id, Artifact.role == role)
        .order_by(col(Artifact.id).desc())
    )
    return session.exec(query).first()


def artifact_public(artifact: Artifact) -> ArtifactPublic:
    """The API form of an artifact."""
    return ArtifactPublic(
        id=artifact.id or 0,
        checkpoint_id=artifact.checkpoint_id,
        role=ArtifactRole(artifact.role),
        name=artifact.name,
        sha256=artifact.sha256,
        size=artifact.size,
        tensors=len(artifact.tensor_index),
        codec=artifact.codec,
        stored_size=artifact.stored_size if artifact.stored_size is not None else artifact.size,
        metadata=artifact.meta or {},
    )
