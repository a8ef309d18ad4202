"""FastAPI dependencies: the request's database session, store, settings, launcher and token."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated

import anyio
import anyio.to_thread
from fastapi import Depends, Path, Query, Request
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from registry import services
from registry.launcher import Launcher
from registry.models import ApiToken, TokenScope
from registry.settings import Settings
from registry.storage import ObjectStore

# Dependencies that do no I/O are ``async def``: FastAPI runs a plain ``def`` dependency on a
# worker thread, and each such hop cost ~0.1-0.3 ms of CPU per request under load.


async def get_session(request: Request) -> AsyncIterator[Session]:
    """The request's session. Creating one does no I/O; closing one that still holds a
    connection (a read's open transaction: ROLLBACK, back to the pool) runs on a thread, as
    FastAPI runs a dependency's exit: outside the shared thread limit (threads blocked waiting
    for a pooled connection must not keep the one holding it from closing) and, here, shielded
    from cancellation (a dropped client must not leak the connection)."""
    session = Session(request.app.state.engine, expire_on_commit=False)
    try:
        yield session
    finally:
        if session.in_transaction():
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(session.close, limiter=anyio.CapacityLimiter(1))
        else:
            session.close()


async def get_store(request: Request) -> ObjectStore:
    return request.app.state.store  # type: ignore[no-any-return]


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def get_launcher(request: Request) -> Launcher:
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


async def _reader(request: Request, session: SessionDep, settings: SettingsDep) -> ApiToken | None:
    if not settings.auth_reads:  # open reads: no thread hop, no query
        return None
    return await run_in_threadpool(
        services.authenticate, session=session, plaintext=_bearer(request), required=TokenScope.read
    )


ReaderDep = Annotated[ApiToken | None, Depends(_reader)]
WriterDep = Annotated[ApiToken, Depends(_require(TokenScope.write))]
AdminDep = Annotated[ApiToken, Depends(_require(TokenScope.admin))]

# Every integer in a path or query fits the database's 64-bit integers (else 422, not 500).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
RowId = Annotated[int, Path(ge=INT64_MIN, le=INT64_MAX)]
RowIdQuery = Annotated[int | None, Query(ge=INT64_MIN, le=INT64_MAX)]
Offset = Annotated[int, Query(ge=0, le=INT64_MAX)]
