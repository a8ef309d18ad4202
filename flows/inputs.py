"""Merge inputs from the store, as mergeops reads them: local files, or sources that range-read
the store in place.

A file store hands out its raw blob paths directly (no copy). Anything else (S3, a blob kept
compressed at rest) is, by default (``CKREG_MERGE_INPUTS=stream``), read IN PLACE: a range-read
``TensorSource`` built from the tensor index stored at ``complete`` fetches each row slice the
engine asks for with one HTTP Range request, so nothing is downloaded and memory stays bounded.
``CKREG_MERGE_INPUTS=cache`` downloads whole files once into a content-addressed cache under
the work dir (``cache/blobs/<sha256>``), which later merges reuse; ``prune_cache`` evicts the
least recently used blobs beyond ``CKREG_CACHE_MAX_BYTES``. Each cached checkpoint gets a folder
of links named like its files, so sharded checkpoints read as they were uploaded. PEFT adapters
(a small folder mergeops reads as one unit) always take the cache path.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from sqlmodel import Session, col, select

from mergeops.sources import TensorSource
from registry.errors import InvalidState
from registry.models import Artifact, ArtifactRole, Checkpoint, CheckpointKind
from registry.services.blobs import stored_blob
from registry.services.common import checkpoint_files, load_ready_checkpoint
from registry.services.tensors import checkpoint_tensor_source, file_tensor_source
from registry.storage import ObjectStore
from registry.storage.codecs import StoredBlob, iter_original

InputMode = Literal["stream", "cache"]
MergeInput = Path | TensorSource
"""What a merge reads one checkpoint (or side artifact) from: a local path or a source."""


def _local(store: ObjectStore, blob: StoredBlob) -> Path | None:
    """The store's own file holding ``blob``'s original bytes, when there is one."""
    return store.local_path(blob.key) if blob.codec == "raw" else None


def blob_path(
    *, store: ObjectStore, artifact: Artifact, cache_dir: Path, blob: StoredBlob | None = None
) -> Path:
    """A local path holding the artifact's original bytes (the store's own file, or a cached
    download). ``blob`` is the file's ``StoredBlob`` (default: the row's blob, stored raw)."""
    blob = blob or StoredBlob(artifact.blob_key, artifact.size)
    local = _local(store, blob)
    if local is not None:
        return local
    target = cache_dir / "blobs" / artifact.sha256
    if target.is_file() and target.stat().st_size == artifact.size:
        os.utime(target)  # mark as recently used for prune_cache
        return target
    fetch_file(store=store, blob=blob, target=target)
    return target


def fetch_file(*, store: ObjectStore, blob: StoredBlob, target: Path) -> Path:
    """Write ``blob``'s original bytes to ``target`` atomically (a failed copy leaves nothing)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name[:12]}-")
    try:
        with os.fdopen(fd, "wb") as handle:
            for chunk in iter_original(store, blob):
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
        source = blob_path(
            store=store,
            artifact=artifact,
            cache_dir=cache_dir,
            blob=stored_blob(session, artifact),
        )
        if link.is_symlink() and Path(os.readlink(link)) == source:
            continue
        link.unlink(missing_ok=True)
        link.symlink_to(source)
    return folder


def checkpoint_input(
    *,
    session: Session,
    store: ObjectStore,
    checkpoint: Checkpoint,
    cache_dir: Path,
    mode: InputMode = "stream",
) -> MergeInput:
    """What a merge reads ``checkpoint`` from: its folder of local files when the store holds
    them raw (or ``mode`` is "cache", or it is a PEFT adapter), else a range-read source."""
    checkpoint_id = checkpoint.id or 0
    load_ready_checkpoint(session, checkpoint_id)
    weights = [f for f in checkpoint_files(session, checkpoint_id) if f.role == "weights"]
    in_place = all(_local(store, stored_blob(session, f)) is not None for f in weights)
    if mode == "cache" or in_place or checkpoint.kind == CheckpointKind.adapter:
        return checkpoint_dir(
            session=session, store=store, checkpoint_id=checkpoint_id, cache_dir=cache_dir
        )
    return checkpoint_tensor_source(session=session, store=store, checkpoint_id=checkpoint_id)


def _first_artifact(session: Session, checkpoint_id: int, role: ArtifactRole) -> Artifact | None:
    query = (
        select(Artifact)
        .where(Artifact.checkpoint_id == checkpoint_id, Artifact.role == role)
        .order_by(col(Artifact.id))
    )
    return session.exec(query).first()


def artifact_input(
    *,
    session: Session,
    store: ObjectStore,
    checkpoint_id: int,
    role: ArtifactRole,
    cache_dir: Path,
    mode: InputMode = "stream",
) -> MergeInput | None:
    """A checkpoint's (first) tensor artifact with ``role`` as a merge input (a local path, or
    a range-read source when streaming), or None when it has none."""
    artifact = _first_artifact(session, checkpoint_id, role)
    if artifact is None:
        return None
    blob = stored_blob(session, artifact)
    local = _local(store, blob)
    if local is not None:
        return local
    if mode == "stream":
        return file_tensor_source(session=session, store=store, artifact=artifact, name=role)
    return blob_path(store=store, artifact=artifact, cache_dir=cache_dir, blob=blob)


def artifact_file(
    *, session: Session, store: ObjectStore, checkpoint_id: int, role: ArtifactRole, cache_dir: Path
) -> Path | None:
    """Local path of a checkpoint's (first) artifact with ``role``, or None when it has none."""
    artifact = _first_artifact(session, checkpoint_id, role)
    if artifact is None:
        return None
    blob = stored_blob(session, artifact)
    return blob_path(store=store, artifact=artifact, cache_dir=cache_dir, blob=blob)


def copy_artifact(
    *, session: Session, store: ObjectStore, checkpoint_id: int, role: ArtifactRole, target: Path
) -> Path | None:
    """Copy a checkpoint's (first) artifact with ``role`` to ``target`` (no cache involved);
    None when it has none."""
    artifact = _first_artifact(session, checkpoint_id, role)
    if artifact is None:
        return None
    blob = stored_blob(session, artifact)
    local = _local(store, blob)
    if local is not None:
        shutil.copyfile(local, target)
        return target
    return fetch_file(store=store, blob=blob, target=target)


def clear_dir(path: Path) -> None:
    """Remove a scratch folder, ignoring what is already gone."""
    shutil.rmtree(path, ignore_errors=True)
