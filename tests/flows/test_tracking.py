"""Tracking pieces without a server: records, outbox, model card, lineage picture, embedded store."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from flows.tracking import LineageEdge, MergeRecord, Tracker, is_outage
from flows.tracking.lineage_plot import layer_nodes, render_lineage_png
from flows.tracking.model_card import render_model_card
from flows.tracking.outbox import Outbox


def test_merge_record_accepts_tuples_and_round_trips_json(make_merge_record) -> None:
    record = make_merge_record()
    assert [i.weight for i in record.inputs] == [0.6, 0.4]
    assert record.lineage_edges[0] == LineageEdge(
        parent="tiny-base", child="tiny-math", label="base"
    )
    again = MergeRecord.model_validate(record.model_dump(mode="json"))
    assert again == record
    edges = {(e.parent, e.child, e.label) for e in record.all_edges()}
    assert ("tiny-math", "tiny-merged", "ties") in edges
    assert ("tiny-base", "tiny-merged", "base") in edges


def test_outbox_keeps_order_and_parks_rejected_events(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox")
    for i in range(5):
        outbox.put("checkpoint", {"i": i})
    events = outbox.pending()
    assert [e.payload["i"] for e in events] == [0, 1, 2, 3, 4]
    assert not list((tmp_path / "outbox").glob(".tmp-*"))
    outbox.done(events[0])
    parked = outbox.fail(events[1], "bad request")
    assert parked.with_suffix(".error.txt").read_text() == "bad request"
    assert [e.payload["i"] for e in outbox.pending()] == [2, 3, 4]
    assert outbox.requeue_failed() == 1
    assert [e.payload["i"] for e in outbox.pending()] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="unknown tracking event kind 'run'"):
        outbox.put("run", {})


def test_model_card_front_matter_names_merged_models(make_merge_record) -> None:
    card = render_model_card(make_merge_record())
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == ["tiny-math", "tiny-code"]
    assert front["base_model_relation"] == "merge"
    assert "| density | 0.2 |" in card and "merge_method: ties" in card


def test_lineage_layers_and_png(make_merge_record) -> None:
    edges = make_merge_record().all_edges()
    layers = layer_nodes(edges)
    assert layers == {"tiny-base": 0, "tiny-math": 1, "tiny-code": 1, "tiny-merged": 2}
    png = render_lineage_png(edges, highlight="tiny-merged")
    assert png.startswith(b"\x89PNG")


def test_outage_classification() -> None:
    down = MlflowException(
        "API request to http://127.0.0.1:9/api/2.0/mlflow/runs/create failed with exception "
        "HTTPConnectionPool(host='127.0.0.1', port=9): Max retries exceeded"
    )
    assert is_outage(down)
    assert is_outage(ConnectionRefusedError(111, "refused"))
    assert not is_outage(MlflowException("bad param", error_code="INVALID_PARAMETER_VALUE"))
    assert not is_outage(ValueError("bug"))


def test_embedded_sqlite_keeps_artifacts_beside_the_database(
    tmp_path: Path, make_merge_record, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # a stray ./mlruns would land here
    home = tmp_path / ".ckreg"
    uri = f"sqlite:///{home / 'mlflow.db'}"
    tracker = Tracker(uri, outbox_dir=home / "mlflow-outbox")
    run_id = tracker.log_merge(make_merge_record())
    assert run_id is not None and tracker.pending == 0
    client = MlflowClient(uri)
    names = {f.path for f in client.list_artifacts(run_id)}
    assert names == {"merge.yml", "model_card.md", "lineage.png", "evaluation.json"}
    assert (home / "mlartifacts").is_dir()
    assert not (tmp_path / "mlruns").exists()
    assert os.listdir(home / "mlflow-outbox") in ([], [".lock"])


def test_replay_after_partial_write_replaces_unfinished_run(
    tmp_path: Path, make_merge_record
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, outbox_dir=tmp_path / "outbox", experiment_name="partial")
    record = make_merge_record(run_id=5)
    client = MlflowClient(uri)
    # What an outage half-way through log_merge leaves behind: a run that never finished.
    stale = client.create_run(tracker.writer.experiment_id(), tags={"ckreg.merge_run_id": "5"})
    run_id = tracker.log_merge(record)
    assert run_id is not None and run_id != stale.info.run_id
    assert client.get_run(stale.info.run_id).info.lifecycle_stage == "deleted"
    runs = client.search_runs([tracker.writer.experiment_id()], "tags.`ckreg.merge_run_id` = '5'")
    assert [r.info.run_id for r in runs] == [run_id]
    assert tracker.log_merge(record) == run_id


def test_logged_model_names_are_made_acceptable_to_mlflow() -> None:
    from flows.tracking.mlflow_writer import mlflow_model_name

    assert mlflow_model_name("mwa:rot90/run.1%'x\"") == "mwa-rot90-run-1--x-"
    assert mlflow_model_name("plain-name_2") == "plain-name_2"


def test_a_sync_during_an_outage_reads_one_queued_event_not_the_backlog(
    tmp_path: Path, tracking_checkpoints
) -> None:
    from tests.services import free_port

    down = Tracker(f"http://127.0.0.1:{free_port()}", outbox_dir=tmp_path / "outbox")
    for name in ("math", "code", "math"):
        assert down.log_checkpoint(tracking_checkpoints[name]) is None
    queued = sorted((tmp_path / "outbox").glob("[0-9]*.json"))
    assert len(queued) == 3
    for later in queued[1:]:  # a sync that stops at the first event never opens these
        later.write_text("not json", encoding="utf-8")
    assert down.sync() == 0 and down.pending == 3
    first = next(Outbox(tmp_path / "outbox").iter_pending())
    assert first.kind == "checkpoint" and first.path == queued[0]


def test_events_queue_without_calling_mlflow_while_it_was_just_down(
    tmp_path: Path, tracking_checkpoints, caplog: pytest.LogCaptureFixture
) -> None:
    from tests.services import free_port

    outbox_dir = tmp_path / "outbox"
    down = Tracker(f"http://127.0.0.1:{free_port()}", outbox_dir=outbox_dir, outage_backoff_s=0.5)
    with caplog.at_level("WARNING", logger="flows.tracking.mlflow_sync"):
        for name in ("math", "code", "math"):
            assert down.log_checkpoint(tracking_checkpoints[name]) is None
        reasons = [r.getMessage() for r in caplog.records]
        assert "Connection refused" in reasons[0]  # the first event tried the server ...
        assert all("down at the last attempt" in r for r in reasons[1:])  # ... the next did not
        time.sleep(0.6)
        caplog.clear()
        assert down.log_checkpoint(tracking_checkpoints["code"]) is None
        assert "Connection refused" in caplog.records[0].getMessage()  # backoff over: tried again
    assert down.pending == 4
    # another tracking URI (MLflow moved or came back elsewhere) is not held back by the mark
    up = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", outbox_dir=outbox_dir, outage_backoff_s=60)
    assert up.log_checkpoint(tracking_checkpoints["math"]) is not None
    assert up.pending == 0
