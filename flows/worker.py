"""Server mode: serve ckreg's flows as Prefect deployments (``ckreg worker``).

* ``on_checkpoint_ready`` runs on every ``ckreg.checkpoint.ready`` event (a DeploymentEventTrigger);
* ``merge_checkpoints`` runs merge runs queued over REST (``POST /merges``, manual policy runs);
* ``sequential_merge`` runs each enabled cron policy on its schedule: one schedule per policy
  (slug ``ckreg-policy-<id>``, parameter ``policy_id``) on the ``ckreg-policy`` deployment,
  kept in step with the policies table while the worker runs;
* a global concurrency limit (``ckreg-merge-gpu``) allows one merge per GPU at a time, across
  every worker on the Prefect server.

Any number of workers may serve the same deployments: each merge run is claimed with a lease in
the database (``registry.services.leases``) and its output adopted only under that lease. Each
worker sweeps for runs whose lease expired (or whose owner died) and re-submits them, plans
on_register runs whose ready event was lost with a killed worker, and fails checkpoints pending
past ``CKREG_PENDING_TTL_S`` (``flows.launchers.recover_checkpoints``).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
from prefect.runner import Runner

from flows import gpu_slot, processes
from flows.launchers import (
    MERGE_DEPLOYMENT,
    POLICY_DEPLOYMENT,
    READY_EVENT,
    ServerLauncher,
    recover_checkpoints,
    run_tag,
    submit_merge,
)
from flows.merge_flow import GPU_LIMIT
from flows.pipelines import (
    evaluate,
    merge_checkpoints,
    merge_search,
    on_checkpoint_ready,
    sequential_merge,
    stale_searches,
)
from flows.policy_flows import missed_policy_runs
from flows.runtime import Runtime
from registry.models import MergeTrigger
from registry.services import leases
from registry.services import policies as policy_service

log = logging.getLogger(__name__)


def gpu_slots() -> int:
    """One merge slot per visible GPU (one on a CPU-only machine)."""
    import torch

    return max(1, torch.cuda.device_count()) if torch.cuda.is_available() else 1


class PrefectUnreachable(RuntimeError):
    """The Prefect API did not answer within the time a worker waits for it at start."""


def wait_for_prefect_api(timeout_s: float, *, poll_s: float = 2.0) -> None:
    """Return once the Prefect API (``PREFECT_API_URL``) answers its health check.

    Workers often start before their server (a compose file, a reboot): instead of failing on
    the first refused connection, wait up to ``timeout_s`` seconds, saying once what it waits
    for. Raises ``PrefectUnreachable`` after that; SIGTERM / SIGINT stop the wait at once.
    """
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout_s
    said = False
    while True:
        with get_client(sync_client=True) as client:
            url = str(client.api_url)
            error = client.api_healthcheck()
        if error is None:
            if said:
                log.warning("the Prefect API at %s answers", url)
            return
        left = deadline - time.monotonic()
        reason = f"{type(error).__name__}: {error}"
        if left <= 0:
            raise PrefectUnreachable(
                f"the Prefect API at {url} did not answer within {timeout_s:g} s ({reason}); "
                "is the Prefect server running, and is PREFECT_API_URL right?"
            )
        if not said:
            log.warning(
                "the Prefect API at %s does not answer (%s); waiting up to %g s for it",
                url,
                reason,
                timeout_s,
            )
            said = True
        time.sleep(min(poll_s, left))


def ensure_concurrency_limit(slots: int | None = None) -> None:
    """Create or update the global concurrency limit the merge flow acquires.

    Workers starting together race to create it; the loser updates the winner's instead.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.upsert_global_concurrency_limit_by_name(GPU_LIMIT, limit=slots or gpu_slots())
        except ObjectAlreadyExists:
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
        merge_search.to_deployment("ckreg-search"),
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


