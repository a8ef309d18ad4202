"""Artifacts of a checkpoint: second moments, Fisher, masks, task vectors, merge state."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request, status
from fastapi.responses import StreamingResponse

from registry import services
from registry.api.deps import ReaderDep, RowId, SessionDep, SettingsDep, StoreDep, WriterDep
from registry.api.uploading import body_chunks, run_upload
from registry.models import ArtifactPublic, ArtifactRole

router = APIRouter(prefix="/checkpoints/{checkpoint_id}/artifacts", tags=["artifacts"])


@router.post("", status_code=status.HTTP_201_CREATED)
async def upload_artifact(
    checkpoint_id: RowId,
    role: ArtifactRole,
    request: Request,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    token: WriterDep,
    name: str | None = None,
    x_content_sha256: Annotated[str | None, Header()] = None,
) -> ArtifactPublic:
    artifact = await run_upload(
        request,
        token,
        services.add_artifact,
        session=session,
        store=store,
        settings=settings,
        checkpoint_id=checkpoint_id,
        role=role,
        name=name,
        content=body_chunks(
            request, idle_timeout_s=settings.upload_idle_timeout_s, before_wait=session.commit
        ),
        declared_sha256=x_content_sha256,
    )
    return services.artifact_public(artifact)


@router.get("")
def list_artifacts(
    checkpoint_id: RowId, session: SessionDep, _: ReaderDep, role: ArtifactRole | None = None
) -> list[ArtifactPublic]:
    artifacts = services.list_artifacts(session=session, checkpoint_id=checkpoint_id, role=role)
    return [services.artifact_public(a) for a in artifacts]


@router.get("/{artifact_id}")
def get_artifact(
    checkpoint_id: RowId, artifact_id: RowId, session: SessionDep, _: ReaderDep
) -> ArtifactPublic:
    artifact = services.get_artifact(
        session=session, checkpoint_id=checkpoint_id, artifact_id=artifact_id
    )
    return services.artifact_public(artifact)


@router.get(
    "/{artifact_id}/content",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "The bytes"}},
)
def download_artifact(
    checkpoint_id: RowId, artifact_id: RowId, session: SessionDep, store: StoreDep, _: ReaderDep
) -> StreamingResponse:
    artifact = services.get_artifact(
        session=session, checkpoint_id=checkpoint_id, artifact_id=artifact_id
    )
    return StreamingResponse(
        services.stream_artifact(store=store, artifact=artifact),
        media_type="application/octet-stream",
        headers={"Content-Length": str(artifact.size), "X-Content-SHA256": artifact.sha256},
    )
