"""MLflow lineage through the flows: REST-registered checkpoints, policy merges, an outage.

The module runs its own ``mlflow server`` (same helper as the session's ``mlflow_server``): the
flows log to the experiment ``ckreg`` keyed by registry ids, and other modules' registries (with
the same small ids) log there too on the shared server.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from mlflow import MlflowClient

from flows import runtime as flow_runtime
from flows.launchers import EmbeddedLauncher
from flows.pipelines import on_checkpoint_ready
from flows.tracking import tracker_from_settings
from flows.tracking.registration import BEST_ALIAS, LATEST_ALIAS
from flows.tracking_records import ancestor_edges, evaluator_metric
from registry.api.app import create_app
from registry.db import upgrade_database
from registry.models import CheckpointCreate, MergeRun
from registry.services import create_token
from registry.services.completion import register_directory
from registry.settings import Settings
from tests.flows.conftest import MlflowServer, start_mlflow_server
from tests.flows.fixtures_flows import *  # noqa: F403
from tests.flows.fixtures_flows import rest_upload, save_state, tiny_state
from tests.services import free_port

EVALUATOR = "ckreg-test-norm"  # metrics l2_norm, mean_abs: no primary_metric, no "avg" -> l2_norm


@pytest.fixture(scope="module")
def own_mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-flows"))
    if server is None:
        pytest.skip("the mlflow executable is not in the venv")
    yield server
    server.stop()


@dataclass
class Live:
    """The registry app with an embedded launcher, logging to a live MLflow server."""

    settings: Settings
    client: TestClient
    launcher: EmbeddedLauncher
    headers: dict[str, str]
    mlflow: MlflowClient

    def upload(self, name: str, state: Any, **fields: Any) -> int:
        return int(rest_upload(self.client, self.headers, name, state, **fields)["id"])

    def settle(self) -> None:
        """Wait for the flows and then for their MLflow logging."""
        assert self.launcher.wait_idle(60), self.launcher.errors
        assert self.launcher.errors == []
        background = self.launcher.runtime.background
        assert background is not None
        background.submit(lambda: None).result(timeout=60)


@pytest.fixture
def live(
    tmp_path: Path, own_mlflow: MlflowServer, prefect_harness: None, evaluator_plugins: Path
) -> Iterator[Live]:
    settings = Settings(
        home=tmp_path / "home", task_vectors_on_complete=False, mlflow_tracking_uri=own_mlflow.url
    )
    upgrade_database(settings.database_url)
    launcher = EmbeddedLauncher(settings, cron=False).start()
    with flow_runtime.current_runtime().session() as session:
        _, secret = create_token(session=session, name="test", scopes=["write"])
    client = MlflowClient(tracking_uri=own_mlflow.url, registry_uri=own_mlflow.url)
    with TestClient(create_app(settings, launcher=launcher)) as api:
        yield Live(settings, api, launcher, {"Authorization": f"Bearer {secret}"}, client)
    launcher.stop()
    flow_runtime.reset()


def _models(client: MlflowClient) -> dict[str, list[Any]]:
    """LoggedModels of the ``ckreg`` experiment by registry id."""
    experiment = client.get_experiment_by_name("ckreg")
    assert experiment is not None
    found: dict[str, list[Any]] = {}
    for model in client.search_logged_models(experiment_ids=[experiment.experiment_id]):
        found.setdefault(model.tags["ckreg.registry_id"], []).append(model)
    return found


def _merge_runs(live: Live) -> list[MergeRun]:
    from sqlmodel import col, select

    with flow_runtime.current_runtime().session() as session:
        return list(session.exec(select(MergeRun).order_by(col(MergeRun.id))).all())


def _alias(client: MlflowClient, name: str, alias: str) -> str:
    return str(client.get_model_version_by_alias(name, alias).version)


def test_evaluator_metric_prefers_declared_then_avg_then_first() -> None:
    class Declared:
        primary_metric = "loss/val"
        higher_is_better = False

    digits = {"accuracy/a": 0.9, "accuracy/avg": 0.8, "normalized_accuracy/avg": 0.95}
    assert evaluator_metric(Declared(), {"loss/val": 1.0, "acc": 0.5}) == ("loss/val", False)
    assert evaluator_metric(None, digits) == ("accuracy/avg", True)
    assert evaluator_metric(None, {"l2_norm": 2.0, "mean_abs": 1.0}) == ("l2_norm", True)
    assert evaluator_metric(None, {"val_loss": 2.0}) == ("val_loss", False)
    assert evaluator_metric(Declared(), {"acc": 0.5}) == ("acc", False)  # named but absent
    assert evaluator_metric(None, {}) == (None, True)


def test_policy_merges_are_tracked_and_survive_an_outage(live: Live) -> None:
    api, client = live.client, live.mlflow
    policy = f"mlflow-linear-{uuid.uuid4().hex[:8]}"
    base = live.upload("base", tiny_state(0), kind="base")
    created = api.post(
        "/api/v1/policies",
        json={
            "name": policy,
            "method": "linear",
            "selector": {"base_id": base},
            "trigger": "on_register",
            "evaluator": EVALUATOR,
        },
        headers=live.headers,
    )
    assert created.status_code == 201, created.text
    ft_a = live.upload("ft-a", tiny_state(1), base_id=base, task="a")
    ft_b = live.upload("ft-b", tiny_state(2), base_id=base, task="b")
    live.settle()

    [first] = _merge_runs(live)
    assert first.status == "succeeded" and first.mlflow_run_id, first.error
    merged = first.output_checkpoint_id
    models = _models(client)
    assert {k: len(v) for k, v in models.items()} == {str(i): 1 for i in (base, ft_a, ft_b, merged)}
    ft_model = models[str(ft_a)][0]
    assert ft_model.tags["ckreg.kind"] == "finetune" and ft_model.tags["ckreg.task"] == "a"
    assert ft_model.tags["ckreg.base_id"] == str(base)
    assert len(ft_model.tags["ckreg.sha256"]) == 64
    assert ft_model.tags["ckreg.store_uri"].startswith(live.settings.store_url)
    assert [a.path for a in client.list_logged_model_artifacts(ft_model.model_id)] == ["MLmodel"]

    run = client.get_run(first.mlflow_run_id)
    by_id = {m.model_id: k for k, [m] in models.items()}
    assert {by_id[i.model_id] for i in run.inputs.model_inputs} >= {str(ft_a), str(ft_b)}
    [output] = run.outputs.model_outputs
    assert by_id[output.model_id] == str(merged)
    assert run.data.params["method"] == "linear" and run.data.params["ckreg.policy"] == policy
    merged_model = client.get_logged_model(output.model_id)
    [l2] = [m for m in merged_model.metrics if m.key == "l2_norm"]  # logged against the model
    assert l2.run_id == run.info.run_id and l2.value == run.data.metrics["l2_norm"]
    assert float(merged_model.params["metric.l2_norm"]) == l2.value
    assert "ft-a" in run.data.tags["mlflow.note.content"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"merge.yml", "model_card.md", "lineage.png"} <= artifacts
    with flow_runtime.current_runtime().session() as session:
        edges = {
            (e.parent, e.child, e.label)
            for e in ancestor_edges(session=session, checkpoint_id=merged or 0)
        }
    merged_name = merged_model.name
    assert ("base", "ft-a", "base") in edges  # an ancestor of an input, not a direct edge
    assert ("ft-a", merged_name, "linear") in edges
    assert _alias(client, policy, LATEST_ALIAS) == _alias(client, policy, BEST_ALIAS) == "1"

    # A newer task-a fine-tune near zero: the new average has a smaller l2_norm (worse).
    live.upload("ft-a2", tiny_state(3, scale=0.01), base_id=base, task="a")
    live.settle()
    second = _merge_runs(live)[-1]
    assert second.status == "succeeded" and second.mlflow_run_id
    assert client.get_run(second.mlflow_run_id).data.metrics["l2_norm"] < l2.value
    assert _alias(client, policy, LATEST_ALIAS) == "2"
    assert _alias(client, policy, BEST_ALIAS) == "1"

    _outage_then_sync(live, policy, base)


def _outage_then_sync(live: Live, policy: str, base: int) -> None:
    """MLflow down for one merge: it succeeds, events queue, ``sync()`` sends them once."""
    client = live.mlflow
    down = live.settings.model_copy(
        update={"mlflow_tracking_uri": f"http://127.0.0.1:{free_port()}"}
    )
    runtime = flow_runtime.configure(down)  # tracking inline, into the same home's outbox
    folder = save_state(live.settings.home.parent / "src" / "ft-b2", tiny_state(4, scale=0.01))
    with runtime.session() as session:
        ft_b2 = register_directory(
            session=session,
            store=runtime.store,
            settings=down,
            data=CheckpointCreate(name="ft-b2", kind="finetune", base_id=base, task="b"),
            directory=folder,
        ).id
    [run_id] = on_checkpoint_ready(ft_b2 or 0)
    third = _merge_runs(live)[-1]
    assert third.id == run_id and third.status == "succeeded" and third.mlflow_run_id is None
    tracker = tracker_from_settings(live.settings)
    assert tracker.pending == 2  # the new checkpoint, then the merge
    assert str(ft_b2) not in _models(client)

    assert tracker.sync(raise_on_outage=True) == 2 and tracker.pending == 0
    assert tracker.sync() == 0
    models = _models(client)
    assert len(models[str(ft_b2)]) == 1 and len(models[str(third.output_checkpoint_id)]) == 1
    assert all(len(v) == 1 for v in models.values())
    runs = client.search_runs(
        [client.get_experiment_by_name("ckreg").experiment_id],  # type: ignore[union-attr]
        filter_string=f"tags.`ckreg.merge_run_id` = '{run_id}'",
    )
    assert len(runs) == 1
    versions = client.search_model_versions(f"name = '{policy}'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3]
    assert _alias(client, policy, LATEST_ALIAS) == "3"
    assert _alias(client, policy, BEST_ALIAS) == "1"


def test_failed_merge_is_logged_as_a_failed_run_with_its_error(live: Live) -> None:
    import torch

    api, client = live.client, live.mlflow
    # Two unrelated models whose tensor shapes differ: their merge fails in the engine.
    wide = live.upload("wide", {"w": torch.ones(2, 3)}, kind="base")
    tall = live.upload("tall", {"w": torch.ones(3, 2)}, kind="base")
    started = api.post(
        "/api/v1/merges",
        json={"method": "linear", "inputs": [{"checkpoint_id": wide}, {"checkpoint_id": tall}]},
        headers=live.headers,
    )
    assert started.status_code == 202, started.text
    assert live.launcher.wait_idle(180)
    assert live.launcher.errors  # the failed merge, reported by the launcher
    background = live.launcher.runtime.background
    assert background is not None
    background.submit(lambda: None).result(timeout=60)  # the MLflow logging is done
    run = api.get(f"/api/v1/merges/{started.json()['id']}").json()
    assert run["status"] == "failed" and run["error"]

    experiment = client.get_experiment_by_name("ckreg")
    assert experiment is not None
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs(
        [experiment.experiment_id], f"tags.`ckreg.merge_run_id` = '{run['id']}'"
    )
    failed = [r for r in runs if r.info.status == "FAILED"]
    assert failed, [r.info.status for r in runs]  # one FAILED run per attempt
    attempts = [r.data.tags["ckreg.attempt"] for r in failed]
    assert len(set(attempts)) == len(attempts)
    last = max(failed, key=lambda r: int(r.data.tags["ckreg.attempt"]))
    assert last.data.tags["ckreg.error"] == run["error"]
    assert last.data.params["method"] == "linear"
    assert last.data.params["ckreg.inputs"] == "wide, tall"
