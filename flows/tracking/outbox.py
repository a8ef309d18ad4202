"""A directory of tracking events waiting for MLflow: one JSON file per event, oldest first.

Files are written atomically (temp file + ``os.replace``) and named by a nanosecond clock plus a
per-process counter, so a lexical sort is the order they were queued in. Events that MLflow
rejects for good (not an outage) are moved to ``failed/`` rather than dropped.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_counter = itertools.count()
EVENT_KINDS = ("checkpoint", "merge", "failed_merge")


@dataclass(frozen=True)
class QueuedEvent:
    """An event read back from the outbox."""

    path: Path
    kind: str
    payload: dict[str, Any]


class Outbox:
    """Ordered, durable queue of tracking events in ``directory``."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.failed_dir = self.directory / "failed"

    def put(self, kind: str, payload: dict[str, Any]) -> Path:
        """Queue one event; returns the file it was written to."""
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown tracking event kind {kind!r}; expected one of {EVENT_KINDS}")
        self.directory.mkdir(parents=True, exist_ok=True)
        stem = f"{time.time_ns():020d}-{next(_counter):06d}-{uuid.uuid4().hex[:8]}-{kind}"
        body = json.dumps({"kind": kind, "payload": payload}, sort_keys=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(body)
                handle.flush()
                os.fsync(handle.fileno())
            target = self.directory / f"{stem}.json"
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    def pending(self) -> list[QueuedEvent]:
        """Queued events, oldest first."""
        return list(self.iter_pending())

    def iter_pending(self) -> Iterator[QueuedEvent]:
        """Queued events, oldest first, each file read only when it is reached (a flush that
        stops at an outage reads one event, not the whole backlog)."""
        if not self.directory.is_dir():
            return
        for path in sorted(self.directory.glob("[0-9]*.json")):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError:  # sent meanwhile by a process not holding the lock
                continue
            yield QueuedEvent(path=path, kind=data["kind"], payload=data["payload"])

    def __len__(self) -> int:
        if not self.directory.is_dir():
            return 0
        return sum(1 for _ in self.directory.glob("[0-9]*.json"))

    def done(self, event: QueuedEvent) -> None:
        """Remove an event MLflow has recorded."""
        event.path.unlink(missing_ok=True)

    def fail(self, event: QueuedEvent, error: str) -> Path:
        """Park an event MLflow rejected for good, with the error beside it."""
        self.failed_dir.mkdir(parents=True, exist_ok=True)
        target = self.failed_dir / event.path.name
        os.replace(event.path, target)
        target.with_suffix(".error.txt").write_text(error, encoding="utf-8")
        return target

    def failed(self) -> list[Path]:
        """Events parked after MLflow rejected them, oldest first."""
        if not self.failed_dir.is_dir():
            return []
        return sorted(self.failed_dir.glob("[0-9]*.json"))

    def requeue_failed(self) -> int:
        """Move parked events back into the queue (their names keep their original order)."""
        moved = 0
        for path in self.failed():
            os.replace(path, self.directory / path.name)
            path.with_suffix(".error.txt").unlink(missing_ok=True)
            moved += 1
        return moved

    def mark_down(self, tracking_uri: str) -> None:
        """Remember (across processes) that MLflow at ``tracking_uri`` was unreachable now."""
        self.directory.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"at": time.time(), "uri": tracking_uri})
        (self.directory / ".down").write_text(body, encoding="utf-8")

    def down_within(self, seconds: float, tracking_uri: str) -> bool:
        """True while MLflow at ``tracking_uri`` was last seen down less than ``seconds`` ago
        and events are still queued: new events then go straight to the queue instead of
        calling a server that was just unreachable."""
        if seconds <= 0:
            return False
        try:
            mark = json.loads((self.directory / ".down").read_text(encoding="utf-8"))
            since = time.time() - float(mark["at"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return False
        return mark.get("uri") == tracking_uri and 0 <= since < seconds and len(self) > 0

    def clear_down(self) -> None:
        """Forget an outage (MLflow answered)."""
        (self.directory / ".down").unlink(missing_ok=True)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the outbox lock so two processes never flush the same events at once."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
