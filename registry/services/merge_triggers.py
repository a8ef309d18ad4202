"""Which merge runs a checkpoint's registration triggered, and which are still to be planned.

An on_register policy plans its run when the checkpoint's ready event is handled — after
``complete`` has answered. ``ckreg register`` asks here to print (and ``--wait`` for) the runs
its checkpoint set off: the runs that take it as an input, plus the policies whose current
selection takes it but whose run does not exist yet.
"""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel
from sqlmodel import Session, select

from registry.models import Checkpoint, MergePolicy, MergeRun
from registry.services import merge_runs as run_service
from registry.services import policies as policy_service
from registry.services.common import load_checkpoint
from registry.services.policy_rules import Window, min_inputs, parse_selector


class PolicyRef(BaseModel):
    id: int
    name: str


class MergeTriggers(BaseModel):
    """``runs``: merge runs taking the checkpoint as input, newest first; ``waiting``: on_register
    policies that will take it but whose run is not planned yet."""

    checkpoint_id: int
    runs: list[run_service.MergeRunPublic]
    waiting: list[PolicyRef]


def merge_triggers(*, session: Session, checkpoint_id: int) -> MergeTriggers:
    """The runs ``checkpoint_id`` takes part in and the policies still to plan one with it."""
    checkpoint = load_checkpoint(session, checkpoint_id)
    runs, _ = run_service.list_merge_runs(
        session=session, input_checkpoint_id=checkpoint_id, limit=1000
    )
    waiting = [
        PolicyRef(id=policy.id or 0, name=policy.name)
        for policy in policy_service.matching_policies(session=session, checkpoint=checkpoint)
        if _run_expected(session, policy, checkpoint)
    ]
    return MergeTriggers(
        checkpoint_id=checkpoint_id,
        runs=[run_service.to_public(session=session, run=run) for run in runs],
        waiting=waiting,
    )


def _run_expected(session: Session, policy: MergePolicy, checkpoint: Checkpoint) -> bool:
    """True when the policy's selection now takes ``checkpoint`` but its run does not exist."""
    if checkpoint.ready_at is None or _utc(checkpoint.ready_at) < _utc(policy.created_at):
        return False  # registered before the policy existed: its event did not trigger it
    selector = parse_selector(policy.selector)
    folded: list[int] = []
    if selector.window == Window.all_since_last_fold:
        folded = run_service.folded_checkpoint_ids(session=session, policy_id=policy.id or 0)
    chosen = policy_service.select_inputs(session=session, selector=selector, folded=folded)
    if checkpoint.id not in {c.id for c in chosen} or len(chosen) < min_inputs(policy.method):
        return False
    request = run_service.MergeRequest(
        method=policy.method,
        params=policy.params,
        base_id=selector.base_id,
        inputs=[run_service.MergeInputSpec(checkpoint_id=c.id or 0) for c in chosen],
        evaluator=policy.evaluator,
    )
    key = run_service.idempotency_key(request=request, policy_id=policy.id)
    return session.exec(select(MergeRun.id).where(MergeRun.idempotency_key == key)).first() is None


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
