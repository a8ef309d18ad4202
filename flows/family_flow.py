"""``family_compress``: store fine-tunes of one base as one task vector plus TALL masks.

For each member the flow picks λ from a small grid on the evaluator's data (the evaluator's
own split: the digits evaluator's default is validation), scores the rebuilt member against
its original, records the figures as ``tall/*`` evaluation metrics on the member, and stores the
family form (``registry.services.family_store``) only when every member keeps at least
``min_retention`` of its own metric. Bad input fails the run with the reason; nothing is stored.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from tqdm import tqdm

from flows.evaluators import load_evaluator
from flows.retries import IO_TASK
from flows.runtime import current_runtime
from mergeops.sources import Evaluator
from registry.models import MetricCreate, MetricSource
from registry.services import family as family_service
from registry.services import metrics as metric_service
from registry.services.common import load_checkpoint
from registry.services.family import LAMBDA_GRID, Family, FamilyMember, StateDict
from registry.services.family_store import MemberForm, StoredFamily, store_family

TASK_OPTIONS: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False}
METRIC_PREFERENCE = ("accuracy/{task}", "accuracy", "accuracy/avg")


def own_metric(metrics: Mapping[str, float], task: str | None, *, evaluator: str) -> str:
    """The metric that is a member's "own accuracy": ``accuracy/<task>``, else ``accuracy``,
    else ``accuracy/avg``, else the evaluator's only metric."""
    for pattern in METRIC_PREFERENCE:
        name = pattern.format(task=task)
        if name in metrics:
            return name
    if len(metrics) == 1:
        return next(iter(metrics))
    raise ValueError(
        f"evaluator '{evaluator}' reports no accuracy for task {task!r}: it gave "
        f"{sorted(metrics)}; expected one of accuracy/<task>, accuracy, accuracy/avg"
    )


@dataclass
class MemberResult:
    """One member's figures: the chosen λ, its own metric before and after, their ratio."""

    checkpoint_id: int
    name: str
    metric: str
    original: float
    reconstructed: float
    retention: float
    lam: float
    served_by: int | None = None


@task(**TASK_OPTIONS)
def check(base_id: int, member_ids: list[int]) -> Family:
    """The checked family (bad input raises naming the checkpoint)."""
    with current_runtime().session() as session:
        return family_service.check_family(session=session, base_id=base_id, member_ids=member_ids)


def _load(checkpoint_id: int) -> StateDict:
    runtime = current_runtime()
    with runtime.session() as session:
        return family_service.load_state(
            session=session, store=runtime.store, checkpoint_id=checkpoint_id
        )


def _score(plugin: Evaluator, state: StateDict, member: FamilyMember, evaluator: str) -> float:
    values = plugin.evaluate(state)
    metric = own_metric(values, member.task, evaluator=evaluator)
    score = float(values[metric])
    if not math.isfinite(score):
        raise ValueError(f"evaluator '{evaluator}' gave {metric}={score} for '{member.name}'")
    return score


@task(**TASK_OPTIONS)
def choose_lambda(
    plugin: Evaluator, evaluator: str, member: FamilyMember, base: StateDict, merged: StateDict,
    grid: Sequence[float],
) -> tuple[MemberResult, dict[str, torch.Tensor]]:  # fmt: skip
    """λ with the best own metric of the rebuilt member, and that λ's masks."""
    state = _load(member.checkpoint_id)
    values = plugin.evaluate(state)
    metric = own_metric(values, member.task, evaluator=evaluator)
    original = float(values[metric])
    if not math.isfinite(original) or original <= 0:
        raise ValueError(
            f"evaluator '{evaluator}' gave {metric}={original} for the original "
            f"'{member.name}'; retention needs a positive score"
        )
    dtypes = family_service.state_dtypes(state)
    best: tuple[float, float, dict[str, torch.Tensor]] | None = None
    for lam in grid:
        masks = family_service.tall_masks(base, state, merged, lam)
        rebuilt = family_service.rebuild_state(base, merged, masks, dtypes)
        score = _score(plugin, rebuilt, member, evaluator)
        if best is None or score > best[1]:
            best = (lam, score, masks)
    assert best is not None
    lam, score, masks = best
    result = MemberResult(
        member.checkpoint_id, member.name, metric, original, score, score / original, lam
    )
    return result, masks


