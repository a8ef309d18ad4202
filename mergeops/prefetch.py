"""Read-ahead of merge inputs: while batch k (a tensor's, or a slice's, reads of every input)
is merged, batches k+1.. are read in a small thread pool, with bounded bytes in flight.

The engine describes each batch as a list of ``Read`` (estimated bytes + a function that does
the read) and walks ``Prefetcher.stream(batches)``; each item is one ``Pending`` per read, whose
``result()`` returns the tensor or re-raises the reader's own exception. Reads are the same
functions with or without prefetch, so results are bit-identical; only when they run changes.
With ``enabled=False`` nothing runs ahead: ``result()`` reads right then, in order.

Bytes in flight (read ahead and not yet consumed, including the batch being merged) stay under
``max_bytes``; a batch that alone exceeds it is not read ahead (its reads still run in parallel
when its turn comes). Nothing blocks on the budget, so nested streams (tensor-level and
slice-level) share one ``Prefetcher`` without deadlock. ``close()`` cancels what has not
started, waits for running reads and joins the threads.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

DEFAULT_PREFETCH_BYTES = 256 * 1024 * 1024
"""Default read-ahead budget (raw input bytes)."""
DEFAULT_WORKERS = 4
MAX_DEPTH = 8
"""Batches read ahead at most, however small (bounds the futures kept)."""


@dataclass(frozen=True)
class Read:
    """One input read: its estimated size in bytes and the function that performs it."""

    nbytes: int
    fetch: Callable[[], Any]


class Pending(Protocol):
    """A read that may be running; ``result()`` waits for it (re-raising its error)."""

    def result(self) -> Any: ...


class _Deferred:
    """A read not prefetched: runs when its result is asked for."""

    def __init__(self, fetch: Callable[[], Any]) -> None:
        self._fetch = fetch

    def result(self) -> Any:
        return self._fetch()


_END = object()


class Prefetcher:
    """A bounded read-ahead pool shared by every stream of one merge (a context manager)."""

    def __init__(
        self,
        *,
        enabled: bool = True,
        max_bytes: int = DEFAULT_PREFETCH_BYTES,
        workers: int = DEFAULT_WORKERS,
        on_submit: Callable[[int], None] | None = None,
    ) -> None:
        if max_bytes < 0 or workers < 1:
            raise ValueError(f"prefetch needs max_bytes >= 0 and workers >= 1, got "
                             f"{max_bytes} and {workers}")  # fmt: skip
        self.enabled = enabled
        self.max_bytes = max_bytes
        self.in_flight = 0
        self.peak_in_flight = 0
        self._on_submit = on_submit
        self._pool: ThreadPoolExecutor | None = None
        self._workers = workers
        self._futures: set[Future[Any]] = set()
        self._lock = threading.Lock()

    def _submit(self, batch: Sequence[Read]) -> tuple[int, list[Pending]]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="mergeops-read")
        nbytes = sum(read.nbytes for read in batch)
        if self._on_submit is not None:
            self._on_submit(len(batch))
        futures = [self._pool.submit(read.fetch) for read in batch]
        with self._lock:
            self._futures.update(futures)
        for future in futures:
            future.add_done_callback(self._forget)
        self.in_flight += nbytes
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        return nbytes, list(futures)

    def _forget(self, future: Future[Any]) -> None:
        with self._lock:
            self._futures.discard(future)

    def stream(
        self, batches: Iterable[Sequence[Read]], *, depth: int = MAX_DEPTH
    ) -> Generator[list[Pending], None, None]:
        """Each batch's pending reads, in order, with up to ``depth`` later batches read ahead.

        Use it inside ``contextlib.closing`` so an early exit releases its budget at once.
        """
        if not self.enabled:
            for batch in batches:
                yield [_Deferred(read.fetch) for read in batch]
            return
        source = iter(batches)
        ahead: deque[tuple[int, list[Pending]]] = deque()
        waiting: Any = _END  # a batch pulled from ``source`` but not submitted yet
        try:
            while True:
                if not ahead:
                    batch = waiting if waiting is not _END else next(source, _END)
                    waiting = _END
                    if batch is _END:
                        return
                    ahead.append(self._submit(batch))
                while len(ahead) <= max(1, min(depth, MAX_DEPTH)):
                    if waiting is _END:
                        waiting = next(source, _END)
                        if waiting is _END:
                            break
                    if self.in_flight + sum(r.nbytes for r in waiting) > self.max_bytes:
                        break
                    ahead.append(self._submit(waiting))
                    waiting = _END
                nbytes, pending = ahead.popleft()
                try:
                    yield pending
                finally:
                    self.in_flight -= nbytes
        finally:
            for nbytes, pending in ahead:
                self.in_flight -= nbytes
                cancel(pending)

    def close(self) -> None:
        """Cancel reads not started, wait for running ones, join the threads."""
        with self._lock:
            futures = list(self._futures)
        cancel(futures)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def cancel(pending: Sequence[Any]) -> None:
    """Cancel the reads of ``pending`` that have not started and wait for the rest (their
    errors are dropped: nobody asked for those results)."""
    futures = [p for p in pending if isinstance(p, Future)]
    for future in futures:
        future.cancel()
    wait(futures)


class StartedStream:
    """A ``Prefetcher.stream`` whose first reads may be submitted before anyone consumes it
    (``start``); iterate it for each batch's pending reads, and ``close`` it (also when it was
    never consumed: what it read ahead is cancelled or waited for)."""

    def __init__(self, stream: Generator[list[Pending], None, None]) -> None:
        self._stream = stream
        self._first: list[Pending] | None = None

    def start(self) -> None:
        """Submit the first reads now (as far ahead as the stream reads)."""
        if self._first is None:
            self._first = next(self._stream, None)

    def __iter__(self) -> Iterator[list[Pending]]:
        first, self._first = self._first, None
        return self._stream if first is None else itertools.chain([first], self._stream)

    def close(self) -> None:
        first, self._first = self._first, None
        self._stream.close()
        if first is not None:
            cancel(first)


def then(batches: Iterable[Sequence[Read]], done: Callable[[], None]) -> Iterator[Sequence[Read]]:
    """``batches``, then ``done()`` once the stream has taken the last one (all submitted)."""
    yield from batches
    done()
