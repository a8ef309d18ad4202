"""Task vectors tau = theta - theta_0, stored as ``task_vector`` artifacts, and cosine similarity
between checkpoints of one base, computed tensor by tensor through range reads."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from sqlmodel import Session, col, select

from mergeops.sources import TensorSource
from registry.errors import InvalidInput, InvalidState
from registry.models import Artifact, ArtifactRole, Checkpoint, CheckpointKind, CheckpointStatus
from registry.services.artifacts import add_artifact, find_artifact
from registry.services.common import load_ready_checkpoint
from registry.services.tensors import (
    SAFETENSORS_DTYPES,
    checkpoint_tensor_source,
    safetensors_stream_writer,
)
from registry.settings import Settings
from registry.storage import ObjectStore

TASK_VECTOR_NAME = "task_vector.safetensors"


@dataclass(frozen=True)
class Similarity:
    """How close another checkpoint's task vector is to the query's."""

    checkpoint_id: int
    name: str
    task: str | None
    cosine: float


def _layout(
    model: TensorSource, base: TensorSource
) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """Floating tensors present in both with equal shapes, in the model's order."""
    base_keys = set(base.keys())
    layout = []
    for key in model.keys():  # noqa: SIM118 - a TensorSource, not a dict
        meta = model.metadata(key)
        usable = (
            key in base_keys and meta.dtype.is_floating_point and meta.dtype in SAFETENSORS_DTYPES
        )
        if usable and tuple(base.metadata(key).shape) == tuple(meta.shape):
            layout.append((key, meta.dtype, tuple(meta.shape)))
    return layout


def _write_task_vector(
    model: TensorSource,
    base: TensorSource,
    layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
    path: Path,
) -> dict[str, float]:
    """Stream tau tensor by tensor into ``path`` (in the model's dtypes); returns L2 norms."""
    norms: dict[str, float] = {}
    with safetensors_stream_writer(path, layout) as writer:
        for key, dtype, _shape in layout:
            delta = model.get(key).to(torch.float32) - base.get(key).to(torch.float32)
            norms[key] = float(torch.linalg.vector_norm(delta))
            writer.write(key, delta.to(dtype))
    return norms


def compute_task_vector(
    *, session: Session, store: ObjectStore, settings: Settings, checkpoint_id: int
) -> Artifact:
    """Compute and store the checkpoint's task vector against its base; returns the artifact.

    Per-tensor L2 norms and the total norm go into the artifact's metadata
    (``{"norms": {tensor: float}, "norm": float, "base_id": int}``).
    """
    checkpoint = load_ready_checkpoint(session, checkpoint_id)
    if checkpoint.base_id is None:
        raise InvalidInput(
            f"checkpoint {checkpoint_id} '{checkpoint.name}' has no base; a task vector needs one"
        )
    if checkpoint.kind == CheckpointKind.adapter:
        raise InvalidInput(
            f"checkpoint {checkpoint_id} '{checkpoint.name}' is an adapter; task vectors need full weights"
        )
    model = checkpoint_tensor_source(session=session, store=store, checkpoint_id=checkpoint_id)
    base = checkpoint_tensor_source(session=session, store=store, checkpoint_id=checkpoint.base_id)
    layout = _layout(model, base)
    if not layout:
        raise InvalidState(
            f"checkpoint {checkpoint_id} '{checkpoint.name}' shares no floating tensor with its base"
        )
    work_dir = Path(settings.work_dir or tempfile.gettempdir())
    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        path = Path(tmp) / TASK_VECTOR_NAME
        norms = _write_task_vector(model, base, layout, path)
        metadata = {
            "norms": norms,
            "norm": math.sqrt(sum(n * n for n in norms.values())),
            "base_id": checkpoint.base_id,
        }
        return add_artifact(
            session=session,
            store=store,
            settings=settings,
            checkpoint_id=checkpoint_id,
            role=ArtifactRole.task_vector,
            name=TASK_VECTOR_NAME,
            content=path,
            metadata=metadata,
        )


def _candidates(session: Session, checkpoint: Checkpoint) -> list[tuple[Checkpoint, Artifact]]:
    query = (
        select(Checkpoint, Artifact)
        .join(Artifact, col(Artifact.checkpoint_id) == col(Checkpoint.id))
        .where(
            Checkpoint.base_id == checkpoint.base_id,
            Checkpoint.id != checkpoint.id,
            Checkpoint.status == CheckpointStatus.ready,
            Artifact.role == ArtifactRole.task_vector,
        )
        .order_by(col(Checkpoint.id))
    )
    return [(c, a) for c, a in session.exec(query).all()]


def _dot_products(
    query: TensorSource, artifacts: list[Artifact], sources: list[TensorSource]
) -> list[float]:
    """<tau_query, tau_i> for every candidate, reading one tensor of each at a time."""
    dots = [0.0] * len(artifacts)
    for key in query.keys():  # noqa: SIM118 - a TensorSource, not a dict
        shape = tuple(query.metadata(key).shape)
        query_tensor = query.get(key).to(torch.float32)
        for i, (artifact, source) in enumerate(zip(artifacts, sources, strict=True)):
            entry = artifact.tensor_index.get(key)
            if entry is not None and tuple(entry["shape"]) == shape:
                dots[i] += float(torch.sum(query_tensor * source.get(key).to(torch.float32)))
    return dots


def similar_checkpoints(
    *, session: Session, store: ObjectStore, settings: Settings, checkpoint_id: int, limit: int = 10
) -> list[Similarity]:
    """Checkpoints of the same base ranked by task-vector cosine similarity (highest first).

    The query's task vector is computed if missing; candidates without one are skipped. Reads one
    tensor of the query and one of each candidate at a time.
    """
    if not 1 <= limit <= 1000:
        raise InvalidInput(f"limit must be 1..1000, got {limit}")
    checkpoint = load_ready_checkpoint(session, checkpoint_id)
    own = find_artifact(session=session, checkpoint_id=checkpoint_id, role=ArtifactRole.task_vector)
    if own is None:
        own = compute_task_vector(
            session=session, store=store, settings=settings, checkpoint_id=checkpoint_id
        )
    candidates = _candidates(session, checkpoint)
    query_source = checkpoint_tensor_source(
        session=session, store=store, checkpoint_id=checkpoint_id, role=ArtifactRole.task_vector
    )
    sources = [
        checkpoint_tensor_source(
            session=session, store=store, checkpoint_id=c.id or 0, role=ArtifactRole.task_vector
        )
        for c, _ in candidates
    ]
    dots = _dot_products(query_source, [a for _, a in candidates], sources)
    own_norm = float(own.meta.get("norm", 0.0))
    results = []
    for (candidate, artifact), dot in zip(candidates, dots, strict=True):
        norm = float(artifact.meta.get("norm", 0.0))
        cosine = dot / (own_norm * norm) if own_norm > 0 and norm > 0 else 0.0
        results.append(
            Similarity(
                checkpoint_id=candidate.id or 0,
                name=candidate.name,
                task=candidate.task,
                cosine=cosine,
            )
        )
    results.sort(key=lambda s: (-s.cosine, s.checkpoint_id))
    return results[:limit]
