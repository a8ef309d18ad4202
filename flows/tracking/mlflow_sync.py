"""The tracker the flows call: log to MLflow now, or queue in the outbox and sync later.

Merges never fail because MLflow is down: a connection failure (or a 5xx) queues the event and
the call returns ``None``. Every call first flushes older queued events, in order, so the next
success (or ``ckreg mlflow sync`` -> :meth:`Tracker.sync`) catches MLflow up. With a registry
``database_url``, a queued merge that reaches MLflow later gets its ``MergeRun.mlflow_run_id``
filled in then (a merge logged at once is recorded by its caller).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import requests
from mlflow import MlflowClient
from mlflow.environment_variables import (
    MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    MLFLOW_HTTP_REQUEST_TIMEOUT,
)
from mlflow.exceptions import MlflowException

from flows.tracking.failures import write_failed_merge
from flows.tracking.mlflow_writer import MlflowWriter
from flows.tracking.outbox import Outbox, QueuedEvent
from flows.tracking.records import CheckpointRecord, FailedMergeRecord, MergeRecord

logger = logging.getLogger(__name__)


class TrackingUnavailable(RuntimeError):
    """MLflow could not be reached; the events stay queued."""


def is_outage(exc: BaseException) -> bool:
    """True when ``exc`` means MLflow is unreachable or failing server-side (worth retrying)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
            return True
        if isinstance(current, ConnectionError | TimeoutError):
            return True
        if isinstance(current, MlflowException) and _is_outage_message(current):
            return True
        current = current.__cause__ or current.__context__
    return False


_OUTAGE_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}
_OUTAGE_TEXT = (
    "failed with exception",  # rest_utils wraps requests' connection errors this way
    "Max retries exceeded",
    "failed with error code 502",  # non-JSON gateway answers while the server restarts
    "failed with error code 503",
    "failed with error code 504",
    "database is locked",
)


def _is_outage_message(exc: MlflowException) -> bool:
    if exc.error_code in _OUTAGE_CODES:
        return True
    text = str(exc)
    return any(fragment in text for fragment in _OUTAGE_TEXT)


