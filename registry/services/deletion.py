"""Deleting checkpoints: refused while merged descendants depend on them, unless forced."""

from __future__ import annotations

from sqlmodel import Session, select

from registry.errors import DependentsExist
from registry.models import Artifact, Checkpoint, CheckpointStatus
from registry.services.common import load_checkpoint, release_blobs
from registry.services.lineage import dependent_merged
from registry.storage import ObjectStore


def delete_checkpoint(
    *, session: Session, store: ObjectStore, checkpoint_id: int, force: bool = False
) -> Checkpoint:
    """Mark a checkpoint deleted, drop its files and artifacts and release their unshared blobs.

    The row, its metrics and its lineage edges stay, so merged descendants keep their history.
    Raises ``DependentsExist`` naming the merged descendants unless ``force``.
    """
    checkpoint = load_checkpoint(session, checkpoint_id)
    if checkpoint.status == CheckpointStatus.deleted:
        return checkpoint
    if not force:
        dependents = dependent_merged(session=session, checkpoint_id=checkpoint_id)
        if dependents:
            names = ", ".join(f"{d.id} '{d.name}'" for d in dependents[:10])
            raise DependentsExist(
                f"checkpoint {checkpoint_id} '{checkpoint.name}' has {len(dependents)} merged "
                f"descendant(s) that depend on it: {names}; pass force=true to delete anyway"
            )
    artifacts = list(
        session.exec(select(Artifact).where(Artifact.checkpoint_id == checkpoint_id)).all()
    )
    keys = [artifact.blob_key for artifact in artifacts]
    for artifact in artifacts:
        session.delete(artifact)
    checkpoint.status = CheckpointStatus.deleted
    session.add(checkpoint)
    session.commit()
    release_blobs(session=session, store=store, keys=keys)
    session.refresh(checkpoint)
    return checkpoint
