"""Lossless compression of a checkpoint's stored safetensors files, run at ``complete``.

Each raw weights file is rewritten in the chunked zipnn container
(``registry.storage.zipnn_encoder``); for a checkpoint with a base, tensors that the base's file
holds with the same name, dtype and shape may be stored as XOR deltas against it, chunk by chunk
wherever that is smaller. The compressed object replaces the row's ``blob_key`` only when it
decodes back to the file's sha256 and saves at least 2 % (else the raw blob stays); the raw
upload is then released. A file whose content is already stored compressed (same sha256) reuses
that object. The row keeps the original sha256 and size; ``stored_size`` is what the store holds.

Deltas are taken only against a base file that is not itself a delta, so reading a file never
chains through more than one base.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlmodel import Session, col, select

from registry.models import Artifact, ArtifactRole, Checkpoint
from registry.services.blobs import stored_blob
from registry.services.common import checkpoint_files, release_blobs
from registry.settings import Settings
from registry.storage import ObjectStore
from registry.storage.codecs import RAW, StoredBlob, iter_original

if TYPE_CHECKING:
    from registry.storage.zipnn_encoder import TensorSpan

log = logging.getLogger(__name__)

MIN_SAVING = 0.98  # keep the compressed form only if it is below this share of the raw size
MIN_FILE_BYTES = 64 * 1024  # smaller files stay raw: a few KiB saved is not worth a second object
DELTA_CODEC = "zipnn-delta"
CODEC = "zipnn"


@dataclass(frozen=True)
class CompressionOutcome:
    """What became of one file: its codec, stored and original bytes, reused or not."""

    name: str
    codec: str
    stored_size: int
    size: int
    reused: bool = False


def _compressed_twin(session: Session, store: ObjectStore, artifact: Artifact) -> Artifact | None:
    """Another row with the same content that is already stored compressed (blob present)."""
    query = select(Artifact).where(
        Artifact.sha256 == artifact.sha256, Artifact.codec != RAW, Artifact.id != artifact.id
    )
    for row in session.exec(query).all():
        if store.exists(row.blob_key):
            return row
    return None


def _adopt(artifact: Artifact, twin: Artifact) -> None:
    meta = dict(artifact.meta or {})
    for key in ("codec_params", "codec_refs"):
        meta.pop(key, None)
        if key in (twin.meta or {}):
            meta[key] = twin.meta[key]
    artifact.blob_key, artifact.codec = twin.blob_key, twin.codec
    artifact.stored_size, artifact.codec_base_sha256 = twin.stored_size, twin.codec_base_sha256
    artifact.meta = meta


def _matched_bytes(artifact: Artifact, base: Artifact) -> int:
    total = 0
    for name, entry in artifact.tensor_index.items():
        other = base.tensor_index.get(name)
        if other and other["dtype"] == entry["dtype"] and other["shape"] == entry["shape"]:
            total += int(entry["end"]) - int(entry["start"])
    return total


def _delta_safe(session: Session, base: Artifact) -> bool:
    """No row with the base's content is itself a delta (reads stay one base deep)."""
    query = select(Artifact.id).where(
        Artifact.sha256 == base.sha256, col(Artifact.codec_base_sha256).is_not(None)
    )
    return session.exec(query.limit(1)).first() is None


def _pick_base(session: Session, artifact: Artifact, candidates: list[Artifact]) -> Artifact | None:
    """The base file sharing the most tensor bytes with ``artifact`` (None: no useful base)."""
    scored = [
        (_matched_bytes(artifact, base), base)
        for base in candidates
        if base.sha256 != artifact.sha256 and base.tensor_index
    ]
    scored = [(score, base) for score, base in scored if score > 0]
    if not scored:
        return None
    best = max(scored, key=lambda pair: pair[0])[1]
    return best if _delta_safe(session, best) else None


