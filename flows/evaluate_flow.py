"""``evaluate(checkpoint_id, evaluator)``: score a stored checkpoint, metrics back to the registry."""

from __future__ import annotations

import torch
from prefect import flow, task

from flows.evaluators import load_evaluator
from flows.retries import IO_TASK
from flows.runtime import current_runtime
from mergeops.methods.base import load_state_dict
from registry.models import MetricCreate, MetricSource
from registry.services import metrics as metric_service
from registry.services.tensors import checkpoint_tensor_source


@task(**IO_TASK)
def load_weights(checkpoint_id: int) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors as float32 on CPU, range-read from the store (I/O: retried)."""
    runtime = current_runtime()
    with runtime.session() as session:
        source = checkpoint_tensor_source(
            session=session, store=runtime.store, checkpoint_id=checkpoint_id
        )
        return load_state_dict(source, torch.device("cpu"))


@task(**IO_TASK)
def store_metrics(checkpoint_id: int, values: dict[str, float], evaluator: str) -> None:
    """Record metrics with ``source = evaluation`` (I/O: retried)."""
    rows = [
        MetricCreate(
            name=name, value=float(value), dataset=evaluator, source=MetricSource.evaluation
        )
        for name, value in values.items()
    ]
    with current_runtime().session() as session:
        metric_service.add_metrics(session=session, checkpoint_id=checkpoint_id, metrics=rows)


@flow(name="evaluate", persist_result=False)
def evaluate(checkpoint_id: int, evaluator: str) -> dict[str, float]:
    """Run evaluator ``evaluator`` on checkpoint ``checkpoint_id``; returns its metrics."""
    plugin = load_evaluator(evaluator)
    values = plugin.evaluate(load_weights(checkpoint_id))
    store_metrics(checkpoint_id, values, evaluator)
    return dict(values)
