"""The embedded cron scheduler: fires cron policies while ``ckreg serve`` runs without Prefect server.

Each enabled cron policy fires at most once per tick when its next cron time (after its last
firing, or after the scheduler started) has passed. In server mode Prefect schedules the
policies' deployments instead (see ``flows.worker``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime

from flows.runtime import Runtime
from registry.models import MergeTrigger
from registry.services import policies as policy_service

log = logging.getLogger(__name__)


class CronScheduler:
    """Calls ``fire(policy_id)`` for every cron policy that is due, checked every ``tick_s``."""

    def __init__(
        self,
        runtime: Runtime,
        fire: Callable[[int], None],
        *,
        tick_s: float = 5.0,
        started: datetime | None = None,
    ) -> None:
        self._runtime = runtime
        self._fire = fire
        self._tick_s = tick_s
        self._started = started or datetime.now(UTC)
        self._last: dict[int, datetime] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self, now: datetime | None = None) -> list[int]:
        """Fire every due policy; returns the ids fired."""
        now = now or datetime.now(UTC)
        with self._runtime.session() as session:
            due = policy_service.list_policies(
                session=session, trigger=MergeTrigger.cron, enabled=True
            )
            schedule = [(p.id or 0, p.cron or "") for p in due]
        fired = []
        for policy_id, cron in schedule:
            last = self._last.get(policy_id, self._started)
            try:
                upcoming = policy_service.next_cron_time(cron, last)
            except ValueError:
                log.warning("policy %s: cron %r does not parse; skipped", policy_id, cron)
                continue
            if upcoming <= now:
                self._last[policy_id] = now
                self._fire(policy_id)
                fired.append(policy_id)
        return fired

    def start(self) -> None:
        """Run ``tick`` in a daemon thread until ``stop``."""
        self._thread = threading.Thread(target=self._loop, name="ckreg-cron", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self._tick_s):
            try:
                self.tick()
            except Exception:  # keep scheduling even if one tick fails (e.g. DB hiccup)
                log.exception("cron scheduler tick failed")
