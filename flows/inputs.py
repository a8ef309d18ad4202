"""Merge inputs from the store: each checkpoint's files laid out as a local folder mergeops reads.

A file store hands out its blob paths directly (no copy); any other store is downloaded once
into a content-addressed cache under the work dir (``cache/blobs/<sha256>``), which a later
merge of the same checkpoint reuses. The cache is bounded: ``prune_cache`` evicts the least
recently used blobs beyond ``CKREG_CACHE_MAX_BYTES`` before each merge resolves its inputs. Each checkpoint gets a folder of links named like its
files, so sharded checkpoints (``model.safetensors.index.json``) read as they were uploaded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from sqlmodel import Session

from mergeops.io import open_source
from mergeops.sources import TensorSource
from registry.errors import InvalidState
from registry.models import Artifact, ArtifactRole, Checkpoint
from registry.services.common import checkpoint_files, load_ready_checkpoint
from registry.storage import ObjectStore


def blob_path(*, store: ObjectStore, artifact: Artifact, cache_dir: Path) -> Path:
    """A local path holding the artifact's bytes (the store's own file, or a cached download)."""
    local = store.local_path(artifact.blob_key)
    if local is not None:
        return local
    target = cache_dir / "blobs" / artifact.sha256
    if target.is_file() and target.stat().st_size == artifact.size:
        os.utime(target)  # mark as recently used for prune_cache
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{artifact.sha256[:12]}-")
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in store.iter_bytes(artifact.blob_key):
                handle.write(chunk)
        os.replace(partial, target)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return target


def prune_cache(cache_dir: Path, *, max_bytes: int) -> int:
    """Evict least recently used cached blobs until the cache holds at most ``max_bytes``.

    Returns the number of bytes freed. Blobs a merge already opened stay readable (POSIX keeps
    unlinked open files); a later merge downloads an evicted blob again.
    """
    blobs = cache_dir / "blobs"
    if not blobs.is_dir():
        return 0
    entries = [(p.stat().st_mtime, p.stat().st_size, p) for p in blobs.iterdir() if p.is_file()]
    total = sum(size for _, size, _ in entries)
    freed = 0
    for _, size, path in sorted(entries, key=lambda entry: entry[0]):
        if total - freed <= max_bytes:
            break
        path.unlink(missing_ok=True)
        freed += size
    return freed


def checkpoint_dir(
    *, session: Session, store: ObjectStore, checkpoint_id: int, cache_dir: Path
) -> Path:
    """A folder of the ready checkpoint's files (links into the store or cache)."""
    checkpoint = load_ready_checkpoint(session, checkpoint_id)
    files = checkpoint_files(session, checkpoint_id)
    if not any(f.role == ArtifactRole.weights for f in files):
        raise InvalidState(f"checkpoint {checkpoint_id} '{checkpoint.name}' has no weights file")
    folder = cache_dir / "checkpoints" / str(checkpoint_id)
    folder.mkdir(parents=True, exist_ok=True)
    for artifact in files:
        link = folder / artifact.name
        source = blob_path(store=store, artifact=artifact, cache_dir=cache_dir)
        if link.is_symlink() and Path(os.readlink(link)) == source:
            continue
        link.unlink(missing_ok=True)
        link.symlink_to(source)
    return folder


def checkpoint_source(
    *, session: Session, store: ObjectStore, checkpoint: Checkpoint, cache_dir: Path
) -> TensorSource:
    """A mergeops tensor source over a ready checkpoint, named after it."""
    folder = checkpoint_dir(
        session=session, store=store, checkpoint_id=checkpoint.id or 0, cache_dir=cache_dir
    )
    weights = sorted(folder.glob("*.safetensors"))
    has_index = any(folder.glob("*.safetensors.index.json"))
    item = weights[0] if len(weights) == 1 and not has_index else folder
    return open_source(item, name=checkpoint.name)


def artifact_file(
    *, session: Session, store: ObjectStore, checkpoint_id: int, role: ArtifactRole, cache_dir: Path
) -> Path | None:
    """Local path of a checkpoint's (first) artifact with ``role``, or None when it has none."""
    from sqlmodel import col, select

    query = (
        select(Artifact)
        .where(Artifact.checkpoint_id == checkpoint_id, Artifact.role == role)
        .order_by(col(Artifact.id))
    )
    artifact = session.exec(query).first()
    if artifact is None:
        return None
    return blob_path(store=store, artifact=artifact, cache_dir=cache_dir)


def clear_dir(path: Path) -> None:
    """Remove a scratch folder, ignoring what is already gone."""
    shutil.rmtree(path, ignore_errors=True)