@task(**IO_TASK)
def record_metrics(result: MemberResult, evaluator: str, split: str | None) -> None:
    """The member's ``tall/*`` figures as evaluation metrics (I/O: retried)."""
    values = {
        "tall/retention": result.retention,
        "tall/original": result.original,
        "tall/reconstructed": result.reconstructed,
        "tall/lambda": result.lam,
    }
    rows = [
        MetricCreate(
            name=name, value=value, dataset=evaluator, split=split, source=MetricSource.evaluation
        )
        for name, value in values.items()
    ]
    with current_runtime().session() as session:
        metric_service.add_metrics(
            session=session, checkpoint_id=result.checkpoint_id, metrics=rows
        )


def _family_bytes(merged: StateDict, masks: Sequence[Mapping[str, torch.Tensor]]) -> int:
    """Tensor bytes of the family form: τ_MTL plus the bit-packed masks (headers excluded)."""
    vector = sum(t.numel() * t.element_size() for t in merged.values())
    return vector + sum((m.numel() + 7) // 8 for member in masks for m in member.values())


def _evaluator_name(base_id: int, evaluator: str | None) -> str:
    if evaluator:
        return evaluator
    with current_runtime().session() as session:
        base = load_checkpoint(session, base_id)
        named = (base.meta or {}).get("evaluator")
    if not isinstance(named, str) or not named:
        raise ValueError(
            f"no evaluator for the family of base {base_id} '{base.name}': pass --evaluator "
            "(or set 'evaluator' in the base checkpoint's metadata)"
        )
    return named


def _members(family: Family, progress: bool) -> Iterator[FamilyMember]:
    return iter(tqdm(family.members, desc="tall masks", disable=not progress, unit="member"))


@flow(name="family_compress", persist_result=False)
def family_compress(
    base_id: int,
    member_ids: list[int],
    evaluator: str | None = None,
    min_retention: float = 0.99,
    keep_originals: bool = False,
    lambdas: list[float] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Compress the family; returns the report: ``outcome`` (``replaced`` | ``kept`` |
    ``stored_alongside``), bytes (``family_bytes``: tensor bytes of the family form;
    ``stored_bytes``: the files stored, when stored) and each member's figures."""
    if not 0.0 < min_retention <= 1.0:
        raise ValueError(f"min_retention must be in (0, 1], got {min_retention}")
    grid = list(lambdas or LAMBDA_GRID)
    name = _evaluator_name(base_id, evaluator)
    plugin = load_evaluator(name)
    family = check(base_id, member_ids)
    base = _load(base_id)
    merged = family_service.multitask_vector(base, (_load(m.checkpoint_id) for m in family.members))
    results, forms = [], []
    for member in _members(family, progress):
        result, masks = choose_lambda(plugin, name, member, base, merged, grid)
        results.append(result)
        forms.append(MemberForm(member, result.lam, masks, result.retention))
    for result in results:  # only once every member was scored: a failed run records nothing
        record_metrics(result, name, getattr(plugin, "split", None))
    outcome, stored_bytes = "kept", None
    if all(r.retention >= min_retention for r in results):
        outcome = "stored_alongside" if keep_originals else "replaced"
        stored = _store(family, merged, forms, replace=not keep_originals)
        stored_bytes = stored.merged_bytes + sum(stored.mask_bytes.values())
        for result in results:
            result.served_by = stored.served[result.checkpoint_id]
    return {
        "outcome": outcome,
        "evaluator": name,
        "min_retention": min_retention,
        "original_bytes": family.original_bytes,
        "family_bytes": _family_bytes(merged, [f.masks for f in forms]),
        "stored_bytes": stored_bytes,
        "members": [asdict(r) for r in results],
    }


@task(**TASK_OPTIONS)
def _store(
    family: Family, merged: StateDict, forms: list[MemberForm], *, replace: bool
) -> StoredFamily:
    runtime = current_runtime()
    with runtime.session() as session:
        return store_family(
            session=session,
            store=runtime.store,
            family=family,
            merged=merged,
            forms=forms,
            replace=replace,
        )
