"""Completing a checkpoint: validate its files, mark it ready, derive its task vector, notify.

A failed validation marks the checkpoint failed, removes its file rows and releases every blob
no other row references, so nothing half-written stays behind.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from sqlmodel import Session

from registry.errors import InvalidInput, InvalidState, RegistryError
from registry.launcher import Launcher, NullLauncher
from registry.models import (
    Checkpoint,
    CheckpointCreate,
    CheckpointKind,
    CheckpointStatus,
    LineageCreate,
    LineageRole,
    utcnow,
)
from registry.services.checkpoints import create_checkpoint
from registry.services.common import checkpoint_files, load_checkpoint, release_blobs
from registry.services.compatibility import check_base_compatibility
from registry.services.compression import compress_checkpoint
from registry.services.files import add_file_from_path
from registry.services.lineage import add_lineage_edges
from registry.services.moe_info import annotate_moe, check_moe_experts, link_moe_experts
from registry.services.validation import tensor_index, validate_files
from registry.settings import Settings
from registry.storage import ObjectStore

log = logging.getLogger(__name__)


def fail_checkpoint(
    *, session: Session, store: ObjectStore, checkpoint_id: int, error: str
) -> Checkpoint:
    """Mark a checkpoint failed, drop its file rows and release blobs nothing else uses."""
    session.rollback()
    checkpoint = load_checkpoint(session, checkpoint_id)
    files = checkpoint_files(session, checkpoint_id)
    keys = [artifact.blob_key for artifact in files]
    for artifact in files:
        session.delete(artifact)
    checkpoint.status = CheckpointStatus.failed
    checkpoint.error = error
    checkpoint.total_bytes = 0
    session.add(checkpoint)
    session.commit()
    release_blobs(session=session, store=store, keys=keys)
    session.refresh(checkpoint)
    return checkpoint


def _mark_ready(*, session: Session, checkpoint: Checkpoint, headers: Mapping) -> None:
    files = checkpoint_files(session, checkpoint.id or 0)
    for artifact in files:
        if artifact.name in headers:
            artifact.tensor_index = tensor_index(headers[artifact.name])
            artifact.meta = dict(headers[artifact.name].metadata)
            session.add(artifact)
    annotate_moe(checkpoint=checkpoint, headers=headers, files=files)
    checkpoint.status = CheckpointStatus.ready
    checkpoint.error = None
    checkpoint.total_bytes = sum(artifact.size for artifact in files)
    checkpoint.ready_at = utcnow()
    session.add(checkpoint)
    session.commit()
    if checkpoint.base_id is not None:
        edge = LineageCreate(
            parent_id=checkpoint.base_id, child_id=checkpoint.id or 0, role=LineageRole.base
        )
        add_lineage_edges(session=session, edges=[edge])


def _derive_task_vector(
    *, session: Session, store: ObjectStore, settings: Settings, checkpoint: Checkpoint
) -> None:
    if not settings.task_vectors_on_complete or checkpoint.base_id is None:
        return
    if checkpoint.kind not in (CheckpointKind.finetune, CheckpointKind.merged):
        return
    from registry.services.task_vectors import compute_task_vector

    try:
        compute_task_vector(
            session=session, store=store, settings=settings, checkpoint_id=checkpoint.id or 0
        )
    except RegistryError as exc:  # the checkpoint stays ready; the vector can be requested later
        session.rollback()
        log.warning("task vector of checkpoint %s not stored: %s", checkpoint.id, exc)


def complete_checkpoint(
    *,
    session: Session,
    store: ObjectStore,
    settings: Settings,
    checkpoint_id: int,
    declared_sha256: Mapping[str, str] | None = None,
    launcher: Launcher | None = None,
) -> Checkpoint:
    """Validate a pending checkpoint's files and mark it ready; returns the checkpoint.

    Completing a ready checkpoint again is a no-op. On a validation failure the checkpoint is
    marked failed (files dropped, orphan blobs deleted) and the ``ValidationFailed`` re-raised.
    """
    checkpoint = load_checkpoint(session, checkpoint_id)
    if checkpoint.status == CheckpointStatus.ready:
        return checkpoint
    if checkpoint.status != CheckpointStatus.pending:
        raise InvalidState(
            f"checkpoint {checkpoint_id} '{checkpoint.name}' is {checkpoint.status}, not pending"
        )
    files = checkpoint_files(session, checkpoint_id)
    try:
        headers = validate_files(
            store=store,
            settings=settings,
            checkpoint=checkpoint,
            files=files,
            declared_sha256=declared_sha256 or {},
        )
        check_base_compatibility(session=session, checkpoint=checkpoint, headers=headers)
        check_moe_experts(session=session, checkpoint=checkpoint)
    except RegistryError as exc:
        fail_checkpoint(
            session=session, store=store, checkpoint_id=checkpoint_id, error=exc.message
        )
        raise
    _mark_ready(session=session, checkpoint=checkpoint, headers=headers)
    link_moe_experts(session=session, checkpoint=checkpoint)
    _derive_task_vector(session=session, store=store, settings=settings, checkpoint=checkpoint)
    # After validation and the task vector (which read the raw upload), before anyone is told.
    compress_checkpoint(session=session, store=store, settings=settings, checkpoint=checkpoint)
    (launcher or NullLauncher()).checkpoint_ready(checkpoint_id)
    session.refresh(checkpoint)
    return checkpoint


def register_directory(
    *,
    session: Session,
    store: ObjectStore,
    settings: Settings,
    data: CheckpointCreate,
    directory: Path,
    launcher: Launcher | None = None,
) -> Checkpoint:
    """Create a checkpoint from every regular file of a local directory and complete it."""
    if not directory.is_dir():
        raise InvalidInput(f"'{directory}' is not a directory")
    paths = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
    if not paths:
        raise InvalidInput(f"directory '{directory}' holds no files")
    checkpoint = create_checkpoint(session=session, data=data)
    checkpoint_id = checkpoint.id or 0
    try:
        for path in paths:
            add_file_from_path(session=session, store=store, checkpoint_id=checkpoint_id, path=path)
    except Exception as exc:
        fail_checkpoint(session=session, store=store, checkpoint_id=checkpoint_id, error=str(exc))
        raise
    return complete_checkpoint(
        session=session,
        store=store,
        settings=settings,
        checkpoint_id=checkpoint_id,
        launcher=launcher,
    )
