"""Merge policies: validation at creation, storage, and input selection for a policy's runs.

A policy says *what* to merge (a selector over registered checkpoints), *how* (a mergeops
method and its params), *when* (a trigger) and how to score the result (an evaluator).
Bad policies are refused when created, with a message that says why.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from enum import StrEnum
from importlib.metadata import entry_points
from typing import Any

from cronsim import CronSim, CronSimError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlmodel import Session, col, select

from mergeops.methods import base as methods_base
from registry.errors import InvalidInput, NotFound
from registry.models import (
    Checkpoint,
    CheckpointKind,
    CheckpointStatus,
    CheckpointTag,
    MergePolicy,
    MergePolicyCreate,
    MergeRun,
    MergeTrigger,
    utcnow,
)
from registry.services import merge_runs

EVALUATOR_GROUP = "ckreg.evaluators"


class Window(StrEnum):
    """Which of the matching checkpoints a run takes."""

    newest_per_task = "newest_per_task"
    last_k_of_run = "last_k_of_run"
    all_since_last_fold = "all_since_last_fold"


class PolicySelector(BaseModel):
    """Which registered checkpoints a policy merges (stored as the policy's ``selector`` JSON)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_id: int | None = None
    tasks: list[str] = Field(default_factory=list)
    tags: list[str] = Field(default_factory=list)
    run: str | None = None
    kinds: list[CheckpointKind] = Field(
        default_factory=lambda: [CheckpointKind.finetune, CheckpointKind.adapter]
    )
    window: Window = Window.newest_per_task
    k: int | None = Field(default=None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _single_task(cls, data: Any) -> Any:
        """Accept ``task: "math"`` as shorthand for ``tasks: ["math"]``."""
        if isinstance(data, dict) and "task" in data:
            data = dict(data)
            task = data.pop("task")
            if task is not None:
                data["tasks"] = [*data.get("tasks", []), task]
        return data

    @model_validator(mode="after")
    def _window_needs(self) -> PolicySelector:
        if self.window == Window.last_k_of_run:
            if self.run is None:
                raise ValueError("window 'last_k_of_run' needs 'run' (the training run to read)")
            if self.k is None:
                raise ValueError("window 'last_k_of_run' needs 'k' (how many checkpoints)")
        if CheckpointKind.base in self.kinds:
            raise ValueError("kinds may not include 'base': base checkpoints have no task vector")
        return self

    def matches(self, checkpoint: Checkpoint) -> bool:
        """Whether one checkpoint falls under this selector (ignoring the window)."""
        if checkpoint.kind not in self.kinds or checkpoint.status != CheckpointStatus.ready:
            return False
        if self.base_id is not None and checkpoint.base_id != self.base_id:
            return False
        if self.tasks and checkpoint.task not in self.tasks:
            return False
        if self.run is not None and checkpoint.run != self.run:
            return False
        return set(self.tags) <= set(checkpoint.tags or [])


def parse_selector(raw: dict[str, Any]) -> PolicySelector:
    """The selector model of a stored or submitted selector dict (``InvalidInput`` if bad)."""
    try:
        return PolicySelector.model_validate(raw)
    except ValidationError as exc:
        raise InvalidInput(f"bad selector: {_brief(exc)}") from None


def next_cron_time(expression: str, after: datetime) -> datetime:
    """The first time strictly after ``after`` that the cron expression fires."""
    naive = after.astimezone(UTC).replace(tzinfo=None, microsecond=0)
    return next(iter(CronSim(expression, naive))).replace(tzinfo=UTC)


def available_evaluators() -> list[str]:
    """Names registered in the ``ckreg.evaluators`` entry-point group."""
    return sorted(ep.name for ep in entry_points(group=EVALUATOR_GROUP))


# ---- validation ------------------------------------------------------------------------------


def validate_policy(*, session: Session, data: MergePolicyCreate) -> PolicySelector:
    """Check a policy before it is stored; raises ``InvalidInput`` saying why it is refused."""
    method = _method(data.method)
    try:
        methods_base.split_params(method, data.params, [{}], ["<every model>"])
    except methods_base.MergeError as exc:
        raise InvalidInput(f"policy '{data.name}': {exc}") from None
    selector = parse_selector(data.selector)
    _check_trigger(data)
    _check_selector_fits(session=session, data=data, method=method, selector=selector)
    if data.evaluator is not None and data.evaluator not in available_evaluators():
        raise InvalidInput(
            f"policy '{data.name}': unknown evaluator '{data.evaluator}'; "
            f"available: {', '.join(available_evaluators()) or '(none installed)'}"
        )
    return selector


def _method(name: str) -> methods_base.MergeMethod:
    import mergeops.methods  # noqa: F401 - registers every method

    try:
        return methods_base.get_method(name)
    except methods_base.MergeError as exc:
        raise InvalidInput(str(exc)) from None


def _check_trigger(data: MergePolicyCreate) -> None:
    if data.trigger == MergeTrigger.cron:
        if not data.cron:
            raise InvalidInput(f"policy '{data.name}': trigger 'cron' needs a 'cron' expression")
        try:
            CronSim(data.cron, datetime(2000, 1, 1))
        except (CronSimError, ValueError) as exc:
            raise InvalidInput(
                f"policy '{data.name}': cron expression {data.cron!r} does not parse: {exc}"
            ) from None
    elif data.cron:
        raise InvalidInput(
            f"policy '{data.name}': 'cron' is set but trigger is '{data.trigger}', not 'cron'"
        )


def _check_selector_fits(
    *,
    session: Session,
    data: MergePolicyCreate,
    method: methods_base.MergeMethod,
    selector: PolicySelector,
) -> None:
    """Refuse selectors that can never produce inputs the method accepts."""
    needs = method.needs
    why = ""
    if methods_base.Need.BASE in needs and selector.base_id is None:
        why = f"method '{method.name}' needs a base model but the selector sets no 'base_id'"
    elif methods_base.Need.STATE in needs and selector.window != Window.all_since_last_fold:
        why = (
            f"method '{method.name}' folds checkpoints continually; "
            f"the selector's window must be 'all_since_last_fold', not '{selector.window}'"
        )
    elif methods_base.Need.METRICS in needs and selector.run is None:
        why = f"method '{method.name}' weights checkpoints of one training run; set 'run'"
    elif methods_base.Need.OBJECTIVE in needs and data.evaluator is None:
        why = f"method '{method.name}' needs an objective; set 'evaluator'"
    elif selector.window == Window.last_k_of_run and (selector.k or 0) < 2 and _needs_many(method):
        why = f"window 'last_k_of_run' with k={selector.k} selects one model; merging needs two"
    if why:
        raise InvalidInput(f"policy '{data.name}': selector can never match: {why}")
    if selector.base_id is not None:
        base = session.get(Checkpoint, selector.base_id)
        if base is None or base.status == CheckpointStatus.deleted:
            raise InvalidInput(
                f"policy '{data.name}': selector base_id {selector.base_id} is not a checkpoint"
            )


def _needs_many(method: methods_base.MergeMethod) -> bool:
    return methods_base.Need.STATE not in method.needs


# ---- CRUD ------------------------------------------------------------------------------------


def create_policy(*, session: Session, data: MergePolicyCreate) -> MergePolicy:
    """Validate and store a policy; a duplicate name is refused."""
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


def _brief(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "selector"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


# ---- runs ------------------------------------------------------------------------------------


def min_inputs(method_name: str) -> int:
    """How many new checkpoints a run needs: 1 to fold into a continual merge, else 2."""
    return 2 if _needs_many(_method(method_name)) else 1


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
    request = merge_runs.MergeRequest(
        method=policy.method,
        params=policy.params,
        base_id=selector.base_id,
        inputs=[merge_runs.MergeInputSpec(checkpoint_id=c.id or 0) for c in chosen],
        evaluator=policy.evaluator,
    )
    return merge_runs.create_merge_run(session=session, request=request, policy_id=policy_id)