def _spans(artifact: Artifact, base: Artifact | None) -> list[TensorSpan]:
    from registry.storage.zipnn_encoder import TensorSpan

    spans = []
    for name, entry in artifact.tensor_index.items():
        other = base.tensor_index.get(name) if base is not None else None
        same = other and other["dtype"] == entry["dtype"] and other["shape"] == entry["shape"]
        base_start = int(other["start"]) if same and other else None
        spans.append(TensorSpan(int(entry["start"]), int(entry["end"]), entry["dtype"], base_start))
    return spans


def _sha256(store: ObjectStore, blob: StoredBlob) -> str:
    digest = hashlib.sha256()
    for chunk in iter_original(store, blob):
        digest.update(chunk)
    return digest.hexdigest()


def _encode(
    *, session: Session, store: ObjectStore, artifact: Artifact, base: Artifact | None
) -> bool:
    """Write the compressed form and point the row at it; False when raw stays."""
    from registry.storage.zipnn_encoder import plan_segments, write_compressed  # imports zipnn

    base_blob = stored_blob(session, base) if base is not None else None
    segments = plan_segments(artifact.size, _spans(artifact, base))
    original = StoredBlob(artifact.blob_key, artifact.size)
    result = write_compressed(store, original=original, segments=segments, base=base_blob)
    codec = DELTA_CODEC if result.uses_base else CODEC
    refs = {"base": base_blob} if result.uses_base and base_blob is not None else {}
    params = {"format": 1, "table": list(result.table), "chunks": result.chunks}
    candidate = StoredBlob(result.info.key, artifact.size, codec, refs, params)
    keep = result.info.size < MIN_SAVING * artifact.size
    if keep and _sha256(store, candidate) != artifact.sha256:
        log.error("compressed form of file '%s' did not decode to its sha256", artifact.name)
        keep = False
    if not keep:
        if result.info.created:
            release_blobs(session=session, store=store, keys=[result.info.key])
        return False
    artifact.blob_key, artifact.codec, artifact.stored_size = (
        result.info.key,
        codec,
        result.info.size,
    )
    artifact.codec_base_sha256 = base.sha256 if result.uses_base and base is not None else None
    artifact.meta = {**(artifact.meta or {}), "codec_params": params}
    return True


def compress_file(
    *, session: Session, store: ObjectStore, artifact: Artifact, base_files: list[Artifact]
) -> CompressionOutcome:
    """Store one raw safetensors file compressed (or as a twin's compressed blob); commits."""
    raw_key = artifact.blob_key
    twin = _compressed_twin(session, store, artifact)
    if twin is not None:
        _adopt(artifact, twin)
        changed = True
    else:
        base = _pick_base(session, artifact, base_files)
        changed = _encode(session=session, store=store, artifact=artifact, base=base)
        if not changed:
            artifact.stored_size = artifact.size
    session.add(artifact)
    session.commit()
    session.refresh(artifact)
    if changed and artifact.blob_key != raw_key:
        release_blobs(session=session, store=store, keys=[raw_key])
    return CompressionOutcome(
        artifact.name,
        artifact.codec,
        artifact.stored_size or artifact.size,
        artifact.size,
        reused=twin is not None,
    )


def compress_checkpoint(
    *, session: Session, store: ObjectStore, settings: Settings, checkpoint: Checkpoint
) -> list[CompressionOutcome]:
    """Compress every raw safetensors file of a ready checkpoint (``store_compression``)."""
    if settings.store_compression == "off":
        return []
    files = checkpoint_files(session, checkpoint.id or 0)
    base_files = []
    if checkpoint.base_id is not None:
        base_files = [
            a
            for a in checkpoint_files(session, checkpoint.base_id)
            if a.role == ArtifactRole.weights
        ]
    outcomes = []
    for artifact in files:
        if (
            artifact.role != ArtifactRole.weights
            or artifact.codec != RAW
            or not artifact.tensor_index
            or artifact.size < MIN_FILE_BYTES
        ):
            continue
        try:
            outcomes.append(
                compress_file(
                    session=session, store=store, artifact=artifact, base_files=base_files
                )
            )
        except Exception:  # the raw file is intact and served as is; compression is an optimisation
            session.rollback()
            log.exception(
                "file '%s' of checkpoint %s stays uncompressed", artifact.name, checkpoint.id
            )
    return outcomes
