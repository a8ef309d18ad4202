"""Failed merge attempts as FAILED MLflow runs carrying their error.

One run per merge run and attempt (found again by the ``ckreg.merge_run_id`` and
``ckreg.attempt`` tags, so a replayed event adds nothing); the error is in the ``ckreg.error``
tag and the run's description, the inputs are linked as LoggedModels like a finished merge's.
A later successful attempt of the same merge run gets its own FINISHED run beside it.
"""

from __future__ import annotations

from mlflow.entities import LoggedModelInput, Param
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

from flows.tracking.mlflow_writer import (
    ATTEMPT_TAG,
    ERROR_TAG,
    MERGE_RUN_TAG,
    MlflowWriter,
    merge_params_of,
)
from flows.tracking.records import FailedMergeRecord

_TAG_LIMIT = 8000


def write_failed_merge(writer: MlflowWriter, record: FailedMergeRecord) -> str:
    """The FAILED run recording this attempt, created when missing; returns its id."""
    client = writer.client
    exp_id = writer.experiment_id()
    found = client.search_runs(
        experiment_ids=[exp_id],
        filter_string=(
            f"tags.`{MERGE_RUN_TAG}` = '{record.run_id}' "
            f"and tags.`{ATTEMPT_TAG}` = '{record.attempt}' and tags.`{ERROR_TAG}` != ''"
        ),
    )
    if found:
        return str(found[0].info.run_id)
    sources = [i.checkpoint for i in record.inputs]
    if record.base is not None:
        sources.append(record.base)
    model_ids = list(dict.fromkeys(writer.ensure_checkpoint(ck) for ck in sources))
    run = client.create_run(
        exp_id,
        run_name=f"merge-{record.run_id}-failed-attempt-{record.attempt}",
        tags=failure_tags(record),
    )
    run_id = run.info.run_id
    params = merge_params_of(
        method=record.method,
        params=record.params,
        base=record.base,
        inputs=record.inputs,
        policy_name=record.policy_name,
    )
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    client.log_inputs(run_id, models=[LoggedModelInput(m) for m in model_ids])
    client.set_terminated(run_id, "FAILED")
    return str(run_id)


def failure_tags(record: FailedMergeRecord) -> dict[str, str]:
    """Run tags: which merge run and attempt failed, with what error."""
    tags = {
        MERGE_RUN_TAG: str(record.run_id),
        ATTEMPT_TAG: str(record.attempt),
        "ckreg.method": record.method,
        ERROR_TAG: record.error[:_TAG_LIMIT] or "(no message)",
        MLFLOW_RUN_NOTE: _description(record)[:_TAG_LIMIT],
    }
    if record.policy_name:
        tags["ckreg.policy"] = record.policy_name
    return tags


def _description(record: FailedMergeRecord) -> str:
    names = ", ".join(f"`{i.checkpoint.name}`" for i in record.inputs)
    return (
        f"**{record.method}** merge of {names} **failed** (ckreg merge run {record.run_id}, "
        f"attempt {record.attempt}"
        + (f", policy `{record.policy_name}`" if record.policy_name else "")
        + f").\n\n```\n{record.error}\n```\n"
    )
