"""Checkpoint files: streamed upload, attach by reference, streamed download."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from registry import services
from registry.api.deps import ReaderDep, RowId, SessionDep, SettingsDep, StoreDep, WriterDep
from registry.api.errors import ErrorResponse
from registry.api.uploading import body_chunks, declared_length, run_upload
from registry.models import FilePublic
from registry.services.checkpoints import files_public

router = APIRouter(prefix="/checkpoints/{checkpoint_id}", tags=["files"])


class FileReference(BaseModel):
    """A blob already in the store, attached under ``name``."""

    name: str
    sha256: str


# ``{name:path}`` so that names with '/' or '..' reach the service and get a 422 naming them.
# Content-Length is read from the request, not declared: it is not a parameter clients choose.
@router.put("/files/{name:path}")
async def upload_file(
    checkpoint_id: RowId,
    name: str,
    request: Request,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
    token: WriterDep,
    x_content_sha256: Annotated[str | None, Header()] = None,
) -> FilePublic:
    stored = await run_upload(
        request,
        token,
        services.add_file_from_stream,
        session=session,
        store=store,
        checkpoint_id=checkpoint_id,
        name=name,
        chunks=body_chunks(
            request, idle_timeout_s=settings.upload_idle_timeout_s, before_wait=session.commit
        ),
        declared_sha256=x_content_sha256,
        expected_size=declared_length(request),
    )
    public = await run_in_threadpool(files_public, session=session, artifacts=[stored.artifact])
    return public[0]


@router.post("/files:by-reference")
def attach_by_reference(
    checkpoint_id: RowId, body: FileReference, session: SessionDep, store: StoreDep, _: WriterDep
) -> FilePublic:
    stored = services.add_file_by_reference(
        session=session,
        store=store,
        checkpoint_id=checkpoint_id,
        name=body.name,
        sha256=body.sha256,
    )
    return files_public(session=session, artifacts=[stored.artifact])[0]


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``[start, end)`` of a single ``bytes=a-b`` / ``a-`` / ``-n`` range; None = whole file.

    Raises ``ValueError`` when the range cannot be satisfied (HTTP 416). A malformed header or
    several ranges are ignored (whole file), as RFC 9110 allows.
    """
    if not header:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    digits = all(part.isdigit() for part in (first, last) if part)
    if not dash or not digits or not (first or last):
        return None
    if not first:  # suffix: the last n bytes
        if int(last) == 0 or size == 0:
            raise ValueError(f"suffix range {spec!r} of a {size}-byte file")
        return max(size - int(last), 0), size
    start = int(first)
    end = min(int(last) + 1, size) if last else size
    if last and int(last) < start:
        return None
    if start >= size:
        raise ValueError(f"range {spec!r} starts past the end of a {size}-byte file")
    return start, end


_BYTES = {"content": {"application/octet-stream": {}}}


@router.get(
    "/files/{name:path}",
    response_class=StreamingResponse,
    responses={
        200: {**_BYTES, "description": "The whole file"},
        206: {**_BYTES, "description": "The requested byte range"},
        416: {"model": ErrorResponse, "description": "The range starts past the end of the file"},
    },
)
def download_file(
    checkpoint_id: RowId,
    name: str,
    session: SessionDep,
    store: StoreDep,
    _: ReaderDep,
    range_header: Annotated[str | None, Header(alias="Range")] = None,
) -> Response:
    artifact = services.get_checkpoint_file(session=session, checkpoint_id=checkpoint_id, name=name)
    headers = {
        "Accept-Ranges": "bytes",
        "Content-Disposition": f'attachment; filename="{artifact.name}"',
        "X-Content-SHA256": artifact.sha256,
    }
    try:
        span = parse_range(range_header, artifact.size)
    except ValueError as exc:  # in the documented error shape, like every other 4xx
        headers["Content-Range"] = f"bytes */{artifact.size}"
        message = f"file '{artifact.name}' of checkpoint {checkpoint_id}: {exc}"
        detail = {"error": "range_not_satisfiable", "message": message}
        return JSONResponse({"detail": detail}, status_code=416, headers=headers)
    start, end = span or (0, artifact.size)
    headers["Content-Length"] = str(end - start)
    if span is None:
        body = services.stream_artifact(store=store, artifact=artifact, session=session)
        return StreamingResponse(body, media_type="application/octet-stream", headers=headers)
    headers["Content-Range"] = f"bytes {start}-{end - 1}/{artifact.size}"
    body = services.stream_artifact(
        store=store, artifact=artifact, session=session, start=start, end=end
    )
    return StreamingResponse(
        body, status_code=206, media_type="application/octet-stream", headers=headers
    )
