"""What a reviewer sees of a merge in MLflow: the files logged on its run and merged model.

Both the run and the merged LoggedModel get ``lineage.png`` (the ancestor graph),
``evaluation.json`` (the merged model's evaluation metrics beside its inputs' and base's, as an
MLflow table), ``model_card.md`` and ``merge.yml``; the run lists the table in its
``mlflow.loggedArtifacts`` tag so the UI offers it in its table views.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from mlflow import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

from flows.tracking.lineage_plot import render_lineage_png
from flows.tracking.model_card import render_model_card
from flows.tracking.records import CheckpointRecord, MergeRecord

EVALUATION_TABLE = "evaluation.json"
LINEAGE_PICTURE = "lineage.png"


def evaluation_table(record: MergeRecord) -> dict[str, list[object]]:
    """``{"columns": [...], "data": [...]}``: one row per model (merged, inputs, base), one
    column per metric of the merge's evaluation; empty cells where a model has no such value."""
    metrics = sorted(record.metrics)
    rows: list[list[object]] = [
        [record.output.name, "merged", record.output.id, *(record.metrics[m] for m in metrics)]
    ]

    def row(checkpoint: CheckpointRecord, role: str) -> list[object]:
        return [checkpoint.name, role, checkpoint.id, *(checkpoint.metrics.get(m) for m in metrics)]

    rows += [row(item.checkpoint, "input") for item in record.inputs]
    if record.base is not None:
        rows.append(row(record.base, "base"))
    return {"columns": ["model", "role", "registry_id", *metrics], "data": rows}


def write_merge_files(record: MergeRecord, folder: Path) -> list[str]:
    """Write the merge's files into ``folder``; returns their names."""
    files = {
        LINEAGE_PICTURE: render_lineage_png(record.all_edges(), highlight=record.output.name),
        EVALUATION_TABLE: json.dumps(evaluation_table(record), indent=1).encode(),
        "model_card.md": render_model_card(record).encode(),
    }
    if record.config_yaml:
        files["merge.yml"] = record.config_yaml.encode()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return sorted(files)


def log_merge_files(
    client: MlflowClient, record: MergeRecord, *, run_id: str, model_id: str
) -> None:
    """Log the merge's files on its run and on the merged LoggedModel."""
    with tempfile.TemporaryDirectory() as tmp:
        write_merge_files(record, Path(tmp))
        client.log_artifacts(run_id, tmp)
        client.log_model_artifacts(model_id=model_id, local_dir=tmp)
    logged = [{"path": EVALUATION_TABLE, "type": "table"}]
    client.set_tag(run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps(logged))
