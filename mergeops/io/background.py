"""One background thread that runs a writer's file writes in order, so the merge goes on
while ``pwrite`` (which releases the GIL) copies the previous slices into the page cache.

Bytes queued are bounded (``max_bytes``; one larger job may run alone), so memory stays a few
slices whatever the speed of the disk. A failed job's exception is kept and re-raised to the
producer at its next ``submit``, ``drain`` or ``close``; later jobs are dropped (their
``release`` still runs, so pooled buffers are given back). ``close`` waits for every job and
joins the thread, whether or not something failed.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

DEFAULT_MAX_BYTES = 8 * 1024 * 1024


class BackgroundWrites:
    """An ordered queue of write jobs run by one daemon thread."""

    def __init__(self, *, max_bytes: int = DEFAULT_MAX_BYTES, name: str = "mergeops-write"):
        self.max_bytes = max_bytes
        self._jobs: deque[tuple[Callable[[], object], int, Callable[[], None] | None]] = deque()
        self._queued = 0
        self._busy = False
        self._closed = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(
        self, job: Callable[[], object], nbytes: int, release: Callable[[], None] | None = None
    ) -> None:
        """Queue ``job`` (``nbytes`` of data); waits while the queue is full."""
        with self._cond:
            while (self._jobs or self._busy) and self._queued + nbytes > self.max_bytes:
                if self._error is not None:
                    break
                self._cond.wait()
            if self._error is not None or self._closed:
                if release is not None:
                    release()
                self._raise()
                raise RuntimeError("background writes are closed")
            self._jobs.append((job, nbytes, release))
            self._queued += nbytes
            self._cond.notify_all()

    def drain(self) -> None:
        """Wait until every queued job ran; re-raise a job's failure."""
        with self._cond:
            while self._jobs or self._busy:
                self._cond.wait()
            self._raise()

    def close(self) -> None:
        """Run (or, after a failure, drop) what is queued and join the thread; re-raises."""
        self.stop()
        with self._cond:
            self._raise()

    def stop(self) -> None:
        """Run (or, after a failure, drop) what is queued and join the thread; no raise."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if not self._jobs:
                    return
                job, nbytes, release = self._jobs.popleft()
                self._busy = True
                failed = self._error is not None
            try:
                if not failed:
                    job()
            except BaseException as exc:  # handed to the producer
                with self._cond:
                    self._error = exc
            finally:
                if release is not None:
                    release()
                with self._cond:
                    self._busy = False
                    self._queued -= nbytes
                    self._cond.notify_all()
