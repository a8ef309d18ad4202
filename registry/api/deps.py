"""FastAPI dependencies: the request's database session, store, settings, launcher and token."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated, Any

import anyio
from fastapi import Depends, Request
from sqlmodel import Session

from registry import services
from registry.launcher import Launcher
from registry.models import ApiToken, TokenScope
from registry.settings import Settings
from registry.storage import ObjectStore


def get_session(request: Request) -> Iterator[Session]:
    with Session(request.app.state.engine, expire_on_commit=False) as session:
        yield session


def get_store(request: Request) -> ObjectStore:
    return request.app.state.store  # type: ignore[no-any-return]


def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def get_launcher(request: Request) -> Launcher:
    return request.app.state.launcher  # type: ignore[no-any-return]


SessionDep = Annotated[Session, Depends(get_session)]
StoreDep = Annotated[ObjectStore, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
LauncherDep = Annotated[Launcher, Depends(get_launcher)]


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _require(scope: TokenScope) -> Callable[..., ApiToken]:
    def dependency(request: Request, session: SessionDep) -> ApiToken:
        return services.authenticate(session=session, plaintext=_bearer(request), required=scope)

    return dependency


def _reader(request: Request, session: SessionDep, settings: SettingsDep) -> ApiToken | None:
    if not settings.auth_reads:
        return None
    return services.authenticate(
        session=session, plaintext=_bearer(request), required=TokenScope.read
    )


ReaderDep = Annotated[ApiToken | None, Depends(_reader)]
WriterDep = Annotated[ApiToken, Depends(_require(TokenScope.write))]
AdminDep = Annotated[ApiToken, Depends(_require(TokenScope.admin))]


def body_chunks(request: Request) -> Iterator[bytes]:
    """The request body as a blocking iterator, for services running in a worker thread.

    Each chunk is pulled from the event loop with ``anyio.from_thread.run``, so the upload is
    streamed into the store without buffering the whole body.
    """
    stream: AsyncIterator[bytes] = request.stream()

    async def next_chunk() -> Any:
        try:
            return await stream.__anext__()
        except StopAsyncIteration:
            return None

    while (chunk := anyio.from_thread.run(next_chunk)) is not None:
        if chunk:
            yield chunk
