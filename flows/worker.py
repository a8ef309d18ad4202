"""Server mode: serve ckreg's flows as Prefect deployments (``ckreg worker``).

* ``on_checkpoint_ready`` runs on every ``ckreg.checkpoint.ready`` event (a DeploymentEventTrigger);
* ``merge_checkpoints`` runs merge runs queued over REST (``POST /merges``, manual policy runs);
* ``sequential_merge`` runs each enabled cron policy on its schedule: one schedule per policy
  (slug ``ckreg-policy-<id>``, parameter ``policy_id``) on the ``ckreg-policy`` deployment,
  kept in step with the policies table while the worker runs;
* a global concurrency limit (``ckreg-merge-gpu``) allows one merge per GPU at a time.
"""

from __future__ import annotations

import logging
import threading
import time

from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

from flows.launchers import MERGE_DEPLOYMENT, POLICY_DEPLOYMENT, READY_EVENT
from flows.merge_flow import GPU_LIMIT
from flows.pipelines import evaluate, merge_checkpoints, on_checkpoint_ready, sequential_merge
from flows.runtime import Runtime
from registry.models import MergeTrigger
from registry.services import merge_runs as run_service
from registry.services import policies as policy_service

log = logging.getLogger(__name__)


def gpu_slots() -> int:
    """One merge slot per visible GPU (one on a CPU-only machine)."""
    import torch

    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


def ensure_concurrency_limit(slots: int | None = None) -> None:
    """Create or update the global concurrency limit the merge flow acquires."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(GPU_LIMIT, limit=slots or gpu_slots())


def ready_trigger() -> DeploymentEventTrigger:
    """Run ``on_checkpoint_ready`` with the event's checkpoint id."""
    return DeploymentEventTrigger(
        name="ckreg-checkpoint-ready",
        expect={READY_EVENT},
        match={"prefect.resource.id": "ckreg.checkpoint.*"},
        parameters={"checkpoint_id": "{{ event.payload.checkpoint_id }}"},
    )


def build_deployments() -> list:
    """The deployments ``ckreg worker`` serves."""
    return [
        merge_checkpoints.to_deployment("ckreg-merge"),
        on_checkpoint_ready.to_deployment("ckreg-on-ready", triggers=[ready_trigger()]),
        sequential_merge.to_deployment("ckreg-policy"),
        evaluate.to_deployment("ckreg-evaluate"),
    ]


def sync_cron_schedules(runtime: Runtime) -> list[str]:
    """Make the ``ckreg-policy`` deployment's schedules match the enabled cron policies.

    Returns the slugs of the schedules now in place.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import CronSchedule

    with runtime.session() as session:
        policies = policy_service.list_policies(
            session=session, trigger=MergeTrigger.cron, enabled=True
        )
        wanted = {f"ckreg-policy-{p.id}": (p.id, p.cron or "") for p in policies}
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(POLICY_DEPLOYMENT)
        current = {
            s.slug: s
            for s in client.read_deployment_schedules(deployment.id)
            if s.slug and s.slug.startswith("ckreg-policy-")
        }
        for slug, schedule in current.items():
            if slug not in wanted or getattr(schedule.schedule, "cron", None) != wanted[slug][1]:
                client.delete_deployment_schedule(deployment.id, schedule.id)
        missing = [
            DeploymentScheduleCreate(
                schedule=CronSchedule(cron=cron, timezone="UTC"),
                active=True,
                parameters={"policy_id": policy_id},
                slug=slug,
            )
            for slug, (policy_id, cron) in wanted.items()
            if slug not in current or getattr(current[slug].schedule, "cron", None) != cron
        ]
        if missing:
            client.create_deployment_schedules(deployment.id, missing)
    return sorted(wanted)


def recover_unfinished(runtime: Runtime) -> list[int]:
    """Re-submit merge runs a killed worker left queued or running; returns their ids.

    Assumes this worker is the only one serving ``merge_checkpoints`` (one-machine setups):
    a run still marked running cannot be executing while the worker is starting.
    """
    from prefect.deployments import run_deployment

    with runtime.session() as session:
        unfinished = [run.id or 0 for run in run_service.unfinished_merge_runs(session=session)]
    for run_id in unfinished:
        run_deployment(MERGE_DEPLOYMENT, parameters={"run_id": run_id}, timeout=0)
    return unfinished


def serve_worker(
    runtime: Runtime, *, limit: int | None = None, recover: bool = True, sync_every_s: float = 30.0
) -> None:
    """Register the deployments and execute their runs until interrupted.

    A background thread re-submits runs a killed worker left unfinished (once, at start) and
    keeps the cron policies' schedules in step with the database (every ``sync_every_s``).
    """
    from prefect import serve

    ensure_concurrency_limit()
    stop = threading.Event()
    thread = threading.Thread(
        target=_housekeeping,
        args=(runtime, recover, sync_every_s, stop),
        name="ckreg-worker-housekeeping",
        daemon=True,
    )
    thread.start()
    try:
        # Poll for new flow runs every second (Prefect's default is 10 s): merges triggered by
        # events should start promptly.
        serve(*build_deployments(), limit=limit, print_starting_message=True, query_seconds=1)
    finally:
        stop.set()


def _housekeeping(runtime: Runtime, recover: bool, every_s: float, stop: threading.Event) -> None:
    # serve() registers the deployments first; wait for them before touching their runs.
    if _wait_for_deployments(stop) and recover:
        try:
            ids = recover_unfinished(runtime)
            if ids:
                log.warning("re-submitted unfinished merge runs %s", ids)
        except Exception:
            log.exception("could not re-submit unfinished merge runs")
    while not stop.is_set():
        try:
            sync_cron_schedules(runtime)
        except Exception:
            log.exception("could not sync cron policy schedules")
        stop.wait(every_s)


def _wait_for_deployments(stop: threading.Event, timeout_s: float = 120.0) -> bool:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout_s
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            with get_client(sync_client=True) as client:
                client.read_deployment_by_name(MERGE_DEPLOYMENT)
                client.read_deployment_by_name(POLICY_DEPLOYMENT)
            return True
        except Exception:
            stop.wait(0.5)
    return False
