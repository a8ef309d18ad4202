"""Shared service helpers: loading rows with domain errors, name checks, releasing blobs to gc."""

from __future__ import annotations

import re
from collections.abc import Iterable

from sqlmodel import Session, col, select

from registry.errors import InvalidInput, InvalidState, NotFound
from registry.models import FILE_ROLES, Artifact, Checkpoint, CheckpointStatus
from registry.storage import ObjectStore

_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def check_file_name(name: str) -> str:
    """Return ``name`` if it is a plain file name (no separators, no traversal), else raise."""
    if not _FILE_NAME.fullmatch(name) or ".." in name:
        raise InvalidInput(
            f"invalid file name {name!r}: use a plain name of letters, digits, '.', '_' or '-' "
            "that starts with a letter or digit (no '/', no '..')"
        )
    return name


def check_sha256(value: str, *, what: str) -> str:
    """Normalise a declared sha256 to lowercase hex, naming ``what`` when it is malformed."""
    normalised = value.strip().lower()
    if not _SHA256.fullmatch(normalised):
        raise InvalidInput(f"declared sha256 of {what} is not 64 hex characters: {value!r}")
    return normalised


def load_checkpoint(session: Session, checkpoint_id: int) -> Checkpoint:
    """The checkpoint row, or ``NotFound`` naming the id."""
    checkpoint = session.get(Checkpoint, checkpoint_id)
    if checkpoint is None:
        raise NotFound(f"checkpoint {checkpoint_id} not found")
    return checkpoint


def load_pending_checkpoint(session: Session, checkpoint_id: int) -> Checkpoint:
    """The checkpoint if it still accepts files, else ``InvalidState``."""
    checkpoint = load_checkpoint(session, checkpoint_id)
    if checkpoint.status != CheckpointStatus.pending:
        raise InvalidState(
            f"checkpoint {checkpoint_id} '{checkpoint.name}' is {checkpoint.status}, "
            "files can only be added while it is pending"
        )
    return checkpoint


def load_ready_checkpoint(session: Session, checkpoint_id: int) -> Checkpoint:
    """The checkpoint if it is ready, else ``InvalidState``."""
    checkpoint = load_checkpoint(session, checkpoint_id)
    if checkpoint.status != CheckpointStatus.ready:
        raise InvalidState(
            f"checkpoint {checkpoint_id} '{checkpoint.name}' is {checkpoint.status}, not ready"
        )
    return checkpoint


def checkpoint_files(session: Session, checkpoint_id: int) -> list[Artifact]:
    """The uploaded files (weights and config) of a checkpoint, by name."""
    query = (
        select(Artifact)
        .where(Artifact.checkpoint_id == checkpoint_id, col(Artifact.role).in_(FILE_ROLES))
        .order_by(col(Artifact.name))
    )
    return list(session.exec(query).all())


def release_blobs(*, session: Session, store: ObjectStore, keys: Iterable[str]) -> list[str]:
    """The blobs among ``keys`` that no artifact row references any more, sorted.

    They are released to garbage collection (``registry.services.gc``), which deletes them once
    the grace period has passed; nothing is deleted here. Deleting inline is not safe: an upload
    of the same content may have found the blob stored and be about to attach it, and only the
    collector's grace period and re-checks cover that. Call after committing the row changes;
    ``store`` is the store the keys live in (kept for the callers, not written to).
    """
    del store  # nothing is deleted inline any more
    wanted = sorted(set(keys))
    if not wanted:
        return []
    named = set(
        session.exec(select(Artifact.blob_key).where(col(Artifact.blob_key).in_(wanted))).all()
    )
    return [key for key in wanted if key not in named]
