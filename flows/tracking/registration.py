"""Merged models as registered model versions: one registered model per policy, two aliases.

MLflow reserves the alias ``latest`` (``models:/<policy>/latest`` already resolves to the newest
version), so the newest version gets the alias ``newest`` instead; ``best`` points at the
version with the best value of the policy's evaluator metric (kept as a version tag so the
comparison needs no run lookups).
"""

from __future__ import annotations

import json

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from flows.tracking.records import MergeRecord

ADHOC_MODEL_NAME = "ckreg-adhoc"
EVALUATOR_VALUE_TAG = "ckreg.evaluator_value"
LATEST_ALIAS = "newest"
BEST_ALIAS = "best"


def registered_model_name(policy_name: str | None) -> str:
    """The registered model a merge's output is versioned under."""
    return policy_name or ADHOC_MODEL_NAME


def register_merged_model(
    client: MlflowClient, *, record: MergeRecord, run_id: str, model_id: str
) -> ModelVersion:
    """Create (or find) the version for this run and move ``newest``/``best`` as earned."""
    name = registered_model_name(record.policy_name)
    _ensure_registered_model(client, name)
    version = _find_version(client, name=name, run_id=run_id)
    if version is None:
        tags = {
            "ckreg.merge_run_id": str(record.run_id),
            "ckreg.registry_id": str(record.output.id),
        }
        score = _score(record)
        if score is not None:
            tags[EVALUATOR_VALUE_TAG] = repr(score)
            tags["ckreg.evaluator_metric"] = str(record.evaluator_metric)
        version = client.create_model_version(
            name=name,
            # Not `models:/<id>`: the SQL registry resolves that through the *global* tracking
            # URI, not this client's, so give the model's own artifact location.
            source=client.get_logged_model(model_id).artifact_location,
            run_id=run_id,
            model_id=model_id,
            tags=tags,
            description=f"{record.method} merge -> {record.output.name}",
            await_creation_for=0,  # registering an external model copies nothing
        )
    _link_version_on_model(client, model_id=model_id, version=version)
    _move_latest(client, name=name, version=version)
    _move_best(client, name=name, version=version, higher_is_better=record.higher_is_better)
    return version


def _link_version_on_model(client: MlflowClient, *, model_id: str, version: ModelVersion) -> None:
    """List the version on the LoggedModel (``mlflow.modelVersions``), as MLflow's own
    ``register_model`` does, so the UI's model page shows its registrations."""
    # An MLflow server adds this tag itself (version as int); the local SQL store does not.
    raw = client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS)
    existing = json.loads(raw) if raw else []
    known = {(e.get("name"), str(e.get("version"))) for e in existing}
    if (version.name, str(version.version)) not in known:
        entry = {"name": version.name, "version": int(version.version)}
        client.set_logged_model_tags(
            model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*existing, entry])}
        )


def _score(record: MergeRecord) -> float | None:
    if record.evaluator_metric is None:
        return None
    value = record.metrics.get(record.evaluator_metric)
    return None if value is None else float(value)


def _ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.create_registered_model(name, tags={"ckreg.kind": "merge-policy"})
    except MlflowException as exc:
        if exc.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise


def _find_version(client: MlflowClient, *, name: str, run_id: str) -> ModelVersion | None:
    found = client.search_model_versions(f"name = '{_quote(name)}' and run_id = '{run_id}'")
    return found[0] if found else None


def _alias_version(client: MlflowClient, *, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _move_latest(client: MlflowClient, *, name: str, version: ModelVersion) -> None:
    # A replayed old event must not move the alias backwards.
    current = _alias_version(client, name=name, alias=LATEST_ALIAS)
    if current is None or int(current.version) <= int(version.version):
        client.set_registered_model_alias(name, LATEST_ALIAS, str(version.version))


def _move_best(
    client: MlflowClient, *, name: str, version: ModelVersion, higher_is_better: bool
) -> None:
    score = _tag_score(version)
    if score is None:
        return
    current = _alias_version(client, name=name, alias=BEST_ALIAS)
    best = None if current is None else _tag_score(current)
    better = best is None or (score > best if higher_is_better else score < best)
    if better:
        client.set_registered_model_alias(name, BEST_ALIAS, str(version.version))


def _tag_score(version: ModelVersion) -> float | None:
    raw = (version.tags or {}).get(EVALUATOR_VALUE_TAG)
    return None if raw is None else float(raw)


def _quote(text: str) -> str:
    return text.replace("'", "\\'")
