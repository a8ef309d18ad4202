"""Registers checkpoint folders from a background thread so a training loop never waits on the
registry: a bounded queue (a full queue drops the newest job with a warning, never blocks),
retries with exponential backoff, one warning line per registry outage, and a bounded flush.

Framework-neutral: ``hf_trainer.CkregCallback`` feeds it ``RegistrationJob`` objects.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("registry.client.integrations")


@dataclass(frozen=True)
class RegistrationJob:
    """One folder to register with ``Client.register(folder, **options)``; ``staged`` is removed
    afterwards (a hard-linked snapshot the trainer's checkpoint rotation cannot delete)."""

    folder: Path
    options: dict[str, Any] = field(default_factory=dict)
    staged: bool = False

    @property
    def name(self) -> str:
        return str(self.options.get("name") or self.folder.name)


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries per checkpoint; waits ``backoff_s * 2**i`` (at most ``max_backoff_s``)."""

    attempts: int = 5
    backoff_s: float = 2.0
    max_backoff_s: float = 60.0

    def delay(self, attempt: int) -> float:
        return min(self.backoff_s * 2**attempt, self.max_backoff_s)


class BackgroundRegistrar:
    """A worker thread registering ``RegistrationJob``s with a client from ``make_client()``."""

    def __init__(
        self,
        make_client: Callable[[], Any],
        *,
        url: str,
        queue_size: int = 8,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.url = url
        self.retry = retry or RetryPolicy()
        self.registered: list[dict[str, Any]] = []
        self.failed: list[str] = []
        self._make_client = make_client
        self._jobs: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._abandon = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._outage = False

    def submit(self, job: RegistrationJob) -> bool:
        """Queue ``job`` without blocking; False (and a warning) when the queue is full."""
        self._ensure_thread()
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            log.warning(
                "ckreg: %d checkpoints still wait for the registry at %s; %s not registered",
                self._jobs.qsize(),
                self.url,
                job.name,
            )
            _discard(job)
            self.failed.append(job.name)
            return False
        return True

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for queued jobs; True when all were handled. Jobs left after
        that are abandoned (logged) and the worker stops."""
        if self._thread is None:
            return True
        self._stopping.set()
        self._thread.join(timeout)
        done = not self._thread.is_alive()
        if not done:
            self._abandon.set()  # the rest are dropped at once
            self._thread.join(10)
        self._thread = None  # a worker stuck in a request ends once it returns
        if self.failed:
            log.warning(
                "ckreg: %d checkpoint(s) not registered in %s: %s",
                len(self.failed),
                self.url,
                ", ".join(self.failed),
            )
        return done

    # -- worker ---------------------------------------------------------------------------------

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            # Fresh events per worker: one left behind by an abandoned flush stays stopped.
            self._stopping, self._abandon = threading.Event(), threading.Event()
            self._thread = threading.Thread(
                target=self._work,
                args=(self._stopping, self._abandon),
                name="ckreg-registrar",
                daemon=True,
            )
            self._thread.start()

    def _work(self, stopping: threading.Event, abandon: threading.Event) -> None:
        with self._make_client() as client:
            while True:
                try:
                    job = self._jobs.get(timeout=0.1)
                except queue.Empty:
                    if stopping.is_set():
                        return
                    continue
                try:
                    if abandon.is_set():
                        self.failed.append(job.name)
                    else:
                        self._register(client, job, abandon)
                finally:
                    _discard(job)

    def _register(self, client: Any, job: RegistrationJob, abandon: threading.Event) -> None:
        for attempt in range(self.retry.attempts):
            try:
                if attempt and self._already_there(client, job):
                    return
                checkpoint = client.register(job.folder, **job.options)
            except Exception as exc:  # training must go on, whatever failed
                if not _retryable(exc):
                    log.warning(
                        "ckreg: %s refused by the registry at %s: %s", job.name, self.url, exc
                    )
                    self.failed.append(job.name)
                    return
                self._note_outage(job, exc)
                if attempt + 1 == self.retry.attempts or abandon.wait(self.retry.delay(attempt)):
                    break
                continue
            if self._outage:
                log.warning("ckreg: registry at %s answers again", self.url)
                self._outage = False
            self.registered.append(checkpoint)
            log.info("ckreg: registered %s as checkpoint %s", job.name, checkpoint.get("id"))
            return
        self.failed.append(job.name)

    def _note_outage(self, job: RegistrationJob, exc: Exception) -> None:
        if self._outage:
            log.debug("ckreg: %s: registry still unreachable: %s", job.name, exc)
            return
        self._outage = True
        reason = " ".join(str(exc).split()) or type(exc).__name__
        log.warning(
            "ckreg: registry at %s is unreachable (%s); %s will be retried, training goes on",
            self.url,
            reason,
            job.name,
        )

    @staticmethod
    def _already_there(client: Any, job: RegistrationJob) -> bool:
        """After a failed try: a ready checkpoint of this name and run means it got through."""
        found = client.list_checkpoints(
            name=job.name, run=job.options.get("run"), status="ready", limit=1
        )
        return bool(found.get("items"))


def _retryable(exc: Exception) -> bool:
    """Connection trouble, timeouts, 5xx and 429 are retried; other refusals are final."""
    import httpx

    from registry.client.transport import ClientError

    if isinstance(exc, httpx.TransportError):
        return True
    return isinstance(exc, ClientError) and (exc.status >= 500 or exc.status == 429)


def _discard(job: Any) -> None:
    if isinstance(job, RegistrationJob) and job.staged:
        shutil.rmtree(job.folder, ignore_errors=True)
