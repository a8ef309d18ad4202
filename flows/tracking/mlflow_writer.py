"""Write checkpoints and merges to MLflow idempotently (every step looks up before it creates).

Checkpoints become external LoggedModels found again by the ``ckreg.registry_id`` tag; a merge
becomes a run found again by ``ckreg.merge_run_id``; its output becomes a registered model
version found again by run id. Replaying an event after a partial failure therefore completes
it without duplicates. The experiment is marked as model development
(``mlflow.experimentKind``), so the UI opens it on its runs and models, not the GenAI overview.
"""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import LoggedModelInput, LoggedModelOutput, LoggedModelStatus, Param
from mlflow.exceptions import MlflowException
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.models.utils import get_external_mlflow_model_spec
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_IS_EXTERNAL, MLFLOW_RUN_NOTE

from flows.tracking.coefficients import log_learnt_coefficients
from flows.tracking.model_card import UI_WORKFLOW_QUERY, render_run_description
from flows.tracking.model_views import log_merge_files
from flows.tracking.records import CheckpointRecord, MergeInput, MergeRecord
from flows.tracking.registration import register_merged_model

REGISTRY_ID_TAG = "ckreg.registry_id"
MERGE_RUN_TAG = "ckreg.merge_run_id"
ERROR_TAG = "ckreg.error"
ATTEMPT_TAG = "ckreg.attempt"
#: The experiment tag the MLflow UI (3.x) reads to pick its tabs; without it an experiment
#: with no traces opens on the GenAI overview.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
#: MLflow 3.17's UI ignores that tag and picks GenAI vs model training from a URL query
#: (``UI_WORKFLOW_QUERY``) or the reviewer's last choice, kept in the browser; GenAI by default.
_PARAM_LIMIT = 6000


_MLFLOW_NAME_FORBIDDEN = re.compile(r"[:/.%\"']")


def experiment_ui_url(ui_url: str, experiment_id: str) -> str:
    """The MLflow UI page of an experiment's runs and models (not the GenAI overview)."""
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}?{UI_WORKFLOW_QUERY}"


def mlflow_model_name(name: str) -> str:
    """A LoggedModel name MLflow accepts (it rejects ``: / . % " '``); the exact registry name
    stays in the ``ckreg.*`` tags."""
    return _MLFLOW_NAME_FORBIDDEN.sub("-", name) or "checkpoint"


class MlflowWriter:
    """Records ckreg objects in one MLflow experiment."""

    def __init__(
        self, client: MlflowClient, *, experiment_name: str, artifact_location: str | None
    ) -> None:
        self.client = client
        self.experiment_name = experiment_name
        self.artifact_location = artifact_location
        self._experiment_id: str | None = None

    def experiment_id(self) -> str:
        """The experiment's id, creating the experiment on first use."""
        if self._experiment_id is None:
            found = self.client.get_experiment_by_name(self.experiment_name)
            if found is None:
                try:
                    exp_id = self.client.create_experiment(
                        self.experiment_name,
                        artifact_location=self.artifact_location,
                        tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
                    )
                except MlflowException as exc:  # another process created it first
                    found = self.client.get_experiment_by_name(self.experiment_name)
                    if found is None:
                        raise exc
                    exp_id = found.experiment_id
            else:
                exp_id = found.experiment_id
            if found is not None and EXPERIMENT_KIND_TAG not in found.tags:
                # Made by an older ckreg: mark it too (a kind chosen in the UI is kept).
                self.client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            self._experiment_id = exp_id
        return self._experiment_id

    def find_model(self, registry_id: int) -> str | None:
        """The LoggedModel id recorded for a registry checkpoint, if any."""
        models = self.client.search_logged_models(
            experiment_ids=[self.experiment_id()],
            filter_string=f"tags.`{REGISTRY_ID_TAG}` = '{registry_id}'",
            max_results=1,
        )
        return models[0].model_id if models else None

    def ensure_checkpoint(
        self, record: CheckpointRecord, *, source_run_id: str | None = None
    ) -> str:
        """The checkpoint's external LoggedModel id, created (READY, no weights) when missing."""
        existing = self.find_model(record.id)
        if existing is not None:
            model = self.client.get_logged_model(existing)
            if model.status != LoggedModelStatus.READY:
                self._finish_external(existing)
            return existing
        model = self.client.create_logged_model(
            experiment_id=self.experiment_id(),
            name=mlflow_model_name(record.name),
            source_run_id=source_run_id,
            tags={MLFLOW_MODEL_IS_EXTERNAL: "true", **checkpoint_tags(record)},
            params={f"metric.{k}": repr(float(v)) for k, v in record.metrics.items()},
            model_type=record.kind,
        )
        self._finish_external(model.model_id)
        return str(model.model_id)

    def _finish_external(self, model_id: str) -> None:
        # An MLmodel stub (metadata only) lets the registry and UI treat it like any model.
        spec = get_external_mlflow_model_spec(self.client.get_logged_model(model_id))
        with tempfile.TemporaryDirectory() as tmp:
            spec.save(str(Path(tmp) / MLMODEL_FILE_NAME))
            self.client.log_model_artifacts(model_id=model_id, local_dir=tmp)
        self.client.finalize_logged_model(model_id=model_id, status=LoggedModelStatus.READY)

    def write_merge(self, record: MergeRecord) -> str:
        """Record a merge as a finished run plus a registered model version; returns the run id."""
        exp_id = self.experiment_id()
        sources = [i.checkpoint for i in record.inputs]
        if record.base is not None:
            sources.append(record.base)
        model_ids = {ck.id: self.ensure_checkpoint(ck) for ck in sources}
        run_id = self._finished_run(record.run_id)
        if run_id is None:
            run_id = self._create_merge_run(record, exp_id=exp_id, model_ids=model_ids)
        output_id = self.ensure_checkpoint(record.output, source_run_id=run_id)
        register_merged_model(self.client, record=record, run_id=run_id, model_id=output_id)
        return run_id

    def _finished_run(self, merge_run_id: int) -> str | None:
        """Id of an already finished run for this merge; unfinished leftovers are deleted."""
        runs = self.client.search_runs(
            experiment_ids=[self.experiment_id()],
            filter_string=f"tags.`{MERGE_RUN_TAG}` = '{merge_run_id}'",
        )
        finished = None
        for run in runs:
            if ERROR_TAG in run.data.tags:
                continue  # a failed attempt, recorded on purpose (flows.tracking.failures)
            if run.info.status == "FINISHED" and finished is None:
                finished = run.info.run_id
            elif run.info.status != "FINISHED":
                self.client.delete_run(run.info.run_id)
        return finished

    def _create_merge_run(
        self, record: MergeRecord, *, exp_id: str, model_ids: dict[int, str]
    ) -> str:
        run = self.client.create_run(
            exp_id,
            run_name=f"merge-{record.run_id}-{record.output.name}",
            tags=merge_tags(record),
        )
        run_id = run.info.run_id
        output_id = self.ensure_checkpoint(record.output, source_run_id=run_id)
        model_ids = {**model_ids, record.output.id: output_id}
        self.client.log_batch(run_id, params=[Param(k, v) for k, v in merge_params(record).items()])
        self.client.log_inputs(
            run_id, models=[LoggedModelInput(m) for m in _input_model_ids(record, model_ids)]
        )
        self.client.log_outputs(run_id, models=[LoggedModelOutput(output_id, step=0)])
        now = int(time.time() * 1000)
        for key, value in sorted(record.metrics.items()):
            self.client.log_metric(
                run_id, key, float(value), timestamp=now, step=0, model_id=output_id
            )
        log_merge_files(self.client, record, run_id=run_id, model_id=output_id)
        log_learnt_coefficients(self.client, record, run_id=run_id)
        description = render_run_description(record, experiment_id=exp_id, model_ids=model_ids)
        self.client.set_tag(run_id, MLFLOW_RUN_NOTE, description)
        # The same text is the merged model's description on its page.
        self.client.set_logged_model_tags(
            output_id, {MERGE_RUN_TAG: str(record.run_id), MLFLOW_RUN_NOTE: description}
        )
        self.client.set_terminated(run_id, "FINISHED")
        return str(run_id)


