"""Log the coefficients a merge learnt (AdaMerging) on its MLflow run.

The merged checkpoint's metadata keeps them (``learnt_coefficients``: input ids, ``lambda`` per
input — one value task-wise, one per tensor layer-wise —, the tensors' order and the objective
per learning step). On the run they become:

- params ``learnt_lambda.<input name>``: the input's λ (layer-wise: the mean over tensors);
- the metric ``adamerging/entropy`` at steps 0..n-1: the objective (the merged model's
  prediction entropy on unlabeled inputs, as the flows run it) while λ was learnt;
- the artifact ``learnt_coefficients.json``: everything, with input names, for a reviewer.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from flows.tracking.records import MergeRecord

ARTIFACT = "learnt_coefficients.json"
LOSS_METRIC = "adamerging/entropy"
PARAM_PREFIX = "learnt_lambda."
_BATCH = 100  # MLflow's limit of params per log_batch (metrics: 1000)


def mean_lambda(value: float | list[float]) -> float:
    """An input's λ: the value itself (task-wise) or its mean over tensors (layer-wise)."""
    if isinstance(value, list):
        return sum(value) / len(value) if value else 0.0
    return float(value)


def learnt_params(record: MergeRecord, learnt: Mapping[str, Any]) -> dict[str, str]:
    """``learnt_lambda.<name>`` per input (``<name>_<id>`` where two inputs share a name)."""
    names = {i.checkpoint.id: i.checkpoint.name for i in record.inputs}
    counts: dict[str, int] = {}
    for name in names.values():
        counts[name] = counts.get(name, 0) + 1
    out = {}
    for input_id, value in zip(learnt.get("inputs", []), learnt.get("lambda", []), strict=False):
        name = names.get(input_id, str(input_id))
        label = name if counts.get(name, 0) <= 1 else f"{name}_{input_id}"
        key = PARAM_PREFIX + "".join(c if c.isalnum() or c in "_-. /" else "_" for c in label)
        out[key[:250]] = repr(round(mean_lambda(value), 6))
    return out


def learnt_document(record: MergeRecord, learnt: Mapping[str, Any]) -> dict[str, Any]:
    """The artifact's content: inputs by id and name, granularity, λ, tensors, loss per step."""
    names = {i.checkpoint.id: i.checkpoint.name for i in record.inputs}
    lambdas = list(learnt.get("lambda", []))
    layer = any(isinstance(v, list) for v in lambdas)
    return {
        "method": record.method,
        "granularity": "layer" if layer else "task",
        "inputs": [{"id": i, "name": names.get(i)} for i in learnt.get("inputs", [])],
        "lambda": lambdas,
        "tensors": list(learnt.get("tensors", [])),
        "loss": list(learnt.get("loss", [])),
    }


def log_learnt_coefficients(client: MlflowClient, record: MergeRecord, *, run_id: str) -> None:
    """Params, per-step metric and JSON artifact of ``record.learnt_coefficients`` (if any)."""
    learnt = record.learnt_coefficients
    if not learnt:
        return
    params = [Param(k, v) for k, v in learnt_params(record, learnt).items()]
    for start in range(0, len(params), _BATCH):
        client.log_batch(run_id, params=params[start : start + _BATCH])
    now = int(time.time() * 1000)
    losses = [
        Metric(LOSS_METRIC, float(v), now, step) for step, v in enumerate(learnt.get("loss", []))
    ]
    for start in range(0, len(losses), 10 * _BATCH):
        client.log_batch(run_id, metrics=losses[start : start + 10 * _BATCH])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ARTIFACT
        path.write_text(json.dumps(learnt_document(record, learnt), indent=1))
        client.log_artifact(run_id, str(path))
