"""Build the tracker's plain records (``flows.tracking``) from registry rows."""

from __future__ import annotations

import yaml
from sqlmodel import Session

from flows.preparation import PreparedMerge
from flows.tracking import CheckpointRecord, MergeInput, MergeRecord
from registry.models import Checkpoint, MergeRun, Metric
from registry.services import merge_runs as run_service
from registry.services.common import checkpoint_files, load_checkpoint


def checkpoint_record(
    *, session: Session, checkpoint: Checkpoint, store_url: str
) -> CheckpointRecord:
    """A checkpoint as MLflow sees it, with its newest metric values."""
    from sqlmodel import col, select

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


def merge_record(
    *,
    session: Session,
    run: MergeRun,
    output_id: int,
    metrics: dict[str, float],
    prepared: PreparedMerge,
    store_url: str = "",
) -> MergeRecord:
    """The finished merge: inputs with weights, base, output and evaluation metrics."""
    inputs = run_service.merge_run_inputs(session=session, run_id=run.id or 0)

    def record(checkpoint_id: int) -> CheckpointRecord:
        checkpoint = load_checkpoint(session, checkpoint_id)
        return checkpoint_record(session=session, checkpoint=checkpoint, store_url=store_url)

    config = {
        "merge_method": run.method,
        "base_model": prepared.base.name if prepared.base else None,
        "models": [
            {"model": n, "parameters": p}
            for n, p in zip(prepared.model_names, prepared.model_params, strict=True)
        ],
        "parameters": run.params,
    }
    return MergeRecord(
        run_id=run.id or 0,
        method=run.method,
        params=run.params,
        inputs=[MergeInput(checkpoint=record(i.checkpoint_id), weight=i.weight) for i in inputs],
        base=record(run.base_id) if run.base_id is not None else None,
        output=record(output_id),
        policy_name=prepared.policy_name,
        metrics=metrics,
        config_yaml=yaml.safe_dump(config, sort_keys=False),
        evaluator_metric=next(iter(metrics), None),
    )
