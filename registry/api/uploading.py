"""Streamed uploads that slow or stalled clients cannot turn into a denial of service.

Each upload takes a slot: at most ``max_uploads_per_token`` per token and ``max_concurrent_uploads``
in all, else 429 with ``Retry-After``. Its service runs on a thread of the uploads' own pool, so
uploads waiting on the network never take the threads other requests run on. The body is read
with an idle timeout per chunk (408 when the client stalls), the database connection is handed
back before the first body byte is awaited, and a client that disconnects is logged in one line.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, TypeVar

import anyio
import anyio.to_thread
from fastapi import Request
from starlette.requests import ClientDisconnect

from registry.errors import ClientDisconnected, InvalidInput, TooManyUploads, UploadStalled
from registry.models import ApiToken
from registry.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
INT64_MAX = 2**63 - 1


class UploadSlots:
    """Counts uploads in flight per token and in all; owns the uploads' thread pool."""

    def __init__(self, *, per_token: int, total: int, retry_after_s: int) -> None:
        self.per_token = per_token
        self.total = total
        self.retry_after_s = retry_after_s
        self.in_flight: Counter[int] = Counter()
        self.limiter = anyio.CapacityLimiter(total)

    @classmethod
    def from_settings(cls, settings: Settings) -> UploadSlots:
        return cls(
            per_token=settings.max_uploads_per_token,
            total=settings.max_concurrent_uploads,
            retry_after_s=settings.upload_retry_after_s,
        )

    @contextmanager
    def hold(self, token: ApiToken) -> Iterator[None]:
        """Take a slot for ``token`` for the duration of the block (event-loop side only)."""
        token_id = token.id or 0
        if self.in_flight[token_id] >= self.per_token:
            raise TooManyUploads(
                f"token '{token.name}' already has {self.in_flight[token_id]} uploads in flight "
                f"(limit {self.per_token}, CKREG_MAX_UPLOADS_PER_TOKEN); retry later",
                retry_after=self.retry_after_s,
            )
        if self.in_flight.total() >= self.total:
            raise TooManyUploads(
                f"the server has {self.total} uploads in flight (CKREG_MAX_CONCURRENT_UPLOADS); "
                "retry later",
                retry_after=self.retry_after_s,
            )
        self.in_flight[token_id] += 1
        try:
            yield
        finally:
            self.in_flight[token_id] -= 1
            if self.in_flight[token_id] <= 0:
                del self.in_flight[token_id]


def declared_length(request: Request) -> int | None:
    """The request's ``Content-Length`` (None when absent); a malformed one is a 422."""
    raw = request.headers.get("content-length")
    if raw is None:
        return None
    if not raw.strip().isdigit() or int(raw) > INT64_MAX:
        raise InvalidInput(f"Content-Length {raw!r} is not a byte count")
    return int(raw)


def body_chunks(
    request: Request, *, idle_timeout_s: float, before_wait: Callable[[], object] | None = None
) -> Iterator[bytes]:
    """The request body as a blocking iterator, for a service running in a worker thread.

    Each chunk is pulled from the event loop with ``anyio.from_thread.run`` (no buffering of the
    whole body); a chunk that takes longer than ``idle_timeout_s`` raises ``UploadStalled``.
    ``before_wait`` runs once before the first chunk is awaited (hand the DB connection back).
    """
    stream: AsyncIterator[bytes] = request.stream()

    async def next_chunk() -> Any:
        try:
            with anyio.fail_after(idle_timeout_s):
                return await stream.__anext__()
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise UploadStalled(
                f"no body bytes for {idle_timeout_s:g} s (CKREG_UPLOAD_IDLE_TIMEOUT_S); "
                "upload aborted, nothing stored"
            ) from None

    if before_wait is not None:
        before_wait()
    while (chunk := anyio.from_thread.run(next_chunk)) is not None:
        if chunk:
            yield chunk


async def run_upload(
    request: Request, token: ApiToken, service: Callable[..., T], **kwargs: Any
) -> T:
    """Run an upload ``service`` under a slot, on the uploads' thread pool.

    A client disconnect is logged in one line and answered 400 ``client_disconnected`` (which
    nobody reads); the service has already discarded the partial body.
    """
    slots: UploadSlots = request.app.state.upload_slots
    with slots.hold(token):
        try:
            return await anyio.to_thread.run_sync(partial(service, **kwargs), limiter=slots.limiter)
        except ClientDisconnect:
            log.warning(
                "%s %s: client disconnected before the body was complete; nothing stored",
                request.method,
                request.url.path,
            )
            raise ClientDisconnected("client disconnected before the body was complete") from None
