"""Merge policies: storage, and input selection and planning for a policy's runs.

A policy says *what* to merge (a selector over registered checkpoints), *how* (a mergeops
method and its params), *when* (a trigger) and how to score the result (an evaluator).
The checks a policy must pass, and the selector model, live in ``registry.services.policy_rules``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from cronsim import CronSim
from sqlmodel import Session, col, select

from registry.errors import InvalidInput, NotFound
from registry.models import (
    Checkpoint,
    CheckpointStatus,
    CheckpointTag,
    MergePolicy,
    MergePolicyCreate,
    MergeRun,
    MergeTrigger,
    utcnow,
)
from registry.services import merge_runs, mergekit_policies
from registry.services.policy_rules import (
    PolicySelector,
    Window,
    min_inputs,
    parse_selector,
    validate_policy,
)
from registry.services.validation import check_json_values, check_text


def next_cron_time(expression: str, after: datetime) -> datetime:
    """The first time strictly after ``after`` that the cron expression fires."""
    naive = after.astimezone(UTC).replace(tzinfo=None, microsecond=0)
    return next(iter(CronSim(expression, naive))).replace(tzinfo=UTC)


# ---- CRUD ------------------------------------------------------------------------------------


def create_policy(*, session: Session, data: MergePolicyCreate) -> MergePolicy:
    """Validate and store a policy; a duplicate name is refused."""
    check_text(data.name, what="policy name")
    check_json_values(data.params, what="params")
    check_json_values(data.selector, what="selector")
    data = mergekit_policies.check_template(session=session, data=data)
    selector = validate_policy(session=session, data=data)
    if session.exec(select(MergePolicy).where(MergePolicy.name == data.name)).first():
        raise InvalidInput(f"a policy named '{data.name}' already exists")
    policy = MergePolicy.model_validate(
        data.model_dump() | {"selector": selector.model_dump(mode="json", exclude_defaults=True)}
    )
    session.add(policy)
    session.commit()
    session.refresh(policy)
    return policy


def get_policy(*, session: Session, policy_id: int) -> MergePolicy:
    """The policy with ``policy_id`` (``NotFound`` otherwise)."""
    policy = session.get(MergePolicy, policy_id)
    if policy is None:
        raise NotFound(f"merge policy {policy_id} not found")
    return policy


def list_policies(
    *,
    session: Session,
    trigger: MergeTrigger | None = None,
    enabled: bool | None = None,
) -> Sequence[MergePolicy]:
    """Policies ordered by id, optionally filtered by trigger and enabled flag."""
    query = select(MergePolicy).order_by(col(MergePolicy.id))
    if trigger is not None:
        query = query.where(MergePolicy.trigger == trigger)
    if enabled is not None:
        query = query.where(MergePolicy.enabled == enabled)
    return session.exec(query).all()


def set_policy_enabled(*, session: Session, policy_id: int, enabled: bool) -> MergePolicy:
    """Enable or disable a policy; returns it."""
    policy = get_policy(session=session, policy_id=policy_id)
    policy.enabled = enabled
    policy.updated_at = utcnow()
    session.add(policy)
    session.commit()
    session.refresh(policy)
    return policy


# ---- selection -------------------------------------------------------------------------------


def matching_policies(*, session: Session, checkpoint: Checkpoint) -> list[MergePolicy]:
    """Enabled on_register policies whose selector covers ``checkpoint``."""
    policies = list_policies(session=session, trigger=MergeTrigger.on_register, enabled=True)
    return [p for p in policies if parse_selector(p.selector).matches(checkpoint)]


def candidates(*, session: Session, selector: PolicySelector) -> list[Checkpoint]:
    """Ready checkpoints under the selector, oldest first (arrival order)."""
    query = select(Checkpoint).where(
        Checkpoint.status == CheckpointStatus.ready,
        col(Checkpoint.kind).in_([str(k) for k in selector.kinds]),
    )
    if selector.base_id is not None:
        query = query.where(Checkpoint.base_id == selector.base_id)
    if selector.tasks:
        query = query.where(col(Checkpoint.task).in_(selector.tasks))
    if selector.run is not None:
        query = query.where(Checkpoint.run == selector.run)
    for tag in selector.tags:
        tagged = select(CheckpointTag.checkpoint_id).where(CheckpointTag.tag == tag)
        query = query.where(col(Checkpoint.id).in_(tagged))
    return list(session.exec(query.order_by(col(Checkpoint.id))).all())


def select_inputs(
    *, session: Session, selector: PolicySelector, folded: Sequence[int] = ()
) -> list[Checkpoint]:
    """The checkpoints a run of the policy takes, in arrival order.

    ``folded`` lists checkpoint ids already folded (for ``all_since_last_fold``).
    """
    found = candidates(session=session, selector=selector)
    if selector.window == Window.newest_per_task:
        newest: dict[str | None, Checkpoint] = {}
        for checkpoint in found:
            newest[checkpoint.task] = checkpoint
        return sorted(newest.values(), key=lambda c: c.id or 0)
    if selector.window == Window.last_k_of_run:
        by_step = sorted(found, key=lambda c: (c.step if c.step is not None else -1, c.id or 0))
        return by_step[-(selector.k or 1) :]
    done = set(folded)
    return [c for c in found if c.id not in done]


# ---- runs ------------------------------------------------------------------------------------


def plan_policy_run(*, session: Session, policy_id: int) -> tuple[MergeRun, bool] | None:
    """Create (or find) the merge run the policy asks for now.

    Returns ``(run, launch)`` — ``launch`` False when an identical run exists already — or
    ``None`` when the selector currently yields too few checkpoints.
    """
    policy = get_policy(session=session, policy_id=policy_id)
    selector = parse_selector(policy.selector)
    folded: list[int] = []
    if selector.window == Window.all_since_last_fold:
        folded = merge_runs.folded_checkpoint_ids(session=session, policy_id=policy_id)
    chosen = select_inputs(session=session, selector=selector, folded=folded)
    if len(chosen) < min_inputs(policy.method):
        return None
    request = mergekit_policies.template_request(
        policy=policy, chosen=chosen, base_id=selector.base_id
    ) or merge_runs.MergeRequest(
        method=policy.method,
        params=policy.params,
        base_id=selector.base_id,
        inputs=[merge_runs.MergeInputSpec(checkpoint_id=c.id or 0) for c in chosen],
        evaluator=policy.evaluator,
    )
    return merge_runs.create_merge_run(session=session, request=request, policy_id=policy_id)
