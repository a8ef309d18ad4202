"""Lineage in a real ``mlflow server``: a merge's run, its models, the registry, and outages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from flows.tracking import FailedMergeRecord, Tracker
from flows.tracking.registration import BEST_ALIAS, LATEST_ALIAS
from tests.services import free_port


def _models_by_registry_id(client: MlflowClient, experiment_id: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for model in client.search_logged_models(experiment_ids=[experiment_id]):
        found.setdefault(model.tags.get("ckreg.registry_id", "?"), []).append(model.model_id)
    return found


def _exp(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None
    return str(experiment.experiment_id)


def test_merge_run_has_inputs_output_params_metrics_and_tags(
    mlflow_server, mlflow_experiment_name, tmp_path: Path, make_merge_record, tracking_checkpoints
) -> None:
    tracker = Tracker(
        mlflow_server.url, outbox_dir=tmp_path / "outbox", experiment_name=mlflow_experiment_name
    )
    math_id = tracker.log_checkpoint(tracking_checkpoints["math"])
    record = make_merge_record()
    run_id = tracker.log_merge(record)
    assert run_id is not None and tracker.pending == 0

    client = MlflowClient(mlflow_server.url)
    run = client.get_run(run_id)
    models = {m.model_id: m for m in client.search_logged_models([run.info.experiment_id])}
    by_name = {m.name: m for m in models.values()}
    assert by_name["tiny-math"].model_id == math_id  # logged once, reused by the merge
    math = by_name["tiny-math"]
    assert math.tags["ckreg.registry_id"] == "2" and math.tags["ckreg.kind"] == "finetune"
    assert math.tags["ckreg.sha256"] == "bb" * 32 and math.tags["ckreg.task"] == "math"
    assert math.tags["ckreg.store_uri"] == "file:///store/blobs/sha256/bb"
    assert math.tags["mlflow.model.isExternal"] == "true"

    inputs = {models[i.model_id].name for i in run.inputs.model_inputs}
    assert inputs == {"tiny-math", "tiny-code", "tiny-base"}
    [output] = run.outputs.model_outputs
    assert models[output.model_id].name == "tiny-merged"
    assert models[output.model_id].source_run_id == run_id

    assert run.data.params["method"] == "ties"
    assert run.data.params["density"] == "0.2" and run.data.params["weight.tiny-math"] == "0.6"
    assert run.data.tags["ckreg.merge_run_id"] == "11" and run.data.tags["ckreg.method"] == "ties"
    assert "tiny-math" in run.data.tags["mlflow.note.content"]
    assert run.data.metrics["accuracy"] == 0.91
    merged = client.get_logged_model(output.model_id)
    assert {(m.key, m.value) for m in merged.metrics} >= {("accuracy", 0.91)}
    assert all(m.model_id == output.model_id for m in merged.metrics)

    views = {"merge.yml", "model_card.md", "lineage.png", "evaluation.json"}
    assert {f.path for f in client.list_artifacts(run_id)} == views
    # The merged model carries the same files (its page shows them), beside its MLmodel stub.
    model_files = {f.path for f in client.list_logged_model_artifacts(output.model_id)}
    assert model_files == {*views, "MLmodel"}
    table = json.loads(
        Path(client.download_artifacts(run_id, "evaluation.json", str(tmp_path))).read_text()
    )
    assert table["columns"] == ["model", "role", "registry_id", "accuracy", "loss"]
    rows = {row[0]: row for row in table["data"]}
    assert rows["tiny-merged"][1:] == ["merged", 4, 0.91, pytest.approx(0.09)]
    assert rows["tiny-math"][1:] == ["input", 2, None, 0.25]  # its own registered loss
    assert rows["tiny-base"][1] == "base"
    logged = json.loads(run.data.tags["mlflow.loggedArtifacts"])
    assert logged == [{"path": "evaluation.json", "type": "table"}]
    # The experiment opens on its runs and models in the UI, not on the GenAI overview.
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    card = Path(client.download_artifacts(run_id, "model_card.md", str(tmp_path)))
    front = yaml.safe_load(card.read_text().split("---")[1])
    assert front == {
        **front,
        "base_model": ["tiny-math", "tiny-code"],
        "base_model_relation": "merge",
    }
    png = Path(client.download_artifacts(run_id, "lineage.png", str(tmp_path)))
    assert png.read_bytes().startswith(b"\x89PNG")


def test_registered_versions_move_newest_and_best(
    mlflow_server, mlflow_experiment_name, tmp_path: Path, make_merge_record, tracking_checkpoints
) -> None:
    tracker = Tracker(
        mlflow_server.url, outbox_dir=tmp_path / "outbox", experiment_name=mlflow_experiment_name
    )
    first = make_merge_record(run_id=1, accuracy=0.9)
    policy = first.policy_name
    assert policy is not None
    second_out = tracking_checkpoints["merged"].model_copy(
        update={"id": 5, "name": "tiny-merged-2"}
    )
    second = make_merge_record(run_id=2, accuracy=0.8, output=second_out, policy=policy)
    tracker.log_merge(first)
    tracker.log_merge(second)
    tracker.log_merge(first)  # a replay changes nothing

    client = MlflowClient(mlflow_server.url, registry_uri=mlflow_server.url)
    versions = client.search_model_versions(f"name = '{policy}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    assert client.get_model_version_by_alias(policy, LATEST_ALIAS).version == "2"
    assert client.get_model_version_by_alias(policy, BEST_ALIAS).version == "1"
    # OSS MLflow does not keep a version's model_id; the link is the model's own tag.
    models = client.search_logged_models([_exp(client, mlflow_experiment_name)])
    [merged] = [m for m in models if m.name == "tiny-merged"]
    assert json.loads(merged.tags["mlflow.modelVersions"]) == [{"name": policy, "version": 1}]
    assert (
        client.get_model_version(policy, "1").run_id
        == client.get_logged_model(merged.model_id).source_run_id
    )


def test_outage_queues_events_and_next_success_syncs_them(
    mlflow_server, mlflow_experiment_name, tmp_path: Path, make_merge_record, tracking_checkpoints
) -> None:
    outbox = tmp_path / "outbox"
    down = Tracker(
        f"http://127.0.0.1:{free_port()}", outbox_dir=outbox, experiment_name=mlflow_experiment_name
    )
    record = make_merge_record(run_id=21)
    assert down.log_checkpoint(tracking_checkpoints["math"]) is None
    assert down.log_merge(record) is None
    assert down.pending == 2 and down.sync() == 0

    up = Tracker(mlflow_server.url, outbox_dir=outbox, experiment_name=mlflow_experiment_name)
    assert up.sync() == 2 and up.pending == 0
    client = MlflowClient(mlflow_server.url)
    experiment = client.get_experiment_by_name(mlflow_experiment_name)
    [found] = client.search_runs([experiment.experiment_id], "tags.`ckreg.merge_run_id` = '21'")
    run = client.get_run(found.info.run_id)  # search results leave out model inputs
    assert len(run.inputs.model_inputs) == 3 and run.data.metrics["accuracy"] == 0.91

    # Another outage: the queued merge goes out first on the next successful call.
    later = make_merge_record(
        run_id=22, output=tracking_checkpoints["merged"].model_copy(update={"id": 6, "name": "m6"})
    )
    assert down.log_merge(later) is None and down.pending == 1
    assert up.log_checkpoint(tracking_checkpoints["code"]) is not None
    assert up.pending == 0
    assert client.search_runs([experiment.experiment_id], "tags.`ckreg.merge_run_id` = '22'")

    # A retried sync (same event queued twice) duplicates nothing.
    up.outbox.put("merge", record.model_dump(mode="json"))
    assert up.sync() == 1
    assert (
        len(client.search_runs([experiment.experiment_id], "tags.`ckreg.merge_run_id` = '21'")) == 1
    )
    counts = _models_by_registry_id(client, experiment.experiment_id)
    assert {k: len(v) for k, v in counts.items()} == {"1": 1, "2": 1, "3": 1, "4": 1, "6": 1}


def test_server_mode_keeps_artifacts_in_s3(
    mlflow_server_s3, mlflow_experiment_name, tmp_path: Path, make_merge_record, s3_endpoint
) -> None:
    import boto3

    server, destination = mlflow_server_s3
    tracker = Tracker(
        server.url, outbox_dir=tmp_path / "outbox", experiment_name=mlflow_experiment_name
    )
    run_id = tracker.log_merge(make_merge_record())
    assert run_id is not None and tracker.pending == 0

    bucket, prefix = destination.removeprefix("s3://").split("/", 1)
    s3 = boto3.client(
        "s3", endpoint_url=s3_endpoint, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing",
    )  # fmt: skip
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    for name in ("merge.yml", "model_card.md", "lineage.png", "evaluation.json"):
        assert any(k.endswith(f"{run_id}/artifacts/{name}") for k in keys), (name, keys)
    # External models: the MLmodel stub (and the merged model's views), never weights.
    model_files = {k.rsplit("/", 1)[1] for k in keys if "/models/" in k}
    assert model_files == {
        "MLmodel",
        "merge.yml",
        "model_card.md",
        "lineage.png",
        "evaluation.json",
    }


def test_failed_merge_is_a_failed_run_with_its_error(
    mlflow_server, mlflow_experiment_name, tmp_path: Path, make_merge_record
) -> None:
    tracker = Tracker(
        mlflow_server.url, outbox_dir=tmp_path / "outbox", experiment_name=mlflow_experiment_name
    )
    done = make_merge_record(run_id=31)
    failed = FailedMergeRecord(
        run_id=31, attempt=1, method="ties", params={"density": 0.2}, inputs=done.inputs,
        base=done.base, policy_name=done.policy_name,
        error="ValueError: two models are named 'checkpoint-30'",
    )  # fmt: skip
    run_id = tracker.log_failed_merge(failed)
    assert run_id is not None
    assert tracker.log_failed_merge(failed) == run_id  # a replay adds nothing
    # A later attempt that succeeds gets its own run; the failed one stays.
    finished_id = tracker.log_merge(done)
    assert finished_id is not None and finished_id != run_id

    client = MlflowClient(mlflow_server.url)
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["ckreg.error"] == "ValueError: two models are named 'checkpoint-30'"
    assert "checkpoint-30" in run.data.tags["mlflow.note.content"]
    assert run.data.tags["ckreg.attempt"] == "1" and run.data.params["density"] == "0.2"
    models = {m.model_id: m.name for m in client.search_logged_models([run.info.experiment_id])}
    assert {models[i.model_id] for i in run.inputs.model_inputs} == {
        "tiny-math",
        "tiny-code",
        "tiny-base",
    }
    runs = client.search_runs([run.info.experiment_id], "tags.`ckreg.merge_run_id` = '31'")
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]
