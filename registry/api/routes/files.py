"""Checkpoint files: streamed upload, attach by reference, streamed download."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from registry import services
from registry.api.deps import ReaderDep, SessionDep, StoreDep, WriterDep, body_chunks
from registry.models import FilePublic
from registry.services.checkpoints import file_public

router = APIRouter(prefix="/checkpoints/{checkpoint_id}", tags=["files"])


class FileReference(BaseModel):
    """A blob already in the store, attached under ``name``."""

    name: str
    sha256: str


# ``{name:path}`` so that names with '/' or '..' reach the service and get a 422 naming them.
@router.put("/files/{name:path}")
async def upload_file(
    checkpoint_id: int,
    name: str,
    request: Request,
    session: SessionDep,
    store: StoreDep,
    _: WriterDep,
    x_content_sha256: Annotated[str | None, Header()] = None,
    content_length: Annotated[int | None, Header()] = None,
) -> FilePublic:
    stored = await run_in_threadpool(
        services.add_file_from_stream,
        session=session,
        store=store,
        checkpoint_id=checkpoint_id,
        name=name,
        chunks=body_chunks(request),
        declared_sha256=x_content_sha256,
        expected_size=content_length,
    )
    return file_public(stored.artifact, deduplicated=stored.deduplicated)


@router.post("/files:by-reference")
def attach_by_reference(
    checkpoint_id: int, body: FileReference, session: SessionDep, store: StoreDep, _: WriterDep
) -> FilePublic:
    stored = services.add_file_by_reference(
        session=session,
        store=store,
        checkpoint_id=checkpoint_id,
        name=body.name,
        sha256=body.sha256,
    )
    return file_public(stored.artifact, deduplicated=stored.deduplicated)


@router.get("/files/{name:path}")
def download_file(
    checkpoint_id: int, name: str, session: SessionDep, store: StoreDep, _: ReaderDep
) -> StreamingResponse:
    artifact = services.get_checkpoint_file(session=session, checkpoint_id=checkpoint_id, name=name)
    return StreamingResponse(
        services.stream_artifact(store=store, artifact=artifact),
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(artifact.size),
            "Content-Disposition": f'attachment; filename="{artifact.name}"',
            "X-Content-SHA256": artifact.sha256,
        },
    )
