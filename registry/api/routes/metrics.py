"""Metrics of a checkpoint."""

from __future__ import annotations

from fastapi import APIRouter, status

from registry import services
from registry.api.deps import ReaderDep, RowId, SessionDep, WriterDep
from registry.models import MetricCreate, MetricPublic

router = APIRouter(prefix="/checkpoints/{checkpoint_id}/metrics", tags=["metrics"])


@router.post("", status_code=status.HTTP_201_CREATED)
def add_metrics(
    checkpoint_id: RowId, metrics: list[MetricCreate], session: SessionDep, _: WriterDep
) -> list[MetricPublic]:
    rows = services.add_metrics(session=session, checkpoint_id=checkpoint_id, metrics=metrics)
    return [MetricPublic.model_validate(row) for row in rows]


@router.get("")
def list_metrics(
    checkpoint_id: RowId, session: SessionDep, _: ReaderDep, name: str | None = None
) -> list[MetricPublic]:
    rows = services.list_metrics(session=session, checkpoint_id=checkpoint_id, name=name)
    return [MetricPublic.model_validate(row) for row in rows]
