"""Merge runs: idempotent creation from a request, queries, and the API view.

The same inputs + method + params give the same idempotency key, so asking twice returns the
existing run instead of merging twice. A failed run asked for again is re-queued. The
queued -> running -> succeeded|failed transitions live in ``registry.services.merge_run_states``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlmodel import Session, col, select

from mergeops.methods import base as methods_base
from registry.errors import InvalidInput, InvalidState, NotFound
from registry.models import (
    INT64_MAX,
    INT64_MIN,
    Checkpoint,
    CheckpointStatus,
    MergeRun,
    MergeRunInput,
    MergeRunStatus,
)
from registry.services.evaluators import check_evaluator
from registry.services.features import check_feature_inputs
from registry.services.validation import check_json_values


class MergeInputSpec(BaseModel):
    """One input of a merge: a checkpoint, its weight and per-model params."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    checkpoint_id: int = Field(ge=INT64_MIN, le=INT64_MAX)
    weight: float | None = Field(default=None, allow_inf_nan=False)
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("params")
    @classmethod
    def _finite_params(cls, value: dict[str, Any]) -> dict[str, Any]:
        _json_safe(value, what="params")
        return value


class MergeRequest(BaseModel):
    """Body of ``POST /merges`` and what policies build for their runs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str = ""
    params: dict[str, Any] = Field(default_factory=dict)
    base_id: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    inputs: list[MergeInputSpec] = Field(default_factory=list)
    evaluator: str | None = None
    # A mergekit YAML (text, or the same as a mapping) instead of method/params/base_id/inputs:
    # checkpoint ids or names where mergekit takes paths (``registry.services.mergekit_runs``).
    mergekit: str | dict[str, Any] | None = Field(
        default=None,
        description="A mergekit YAML (text, or the config as a mapping) instead of method, "
        "params, base_id and inputs; models are checkpoint ids (12, ckreg/12) or names "
        "(ckreg/my-ft: the newest ready one). See docs/mergekit.md, 'In the registry'.",
    )

    @field_validator("params")
    @classmethod
    def _finite_params(cls, value: dict[str, Any]) -> dict[str, Any]:
        _json_safe(value, what="params")
        return value

    @model_validator(mode="after")
    def _one_form(self) -> MergeRequest:
        if self.mergekit is not None:
            given = [k for k in ("method", "params", "base_id", "inputs") if getattr(self, k)]
            if given:
                raise ValueError(f"give either 'mergekit' or {given}, not both")
            return self
        if not self.method:
            raise ValueError("'method' is required (or give a 'mergekit' YAML)")
        if not self.inputs:
            raise ValueError("'inputs' needs at least one checkpoint (or give a 'mergekit' YAML)")
        return self


def _json_safe(value: Any, *, what: str) -> None:
    """Non-finite numbers, out-of-range integers or NUL text in params: a validation error."""
    try:
        check_json_values(value, what=what)
    except InvalidInput as exc:
        raise ValueError(exc.message) from None


class MergeInputPublic(MergeInputSpec):
    position: int


class MergeRunPublic(BaseModel):
    id: int
    policy_id: int | None
    method: str
    params: dict[str, Any]
    base_id: int | None
    status: MergeRunStatus
    inputs: list[MergeInputPublic]
    output_checkpoint_id: int | None
    orchestration_run_id: str | None
    mlflow_run_id: str | None
    evaluator: str | None
    mergekit_config: dict[str, Any] | None = None
    error: str | None
    idempotency_key: str
    created_at: Any
    started_at: Any
    finished_at: Any
    reused: bool = False


class MergeRunPage(BaseModel):
    items: list[MergeRunPublic]
    total: int
    limit: int
    offset: int


def idempotency_key(*, request: MergeRequest, policy_id: int | None = None) -> str:
    """sha256 over (method, params, base, ordered inputs with weights).

    ``policy_id`` is part of the key only for stateful (continual) methods, whose result also
    depends on the policy's folded state. The evaluator is part of it only for methods that
    learn from its objective (``Need.OBJECTIVE``: fw, adamerging, regmean_plusplus, ...), whose
    output it changes; for the others it only scores the output, so the same merge asked for
    with another evaluator returns the existing run (scored by the evaluator it was created with).
    """
    needs = _needs(request.method)
    canonical = {
        "method": request.method,
        "params": request.params,
        "base_id": request.base_id,
        "inputs": [i.model_dump(mode="json") for i in request.inputs],
        "policy_id": policy_id if methods_base.Need.STATE in needs else None,
    }
    if methods_base.Need.OBJECTIVE in needs:  # other methods' keys stay as they were
        canonical["evaluator"] = request.evaluator
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _needs(method_name: str) -> frozenset[methods_base.Need]:
    import mergeops.methods  # noqa: F401 - registers every method

    try:
        method = methods_base.get_method(method_name)
    except methods_base.MergeError as exc:
        raise InvalidInput(str(exc)) from None
    return frozenset(method.needs)


def create_merge_run(
    *, session: Session, request: MergeRequest, policy_id: int | None = None
) -> tuple[MergeRun, bool]:
    """The run for ``request``: ``(run, True)`` if it must be launched, ``(run, False)`` if reused.

    An existing queued, running or succeeded run with the same key is returned as is (whatever
    evaluator it was created with, unless the method learns from the evaluator's objective: see
    ``idempotency_key``); a failed one is
    re-queued (the error kept until it runs again). An ad-hoc request's evaluator must be
    installed (``InvalidInput`` listing the available ones); a policy's was checked when the
    policy was created.
    """
    if policy_id is None:
        check_evaluator(request.evaluator, owner="merge request")
    config = None
    if request.mergekit is not None:
        config, request = _from_mergekit(session=session, request=request)
        key = _mergekit_key(config)
    else:
        _check_inputs(session=session, request=request)
        if policy_id is None:  # pleas/ot_fusion on stored features: each input has them
            check_feature_inputs(session=session, method=request.method, params=request.params,
                                 evaluator=request.evaluator,
                                 input_ids=[i.checkpoint_id for i in request.inputs])  # fmt: skip
        key = idempotency_key(request=request, policy_id=policy_id)
    existing = session.exec(select(MergeRun).where(MergeRun.idempotency_key == key)).first()
    if existing is not None:
        if existing.status != MergeRunStatus.failed:
            return existing, False
        existing.status = MergeRunStatus.queued
        session.add(existing)
        session.commit()
        session.refresh(existing)
        return existing, True
    run = MergeRun(
        policy_id=policy_id,
        method=request.method,
        params=request.params,
        base_id=request.base_id,
        idempotency_key=key,
        evaluator=request.evaluator,
        mergekit_config=config,
    )
    session.add(run)
    session.flush()
    for position, spec in enumerate(request.inputs):
        session.add(
            MergeRunInput(
                merge_run_id=run.id or 0,
                position=position,
                checkpoint_id=spec.checkpoint_id,
                weight=spec.weight,
                params=spec.params,
            )
        )
    session.commit()
    session.refresh(run)
    return run, True


def _from_mergekit(
    *, session: Session, request: MergeRequest
) -> tuple[dict[str, Any], MergeRequest]:
    """The resolved config (references as ``ckreg/<id>``) and the request it amounts to: its
    method, base and inputs (every other referenced checkpoint), for listings and lineage."""
    from registry.services import mergekit_runs

    assert request.mergekit is not None
    raw = mergekit_runs.load_yaml(request.mergekit)
    config, ids = mergekit_runs.resolve_config(session, raw)
    check_json_values(config, what="mergekit")
    mergekit_runs.check_config(config)
    base_id = mergekit_runs.base_id_of(config)
    inputs = [MergeInputSpec(checkpoint_id=i) for i in ids if i != base_id]
    fields = {"method": config["merge_method"], "base_id": base_id, "inputs": inputs}
    return config, request.model_copy(update=fields | {"mergekit": None})


def _mergekit_key(config: dict[str, Any]) -> str:
    """sha256 over the resolved mergekit config (the evaluator is not part of it)."""
    text = json.dumps({"mergekit": config}, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _check_method(request: MergeRequest) -> None:
    """Refuse unknown methods and params (global or per model) the method rejects."""
    import mergeops.methods  # noqa: F401 - registers every method

    try:
        method = methods_base.get_method(request.method)
        params, _ = methods_base.split_params(
            method,
            request.params,
            [spec.params for spec in request.inputs],
            [f"checkpoint {spec.checkpoint_id}" for spec in request.inputs],
        )
        method.check_model_count(params, len(request.inputs))
    except methods_base.MergeError as exc:
        raise InvalidInput(str(exc)) from None
    if methods_base.Need.BASE in method.needs and request.base_id is None:
        raise InvalidInput(f"method '{request.method}' needs a base model; set 'base_id'")


def _check_inputs(*, session: Session, request: MergeRequest) -> None:
    _check_method(request)
    wanted = [s.checkpoint_id for s in request.inputs]
    if len(set(wanted)) != len(wanted):
        raise InvalidInput(f"merge inputs list a checkpoint twice: {wanted}")
    ids = [*wanted, *([request.base_id] if request.base_id is not None else [])]
    for checkpoint_id in ids:
        checkpoint = session.get(Checkpoint, checkpoint_id)
        if checkpoint is None:
            raise NotFound(f"merge input checkpoint {checkpoint_id} not found")
        if checkpoint.status != CheckpointStatus.ready:
            raise InvalidState(
                f"merge input checkpoint {checkpoint_id} ('{checkpoint.name}') is "
                f"{checkpoint.status}, not ready"
            )


def get_merge_run(*, session: Session, run_id: int) -> MergeRun:
    """The run with ``run_id`` (``NotFound`` otherwise)."""
    run = session.get(MergeRun, run_id)
    if run is None:
        raise NotFound(f"merge run {run_id} not found")
    return run


def merge_run_inputs(*, session: Session, run_id: int) -> list[MergeRunInput]:
    """The run's inputs in merge order."""
    query = (
        select(MergeRunInput)
        .where(MergeRunInput.merge_run_id == run_id)
        .order_by(col(MergeRunInput.position))
    )
    return list(session.exec(query).all())


