"""Search policies: the ``search`` field's model and checks, and the resumable search state.

A policy with ``search: {algorithm, budget, space, ...}`` runs a merge search (``flows.search_flow``)
instead of one merge: CMA-ES over a box of the method's parameters, or M2N2 over an archive of
merged models. Its progress is kept in the policy's ``search_state`` so a killed run resumes.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlmodel import Session

from mergeops.methods import base as methods_base
from registry.errors import InvalidInput, NotFound
from registry.models import MergePolicy, MergePolicyCreate, MergeTrigger, utcnow


class SearchBudget(BaseModel):
    """At most ``evaluations`` candidates scored, and (if set) at most ``seconds`` of search."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    evaluations: int = Field(ge=1)
    seconds: float | None = Field(default=None, gt=0)


class SearchSpec(BaseModel):
    """A policy's ``search`` field."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    algorithm: Literal["cma_es", "m2n2"]
    budget: SearchBudget
    #: cma_es: ``{param: [low, high]}`` over the method's parameters.
    space: dict[str, tuple[float, float]] = Field(default_factory=dict)
    #: The evaluator metric maximised (cma_es; m2n2 uses per-example scores).
    metric: str = "accuracy/avg"
    seed: int = 0
    popsize: int | None = Field(default=None, ge=2)
    archive_size: int = Field(default=4, ge=2)
    alpha: float = Field(default=1.0, ge=0)


def parse_search(raw: dict[str, Any], *, owner: str) -> SearchSpec:
    """The search model of a stored or submitted ``search`` dict (``InvalidInput`` naming the field)."""
    try:
        return SearchSpec.model_validate(raw)
    except ValidationError as exc:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"])
            parts.append(f"search.{loc}: {err['msg']} (got {err.get('input')!r})")
        raise InvalidInput(f"{owner}: bad search: {'; '.join(parts)}") from None


def check_search(data: MergePolicyCreate, method: methods_base.MergeMethod) -> None:
    """Refuse a search the flow could never run: no evaluator, a trigger other than manual,
    a space naming unknown parameters or values the method refuses."""
    if data.search is None:
        return
    owner = f"policy '{data.name}'"
    spec = parse_search(data.search, owner=owner)
    if data.evaluator is None:
        raise InvalidInput(f"{owner}: search needs an 'evaluator' to score its candidates")
    if data.trigger != MergeTrigger.manual:
        raise InvalidInput(f"{owner}: a search runs when started; 'trigger' must be 'manual'")
    if spec.algorithm == "m2n2":
        if spec.space:
            raise InvalidInput(
                f"{owner}: search.space: m2n2 searches the archive of merged models, "
                "not parameters; leave 'space' out"
            )
        return
    if not spec.space:
        raise InvalidInput(f"{owner}: search.space: cma_es needs '{{param: [low, high]}}'")
    for name, (low, high) in spec.space.items():
        if not low < high:
            raise InvalidInput(
                f"{owner}: search.space.{name}: need low < high, got [{low}, {high}]"
            )
        for value in (low, high):
            params = {**data.params, name: value}
            try:
                methods_base.split_params(method, params, [{}], ["<every model>"])
            except methods_base.MergeError as exc:
                raise InvalidInput(f"{owner}: search.space.{name}: {exc}") from None


def get_search_state(*, session: Session, policy_id: int) -> dict[str, Any] | None:
    """The stored progress of the policy's search (None before its first candidate)."""
    policy = session.get(MergePolicy, policy_id)
    if policy is None:
        raise NotFound(f"merge policy {policy_id} not found")
    return policy.search_state


def save_search_state(*, session: Session, policy_id: int, state: dict[str, Any] | None) -> None:
    """Replace the policy's search progress (one commit: a killed search keeps the last one)."""
    policy = session.get(MergePolicy, policy_id)
    if policy is None:
        raise NotFound(f"merge policy {policy_id} not found")
    policy.search_state = state
    policy.updated_at = utcnow()
    session.add(policy)
    session.commit()