def default_artifact_location(tracking_uri: str) -> str | None:
    """For a local SQLite store, artifacts go beside the database instead of ``./mlruns``."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db_path = Path(urlparse(tracking_uri).path)
    return (db_path.parent / "mlartifacts").resolve().as_uri()


class Tracker:
    """Records checkpoints and merges in MLflow, queueing them in ``outbox_dir`` on outages."""

    def __init__(
        self,
        tracking_uri: str,
        *,
        outbox_dir: str | os.PathLike[str],
        experiment_name: str = "ckreg",
        artifact_location: str | None = None,
        http_timeout_s: int = 10,
        http_max_retries: int = 0,
        database_url: str | None = None,
        outage_backoff_s: float = 10.0,
    ) -> None:
        # MLflow reads these per request; keep outage detection fast unless the user chose otherwise.
        if not MLFLOW_HTTP_REQUEST_MAX_RETRIES.is_set():
            MLFLOW_HTTP_REQUEST_MAX_RETRIES.set(str(http_max_retries))
        if not MLFLOW_HTTP_REQUEST_TIMEOUT.is_set():
            MLFLOW_HTTP_REQUEST_TIMEOUT.set(str(http_timeout_s))
        if tracking_uri.startswith("sqlite:///"):
            Path(urlparse(tracking_uri).path).parent.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = tracking_uri
        self.database_url = database_url
        self.outbox = Outbox(outbox_dir)
        self.outage_backoff_s = outage_backoff_s
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.writer = MlflowWriter(
            client,
            experiment_name=experiment_name,
            artifact_location=artifact_location or default_artifact_location(tracking_uri),
        )

    @property
    def pending(self) -> int:
        """Number of events waiting in the outbox."""
        return len(self.outbox)

    def log_checkpoint(self, record: CheckpointRecord) -> str | None:
        """The checkpoint's LoggedModel id, or ``None`` when the event was queued."""
        return self._submit("checkpoint", record.model_dump(mode="json"))

    def log_merge(self, record: MergeRecord) -> str | None:
        """The merge's MLflow run id, or ``None`` when the event was queued."""
        return self._submit("merge", record.model_dump(mode="json"))

    def log_failed_merge(self, record: FailedMergeRecord) -> str | None:
        """The FAILED run recording a failed merge attempt, or ``None`` when queued."""
        return self._submit("failed_merge", record.model_dump(mode="json"))

    def sync(self, *, raise_on_outage: bool = False, retry_failed: bool = False) -> int:
        """Send queued events in order; returns how many were recorded.

        Stops at the first outage, leaving that event and the later ones queued (and raises
        :class:`TrackingUnavailable` if ``raise_on_outage``). ``retry_failed`` first puts events
        MLflow had rejected (parked in ``failed/``) back in the queue.
        """
        with self.outbox.locked():
            if retry_failed:
                self.outbox.requeue_failed()
            sent, outage = self._flush()
            if outage is None:
                self.outbox.clear_down()
            else:
                self.outbox.mark_down(self.tracking_uri)
        if outage is not None and raise_on_outage:
            raise TrackingUnavailable(
                f"MLflow at {self.tracking_uri} unreachable; {self.pending} events still queued: {outage}"
            ) from outage
        return sent

    def _apply(self, kind: str, payload: dict[str, Any]) -> str:
        handlers: dict[str, Callable[[dict[str, Any]], str]] = {
            "checkpoint": lambda p: self.writer.ensure_checkpoint(
                CheckpointRecord.model_validate(p)
            ),
            "merge": lambda p: self.writer.write_merge(MergeRecord.model_validate(p)),
            "failed_merge": lambda p: write_failed_merge(
                self.writer, FailedMergeRecord.model_validate(p)
            ),
        }
        return handlers[kind](payload)

    def _submit(self, kind: str, payload: dict[str, Any]) -> str | None:
        with self.outbox.locked():
            if self.outbox.down_within(
                self.outage_backoff_s, self.tracking_uri
            ):  # no call to a server just seen down
                self._queue(kind, payload, TrackingUnavailable(
                    f"down at the last attempt; next try after {self.outage_backoff_s:g} s"))  # fmt: skip
                return None
            _, outage = self._flush()
            if outage is not None:
                self.outbox.mark_down(self.tracking_uri)
                self._queue(kind, payload, outage)
                return None
            try:
                recorded = self._apply(kind, payload)
                self.outbox.clear_down()
                return recorded
            except Exception as exc:
                if is_outage(exc):
                    self.outbox.mark_down(self.tracking_uri)
                    self._queue(kind, payload, exc)
                else:
                    parked = self.outbox.fail(
                        QueuedEvent(self.outbox.put(kind, payload), kind, payload), repr(exc)
                    )
                    logger.exception("MLflow rejected %s event; parked at %s", kind, parked)
                return None

    def _queue(self, kind: str, payload: dict[str, Any], reason: BaseException) -> None:
        path = self.outbox.put(kind, payload)
        logger.warning(
            "MLflow at %s unavailable (%s); queued %s event as %s",
            self.tracking_uri,
            reason,
            kind,
            path.name,
        )

    def _flush(self) -> tuple[int, BaseException | None]:
        """Send queued events oldest first; stop at an outage. Caller holds the outbox lock."""
        sent = 0
        for event in self.outbox.iter_pending():
            try:
                mlflow_id = self._apply(event.kind, event.payload)
            except Exception as exc:
                if is_outage(exc):
                    return sent, exc
                parked = self.outbox.fail(event, repr(exc))
                logger.exception(
                    "MLflow rejected queued %s event; parked at %s", event.kind, parked
                )
                continue
            self.outbox.done(event)
            sent += 1
            if event.kind == "merge":
                self._record_run_id(int(event.payload["run_id"]), mlflow_id)
        return sent, None

    def _record_run_id(self, merge_run_id: int, mlflow_run_id: str) -> None:
        """Fill ``MergeRun.mlflow_run_id`` of a merge whose event was queued (best effort)."""
        if self.database_url is None:
            return
        from registry.db import make_engine, session_scope
        from registry.errors import RegistryError
        from registry.services.merge_run_states import set_mlflow_run_id

        engine = make_engine(self.database_url)
        try:
            with session_scope(engine) as session:
                set_mlflow_run_id(session=session, run_id=merge_run_id, mlflow_run_id=mlflow_run_id)
        except RegistryError as exc:  # the run was removed meanwhile: MLflow still has it
            logger.warning(
                "MLflow run %s not recorded on merge run %s: %s", mlflow_run_id, merge_run_id, exc
            )
        finally:
            engine.dispose()
