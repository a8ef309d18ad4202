"""Issue 9: a merge logged while MLflow was down gets ``MergeRun.mlflow_run_id`` once the queued
event reaches MLflow, by ``sync()`` or by the next successful call (real ``mlflow server``)."""

from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient
from sqlmodel import Session

from flows.tracking import Tracker
from registry.db import make_engine, upgrade_database
from registry.models import MergeRun
from tests.services import free_port


def _merge_runs(database_url: str, count: int) -> list[int]:
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            runs = [MergeRun(method="ties", idempotency_key=f"{i:064d}") for i in range(count)]
            session.add_all(runs)
            session.commit()
            return [run.id or 0 for run in runs]
    finally:
        engine.dispose()


def _mlflow_run_id(database_url: str, run_id: int) -> str | None:
    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            run = session.get(MergeRun, run_id)
            assert run is not None
            return run.mlflow_run_id
    finally:
        engine.dispose()


def test_queued_merge_gets_its_mlflow_run_id_when_synced(
    mlflow_server, mlflow_experiment_name, tmp_path: Path, make_merge_record
) -> None:
    database_url = f"sqlite:///{tmp_path / 'registry.db'}"
    upgrade_database(database_url)
    first, second = _merge_runs(database_url, 2)
    outbox = tmp_path / "outbox"
    trackers = {
        name: Tracker(
            url,
            outbox_dir=outbox,
            experiment_name=mlflow_experiment_name,
            database_url=database_url,
        )
        for name, url in (
            ("down", f"http://127.0.0.1:{free_port()}"),
            ("up", mlflow_server.url),
        )
    }
    assert trackers["down"].log_merge(make_merge_record(run_id=first)) is None
    assert _mlflow_run_id(database_url, first) is None

    assert trackers["up"].sync() == 1
    client = MlflowClient(mlflow_server.url)
    experiment = client.get_experiment_by_name(mlflow_experiment_name)
    assert experiment is not None
    [found] = client.search_runs(
        [experiment.experiment_id], f"tags.`ckreg.merge_run_id` = '{first}'"
    )
    assert _mlflow_run_id(database_url, first) == found.info.run_id

    # Queued again; this time the next successful call (another merge) flushes it first.
    assert trackers["down"].log_merge(make_merge_record(run_id=second)) is None
    direct = trackers["up"].log_merge(make_merge_record(run_id=first, accuracy=0.5))
    assert direct is not None
    [queued] = client.search_runs(
        [experiment.experiment_id], f"tags.`ckreg.merge_run_id` = '{second}'"
    )
    assert _mlflow_run_id(database_url, second) == queued.info.run_id