def recover_runs(runtime: Runtime) -> list[int]:
    """One recovery sweep: re-submit stale merge runs and missed on_register runs.

    Stale: queued or running, but the lease expired, its owner died, or nobody claimed it
    within ``CKREG_MERGE_CLAIM_GRACE_S``. A dead owner's GPU slot is released and its Prefect
    flow run marked CRASHED first (``flows.gpu_slot``). Of many sweeping workers exactly one
    re-submits each run; not while an earlier submission still waits for a worker (busy
    workers would otherwise pile up flow runs). Returns the re-submitted run ids.
    """
    waiting = _waiting_submissions()
    with runtime.session() as session:
        dead = gpu_slot.dead_attempts(session)
        run_ids = leases.reclaim_stale_runs(
            session=session, claim_grace_s=runtime.settings.merge_claim_grace_s
        )
        run_ids += missed_policy_runs(
            session=session, settle_s=runtime.settings.merge_claim_grace_s
        )
    # A flow killed with its worker's process group kept its GPU slot and shows RUNNING:
    # free the slot before the run goes back, so its next attempt does not wait Prefect's 60 s.
    gpu_slot.release_dead_attempts(dead, run_ids)
    run_ids = [run_id for run_id in run_ids if run_tag(run_id) not in waiting]
    for run_id in run_ids:
        submit_merge(run_id)
    for search_id in stale_searches(runtime):  # their worker died
        ServerLauncher().search_requested(search_id)
    return run_ids


def _waiting_submissions() -> set[str]:
    """Tags of merge flow runs submitted but not picked up by any worker yet."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    scheduled = FlowRunFilter(
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))
    )
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=scheduled, sort=FlowRunSort.ID_DESC, limit=200)
    return {tag for run in runs for tag in run.tags if tag.startswith("ckreg-merge-run-")}


def sweep_interval_s(lease_s: float) -> float:
    """How often a worker sweeps: a third of the lease, between 0.5 s and 15 s."""
    return min(15.0, max(0.5, lease_s / 3))


def serve_worker(
    runtime: Runtime,
    *,
    limit: int | None = None,
    recover: bool = True,
    sync_every_s: float = 30.0,
    api_wait_s: float = 120.0,
) -> None:
    """Register the deployments and execute their runs until interrupted.

    First waits up to ``api_wait_s`` for the Prefect API (``wait_for_prefect_api``).
    Background threads keep the cron policies' schedules in step with the database (every
    ``sync_every_s``) and, with ``recover``, sweep for runs to recover (``recover_runs``).
    SIGTERM and SIGINT stop it within seconds even while the Prefect API is unreachable
    (``flows.processes.handle_stop_signal``).
    """
    wait_for_prefect_api(api_wait_s)
    ensure_concurrency_limit()
    stop = threading.Event()
    jobs = [(_sync_schedules, sync_every_s)]
    if recover:
        jobs.append((_recover, sweep_interval_s(runtime.settings.merge_lease_s)))
    for job, every_s in jobs:
        threading.Thread(
            target=_repeat,
            args=(job, runtime, every_s, stop),
            name=f"ckreg-worker{job.__name__}",
            daemon=True,
        ).start()
    runner = build_runner(limit)
    try:
        asyncio.run(runner.start())
    except KeyboardInterrupt:
        log.warning("interrupted: worker stopped")
    finally:
        stop.set()


class WorkerRunner(Runner):
    """Prefect's runner, but SIGTERM stops the worker the way ``ckreg`` stops (a deadline, its
    children stopped) instead of Prefect's graceful stop, which waits on the API."""

    def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:
        processes.handle_stop_signal(signal.SIGTERM)


def build_runner(limit: int | None = None) -> WorkerRunner:
    """The runner serving ``build_deployments()``.

    Its schedules stay active when it stops (other workers serve the same deployments: Prefect's
    default pauses them for everyone); it polls for new flow runs every second (Prefect's
    default is 10 s), so merges triggered by events start promptly.
    """
    runner = WorkerRunner(pause_on_shutdown=False, limit=limit, query_seconds=1)
    deployments = build_deployments()
    for deployment in deployments:
        runner.add_deployment(deployment)
    print(f"serving deployments {', '.join(d.name for d in deployments)}", flush=True)
    return runner


def _repeat(
    job: Callable[[Runtime], None], runtime: Runtime, every_s: float, stop: threading.Event
) -> None:
    # serve() registers the deployments first; wait for them before touching their runs.
    if not _wait_for_deployments(stop):
        return
    while not stop.is_set():
        job(runtime)
        stop.wait(every_s)


def _sync_schedules(runtime: Runtime) -> None:
    try:
        sync_cron_schedules(runtime)
    except Exception:
        log.exception("could not sync cron policy schedules")


def _recover(runtime: Runtime) -> None:
    try:
        ids = recover_runs(runtime)
        if ids:
            log.warning("re-submitted merge runs %s", ids)
    except Exception:
        log.exception("could not re-submit merge runs")
    try:  # as the embedded sweep: stale pending checkpoints, compression a crash skipped
        recover_checkpoints(runtime)
    except Exception:
        log.exception("could not recover stale checkpoints")


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
