"""Garbage collection of the object store: delete blobs that nothing references any more, abort
uploads that were never finished. ``ckreg gc`` and ``POST /api/v1/admin/gc`` run it.

What is referenced: every key of ``stored_blob(row).keys()`` for every artifact row (file or
artifact) of a checkpoint that is not deleted, i.e. the row's own blob plus every blob its codec
decodes against. A row of a deleted checkpoint survives deletion only while a live row decodes
against it (``registry.services.deletion``); once none does, a collection prunes it.

Why a concurrent upload never loses its blob. An upload writes its blob (or, when the content is
already stored, *touches* it: ``ObjectStore.touch`` sets its last-modified time to now), then
commits the row that references it; call the time between the two its gap ``W``. A collection
that starts at ``T`` (cutoff ``T - grace``) deletes a blob only when all of these hold:

1. it is not in the reference set read at the start;
2. right before the delete, no artifact row names it (a fresh read of the database, at ``t2``);
3. at the delete itself, its last-modified time is before the cutoff
   (``ObjectStore.delete_if_older``, at ``t3 > t2``).

Take an upload whose row check 2 missed: it commits at ``tc > t2``, so it wrote or touched the
blob at ``tw >= tc - W > t2 - W >= T - W``. If ``tw`` comes before check 3, the blob's time is
after the cutoff as long as ``W`` is shorter than the grace period (default one hour; real gaps
are milliseconds to seconds), and check 3 keeps it. If ``tw`` comes after check 3, the file store
has already moved the blob aside (the move is what makes check 3 atomic there), so the touch finds
no file and the upload links its own copy; a content-addressed re-upload of a blob deleted a
moment ago is never mistaken for a duplicate, because the write is conditional on the key being
absent and a touch of a missing key fails, so the bytes are written again. On S3 check 3 and the
delete are two requests: an upload touching an *old orphan* in the milliseconds between them is
the one window left, and ``complete`` (which reads the headers of the files it validates) then
fails that checkpoint rather than marking it ready. Check 2 covers rows committed while the
collection ran. Attaching by reference (``files.add_file_by_reference``) does not touch the blob
yet, so it relies on check 2 alone and can lose a race against the deletion of that very
orphan. S3 reports times to the second, so the cutoff moves back one more second.

Uploads never finished: multipart uploads the store holds open longer than the upload TTL are
aborted and temp objects (``tmp/``) older than the TTL removed (``registry.services.presigned``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy.orm import defer
from sqlmodel import Session, col, select

from registry.errors import NotFound
from registry.models import Artifact, Checkpoint, CheckpointStatus
from registry.services.blobs import stored_blob
from registry.services.presigned import expire_uploads
from registry.storage import ObjectStore
from registry.storage.base import BLOB_PREFIX, ObjectInfo, OpenUpload

RECHECK_BATCH = 256
DELETE_THREADS = 8  # deletes in flight at once (each is a check and a delete; S3: two requests)
# S3 reports Last-Modified in whole seconds (rounded down): a blob touched just after the cutoff
# can look older than it. The cutoff moves back by this much more (by at most the grace period).
MTIME_RESOLUTION_S = 1.0

# progress(stage, advance, total): stage "scan" (total unknown) or "delete" (total known).
Progress = Callable[[str, int, int | None], None]


@dataclass
class GcReport:
    """What a collection found and did; with ``dry_run`` nothing was deleted or aborted."""

    dry_run: bool
    grace_s: float
    upload_ttl_s: float
    scanned: int = 0
    referenced: int = 0
    young: int = 0
    orphans: list[ObjectInfo] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    kept_on_recheck: list[str] = field(default_factory=list)
    stale_uploads: list[OpenUpload] = field(default_factory=list)
    stale_temps: list[ObjectInfo] = field(default_factory=list)
    pruned_rows: int = 0
    unresolved_rows: list[str] = field(default_factory=list)

    @property
    def orphan_bytes(self) -> int:
        """Bytes of the orphans found (what a dry run would reclaim)."""
        return sum(info.size for info in self.orphans)

    @property
    def deleted_bytes(self) -> int:
        """Bytes actually reclaimed (0 in a dry run)."""
        gone = set(self.deleted)
        return sum(info.size for info in self.orphans if info.key in gone)


def _rows(session: Session, *, of_deleted: bool = False) -> Iterable[Artifact]:
    """Artifact rows of live checkpoints (or, ``of_deleted``, of deleted ones); tensor indexes
    are left unloaded."""
    status = col(Checkpoint.status)
    deleted = CheckpointStatus.deleted
    condition = status == deleted if of_deleted else status != deleted
    query = (
        select(Artifact)
        .join(Checkpoint, col(Checkpoint.id) == col(Artifact.checkpoint_id))
        .where(condition)
        .options(defer(Artifact.tensor_index))  # type: ignore[arg-type]
    )
    return session.exec(query).all()


def referenced_keys(*, session: Session, unresolved: list[str] | None = None) -> set[str]:
    """Every store key a live artifact row depends on (``StoredBlob.keys()`` of each).

    A row whose codec refs do not resolve still keeps its own blob; its name goes to
    ``unresolved``.
    """
    keys: set[str] = set()
    for row in _rows(session):
        try:
            keys |= stored_blob(session, row).keys()
        except NotFound:
            keys.add(row.blob_key)
            if unresolved is not None:
                unresolved.append(f"checkpoint {row.checkpoint_id} file '{row.name}'")
    return keys


def prune_retained_rows(*, session: Session, needed: set[str], dry_run: bool) -> int:
    """Drop rows of deleted checkpoints (kept as codec refs) that no live row needs any more."""
    stale = [row for row in _rows(session, of_deleted=True) if row.blob_key not in needed]
    if not dry_run and stale:
        for row in stale:
            session.delete(row)
        session.commit()
    return len(stale)


def _still_named(session: Session, keys: list[str]) -> set[str]:
    """The keys among ``keys`` some artifact row names now (a fresh read of the database)."""
    session.rollback()  # end any open transaction: read what is committed now
    query = select(Artifact.blob_key).where(col(Artifact.blob_key).in_(keys))
    named = set(session.exec(query).all())
    session.rollback()
    return named


def _find_orphans(
    *, session: Session, store: ObjectStore, report: GcReport, cutoff: datetime, progress: Progress
) -> None:
    report.referenced = len(
        needed := referenced_keys(session=session, unresolved=report.unresolved_rows)
    )
    session.rollback()
    report.pruned_rows = prune_retained_rows(session=session, needed=needed, dry_run=report.dry_run)
    for info in store.list_info(BLOB_PREFIX):
        report.scanned += 1
        progress("scan", 1, None)
        if info.key in needed:
            continue
        if info.modified >= cutoff:
            report.young += 1
        else:
            report.orphans.append(info)


def _delete_orphans(
    *, session: Session, store: ObjectStore, report: GcReport, cutoff: datetime, progress: Progress
) -> None:
    total = len(report.orphans)

    def delete(key: str) -> bool:
        return store.delete_if_older(key, cutoff=cutoff)

    with ThreadPoolExecutor(max_workers=DELETE_THREADS, thread_name_prefix="ckreg-gc") as pool:
        for first in range(0, total, RECHECK_BATCH):
            batch = [info.key for info in report.orphans[first : first + RECHECK_BATCH]]
            named = _still_named(session, batch)
            candidates = [key for key in batch if key not in named]
            report.kept_on_recheck.extend(key for key in batch if key in named)
            progress("delete", len(batch) - len(candidates), total)
            for key, deleted in zip(candidates, pool.map(delete, candidates), strict=True):
                (report.deleted if deleted else report.kept_on_recheck).append(key)
                progress("delete", 1, total)


def _no_progress(stage: str, advance: int, total: int | None) -> None:
    return None


def collect_garbage(
    *,
    session: Session,
    store: ObjectStore,
    grace_s: float,
    upload_ttl_s: float,
    dry_run: bool = True,
    now: datetime | None = None,
    progress: Progress | None = None,
) -> GcReport:
    """Find (and unless ``dry_run`` delete) unreferenced blobs older than ``grace_s`` seconds,
    and abort uploads older than ``upload_ttl_s``; returns the report.

    ``now`` is the time both periods count back from (default: the current time).
    """
    if grace_s < 0 or upload_ttl_s < 0:
        raise ValueError(f"grace_s and upload_ttl_s must be >= 0, got {grace_s}, {upload_ttl_s}")
    moment = now or datetime.now(UTC)
    cutoff = moment - timedelta(seconds=grace_s + min(grace_s, MTIME_RESOLUTION_S))
    report = GcReport(dry_run=dry_run, grace_s=grace_s, upload_ttl_s=upload_ttl_s)
    step = progress or _no_progress
    _find_orphans(session=session, store=store, report=report, cutoff=cutoff, progress=step)
    if not dry_run:
        _delete_orphans(session=session, store=store, report=report, cutoff=cutoff, progress=step)
    report.stale_uploads, report.stale_temps = expire_uploads(
        store=store, cutoff=moment - timedelta(seconds=upload_ttl_s), dry_run=dry_run
    )
    return report


def report_summary(report: GcReport, *, limit: int = 1000) -> dict[str, object]:
    """The report as JSON-ready data; key lists are cut to ``limit`` entries (counts are whole)."""
    return {
        "dry_run": report.dry_run,
        "grace_s": report.grace_s,
        "upload_ttl_s": report.upload_ttl_s,
        "scanned": report.scanned,
        "referenced": report.referenced,
        "young": report.young,
        "orphan_count": len(report.orphans),
        "orphan_bytes": report.orphan_bytes,
        "orphans": [{"key": i.key, "size": i.size} for i in report.orphans[:limit]],
        "deleted_count": len(report.deleted),
        "deleted_bytes": report.deleted_bytes,
        "kept_on_recheck": report.kept_on_recheck[:limit],
        "stale_uploads": [u.key for u in report.stale_uploads[:limit]],
        "stale_temps": [i.key for i in report.stale_temps[:limit]],
        "pruned_rows": report.pruned_rows,
        "unresolved_rows": report.unresolved_rows[:limit],
    }
