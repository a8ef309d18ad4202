"""Launchers the registry calls to start work: in-process (embedded) or via a Prefect server.

``EmbeddedLauncher`` runs the flows in this process on one background worker thread (so one
merge at a time), with Prefect's ephemeral API instead of a server; at start-up and every
``CKREG_RECOVERY_SWEEP_S`` it sweeps for work a crash lost (``recovery_sweep``). ``ServerLauncher`` emits
``ckreg.checkpoint.ready`` events and starts deployments served by ``ckreg worker``.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from flows.runtime import Runtime, configure
from flows.scheduler import CronScheduler
from registry.services import leases, recovery
from registry.settings import Settings

log = logging.getLogger(__name__)

READY_EVENT = "ckreg.checkpoint.ready"
MERGE_DEPLOYMENT = "merge_checkpoints/ckreg-merge"
POLICY_DEPLOYMENT = "sequential_merge/ckreg-policy"
SEARCH_DEPLOYMENT = "merge_search/ckreg-search"

Job = tuple[Literal["ready", "merge", "policy", "warmup", "sweep", "search"], int]
AT_START = 1  # the object id of the start-up sweep job (periodic sweeps: 0)
EPHEMERAL_TIMEOUT_VAR = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
EPHEMERAL_TIMEOUT_S = 300


def recovery_sweep(runtime: Runtime, *, started_s_ago: float | None = None) -> list[int]:
    """Find work a crash lost; returns the merge runs to (re-)run.

    Merge runs whose owner died or whose lease expired; on_register runs whose ready event was
    lost (planned from the current selection, as the event would have); checkpoints pending past
    ``CKREG_PENDING_TTL_S`` (failed, blobs released to gc); files an interrupted ``complete``
    never compressed. Periodic sweeps leave runs and checkpoints younger than the claim grace
    alone. The start-up sweep passes ``started_s_ago``, how long ago this process started: what
    is older was lost with the last process, what is younger is this process's own (a request
    answered before the sweep ran queued its run behind it) and is left alone.
    """
    from flows.policy_flows import missed_policy_runs  # imports Prefect: only when sweeping

    settings = runtime.settings
    settle_s = settings.merge_claim_grace_s if started_s_ago is None else started_s_ago
    with runtime.session() as session:
        run_ids = leases.reclaim_stale_runs(session=session, claim_grace_s=settle_s)
        run_ids += missed_policy_runs(session=session, settle_s=settle_s)
    recover_checkpoints(runtime, started_s_ago=started_s_ago)
    return run_ids


def recover_checkpoints(runtime: Runtime, *, started_s_ago: float | None = None) -> None:
    """Fail checkpoints pending past ``CKREG_PENDING_TTL_S`` and compress what an interrupted
    ``complete`` left raw. Periodic sweeps compress only checkpoints ready for longer than the
    TTL (a large file may still be compressing in the request that completed it); the start-up
    sweep, those ready before this process started ``started_s_ago`` seconds ago."""
    settings = runtime.settings
    with runtime.session() as session:
        recovery.fail_stale_pending(
            session=session, store=runtime.store, ttl_s=settings.pending_ttl_s
        )
        recovery.resume_compression(
            session=session,
            store=runtime.store,
            settings=settings,
            settle_s=settings.pending_ttl_s if started_s_ago is None else started_s_ago,
        )


class EmbeddedLauncher:
    """Runs flows in-process on a background worker thread fed by a queue."""

    def __init__(
        self,
        settings: Settings,
        *,
        cron: bool = True,
        recover: bool = True,
        cron_tick_s: float = 5.0,
    ) -> None:
        self.runtime = configure(settings)
        if self.runtime.background is None:  # MLflow logging must not delay the next merge
            self.runtime.background = ThreadPoolExecutor(1, thread_name_prefix="ckreg-tracking")
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="ckreg-flows", daemon=True)
        self.scheduler = (
            CronScheduler(self.runtime, self.policy_due, tick_s=cron_tick_s) if cron else None
        )
        self._recover = recover
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_timer, name="ckreg-sweep", daemon=True)
        self.errors: list[str] = []
        self._started = time.monotonic()

    # ---- Launcher protocol ---------------------------------------------------------------
    def checkpoint_ready(self, checkpoint_id: int) -> None:
        self._jobs.put(("ready", checkpoint_id))

    def merge_requested(self, run_id: int) -> None:
        self._jobs.put(("merge", run_id))

    def search_requested(self, search_id: int) -> None:
        self._jobs.put(("search", search_id))  # on the flow thread: merges wait behind it

    def policy_due(self, policy_id: int) -> None:
        """Run a cron or manual policy (used by the scheduler)."""
        self._jobs.put(("policy", policy_id))

    # ---- lifecycle -----------------------------------------------------------------------
    def start(self) -> EmbeddedLauncher:
        """Start the worker (and cron scheduler); recover what a previous process left.

        A run still leased by a live process (another server on the same database) is left to
        it; one whose owner died (or whose lease expired) is taken over. With ``recover`` the
        start-up sweep runs first and the periodic one every ``CKREG_RECOVERY_SWEEP_S``.
        """
        self._started = time.monotonic()
        self._jobs.put(("warmup", 0))
        if self._recover:  # first in the queue, off the caller's thread (it imports Prefect)
            self._jobs.put(("sweep", AT_START))
            self._sweeper.start()
        self._thread.start()
        if self.scheduler is not None:
            self.scheduler.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self.scheduler is not None:
            self.scheduler.stop()
        self._jobs.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until every queued job finished; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._jobs.unfinished_tasks == 0:
                return True
            time.sleep(0.05)
        return False

    def _sweep_timer(self) -> None:
        """Queue a sweep every ``recovery_sweep_s`` while the worker is idle: queued behind other
        jobs it would find their runs unclaimed and queue them twice."""
        while not self._stop.wait(self.runtime.settings.recovery_sweep_s):
            if self._jobs.unfinished_tasks == 0:
                self._jobs.put(("sweep", 0))

    def _work(self) -> None:
        # In-process flows cannot crash apart from this process: skip flow-run heartbeats,
        # whose thread costs up to a second per flow run at exit.
        from prefect.settings import (
            PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
            PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
            temporary_settings,
        )

        updates: dict[Any, Any] = {PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
        # Prefect's 20 s for its API subprocess to start is too short on a loaded machine (38 s
        # measured at load 16 on 2 cores): the warm-up failed and every flow after it.
        if EPHEMERAL_TIMEOUT_VAR not in os.environ:
            updates[PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS] = EPHEMERAL_TIMEOUT_S
        with temporary_settings(updates=updates):
            self._drain()

    def _drain(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                self._run(*job)
            except Exception as exc:  # a failed job must not stop the worker
                log.exception("embedded flow job %s failed", job)
                self.errors.append(f"{job}: {exc}")
            finally:
                self._jobs.task_done()

    def _run(self, kind: str, object_id: int) -> None:
        from flows import pipelines

        if kind == "warmup":
            pipelines.warm_up()
        elif kind == "ready":
            checkpoint_ready_job(object_id)
        elif kind == "merge":
            pipelines.merge_checkpoints(object_id)
        elif kind == "policy":
            pipelines.sequential_merge(object_id)
        elif kind == "search":
            pipelines.merge_search(object_id)
        elif kind == "sweep":
            started_s_ago = time.monotonic() - self._started if object_id == AT_START else None
            for run_id in recovery_sweep(self.runtime, started_s_ago=started_s_ago):
                self._jobs.put(("merge", run_id))
            for search_id in pipelines.stale_searches(self.runtime, settle_s=started_s_ago):
                self._jobs.put(("search", search_id))


def checkpoint_ready_job(checkpoint_id: int) -> None:
    """A ready checkpoint, embedded: the ``on_checkpoint_ready`` flow when an enabled
    on_register policy covers it (or it is gone: the flow reports that); else only its MLflow
    logging, in the background, as the flow would. A Prefect flow run with nothing to merge
    cost ~115 ms of CPU per checkpoint here and in Prefect's API subprocess
    (``bench.registry_load``), three times what registering it took."""
    from flows import pipelines
    from flows.merge_flow import in_background, track_checkpoint
    from flows.runtime import current_runtime
    from registry.models import Checkpoint
    from registry.services.policies import matching_policies

    with current_runtime().session() as session:
        checkpoint = session.get(Checkpoint, checkpoint_id)
        covered = checkpoint is None or bool(
            matching_policies(session=session, checkpoint=checkpoint)
        )
    if covered:
        pipelines.on_checkpoint_ready(checkpoint_id)
    else:
        in_background(track_checkpoint, checkpoint_id)


def run_tag(run_id: int) -> str:
    """The tag of the flow runs submitted for merge run ``run_id``."""
    return f"ckreg-merge-run-{run_id}"


def submit_merge(run_id: int) -> None:
    """Start the ``ckreg-merge`` deployment for merge run ``run_id`` (any worker picks it up)."""
    from prefect.deployments import run_deployment

    run_deployment(
        MERGE_DEPLOYMENT, parameters={"run_id": run_id}, timeout=0, tags=[run_tag(run_id)]
    )


class ServerLauncher:
    """Hands work to a Prefect server: events for new checkpoints, deployment runs for merges."""

    def checkpoint_ready(self, checkpoint_id: int) -> None:
        from prefect.events import emit_event

        emit_event(
            event=READY_EVENT,
            resource={"prefect.resource.id": f"ckreg.checkpoint.{checkpoint_id}"},
            payload={"checkpoint_id": checkpoint_id},
        )

    def merge_requested(self, run_id: int) -> None:
        submit_merge(run_id)

    def search_requested(self, search_id: int) -> None:
        from prefect.deployments import run_deployment

        run_deployment(SEARCH_DEPLOYMENT, parameters={"search_id": search_id}, timeout=0)

    def policy_due(self, policy_id: int) -> None:
        from prefect.deployments import run_deployment

        run_deployment(POLICY_DEPLOYMENT, parameters={"policy_id": policy_id}, timeout=0)