def _input_model_ids(record: MergeRecord, model_ids: dict[int, str]) -> list[str]:
    ids = [model_ids[i.checkpoint.id] for i in record.inputs]
    if record.base is not None and model_ids[record.base.id] not in ids:
        ids.append(model_ids[record.base.id])
    return list(dict.fromkeys(ids))


def checkpoint_tags(record: CheckpointRecord) -> dict[str, str]:
    """Tags naming the checkpoint in the registry: id, kind, base, task, store URI, sha256."""
    tags = {
        REGISTRY_ID_TAG: str(record.id),
        "ckreg.kind": record.kind,
        "ckreg.base_id": "" if record.base_id is None else str(record.base_id),
        "ckreg.task": record.task or "",
        "ckreg.run": record.run or "",
        "ckreg.step": "" if record.step is None else str(record.step),
        "ckreg.store_uri": record.store_uri,
        "ckreg.sha256": record.sha256,
    }
    return {k: v for k, v in tags.items() if v != ""}


def merge_tags(record: MergeRecord) -> dict[str, str]:
    """Run tags that identify the merge and let a retry find its run."""
    tags = {MERGE_RUN_TAG: str(record.run_id), "ckreg.method": record.method}
    if record.policy_name:
        tags["ckreg.policy"] = record.policy_name
    tags["ckreg.output_id"] = str(record.output.id)
    return tags


def merge_params(record: MergeRecord) -> dict[str, str]:
    """Run params: the method, its settings, the base and the inputs with their weights."""
    return merge_params_of(
        method=record.method,
        params=record.params,
        base=record.base,
        inputs=record.inputs,
        policy_name=record.policy_name,
    )


def merge_params_of(
    *,
    method: str,
    params: Mapping[str, object],
    base: CheckpointRecord | None,
    inputs: Sequence[MergeInput],
    policy_name: str | None,
) -> dict[str, str]:
    """The run params of a merge (finished or failed)."""
    out: dict[str, str] = {"method": method}
    for key, value in params.items():
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        name = _param_key(key)
        out[f"param.{name}" if name in _RESERVED_PARAMS else name] = text[:_PARAM_LIMIT]
    if base is not None:
        out["ckreg.base"] = base.name
    out["ckreg.inputs"] = ", ".join(i.checkpoint.name for i in inputs)[:_PARAM_LIMIT]
    for item in inputs:
        if item.weight is not None:
            out[_param_key(f"weight.{item.checkpoint.name}")] = repr(float(item.weight))
    if policy_name:
        out["ckreg.policy"] = policy_name
    return out


_RESERVED_PARAMS = {"method"}


def _param_key(text: str) -> str:
    """MLflow param names allow letters, digits and ``_-. /``; anything else becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", text)[:250]
