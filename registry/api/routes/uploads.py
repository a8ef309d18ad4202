"""Presigned multipart uploads (S3 stores): the client PUTs a large file's parts straight to S3."""

from __future__ import annotations

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from registry.api.deps import INT64_MAX, RowId, SessionDep, StoreDep, WriterDep
from registry.models import FilePublic
from registry.services.checkpoints import files_public
from registry.services.presigned import (
    PresignedUnsupported,
    abort_presigned_upload,
    complete_presigned_upload,
    start_presigned_upload,
)

router = APIRouter(prefix="/checkpoints/{checkpoint_id}/uploads", tags=["files"])


class UploadCreate(BaseModel):
    """The file the client is about to upload; ``part_size`` defaults to the store's."""

    name: str
    size: int = Field(ge=0, le=INT64_MAX)
    sha256: str
    part_size: int | None = Field(default=None, gt=0, le=INT64_MAX)


class PartUrl(BaseModel):
    part_number: int
    url: str


class UploadPlan(BaseModel):
    """Where to PUT each part (in order, ``part_size`` bytes each but the last)."""

    upload_id: str
    key: str
    part_size: int
    parts: list[PartUrl]


class PartDone(BaseModel):
    part_number: int = Field(ge=1, le=10_000)  # S3's part numbers are 1..10000
    # As S3 answered the part's PUT: quoted hex (``"<md5>"``). Anything else (control
    # characters above all) never names a part, and some endpoints answer it with a 500.
    etag: str = Field(min_length=1, max_length=128, pattern=r'^"?[0-9A-Za-z-]+"?$')


class UploadComplete(BaseModel):
    parts: list[PartDone]


@router.post("", status_code=201)
def create_upload(
    checkpoint_id: RowId, body: UploadCreate, session: SessionDep, store: StoreDep, _: WriterDep
) -> UploadPlan:
    upload = start_presigned_upload(
        session=session,
        store=store,
        checkpoint_id=checkpoint_id,
        name=body.name,
        size=body.size,
        sha256=body.sha256,
        part_size=body.part_size,
    )
    return UploadPlan(
        upload_id=upload.upload_id,
        key=upload.key,
        part_size=upload.part_size,
        parts=[PartUrl(part_number=n, url=url) for n, url in enumerate(upload.urls, start=1)],
    )


@router.post("/{upload_id}/complete")
def complete_upload(
    checkpoint_id: RowId,
    upload_id: str,
    body: UploadComplete,
    session: SessionDep,
    store: StoreDep,
    _: WriterDep,
) -> FilePublic:
    if not store.supports_presigned_uploads():  # as its sister routes: 409, not a 500
        raise PresignedUnsupported(
            "presigned uploads need an S3 store and this registry's store is not one; "
            "PUT the file instead"
        )
    stored = complete_presigned_upload(
        session=session,
        store=store,
        checkpoint_id=checkpoint_id,
        upload_id=upload_id,
        parts=[(part.part_number, part.etag) for part in body.parts],
    )
    return files_public(session=session, artifacts=[stored.artifact])[0]


@router.delete("/{upload_id}", status_code=204)
def abort_upload(
    checkpoint_id: RowId, upload_id: str, session: SessionDep, store: StoreDep, _: WriterDep
) -> Response:
    abort_presigned_upload(
        session=session, store=store, checkpoint_id=checkpoint_id, upload_id=upload_id
    )
    return Response(status_code=204)
