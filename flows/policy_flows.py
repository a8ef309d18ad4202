"""Policy-driven flows: ``on_checkpoint_ready`` (on_register policies) and ``sequential_merge``.

``sequential_merge(policy_id)`` runs a policy now — scheduled by cron or asked for manually.
With a continual method (OPCM, the default for folding) and window ``all_since_last_fold`` it
folds the checkpoints that arrived since the last fold, resuming from the stored merge state.
``missed_policy_runs`` catches up on_register policies whose ``ckreg.checkpoint.ready`` event
was lost with a killed worker.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from prefect import flow
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from flows.merge_flow import in_background, merge_checkpoints, track_checkpoint
from flows.runtime import current_runtime
from registry.models import MergePolicy, MergeRun, MergeTrigger, utcnow
from registry.services import merge_runs as run_service
from registry.services import policies as policy_service
from registry.services.common import load_checkpoint
from registry.services.mergekit_policies import template_request
from registry.services.policy_rules import Window, min_inputs, parse_selector

log = logging.getLogger(__name__)


def _plan(policy_id: int) -> int | None:
    """The id of a run to launch for the policy now, or None (nothing new / already done)."""
    with current_runtime().session() as session:
        planned = policy_service.plan_policy_run(session=session, policy_id=policy_id)
    if planned is None:
        return None
    run, launch = planned
    return run.id if launch else None


@flow(name="on_checkpoint_ready", persist_result=False)
def on_checkpoint_ready(checkpoint_id: int) -> list[int]:
    """Log the new checkpoint to MLflow, then run every enabled on_register policy that covers
    it; returns run ids."""
    in_background(track_checkpoint, checkpoint_id)
    with current_runtime().session() as session:
        checkpoint = load_checkpoint(session, checkpoint_id)
        policy_ids = [
            p.id or 0
            for p in policy_service.matching_policies(session=session, checkpoint=checkpoint)
        ]
    started: list[int] = []
    for policy_id in policy_ids:
        run_id = _plan(policy_id)
        if run_id is None:
            continue
        started.append(run_id)
        try:
            merge_checkpoints(run_id)
        except Exception:  # one policy's failure must not stop the others (run is marked failed)
            log.exception("merge run %s of policy %s failed", run_id, policy_id)
    return started


@flow(name="sequential_merge", persist_result=False)
def sequential_merge(policy_id: int) -> int | None:
    """Run policy ``policy_id`` now; returns the merged checkpoint's id (None if nothing to do)."""
    run_id = _plan(policy_id)
    if run_id is None:
        return None
    return merge_checkpoints(run_id)


def missed_policy_runs(*, session: Session, settle_s: float) -> list[int]:
    """Create the run each enabled on_register policy asks for now, where none exists yet.

    An on_register policy's run is planned when a checkpoint's ready event is handled; a
    worker killed before it planned loses that event. Planning again from the current
    selection gives the run the newest event would have made. Only selections whose newest
    checkpoint became ready more than ``settle_s`` ago count (younger events are still being
    handled). Runs that exist already (also failed ones: they are not retried here) are left
    alone. Returns the ids of new runs.
    """
    created: list[int] = []
    policies = policy_service.list_policies(
        session=session, trigger=MergeTrigger.on_register, enabled=True
    )
    for policy in policies:
        request = _current_request(session, policy, settle_s)
        if request is None:
            continue
        key = run_service.idempotency_key(request=request, policy_id=policy.id)
        if session.exec(select(MergeRun.id).where(MergeRun.idempotency_key == key)).first():
            continue
        try:
            run, launch = run_service.create_merge_run(
                session=session, request=request, policy_id=policy.id
            )
        except IntegrityError:  # another worker created it a moment ago
            session.rollback()
            continue
        if launch:  # else another worker created it since the check above
            created.append(run.id or 0)
    return created


def _current_request(
    session: Session, policy: MergePolicy, settle_s: float
) -> run_service.MergeRequest | None:
    """The request ``plan_policy_run`` would make for the policy now; None with too few inputs
    or when its newest input is not older than ``settle_s`` or than the policy."""
    selector = parse_selector(policy.selector)
    folded: list[int] = []
    if selector.window == Window.all_since_last_fold:
        folded = run_service.folded_checkpoint_ids(session=session, policy_id=policy.id or 0)
    chosen = policy_service.select_inputs(session=session, selector=selector, folded=folded)
    if len(chosen) < min_inputs(policy.method):
        return None
    # Only a registration after the policy existed triggers it (as its event would have).
    newest = max((c.ready_at for c in chosen if c.ready_at is not None), default=None)
    settled = utcnow() - timedelta(seconds=settle_s)
    if newest is None or _utc(newest) < _utc(policy.created_at) or _utc(newest) > settled:
        return None
    return template_request(
        policy=policy, chosen=chosen, base_id=selector.base_id
    ) or run_service.MergeRequest(
        method=policy.method,
        params=policy.params,
        base_id=selector.base_id,
        inputs=[run_service.MergeInputSpec(checkpoint_id=c.id or 0) for c in chosen],
        evaluator=policy.evaluator,
    )


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
