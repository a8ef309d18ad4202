"""The merge flow's GPU slot, given back at once when the flow that held it died.

Server mode allows one merge per GPU across every worker with a Prefect global concurrency
limit (``ckreg-merge-gpu``). Prefect holds each acquired slot under a lease of at least 60 s,
renewed by a thread of the holding process; a flow killed with its worker's process group
(``kill -9`` of the group) cannot release it, and Prefect's repossessor frees it only after
the lease ran out (60 s, plus up to its 15 s loop): every merge waited that long.

So the flow records its slot's lease id on its own Prefect flow run (label
``ckreg.gpu-lease``), and the worker that takes over a merge run whose owner died
(``release_dead_attempts``, from the recovery sweep) releases that lease and marks the dead
flow run CRASHED (Prefect would show it RUNNING forever). Only owners known dead are handled
(``registry.services.leases.owner_is_dead``: a process on this host that no longer runs); a
slot of a flow on another host still waits for Prefect's lease.

Prefect's public ``concurrency()`` context manager does not expose the lease id; this module
uses the same steps from ``prefect.concurrency`` (pinned ``prefect==3.8.8``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from uuid import UUID

from sqlalchemy import select
from sqlmodel import Session, col

from registry.models import MergeRun
from registry.services import leases

log = logging.getLogger(__name__)

LEASE_LABEL = "ckreg.gpu-lease"
#: Prefect's shortest slot lease (its API refuses less); renewed every 45 s while held.
SLOT_LEASE_S = 60.0


@contextlib.contextmanager
def hold(limit: str, flow_run_id: str | None) -> Iterator[None]:
    """Hold one slot of global concurrency limit ``limit`` while in the block (a no-op without a
    Prefect server or when the limit does not exist); its lease id is recorded on
    ``flow_run_id``."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():  # embedded: one merge thread serialises merges already
        yield
        return
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.concurrency._leases import maintain_concurrency_lease
    from prefect.concurrency._sync import acquire_concurrency_slots_with_lease

    holder = ConcurrencyLeaseHolder(type="flow_run", id=UUID(flow_run_id)) if flow_run_id else None
    acquired = acquire_concurrency_slots_with_lease(
        [limit], 1, lease_duration=SLOT_LEASE_S, strict=False, holder=holder
    )
    if not acquired.limits:  # Prefect logged that the limit does not exist
        yield
        return
    lease_id = acquired.lease_id
    if flow_run_id:
        _record_lease(flow_run_id, lease_id)
    try:
        with maintain_concurrency_lease(lease_id, SLOT_LEASE_S):
            yield
    finally:
        _release_lease(lease_id)


def _record_lease(flow_run_id: str, lease_id: UUID) -> None:
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run_labels(UUID(flow_run_id), {LEASE_LABEL: str(lease_id)})
    except Exception:  # only costs a slower takeover should this flow die
        log.warning("could not record GPU slot lease %s on flow run %s", lease_id, flow_run_id)


def _release_lease(lease_id: UUID) -> None:
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            client.release_concurrency_slots_with_lease(lease_id=lease_id)
    except Exception:  # Prefect frees it when the lease runs out
        log.warning("could not release GPU slot lease %s; Prefect frees it in 60 s", lease_id)


def dead_attempts(session: Session) -> dict[int, str]:
    """Unfinished merge runs whose lease owner is known dead: run id -> the dead attempt's
    Prefect flow run id. Read before the sweep re-queues them (which keeps the flow run id
    until the next claim)."""
    rows = session.execute(
        select(
            col(MergeRun.id), col(MergeRun.lease_owner), col(MergeRun.orchestration_run_id)
        ).where(
            col(MergeRun.status).in_(leases.UNFINISHED),
            col(MergeRun.lease_owner).is_not(None),
            col(MergeRun.orchestration_run_id).is_not(None),
        )
    ).all()
    session.rollback()
    return {
        int(run_id): str(flow_run_id)
        for run_id, owner, flow_run_id in rows
        if leases.owner_is_dead(owner)
    }


def release_dead_attempt(flow_run_id: str, run_id: int) -> bool:
    """Release the GPU slot the dead flow run ``flow_run_id`` held and mark it CRASHED unless it
    reached a final state; returns whether a slot lease was released."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(UUID(flow_run_id))
        lease = flow_run.labels.get(LEASE_LABEL)
        if lease:
            client.release_concurrency_slots_with_lease(lease_id=UUID(str(lease)))
        if flow_run.state is None or not flow_run.state.is_final():
            message = f"its process died; merge run {run_id} was taken over by another attempt"
            client.set_flow_run_state(flow_run.id, Crashed(message=message), force=True)
    return bool(lease)


def release_dead_attempts(dead: dict[int, str], run_ids: list[int]) -> None:
    """``release_dead_attempt`` for each of ``run_ids`` found in ``dead``; never raises."""
    for run_id in run_ids:
        if run_id not in dead:
            continue
        try:
            if release_dead_attempt(dead[run_id], run_id):
                log.warning("merge run %s: released the GPU slot of its dead attempt", run_id)
        except Exception:
            log.exception("merge run %s: could not clean up its dead flow run", run_id)
