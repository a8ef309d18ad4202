"""Markdown written for a merge: the merged model's card and the MLflow run description."""

from __future__ import annotations

import yaml

from flows.tracking.records import CheckpointRecord, MergeRecord

#: Keeps the MLflow UI (3.17) on its model-training pages when a link is followed.
UI_WORKFLOW_QUERY = "workflowType=machine_learning"


def render_model_card(record: MergeRecord) -> str:
    """A Hugging Face style model card: YAML front matter naming the merged models, then a summary."""
    front = {
        "base_model": [i.checkpoint.name for i in record.inputs],
        "base_model_relation": "merge",
        "tags": ["merge", "ckreg", record.method],
    }
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {record.output.name}",
        "",
        f"Merged by ckreg with **{record.method}** (merge run {record.run_id}).",
        "",
        *_inputs_table(record, link=None),
    ]
    if record.base is not None:
        lines += ["", f"Task vectors are taken against the base model `{record.base.name}`."]
    if record.params:
        lines += ["", "## Parameters", "", "| name | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in sorted(record.params.items())]
    if record.metrics:
        lines += ["", "## Evaluation", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v:.6g} |" for k, v in sorted(record.metrics.items())]
    if record.config_yaml:
        lines += ["", "## Configuration", "", "```yaml", record.config_yaml.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def render_run_description(
    record: MergeRecord, *, experiment_id: str, model_ids: dict[int, str]
) -> str:
    """Markdown for the run's description, linking each input to its MLflow model page."""

    def link(checkpoint: CheckpointRecord) -> str:
        model_id = model_ids.get(checkpoint.id)
        if model_id is None:
            return f"`{checkpoint.name}`"
        return (
            f"[{checkpoint.name}](#/experiments/{experiment_id}/models/{model_id}"
            f"?{UI_WORKFLOW_QUERY})"
        )

    lines = [
        f"**{record.method}** merge of {len(record.inputs)} checkpoints into "
        f"{link(record.output)} (ckreg merge run {record.run_id}"
        + (f", policy `{record.policy_name}`" if record.policy_name else "")
        + ").",
        "",
        *_inputs_table(record, link=link),
    ]
    if record.base is not None:
        lines += ["", f"Base model: {link(record.base)}"]
    lines += ["", "Artifacts: `lineage.png`, `evaluation.json`, `model_card.md`, `merge.yml`."]
    return "\n".join(lines) + "\n"


def _inputs_table(record: MergeRecord, *, link: object) -> list[str]:
    rows = ["| input | registry id | task | weight |", "| --- | --- | --- | --- |"]
    for item in record.inputs:
        ck = item.checkpoint
        name = link(ck) if callable(link) else f"`{ck.name}`"
        weight = "" if item.weight is None else f"{item.weight:g}"
        rows.append(f"| {name} | {ck.id} | {ck.task or ''} | {weight} |")
    return rows
