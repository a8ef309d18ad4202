"""AdaMerging's learnt coefficients on the merge's MLflow run (issue 19, item 2): params per
input, the objective per step as a metric, and the JSON artifact — on the session's real
``mlflow server`` (each test its own experiment)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from flows import runtime as flow_runtime
from flows.merge_flow import merge_checkpoints
from flows.tracking.coefficients import ARTIFACT, LOSS_METRIC, learnt_params
from registry.db import upgrade_database
from registry.models import Checkpoint, MergeRun
from registry.services import merge_runs as run_service
from registry.settings import Settings
from tests.flows.conftest import MlflowServer
from tests.flows.fixtures_flows import *  # noqa: F403
from tests.flows.fixtures_flows import FlowEnv, tiny_state


@pytest.fixture
def tracked_env(
    tmp_path: Path,
    mlflow_server: MlflowServer,
    mlflow_experiment_name: str,
    prefect_harness: None,
    evaluator_plugins: Path,
) -> Iterator[FlowEnv]:
    settings = Settings(
        home=tmp_path / "home",
        task_vectors_on_complete=False,
        mlflow_tracking_uri=mlflow_server.url,
        mlflow_experiment=mlflow_experiment_name,
    )
    upgrade_database(settings.database_url)
    flow_runtime.configure(settings)
    yield FlowEnv(settings=settings, tmp=tmp_path)
    flow_runtime.reset()


def _adamerging(env: FlowEnv, granularity: str, steps: int) -> tuple[int, list[int]]:
    base = env.register("base", tiny_state(0), kind="base")
    inputs = [
        env.register(f"ft-{t}", tiny_state(i + 1), base_id=base, task=t) for i, t in enumerate("ab")
    ]
    request = run_service.MergeRequest(
        method="adamerging",
        base_id=base,
        inputs=[run_service.MergeInputSpec(checkpoint_id=i) for i in inputs],
        params={"granularity": granularity, "steps": steps, "lr": 0.05},
        evaluator="ckreg-test-norm",  # its unlabeled objective is the squared norm
    )
    with env.session() as session:
        run, _ = run_service.create_merge_run(session=session, request=request)
    return run.id or 0, inputs


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_learnt_coefficients_are_logged_on_the_merge_run(
    tracked_env: FlowEnv, mlflow_server: MlflowServer, granularity: str
) -> None:
    run_id, inputs = _adamerging(tracked_env, granularity, steps=12)
    output = merge_checkpoints(run_id)
    with tracked_env.session() as session:
        learnt = session.get(Checkpoint, output).meta["learnt_coefficients"]
        mlflow_run_id = session.get(MergeRun, run_id).mlflow_run_id  # type: ignore[union-attr]
    assert mlflow_run_id, "the merge was not tracked"
    assert len(learnt["loss"]) == 12 and learnt["loss"][-1] < learnt["loss"][0]

    client = MlflowClient(tracking_uri=mlflow_server.url)
    run = client.get_run(mlflow_run_id)
    for name, value in zip(("ft-a", "ft-b"), learnt["lambda"], strict=True):
        expected = value if granularity == "task" else sum(value) / len(value)
        assert float(run.data.params[f"learnt_lambda.{name}"]) == pytest.approx(expected, abs=1e-6)
    history = client.get_metric_history(mlflow_run_id, LOSS_METRIC)
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(12))
    by_step = {m.step: m.value for m in history}
    assert [by_step[s] for s in range(12)] == pytest.approx(learnt["loss"], rel=1e-5)

    local = Path(client.download_artifacts(mlflow_run_id, ARTIFACT, str(tracked_env.tmp)))
    document = json.loads(local.read_text())
    assert document["granularity"] == granularity
    assert document["inputs"] == [
        {"id": inputs[0], "name": "ft-a"},
        {"id": inputs[1], "name": "ft-b"},
    ]
    assert document["lambda"] == learnt["lambda"] and document["tensors"] == learnt["tensors"]


def test_a_merge_that_learnt_nothing_logs_no_coefficients(
    tracked_env: FlowEnv, mlflow_server: MlflowServer
) -> None:
    base = tracked_env.register("base", tiny_state(0), kind="base")
    ft = tracked_env.register("ft-a", tiny_state(1), base_id=base, task="a")
    request = run_service.MergeRequest(
        method="task_arithmetic",
        base_id=base,
        inputs=[run_service.MergeInputSpec(checkpoint_id=ft)],
    )
    with tracked_env.session() as session:
        run, _ = run_service.create_merge_run(session=session, request=request)
    merge_checkpoints(run.id)
    with tracked_env.session() as session:
        mlflow_run_id = session.get(MergeRun, run.id).mlflow_run_id  # type: ignore[union-attr]
    client = MlflowClient(tracking_uri=mlflow_server.url)
    data = client.get_run(mlflow_run_id).data
    assert not [k for k in data.params if k.startswith("learnt_lambda.")]
    assert LOSS_METRIC not in data.metrics
    assert ARTIFACT not in {a.path for a in client.list_artifacts(mlflow_run_id)}


def test_inputs_sharing_a_name_get_their_id_in_the_param() -> None:
    from flows.tracking.records import CheckpointRecord, MergeRecord

    def ck(i: int, name: str) -> CheckpointRecord:
        return CheckpointRecord(id=i, name=name, kind="finetune")

    record = MergeRecord(run_id=1, method="adamerging", inputs=[ck(2, "ft"), ck(3, "ft")],
                         output=ck(4, "merged"))  # fmt: skip
    params = learnt_params(record, {"inputs": [2, 3], "lambda": [[0.1, 0.3], 0.5]})
    assert params == {"learnt_lambda.ft_2": "0.2", "learnt_lambda.ft_3": "0.5"}
