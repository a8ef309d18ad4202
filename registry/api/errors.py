"""The one place domain (and storage) errors become HTTP responses."""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException
from starlette.routing import Match

from registry.errors import (
    BaseMismatch,
    ClientDisconnected,
    DependentsExist,
    Forbidden,
    InvalidInput,
    InvalidState,
    NotFound,
    RegistryError,
    TooManyUploads,
    Unauthenticated,
    UploadStalled,
    ValidationFailed,
)
from registry.storage import BlobNotFound, StorageError, UnsafeKeyError

log = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    """What went wrong: a stable ``error`` code and a ``message`` naming the object and values
    (``file``/``tensor`` for validation failures, ``errors`` for malformed request fields)."""

    model_config = ConfigDict(extra="allow")

    error: str
    message: str


class ErrorResponse(BaseModel):
    """The body of every 4xx and 5xx answer."""

    detail: ErrorDetail


# Declared on every route (instead of FastAPI's default 422 schema), so the OpenAPI says what
# the server really answers.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorResponse, "description": "Refused: bad input, state or credentials"},
    "5XX": {"model": ErrorResponse, "description": "Server or storage failure"},
}

STATUS: dict[type[Exception], int] = {
    NotFound: 404,
    InvalidState: 409,
    InvalidInput: 422,
    BaseMismatch: 409,
    ValidationFailed: 422,
    DependentsExist: 409,
    Unauthenticated: 401,
    Forbidden: 403,
    UploadStalled: 408,
    ClientDisconnected: 400,
    TooManyUploads: 429,
    BlobNotFound: 404,
    UnsafeKeyError: 422,
    StorageError: 502,
}


def _status(exc: Exception) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


async def handle_domain_error(request: Request, exc: Exception) -> JSONResponse:
    """Map a ``RegistryError`` or ``StorageError`` to ``{"detail": {"error", "message", ...}}``."""
    message = getattr(exc, "message", str(exc))
    if isinstance(exc, BlobNotFound):
        message = f"object '{exc.key}' not found"
    detail: dict[str, object] = {
        "error": getattr(exc, "code", "storage_error"),
        "message": _without_store_location(request, message),
    }
    if isinstance(exc, ValidationFailed):
        detail.update(file=exc.file, tensor=exc.tensor)
    headers: dict[str, str] | None = None
    if isinstance(exc, Unauthenticated):
        headers = {"WWW-Authenticate": "Bearer"}
    elif isinstance(exc, TooManyUploads):
        headers = {"Retry-After": str(exc.retry_after)}
    return JSONResponse({"detail": detail}, status_code=_status(exc), headers=headers)


def _without_store_location(request: Request, message: str) -> str:
    """``message`` without the store's location (a server path, an S3 bucket and prefix): a
    client has no use for it and should not learn the server's layout."""
    store = getattr(request.app.state, "store", None)
    for location in (getattr(store, "url", None), str(getattr(store, "root", "") or "")):
        if location:
            message = message.replace(location, "the store")
    return message


def _finite(value: Any) -> Any:
    """``value`` with non-finite floats replaced by their text, so the response is valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _brief_input(value: Any) -> Any:
    """The refused input as echoed back: large values are cut, not returned whole."""
    text = repr(value)
    return value if len(text) <= 200 else text[:200] + "..."


async def handle_request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Malformed request fields, in the same error shape (the field path in the message)."""
    errors = [{**error, "input": _brief_input(error.get("input"))} for error in exc.errors()]
    problems = "; ".join(
        f"{'.'.join(str(p) for p in error.get('loc', ()))}: {error.get('msg')}" for error in errors
    )
    detail = {"error": "invalid_request", "message": problems, "errors": jsonable(errors)}
    return JSONResponse({"detail": detail}, status_code=422)


def jsonable(errors: object) -> object:
    return _finite(jsonable_encoder(errors))


async def handle_http_error(request: Request, exc: Exception) -> JSONResponse:
    """Routing errors (unknown path 404, wrong method 405, ...) in the documented shape."""
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 405:  # Starlette names only the first route's methods
        headers["Allow"] = ", ".join(allowed_methods(request))
        message = f"{request.method} is not allowed here; allowed: {headers['Allow']}"
    return JSONResponse(
        {"detail": {"error": code, "message": message}},
        status_code=exc.status_code,
        headers=headers or None,
    )


def allowed_methods(request: Request) -> list[str]:
    """Every method some route of the request's path answers (asked of the router itself, so
    included routers count too)."""
    found = []
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"):
        scope = {**request.scope, "method": method}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            found.append(method)
    return found


async def handle_overflow(request: Request, exc: Exception) -> JSONResponse:
    """A number too large for the database that slipped past the field bounds: 422, not 500."""
    message = f"{request.method} {request.url.path}: a number is out of the database's range: {exc}"
    return JSONResponse(
        {"detail": {"error": "invalid_number", "message": message}}, status_code=422
    )


DATABASE_RETRY_AFTER_S = 5


async def handle_database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """The database could not be reached or dropped the connection (a restart, an outage):
    503 with ``Retry-After``, the connection kept open. The driver's text is logged, not sent
    (it names hosts and ports)."""
    log.warning("database unavailable for %s %s: %s", request.method, request.url.path, exc)
    message = (
        f"the database is unavailable ({type(getattr(exc, 'orig', None) or exc).__name__}); "
        f"retry in {DATABASE_RETRY_AFTER_S} s"
    )
    return JSONResponse(
        {"detail": {"error": "database_unavailable", "message": message}},
        status_code=503,
        headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)},
    )


async def handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
    """Last resort: a bug still answers in the documented shape (Starlette re-raises it after
    this response, so the server logs the traceback once)."""
    message = f"internal error handling {request.method} {request.url.path}"
    return JSONResponse(
        {"detail": {"error": "internal_error", "message": message}}, status_code=500
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RegistryError, handle_domain_error)
    app.add_exception_handler(StorageError, handle_domain_error)
    app.add_exception_handler(RequestValidationError, handle_request_validation)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, handle_http_error)
    app.add_exception_handler(OverflowError, handle_overflow)
    # Connection-level failures only (refused, dropped, pool exhausted); other database errors
    # (constraint violations, bad SQL) are bugs or handled where they happen.
    for unavailable in (OperationalError, InterfaceError, DisconnectionError, PoolTimeout):
        app.add_exception_handler(unavailable, handle_database_unavailable)
    app.add_exception_handler(Exception, handle_unexpected)
