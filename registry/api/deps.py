"""FastAPI dependencies: the request's database session, store, settings, launcher and token."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Path, Query, Request
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

# Every integer in a path or query fits the database's 64-bit integers (else 422, not 500).
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
RowId = Annotated[int, Path(ge=INT64_MIN, le=INT64_MAX)]
RowIdQuery = Annotated[int | None, Query(ge=INT64_MIN, le=INT64_MAX)]
Offset = Annotated[int, Query(ge=0, le=INT64_MAX)]
