"""Build the tracker's plain records (``flows.tracking``) from registry rows.

The records carry what MLflow shows: a checkpoint's tags and metrics, a merge's inputs, config,
evaluation metrics, the ancestor graph of its output (edges labelled with the merge method or
lineage role) and which evaluator metric ranks merged versions for the ``best`` alias; a failed
merge attempt becomes a FAILED run with its error (:func:`track_failed_merge`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import yaml
from sqlmodel import Session, col, select

from flows.preparation import PreparedMerge
from flows.tracking import (
    CheckpointRecord,
    FailedMergeRecord,
    LineageEdge,
    MergeInput,
    MergeRecord,
)
from registry.models import Checkpoint, Lineage, LineageRole, MergePolicy, MergeRun, Metric
from registry.services import merge_runs as run_service
from registry.services.common import checkpoint_files, load_checkpoint

log = logging.getLogger(__name__)

#: How far up the lineage the picture of a merge reaches.
MAX_ANCESTOR_DEPTH = 50
#: Metric names that get better as they fall (when the evaluator does not say).
_LOWER_IS_BETTER = ("loss", "error", "perplexity")


def checkpoint_record(
    *, session: Session, checkpoint: Checkpoint, store_url: str
) -> CheckpointRecord:
    """A checkpoint as MLflow sees it, with its newest metric values."""
    files = checkpoint_files(session, checkpoint.id or 0)
    weights = [f for f in files if f.name.endswith(".safetensors")]
    rows = session.exec(
        select(Metric).where(Metric.checkpoint_id == checkpoint.id).order_by(col(Metric.id))
    ).all()
    return CheckpointRecord(
        id=checkpoint.id or 0,
        name=checkpoint.name,
        kind=str(checkpoint.kind),
        base_id=checkpoint.base_id,
        task=checkpoint.task,
        run=checkpoint.run,
        step=checkpoint.step,
        store_uri=f"{store_url.rstrip('/')}/{weights[0].blob_key}" if weights else "",
        sha256=weights[0].sha256 if weights else "",
        metrics={row.name: row.value for row in rows},
    )


def ancestor_edges(
    *, session: Session, checkpoint_id: int, max_depth: int = MAX_ANCESTOR_DEPTH
) -> list[LineageEdge]:
    """Every lineage edge above ``checkpoint_id`` (its inputs' ancestors too), by name.

    An edge a merge made is labelled with that merge's method; the others with their role
    (``base`` for a fine-tune's base, ``mask``, ``state``).
    """
    rows: list[Lineage] = []
    seen: set[int] = set()
    frontier = {checkpoint_id}
    for _ in range(max_depth):
        frontier -= seen
        if not frontier:
            break
        seen |= frontier
        found = session.exec(
            select(Lineage).where(col(Lineage.child_id).in_(frontier)).order_by(col(Lineage.id))
        ).all()
        rows.extend(found)
        frontier = {row.parent_id for row in found}
    ids = {row.parent_id for row in rows} | {row.child_id for row in rows}
    names = {
        c.id: c.name for c in session.exec(select(Checkpoint).where(col(Checkpoint.id).in_(ids)))
    }
    run_ids = {row.merge_run_id for row in rows if row.merge_run_id is not None}
    methods = {
        r.id: r.method for r in session.exec(select(MergeRun).where(col(MergeRun.id).in_(run_ids)))
    }
    return [
        LineageEdge(
            parent=names[row.parent_id], child=names[row.child_id], label=_edge_label(row, methods)
        )
        for row in rows
    ]


def _edge_label(row: Lineage, methods: Mapping[int | None, str]) -> str:
    if row.role == LineageRole.input and row.merge_run_id in methods:
        return methods[row.merge_run_id]
    return str(row.role)


def evaluator_metric(
    evaluator: object | None, metrics: Mapping[str, float]
) -> tuple[str | None, bool]:
    """The metric that ranks merged versions (``best`` alias) and whether higher is better.

    An evaluator may name it in a ``primary_metric`` attribute (and say ``higher_is_better``).
    Otherwise the first metric whose name contains ``avg`` is used (``accuracy/avg`` for the
    digits evaluator), else the first metric; it is lower-is-better only when the evaluator says
    so or its name mentions loss, error or perplexity.
    """
    named = getattr(evaluator, "primary_metric", None)
    if isinstance(named, str) and named not in metrics:
        log.warning("evaluator's primary_metric %r not in its metrics %s", named, sorted(metrics))
        named = None
    if not isinstance(named, str):
        named = next((n for n in metrics if "avg" in n), next(iter(metrics), None))
    declared = getattr(evaluator, "higher_is_better", None)
    if isinstance(declared, bool):
        return named, declared
    lower = named is not None and any(word in named.lower() for word in _LOWER_IS_BETTER)
    return named, not lower


def _load_evaluator(name: str | None) -> object | None:
    if name is None:
        return None
    from flows.evaluators import load_evaluator

    try:
        return load_evaluator(name)
    except Exception:  # the ranking falls back to the metric names
        log.warning("evaluator %r not loadable for MLflow ranking", name, exc_info=True)
        return None


def merge_record(
    *,
    session: Session,
    run: MergeRun,
    output_id: int,
    metrics: dict[str, float],
    prepared: PreparedMerge,
    store_url: str = "",
) -> MergeRecord:
    """The finished merge: inputs with weights, base, output, metrics and ancestor graph."""
    inputs = run_service.merge_run_inputs(session=session, run_id=run.id or 0)

    def record(checkpoint_id: int) -> CheckpointRecord:
        checkpoint = load_checkpoint(session, checkpoint_id)
        return checkpoint_record(session=session, checkpoint=checkpoint, store_url=store_url)

    base = record(run.base_id) if run.base_id is not None else None
    config = run.mergekit_config or {  # a mergekit run logs its own YAML
        "merge_method": run.method,
        "base_model": base.name if base else None,
        "models": [
            {"model": n, "parameters": p}
            for n, p in zip(prepared.model_names, prepared.model_params, strict=True)
        ],
        "parameters": run.params,
    }
    metric, higher_is_better = evaluator_metric(_load_evaluator(prepared.evaluator), metrics)
    return MergeRecord(
        run_id=run.id or 0,
        method=run.method,
        params=run.params,
        inputs=[MergeInput(checkpoint=record(i.checkpoint_id), weight=i.weight) for i in inputs],
        base=base,
        output=record(output_id),
        policy_name=prepared.policy_name,
        metrics=metrics,
        config_yaml=yaml.safe_dump(config, sort_keys=False),
        lineage_edges=ancestor_edges(session=session, checkpoint_id=output_id),
        evaluator_metric=metric,
        higher_is_better=higher_is_better,
        learnt_coefficients=(load_checkpoint(session, output_id).meta or {}).get(
            "learnt_coefficients"
        ),
    )


def failed_merge_record(
    *, session: Session, run: MergeRun, attempt: int, error: str, store_url: str = ""
) -> FailedMergeRecord:
    """A failed attempt of ``run``: its method, settings, inputs, base and error."""

    def record(checkpoint_id: int) -> CheckpointRecord:
        checkpoint = load_checkpoint(session, checkpoint_id)
        return checkpoint_record(session=session, checkpoint=checkpoint, store_url=store_url)

    inputs = run_service.merge_run_inputs(session=session, run_id=run.id or 0)
    policy = session.get(MergePolicy, run.policy_id) if run.policy_id is not None else None
    return FailedMergeRecord(
        run_id=run.id or 0,
        attempt=attempt,
        method=run.method,
        params=run.params,
        inputs=[MergeInput(checkpoint=record(i.checkpoint_id), weight=i.weight) for i in inputs],
        base=record(run.base_id) if run.base_id is not None else None,
        policy_name=policy.name if policy else None,
        error=error,
    )


def track_failed_merge(run_id: int, attempt: int, error: str) -> None:
    """Log a failed merge attempt to MLflow as a FAILED run; never raises (the tracker queues)."""
    from flows.runtime import current_runtime
    from flows.tracking import tracker_from_settings

    runtime = current_runtime()
    try:
        with runtime.session() as session:
            run = run_service.get_merge_run(session=session, run_id=run_id)
            record = failed_merge_record(
                session=session,
                run=run,
                attempt=attempt,
                error=error,
                store_url=runtime.settings.store_url,
            )
        tracker_from_settings(runtime.settings).log_failed_merge(record)
    except Exception:
        log.exception("MLflow tracking of failed merge run %s failed", run_id)