def list_merge_runs(
    *,
    session: Session,
    status: MergeRunStatus | None = None,
    policy_id: int | None = None,
    input_checkpoint_id: int | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[Sequence[MergeRun], int]:
    """Runs newest first (optionally only those taking ``input_checkpoint_id``), with the total
    count before paging."""
    query = select(MergeRun)
    if status is not None:
        query = query.where(MergeRun.status == status)
    if policy_id is not None:
        query = query.where(MergeRun.policy_id == policy_id)
    if input_checkpoint_id is not None:
        taking = select(MergeRunInput.merge_run_id).where(
            MergeRunInput.checkpoint_id == input_checkpoint_id
        )
        query = query.where(col(MergeRun.id).in_(taking))
    total = len(session.exec(query).all())
    page = session.exec(query.order_by(col(MergeRun.id).desc()).offset(offset).limit(limit)).all()
    return page, total


def unfinished_merge_runs(*, session: Session) -> list[MergeRun]:
    """Queued or running runs, oldest first: what a restarted worker must pick up."""
    query = (
        select(MergeRun)
        .where(col(MergeRun.status).in_([MergeRunStatus.queued, MergeRunStatus.running]))
        .order_by(col(MergeRun.id))
    )
    return list(session.exec(query).all())


def folded_checkpoint_ids(*, session: Session, policy_id: int) -> list[int]:
    """Input checkpoints of the policy's succeeded runs, in arrival (fold) order."""
    query = (
        select(MergeRunInput.checkpoint_id)
        .join(MergeRun, col(MergeRun.id) == col(MergeRunInput.merge_run_id))
        .where(
            MergeRun.policy_id == policy_id,
            MergeRun.status == MergeRunStatus.succeeded,
        )
        .order_by(col(MergeRun.id), col(MergeRunInput.position))
    )
    return list(session.exec(query).all())


def last_succeeded_run(*, session: Session, policy_id: int) -> MergeRun | None:
    """The policy's newest succeeded run (whose output holds the continual merge's state)."""
    query = (
        select(MergeRun)
        .where(MergeRun.policy_id == policy_id, MergeRun.status == MergeRunStatus.succeeded)
        .order_by(col(MergeRun.id).desc())
    )
    return session.exec(query).first()


def to_public(*, session: Session, run: MergeRun, reused: bool = False) -> MergeRunPublic:
    """The API view of a run with its inputs."""
    inputs = [
        MergeInputPublic(
            checkpoint_id=i.checkpoint_id, weight=i.weight, params=i.params, position=i.position
        )
        for i in merge_run_inputs(session=session, run_id=run.id or 0)
    ]
    fields = run.model_dump(warnings=False) | {"status": MergeRunStatus(run.status)}
    return MergeRunPublic.model_validate(fields | {"inputs": inputs, "reused": reused})
