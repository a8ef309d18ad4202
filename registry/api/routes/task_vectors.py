"""Task vectors and task-vector similarity between checkpoints of one base."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel

from registry import services
from registry.api.deps import ReaderDep, RowId, SessionDep, SettingsDep, StoreDep, WriterDep
from registry.models import ArtifactPublic

router = APIRouter(prefix="/checkpoints/{checkpoint_id}", tags=["task vectors"])


class SimilarPublic(BaseModel):
    checkpoint_id: int
    name: str
    task: str | None
    cosine: float


@router.post("/task-vector")
def compute_task_vector(
    checkpoint_id: RowId, session: SessionDep, store: StoreDep, settings: SettingsDep, _: WriterDep
) -> ArtifactPublic:
    artifact = services.compute_task_vector(
        session=session, store=store, settings=settings, checkpoint_id=checkpoint_id
    )
    return services.artifact_public(artifact)


@router.get("/similar")
def similar_checkpoints(
    checkpoint_id: RowId,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    _: ReaderDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 10,
) -> list[SimilarPublic]:
    ranked = services.similar_checkpoints(
        session=session, store=store, settings=settings, checkpoint_id=checkpoint_id, limit=limit
    )
    return [
        SimilarPublic(checkpoint_id=s.checkpoint_id, name=s.name, task=s.task, cosine=s.cosine)
        for s in ranked
    ]
