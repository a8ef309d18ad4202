"""Merge-policy rules: the selector model and the checks a policy must pass to be stored.

Bad policies are refused when created, with a message that says why; ``registry.services.policies``
stores them and picks their inputs.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from cronsim import CronSim, CronSimError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlmodel import Session

from mergeops.methods import base as methods_base
from registry.errors import InvalidInput
from registry.models import (
    Checkpoint,
    CheckpointKind,
    CheckpointStatus,
    MergePolicyCreate,
    MergeTrigger,
)
from registry.services.evaluators import check_evaluator
from registry.services.searches import check_search


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


def _brief(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "selector"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


# ---- validation ------------------------------------------------------------------------------


def validate_policy(*, session: Session, data: MergePolicyCreate) -> PolicySelector:
    """Check a policy before it is stored; raises ``InvalidInput`` saying why it is refused."""
    method = policy_method(data.method)
    try:
        methods_base.split_params(method, data.params, [{}], ["<every model>"])
    except methods_base.MergeError as exc:
        raise InvalidInput(f"policy '{data.name}': {exc}") from None
    selector = parse_selector(data.selector)
    _check_trigger(data)
    _check_selector_fits(session=session, data=data, method=method, selector=selector)
    check_evaluator(data.evaluator, owner=f"policy '{data.name}'")
    check_search(data, method)
    return selector


def policy_method(name: str) -> methods_base.MergeMethod:
    """The mergeops method named ``name`` (``InvalidInput`` listing the methods otherwise)."""
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


def min_inputs(method_name: str) -> int:
    """How many new checkpoints a run needs: 1 to fold into a continual merge, else 2."""
    return 2 if _needs_many(policy_method(method_name)) else 1
