"""Refuse malformed request input before any route sees it, in the documented error shape.

JSON bodies larger than the limit get 413; bodies nested too deep, holding a non-finite number
(``NaN``, ``Infinity``, ``1e309``), an integer the database cannot hold (outside int64), a NUL
character or text that is not valid Unicode (a lone surrogate such as ``"\\udfff"``, in a value
or a key) get 422 naming the field path. The query string and the path must percent-decode to
valid UTF-8 without NUL (else 422 naming the parameter): the PostgreSQL driver refuses NUL, and
neither the database nor a JSON answer can hold a lone surrogate. Streamed uploads (file and
artifact bodies) pass through; their safetensors headers are checked in ``safetensors_check``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import unquote_to_bytes

from starlette.responses import JSONResponse

from registry.text import shown, text_problem

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_DEPTH = 32
# Routes whose body is a raw byte stream, not JSON: (method, path pattern).
_STREAMED = (
    ("PUT", re.compile(r"^/api/v1/checkpoints/[^/]+/files/.+$")),
    ("POST", re.compile(r"^/api/v1/checkpoints/[^/]+/artifacts/?$")),
)
_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})


class InputRefused(Exception):
    """Request input refused before routing; rendered as ``{"detail": {"error", "message"}}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"detail": {"error": self.code, "message": self.message}}, status_code=self.status
        )


class _Constant:
    """A ``NaN`` / ``Infinity`` literal, kept as a marker so the walk can name its field."""

    def __init__(self, literal: str) -> None:
        self.literal = literal


def _location(path: tuple[str | int, ...]) -> str:
    return ".".join(["body", *(str(part) for part in path)])


def _check_value(value: Any, path: tuple[str | int, ...]) -> None:
    if isinstance(value, _Constant) or (isinstance(value, float) and not math.isfinite(value)):
        literal = value.literal if isinstance(value, _Constant) else repr(value)
        raise InputRefused(422, "invalid_number", f"{_location(path)}: {literal} is not finite")
    out_of_range = isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX
    if out_of_range:
        raise InputRefused(
            422,
            "invalid_number",
            f"{_location(path)}: integer {value} is outside the 64-bit range "
            f"[{INT64_MIN}, {INT64_MAX}] the database holds",
        )
    if isinstance(value, str):
        _check_text(value, _location(path), "text")


def _check_text(text: str, where: str, what: str) -> None:
    problem = text_problem(text)
    if problem is not None:
        raise InputRefused(422, "invalid_text", f"{where}: {what} {problem}")


def check_json_values(document: Any, *, max_depth: int = MAX_DEPTH) -> None:
    """Walk a parsed JSON document (iteratively) and raise ``InputRefused`` on the first bad value."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(document, ())]
    while stack:
        value, path = stack.pop()
        if len(path) > max_depth:
            raise InputRefused(
                422, "invalid_json", f"{_location(path[:3])}...: nested deeper than {max_depth}"
            )
        if isinstance(value, dict):
            for key, item in value.items():
                _check_text(key, _location(path), f"key '{shown(key)}'")
                stack.append((item, (*path, key)))
        elif isinstance(value, list):
            stack.extend((item, (*path, index)) for index, item in enumerate(value))
        else:
            _check_value(value, path)


def check_json_body(raw: bytes, *, max_depth: int = MAX_DEPTH) -> None:
    """Refuse a JSON body holding what the registry cannot store; unparsable JSON is left to
    FastAPI (which answers 422 ``json_invalid`` through the validation handler)."""
    try:
        document = json.loads(raw, parse_constant=_Constant)
    except RecursionError:
        raise InputRefused(422, "invalid_json", f"body: nested deeper than {max_depth}") from None
    except ValueError:  # not JSON (or not UTF-8): FastAPI reports it
        return
    check_json_values(document, max_depth=max_depth)


def check_target(scope: Scope) -> None:
    """Refuse a query string that does not percent-decode to valid UTF-8 text without NUL, naming
    the parameter, and a path that is not valid UTF-8 (path parameters are checked by their
    routes: ids must be integers, file names plain names)."""
    if b"%00" in scope.get("query_string", b""):
        raise InputRefused(422, "invalid_text", "the query string holds a NUL character (%00)")
    for field in scope.get("query_string", b"").split(b"&"):
        name, _, value = field.partition(b"=")
        for part, what in ((name, "parameter name"), (value, "value")):
            _check_encoded(part.replace(b"+", b" "), f"query.{_shown(name)}", what)
    raw_path = scope.get("raw_path") or scope.get("path", "").encode("utf-8", "surrogateescape")
    try:
        unquote_to_bytes(raw_path).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputRefused(
            422, "invalid_text", f"path: text is not valid UTF-8 ({exc.reason})"
        ) from None


def _shown(encoded: bytes) -> str:
    return unquote_to_bytes(encoded).decode("utf-8", "backslashreplace")


def _check_encoded(encoded: bytes, where: str, what: str) -> None:
    try:
        text = unquote_to_bytes(encoded).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputRefused(
            422, "invalid_text", f"{where}: {what} is not valid UTF-8 ({exc.reason})"
        ) from None
    _check_text(text, where, what)


class InputGuard:
    """ASGI middleware applying ``check_target`` to every request and ``check_json_body`` to
    every non-streamed body of at most ``max_body_bytes`` (larger ones: 413)."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, max_depth: int = MAX_DEPTH) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_depth = max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            check_target(scope)
            if not self._has_json_body(scope):
                await self.app(scope, receive, send)
                return
            body = await self._read_body(scope, receive)
            if body:
                check_json_body(body, max_depth=self.max_depth)
        except InputRefused as refused:
            await refused.response()(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    def _has_json_body(self, scope: Scope) -> bool:
        method, path = scope.get("method", "GET"), scope.get("path", "")
        if method not in _WITH_BODY:
            return False
        return not any(method == m and pattern.match(path) for m, pattern in _STREAMED)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise self._too_large()
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    def _too_large(self) -> InputRefused:
        return InputRefused(
            413,
            "body_too_large",
            f"request body is larger than {self.max_body_bytes} bytes (CKREG_MAX_JSON_BODY_BYTES)",
        )


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the buffered body over once, then defers to the real one."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
