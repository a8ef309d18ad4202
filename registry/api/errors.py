"""The one place domain (and storage) errors become HTTP responses."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from registry.errors import (
    BaseMismatch,
    DependentsExist,
    Forbidden,
    InvalidInput,
    InvalidState,
    NotFound,
    RegistryError,
    Unauthenticated,
    ValidationFailed,
)
from registry.storage import BlobNotFound, StorageError, UnsafeKeyError

STATUS: dict[type[Exception], int] = {
    NotFound: 404,
    InvalidState: 409,
    InvalidInput: 422,
    BaseMismatch: 409,
    ValidationFailed: 422,
    DependentsExist: 409,
    Unauthenticated: 401,
    Forbidden: 403,
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
    detail: dict[str, object] = {
        "error": getattr(exc, "code", "storage_error"),
        "message": getattr(exc, "message", str(exc)),
    }
    if isinstance(exc, ValidationFailed):
        detail.update(file=exc.file, tensor=exc.tensor)
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthenticated) else None
    return JSONResponse({"detail": detail}, status_code=_status(exc), headers=headers)


async def handle_request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Malformed request fields, in the same error shape (the field path in the message)."""
    problems = "; ".join(
        f"{'.'.join(str(p) for p in error.get('loc', ()))}: {error.get('msg')}"
        for error in exc.errors()
    )
    detail = {"error": "invalid_request", "message": problems, "errors": jsonable(exc.errors())}
    return JSONResponse({"detail": detail}, status_code=422)


def jsonable(errors: object) -> object:
    from fastapi.encoders import jsonable_encoder

    return jsonable_encoder(errors)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RegistryError, handle_domain_error)
    app.add_exception_handler(StorageError, handle_domain_error)
    app.add_exception_handler(RequestValidationError, handle_request_validation)  # type: ignore[arg-type]
