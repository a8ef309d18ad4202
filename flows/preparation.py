"""Turning a MergeRun row into what ``mergeops.merge_files`` needs: its inputs and side inputs.

Everything is resolved through registry services. Inputs are local paths, or (S3 stores, by
default) range-read sources that stream the stored files in place (see ``flows.inputs``); both
pickle, so the result crosses into Prefect tasks (and Dask workers) unchanged.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sqlmodel import Session, col, select

from flows.inputs import (
    InputMode,
    MergeInput,
    artifact_input,
    checkpoint_input,
    copy_artifact,
    prune_cache,
)
from flows.model_names import unique_model_names
from flows.outputs import OutputSpec, output_name
from flows.pass_through import pass_through
from mergeops.methods import base as mb
from registry.errors import InvalidState
from registry.models import ArtifactRole, Checkpoint, CheckpointKind, MergePolicy, MergeRun, Metric
from registry.services import merge_runs as run_service
from registry.services.common import load_checkpoint
from registry.storage import ObjectStore

log = logging.getLogger(__name__)


@dataclass
class PreparedMerge:
    """A merge run resolved to its inputs (local paths or range-read sources) and plain values."""

    run_id: int
    method: str
    params: dict[str, Any]
    work_dir: Path
    models: list[MergeInput]
    model_names: list[str]
    model_params: list[dict[str, Any]]
    output: OutputSpec
    base: MergeInput | None = None
    second_moments: list[MergeInput] | None = None
    fisher: list[MergeInput] | None = None
    grams: list[MergeInput] | None = None
    metrics: list[float | None] | None = None
    state_path: Path | None = None
    evaluator: str | None = None
    policy_name: str | None = None
    lora: str = "factors"  # how PEFT adapter inputs are read (see ``_lora_mode``)
    mergekit: dict[str, Any] | None = None  # a mergekit run's config (``flows.mergekit_flow``)

    @property
    def out_dir(self) -> Path:
        return self.work_dir / "out"

    def input_kwargs(self) -> dict[str, Any]:
        """The mergeops inputs of this run (paths as strings; sources as they are, they pickle)."""
        return {
            "method": self.method,
            "models": [_plain(p) for p in self.models],
            "base": _plain(self.base) if self.base is not None else None,
            "params": self.params,
            "model_params": self.model_params,
            "model_names": self.model_names,
            "second_moments": [_plain(p) for p in self.second_moments]
            if self.second_moments
            else None,
            "fisher": [_plain(p) for p in self.fisher] if self.fisher else None,
            "grams": [_plain(p) for p in self.grams] if self.grams else None,
            "metrics": self.metrics,
            "lora": self.lora,
        }


def prepare(
    *,
    session: Session,
    store: ObjectStore,
    work_root: Path,
    run_id: int,
    cache_max_bytes: int | None = None,
    inputs: InputMode | None = None,
) -> PreparedMerge:
    """Resolve ``run_id``'s inputs, side inputs and state into a fresh work folder.

    With ``cache_max_bytes``, the download cache is pruned to that size first. ``inputs``:
    "stream" (range-read remote inputs in place) or "cache" (download them); default: the
    runtime's ``CKREG_MERGE_INPUTS``.
    """
    mode = inputs or _input_mode()
    run = run_service.get_merge_run(session=session, run_id=run_id)
    method = mb.get_method(run.method)
    inputs = run_service.merge_run_inputs(session=session, run_id=run_id)
    checkpoints = [load_checkpoint(session, i.checkpoint_id) for i in inputs]
    cache = work_root / "cache"
    if cache_max_bytes is not None:
        prune_cache(cache, max_bytes=cache_max_bytes)
    work_dir = work_root / f"run-{run_id}"
    shutil.rmtree(work_dir, ignore_errors=True)  # leftovers of a crashed attempt
    work_dir.mkdir(parents=True)
    policy = session.get(MergePolicy, run.policy_id) if run.policy_id is not None else None
    if run.mergekit_config is not None:
        from flows.mergekit_flow import prepare_mergekit

        return prepare_mergekit(
            session=session, store=store, run=run, work_dir=work_dir, cache=cache, policy=policy
        )
    prepared = PreparedMerge(
        run_id=run_id,
        method=run.method,
        params=dict(run.params),
        work_dir=work_dir,
        models=[_input(session, store, c, cache, mode) for c in checkpoints],
        model_names=unique_model_names(checkpoints),
        model_params=[_model_params(i.params, i.weight) for i in inputs],
        output=OutputSpec(
            name=output_name(run, policy.name if policy else None),
            input_ids=[c.id or 0 for c in checkpoints],
            tasks=[c.task for c in checkpoints if c.task],
        ),
        base=_base(session, store, run.base_id, cache, mode) if run.base_id is not None else None,
        evaluator=policy.evaluator if policy else run.evaluator,
        policy_name=policy.name if policy else None,
    )
    prepared.lora = _lora_mode(checkpoints, run.base_id)
    prepared.output = replace(
        prepared.output,
        **pass_through(session, store, checkpoints, run.base_id, cache, prepared.lora),
    )
    _side_inputs(session, store, method, prepared, checkpoints, (cache, mode))
    if mb.Need.STATE in method.needs:
        _previous_state(session, store, run, prepared)
    return prepared


def _lora_mode(checkpoints: list[Checkpoint], base_id: int | None) -> str:
    """Adapters with a base are merged as full weights (base + B·A: any method, a full model
    out); without a base, as adapters (their A and B factors: base-free methods)."""
    if any(c.kind == CheckpointKind.adapter for c in checkpoints) and base_id is not None:
        return "full"
    return "factors"


def _input_mode() -> InputMode:
    from flows.runtime import current_runtime

    return current_runtime().settings.merge_inputs


def _plain(item: MergeInput) -> Any:
    return str(item) if isinstance(item, Path) else item


def _base(
    session: Session, store: ObjectStore, base_id: int, cache: Path, mode: InputMode
) -> MergeInput:
    """The base input. A local base folder is named after its cache folder (the checkpoint id),
    which the output records as ``mergeops_base``; a streamed base is named the same, so the
    output is byte-identical however the inputs are read."""
    item = _input(session, store, load_checkpoint(session, base_id), cache, mode)
    if not isinstance(item, Path):
        item.name = str(base_id)
    return item


def _input(
    session: Session, store: ObjectStore, checkpoint: Checkpoint, cache: Path, mode: InputMode
) -> MergeInput:
    return checkpoint_input(
        session=session, store=store, checkpoint=checkpoint, cache_dir=cache, mode=mode
    )


def _model_params(params: dict[str, Any], weight: float | None) -> dict[str, Any]:
    return {**params, "weight": weight} if weight is not None else dict(params)


def _side_inputs(
    session: Session,
    store: ObjectStore,
    method: mb.MergeMethod,
    prepared: PreparedMerge,
    checkpoints: list[Checkpoint],
    where: tuple[Path, InputMode],
) -> None:
    cache, mode = where
    wanted = {
        mb.Need.SECOND_MOMENTS: ArtifactRole.second_moment,
        mb.Need.FISHER: ArtifactRole.fisher,
        mb.Need.GRAMS: ArtifactRole.gram,
    }
    for need, role in wanted.items():
        if need not in method.needs:
            continue
        paths = []
        for checkpoint in checkpoints:
            path = artifact_input(
                session=session,
                store=store,
                checkpoint_id=checkpoint.id or 0,
                role=role,
                cache_dir=cache,
                mode=mode,
            )
            if path is None and need == mb.Need.FISHER and prepared.evaluator:
                path = _estimate_fisher(session, store, checkpoint, prepared, where)
            if path is None:
                raise InvalidState(
                    f"method '{method.name}' needs a '{role}' artifact; checkpoint "
                    f"{checkpoint.id} '{checkpoint.name}' has none"
                )
            paths.append(path)
        if need == mb.Need.SECOND_MOMENTS:
            prepared.second_moments = paths
        elif need == mb.Need.GRAMS:
            prepared.grams = paths
        else:
            prepared.fisher = paths
    if mb.Need.METRICS in method.needs:
        prepared.metrics = [_metric(session, c, prepared.params) for c in checkpoints]


def _estimate_fisher(
    session: Session,
    store: ObjectStore,
    checkpoint: Checkpoint,
    prepared: PreparedMerge,
    where: tuple[Path, InputMode],
) -> Path:
    """Estimate a checkpoint's diagonal Fisher with the run's evaluator and keep it as an artifact."""
    import torch

    from flows.evaluators import load_evaluator
    from flows.runtime import current_runtime
    from mergeops.io import open_source, write_safetensors
    from registry.errors import RegistryError
    from registry.services import artifacts

    assert prepared.evaluator is not None
    model = _input(session, store, checkpoint, *where)
    state = mb.load_state_dict(open_source(_plain(model)), torch.device("cpu"))
    fisher = load_evaluator(prepared.evaluator).fisher(state)
    path = prepared.work_dir / f"fisher-{checkpoint.id}.safetensors"
    write_safetensors(path, {k: v.detach().float() for k, v in fisher.items()})
    try:  # kept for the next merge; the estimate is used even if the registry refuses it
        artifacts.add_artifact(
            session=session,
            store=store,
            settings=current_runtime().settings,
            checkpoint_id=checkpoint.id or 0,
            role=ArtifactRole.fisher,
            content=path,
            name="fisher.safetensors",
            metadata={"estimated_by": prepared.evaluator},
        )
    except RegistryError as exc:
        session.rollback()
        log.warning("Fisher estimate of checkpoint %s not stored: %s", checkpoint.id, exc)
    return path


def _metric(session: Session, checkpoint: Checkpoint, params: dict[str, Any]) -> float | None:
    """mwa's per-model value: the step (higher is better) or the newest client ``loss``."""
    if params.get("metric_mode") == "higher":
        return float(checkpoint.step) if checkpoint.step is not None else None
    query = (
        select(Metric)
        .where(Metric.checkpoint_id == checkpoint.id, Metric.name == "loss")
        .order_by(col(Metric.id).desc())
    )
    row = session.exec(query).first()
    return row.value if row is not None else None


def _previous_state(
    session: Session, store: ObjectStore, run: MergeRun, prepared: PreparedMerge
) -> None:
    """Copy the policy's last merge_state (if any) where the engine resumes from it."""
    prepared.state_path = prepared.work_dir / "merge_state.safetensors"
    prepared.output = replace(prepared.output, state_path=prepared.state_path)
    if run.policy_id is None:
        return
    last = run_service.last_succeeded_run(session=session, policy_id=run.policy_id)
    if last is None or last.output_checkpoint_id is None:
        return
    path = copy_artifact(
        session=session,
        store=store,
        checkpoint_id=last.output_checkpoint_id,
        role=ArtifactRole.merge_state,
        target=prepared.state_path,
    )
    parent = last.output_checkpoint_id if path is not None else None
    prepared.output = replace(prepared.output, state_parent_id=parent)
