"""Checkpoints: create, list, get, complete, delete, lineage."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from registry import services
from registry.api.deps import (
    LauncherDep,
    Offset,
    ReaderDep,
    RowId,
    RowIdQuery,
    SessionDep,
    SettingsDep,
    StoreDep,
    WriterDep,
)
from registry.models import (
    CheckpointCreate,
    CheckpointKind,
    CheckpointPage,
    CheckpointPublic,
    CheckpointStatus,
    LineagePublic,
)

router = APIRouter(prefix="/checkpoints", tags=["checkpoints"])


class CompleteRequest(BaseModel):
    """Optional sha256 per file name, checked against what the server hashed."""

    sha256: dict[str, str] = Field(default_factory=dict)


@router.post("", status_code=status.HTTP_201_CREATED)
def create_checkpoint(
    data: CheckpointCreate, session: SessionDep, settings: SettingsDep, _: WriterDep
) -> CheckpointPublic:
    checkpoint = services.create_checkpoint(
        session=session, data=data, max_metadata_bytes=settings.max_metadata_bytes
    )
    return services.checkpoint_public(session=session, checkpoint=checkpoint)


@router.get("")
def list_checkpoints(
    session: SessionDep,
    _: ReaderDep,
    base_id: RowIdQuery = None,
    kind: CheckpointKind | None = None,
    task: str | None = None,
    run: str | None = None,
    tag: str | None = None,
    status: CheckpointStatus | None = None,
    name: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Offset = 0,
) -> CheckpointPage:
    items, total = services.list_checkpoints(
        session=session,
        base_id=base_id,
        kind=kind,
        task=task,
        run=run,
        tag=tag,
        status=status,
        name=name,
        limit=limit,
        offset=offset,
    )
    page = services.checkpoints_public(session=session, checkpoints=items)
    return CheckpointPage(items=page, total=total, limit=limit, offset=offset)


@router.get("/{checkpoint_id}")
def get_checkpoint(checkpoint_id: RowId, session: SessionDep, _: ReaderDep) -> CheckpointPublic:
    checkpoint = services.get_checkpoint(session=session, checkpoint_id=checkpoint_id)
    return services.checkpoint_public(session=session, checkpoint=checkpoint)


@router.post("/{checkpoint_id}/complete")
def complete_checkpoint(
    checkpoint_id: RowId,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    launcher: LauncherDep,
    _: WriterDep,
    body: CompleteRequest | None = None,
) -> CheckpointPublic:
    checkpoint = services.complete_checkpoint(
        session=session,
        store=store,
        settings=settings,
        checkpoint_id=checkpoint_id,
        declared_sha256=(body.sha256 if body else {}),
        launcher=launcher,
    )
    return services.checkpoint_public(session=session, checkpoint=checkpoint)


@router.delete("/{checkpoint_id}")
def delete_checkpoint(
    checkpoint_id: RowId, session: SessionDep, store: StoreDep, _: WriterDep, force: bool = False
) -> CheckpointPublic:
    checkpoint = services.delete_checkpoint(
        session=session, store=store, checkpoint_id=checkpoint_id, force=force
    )
    return services.checkpoint_public(session=session, checkpoint=checkpoint)


@router.get("/{checkpoint_id}/lineage")
async def get_lineage(
    checkpoint_id: RowId,
    session: SessionDep,
    _: ReaderDep,
    depth: Annotated[int, Query(ge=1, le=50)] = 5,
) -> LineagePublic:
    return await run_in_threadpool(
        services.get_lineage, session=session, checkpoint_id=checkpoint_id, depth=depth
    )
