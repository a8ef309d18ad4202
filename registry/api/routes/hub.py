"""A read-only Hugging Face Hub API under ``/hub``: point ``HF_ENDPOINT`` at ``<registry>/hub``
and ``huggingface_hub``, ``transformers`` and ``peft`` load ``ckreg/<checkpoint id or name>``.

Paths are the Hub's: ``/api/models/{repo_id}[/revision/{rev}]``, ``/api/models/{repo_id}/tree/{rev}``
and ``/{repo_id}/resolve/{rev}/{filename}`` (GET and HEAD, with Range). Not-found answers carry
the Hub's ``X-Error-Code`` so clients raise their usual errors. Reads need a read token when the
registry requires one for reads (``CKREG_AUTH_READS``); clients send it from ``HF_TOKEN``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from sqlmodel import Session

from registry import services
from registry.api.deps import SessionDep, SettingsDep, StoreDep
from registry.api.routes.files import parse_range
from registry.errors import Forbidden, Unauthenticated
from registry.models import TokenScope
from registry.services import hub

router = APIRouter(prefix="/hub", tags=["hub"], include_in_schema=False)


def _hub_reader(request: Request, session: SessionDep, settings: SettingsDep) -> None:
    """Reads need a read token when the registry says so; refused as the Hub refuses a private
    repo (401/403 with ``X-Error-Code: RepoNotFound``), so clients tell users to authenticate."""
    if not settings.auth_reads:
        return
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    token = value.strip() if scheme.lower() == "bearer" else None
    try:
        services.authenticate(session=session, plaintext=token or None, required=TokenScope.read)
    except (Unauthenticated, Forbidden) as exc:
        headers = {
            "X-Error-Code": "RepoNotFound",
            "X-Error-Message": f"{exc.message} (set HF_TOKEN to a ckreg read token)",
            "WWW-Authenticate": "Bearer",
        }
        status = 401 if isinstance(exc, Unauthenticated) else 403
        raise HTTPException(status, headers["X-Error-Message"], headers=headers) from exc


ReaderDep = Annotated[None, Depends(_hub_reader)]


def _not_found(exc: hub.HubNotFound) -> JSONResponse:
    headers = {
        "X-Error-Code": exc.hub_code,
        "X-Error-Message": exc.message.encode("ascii", "replace").decode(),
    }
    if exc.commit is not None:
        headers["X-Repo-Commit"] = exc.commit
    return JSONResponse({"error": exc.message}, status_code=404, headers=headers)


def _repo(session: Session, namespace: str, name: str, revision: str) -> hub.HubRepo:
    return hub.find_repo(session=session, namespace=namespace, name=name, revision=revision)


@router.get("/api/models/{namespace}/{name}")
@router.get("/api/models/{namespace}/{name}/revision/{revision}")
def model_info(
    namespace: str, name: str, session: SessionDep, _: ReaderDep, revision: str = "main"
) -> Response:
    try:
        repo = _repo(session, namespace, name, revision)
    except hub.HubNotFound as exc:
        return _not_found(exc)
    return JSONResponse(hub.model_info(repo), headers={"X-Repo-Commit": repo.sha})


@router.get("/api/models/{namespace}/{name}/tree/{revision}")
@router.get("/api/models/{namespace}/{name}/tree/{revision}/{path:path}")
def tree(
    namespace: str, name: str, revision: str, session: SessionDep, _: ReaderDep, path: str = ""
) -> Response:
    try:
        repo = _repo(session, namespace, name, revision)
        entries: list[dict[str, Any]] = hub.tree(repo, path.strip("/"))
    except hub.HubNotFound as exc:
        return _not_found(exc)
    return JSONResponse(entries, headers={"X-Repo-Commit": repo.sha})


@router.api_route("/{namespace}/{name}/resolve/{revision}/{filename:path}", methods=["GET", "HEAD"])
def resolve(
    namespace: str,
    name: str,
    revision: str,
    filename: str,
    request: Request,
    session: SessionDep,
    store: StoreDep,
    _: ReaderDep,
    range_header: Annotated[str | None, Header(alias="Range")] = None,
) -> Response:
    """A file's bytes (or, for HEAD, its headers): ETag = its sha256, X-Repo-Commit = the revision."""
    try:
        repo = _repo(session, namespace, name, revision)
        artifact = repo.file(filename)
    except hub.HubNotFound as exc:
        return _not_found(exc)
    etag = f'"{artifact.sha256}"'
    headers = {
        "Accept-Ranges": "bytes",
        "ETag": etag,
        "X-Linked-Etag": etag,
        "X-Linked-Size": str(artifact.size),
        "X-Repo-Commit": repo.sha,
        "Content-Disposition": f'inline; filename="{artifact.name}"',
    }
    try:
        span = parse_range(range_header, artifact.size)
    except ValueError:
        headers["Content-Range"] = f"bytes */{artifact.size}"
        return Response(status_code=416, headers=headers)
    start, end = span or (0, artifact.size)
    headers["Content-Length"] = str(end - start)
    status = 200 if span is None else 206
    if span is not None:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{artifact.size}"
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers)
    body = services.stream_artifact(
        store=store, artifact=artifact, session=session, start=start, end=end
    )
    return StreamingResponse(
        body, status_code=status, media_type="application/octet-stream", headers=headers
    )
