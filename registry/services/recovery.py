"""Recovery of work a crash cut off: checkpoints left pending, ``complete`` stopped mid-way.

``fail_stale_pending`` marks checkpoints failed that stayed ``pending`` past the TTL
(``CKREG_PENDING_TTL_S``, counted from their newest file) and releases their blobs to garbage
collection; ``resume_compression`` compresses the files a ``complete`` marked ready but never
compressed (the process died while compressing). Both are safe to run from several processes at
once: a row is only changed under a compare-and-set on its state. The launchers call them at
start-up and from their periodic sweep, next to the merge-run recovery in ``leases``.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, update
from sqlmodel import Session, col, select

from registry.models import Artifact, ArtifactRole, Checkpoint, CheckpointStatus, utcnow
from registry.services.common import checkpoint_files, release_blobs
from registry.services.compression import MIN_FILE_BYTES, compress_checkpoint
from registry.settings import Settings
from registry.storage import ObjectStore
from registry.storage.codecs import RAW

log = logging.getLogger(__name__)


def _naive_utc(moment: datetime) -> datetime:
    """``moment`` as the database compares it (naive UTC on SQLite, aware on PostgreSQL)."""
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo else moment


def stale_pending_ids(*, session: Session, ttl_s: float) -> list[int]:
    """Pending checkpoints with no activity (creation, newest file) for longer than ``ttl_s``."""
    cutoff = utcnow() - timedelta(seconds=ttl_s)
    newest_file = (
        select(Artifact.checkpoint_id, func.max(Artifact.created_at).label("newest"))
        .group_by(col(Artifact.checkpoint_id))
        .subquery()
    )
    query = (
        select(Checkpoint.id, Checkpoint.created_at, newest_file.c.newest)
        .outerjoin(newest_file, newest_file.c.checkpoint_id == Checkpoint.id)
        .where(Checkpoint.status == CheckpointStatus.pending, Checkpoint.created_at < cutoff)
        .order_by(col(Checkpoint.id))
    )
    rows = session.execute(query).all()
    session.rollback()
    limit = _naive_utc(cutoff)
    return [int(row[0]) for row in rows if row[2] is None or _naive_utc(row[2]) < limit]


def fail_stale_pending(*, session: Session, store: ObjectStore, ttl_s: float) -> list[int]:
    """Mark pending checkpoints idle for longer than ``ttl_s`` failed, drop their file rows and
    release their blobs to gc; returns their ids. A checkpoint another process completes or
    fails meanwhile is left alone (compare-and-set on ``pending``)."""
    failed: list[int] = []
    for checkpoint_id in stale_pending_ids(session=session, ttl_s=ttl_s):
        error = (
            f"abandoned: pending for more than {ttl_s:g} s without an upload or complete "
            "(CKREG_PENDING_TTL_S); register it again"
        )
        won = session.execute(
            update(Checkpoint)
            .where(
                col(Checkpoint.id) == checkpoint_id,
                col(Checkpoint.status) == CheckpointStatus.pending,
            )
            .values(status=CheckpointStatus.failed, error=error, total_bytes=0)
        )
        if won.rowcount != 1:  # type: ignore[attr-defined]
            session.rollback()
            continue
        files = checkpoint_files(session, checkpoint_id)
        keys = [artifact.blob_key for artifact in files]
        for artifact in files:
            session.delete(artifact)
        session.commit()
        release_blobs(session=session, store=store, keys=keys)
        failed.append(checkpoint_id)
    if failed:
        log.warning("failed stale pending checkpoints %s (pending TTL %g s)", failed, ttl_s)
    return failed


def uncompressed_ready_ids(*, session: Session, settle_s: float) -> list[int]:
    """Ready checkpoints (ready for longer than ``settle_s``) holding a weights file that
    ``complete`` should have compressed but never tried (raw, ``stored_size`` unset)."""
    settled = utcnow() - timedelta(seconds=settle_s)
    query = (
        select(Checkpoint.id)
        .join(Artifact, col(Artifact.checkpoint_id) == col(Checkpoint.id))
        .where(
            Checkpoint.status == CheckpointStatus.ready,
            col(Checkpoint.ready_at) <= settled,
            Artifact.role == ArtifactRole.weights,
            Artifact.codec == RAW,
            col(Artifact.stored_size).is_(None),
            Artifact.size >= MIN_FILE_BYTES,
        )
        .distinct()
        .order_by(col(Checkpoint.id))
    )
    ids = [int(row) for row in session.exec(query).all() if row is not None]
    session.rollback()
    return ids


def resume_compression(
    *, session: Session, store: ObjectStore, settings: Settings, settle_s: float
) -> list[int]:
    """Compress what an interrupted ``complete`` left raw; returns the checkpoint ids handled."""
    if settings.store_compression == "off":
        return []
    done: list[int] = []
    for checkpoint_id in uncompressed_ready_ids(session=session, settle_s=settle_s):
        checkpoint = session.get(Checkpoint, checkpoint_id)
        if checkpoint is None:
            continue
        compress_checkpoint(session=session, store=store, settings=settings, checkpoint=checkpoint)
        # A file compression gave up on keeps stored_size unset only on an error: mark it
        # tried, so the sweep does not redo it forever (it is served raw, as before).
        for artifact in checkpoint_files(session, checkpoint_id):
            if artifact.codec == RAW and artifact.stored_size is None:
                artifact.stored_size = artifact.size
                session.add(artifact)
        session.commit()
        done.append(checkpoint_id)
    if done:
        log.warning("compressed files an interrupted complete left raw: checkpoints %s", done)
    return done
