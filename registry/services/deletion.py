"""Deleting checkpoints: refused while merged descendants or unfinished merge runs depend on
them, unless forced. Deletion drops the rows and releases their blobs to garbage collection
(``registry.services.gc``) instead of deleting them inline, so content shared with another
checkpoint or with an upload in flight stays; what was released is recorded on the checkpoint
(``metadata["deletion"]``) and returned.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlmodel import Session, col, select

from registry.errors import DependentsExist
from registry.models import (
    Artifact,
    Checkpoint,
    CheckpointStatus,
    MergeRun,
    MergeRunInput,
    MergeRunStatus,
)
from registry.services.blobs import codec_refs
from registry.services.common import load_checkpoint, release_blobs
from registry.services.lineage import dependent_merged
from registry.storage import ObjectStore


@dataclass(frozen=True)
class DeletionReport:
    """A deleted checkpoint and what became of its blobs.

    ``released``: blob keys no row uses any more (gc deletes them after its grace period);
    ``released_bytes`` their size; ``kept_shared``: keys other rows still use (same sha256);
    ``kept_as_codec_ref``: names of files kept because live files decode against them.
    """

    checkpoint: Checkpoint
    released: list[str]
    released_bytes: int
    kept_shared: list[str]
    kept_as_codec_ref: list[str]

    def summary(self) -> dict[str, object]:
        """The report as JSON-ready data (stored in the checkpoint's metadata)."""
        return {
            "released_to_gc": self.released,
            "released_bytes": self.released_bytes,
            "kept_shared": self.kept_shared,
            "kept_as_codec_ref": self.kept_as_codec_ref,
        }


def _refuse_if_needed(session: Session, checkpoint: Checkpoint) -> None:
    dependents = dependent_merged(session=session, checkpoint_id=checkpoint.id or 0)
    if dependents:
        names = ", ".join(f"{d.id} '{d.name}'" for d in dependents[:10])
        raise DependentsExist(
            f"checkpoint {checkpoint.id} '{checkpoint.name}' has {len(dependents)} merged "
            f"descendant(s) that depend on it: {names}; pass force=true to delete anyway"
        )
    unfinished = session.exec(
        select(MergeRunInput.merge_run_id)
        .join(MergeRun, col(MergeRunInput.merge_run_id) == col(MergeRun.id))
        .where(
            MergeRunInput.checkpoint_id == checkpoint.id,
            col(MergeRun.status).in_([MergeRunStatus.queued, MergeRunStatus.running]),
        )
    ).all()
    if unfinished:
        raise DependentsExist(
            f"checkpoint {checkpoint.id} '{checkpoint.name}' is an input of unfinished merge "
            f"run(s) {sorted(set(unfinished))}; wait for them or pass force=true"
        )


def _codec_ref_shas(session: Session, checkpoint_id: int) -> set[str]:
    """sha256s that live rows of other checkpoints decode against."""
    query = (
        select(Artifact)
        .join(Checkpoint, col(Checkpoint.id) == col(Artifact.checkpoint_id))
        .where(
            Artifact.codec != "raw",
            Artifact.checkpoint_id != checkpoint_id,
            Checkpoint.status != CheckpointStatus.deleted,
        )
    )
    return {sha for row in session.exec(query).all() for sha in codec_refs(row).values()}


def _has_twin(session: Session, artifact: Artifact) -> bool:
    """Whether a row of another live checkpoint has the same content (refs resolve to it)."""
    query = (
        select(Artifact.id)
        .join(Checkpoint, col(Checkpoint.id) == col(Artifact.checkpoint_id))
        .where(
            Artifact.sha256 == artifact.sha256,
            Artifact.checkpoint_id != artifact.checkpoint_id,
            Checkpoint.status != CheckpointStatus.deleted,
        )
        .limit(1)
    )
    return session.exec(query).first() is not None


def delete_checkpoint_report(
    *, session: Session, store: ObjectStore, checkpoint_id: int, force: bool = False
) -> DeletionReport:
    """Mark a checkpoint deleted, drop its files and artifacts and release their blobs to gc.

    The row, its metrics and its lineage edges stay, so merged descendants keep their history;
    file rows that live files of other checkpoints decode against stay too (with their blobs).
    Raises ``DependentsExist`` naming merged descendants or unfinished merge runs unless ``force``.
    """
    checkpoint = load_checkpoint(session, checkpoint_id)
    if checkpoint.status == CheckpointStatus.deleted:
        return DeletionReport(checkpoint, [], 0, [], [])
    if not force:
        _refuse_if_needed(session, checkpoint)
    artifacts = list(
        session.exec(select(Artifact).where(Artifact.checkpoint_id == checkpoint_id)).all()
    )
    ref_shas = _codec_ref_shas(session, checkpoint_id)
    kept = [a for a in artifacts if a.sha256 in ref_shas and not _has_twin(session, a)]
    dropped = [a for a in artifacts if a not in kept]
    sizes = {a.blob_key: a.stored_size or a.size for a in dropped}
    for artifact in dropped:
        session.delete(artifact)
    checkpoint.status = CheckpointStatus.deleted
    session.add(checkpoint)
    session.commit()
    released = release_blobs(session=session, store=store, keys=sizes)
    report = DeletionReport(
        checkpoint=checkpoint,
        released=released,
        released_bytes=sum(sizes[key] for key in released),
        kept_shared=sorted(set(sizes) - set(released)),
        kept_as_codec_ref=sorted(a.name for a in kept),
    )
    checkpoint.meta = {**(checkpoint.meta or {}), "deletion": report.summary()}
    session.add(checkpoint)
    session.commit()
    session.refresh(checkpoint)
    return report


def delete_checkpoint(
    *, session: Session, store: ObjectStore, checkpoint_id: int, force: bool = False
) -> Checkpoint:
    """``delete_checkpoint_report`` returning just the checkpoint (its metadata says what went)."""
    return delete_checkpoint_report(
        session=session, store=store, checkpoint_id=checkpoint_id, force=force
    ).checkpoint
