"""Garbage collection running while 20 uploads and 5 merges are in flight, on the file store and
on S3 (the session's moto_server): nothing referenced or in flight is deleted (every blob of every
ready checkpoint verifies by sha256 afterwards) and every orphan planted before it started is
reclaimed. Two uploads pause between storing their blob and attaching it until a collection has
run, so the grace period and the touch of deduplicated content are exercised deterministically.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import torch
from safetensors.torch import save
from sqlmodel import Session, select

from flows import runtime as flow_runtime
from flows.pipelines import merge_checkpoints
from registry.db import upgrade_database
from registry.models import Artifact, Checkpoint, CheckpointCreate, CheckpointStatus
from registry.services import collect_garbage, complete_checkpoint, create_checkpoint
from registry.services import merge_runs as run_service
from registry.services.blobs import stored_blob
from registry.services.deletion import delete_checkpoint_report
from registry.services.files import attach_file
from registry.services.gc import GcReport
from registry.settings import Settings
from registry.storage import BlobInfo
from registry.storage.codecs import iter_original
from tests.flows.fixtures_flows import *  # noqa: F403
from tests.flows.fixtures_flows import FlowEnv, tiny_state

HOUR = 3600.0


@pytest.fixture(params=["file", "s3"])
def lifecycle_env(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    prefect_harness: None,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[FlowEnv]:
    overrides: dict[str, object] = {}
    if request.param == "s3":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        overrides = {
            "store_url": request.getfixturevalue("s3_store_url"),
            "s3_endpoint_url": request.getfixturevalue("s3_endpoint"),
        }
    settings = Settings(
        home=tmp_path / "home",
        task_vectors_on_complete=False,
        mlflow_tracking_uri="http://127.0.0.1:9",
        **overrides,  # type: ignore[arg-type]
    )
    upgrade_database(settings.database_url)
    flow_runtime.configure(settings)
    yield FlowEnv(settings=settings, tmp=tmp_path)
    flow_runtime.reset()


def _bytes(state: dict[str, torch.Tensor]) -> bytes:
    return save({k: v.contiguous() for k, v in state.items()})


class Collector:
    """Runs collections back to back (cutoff fixed at ``t0``) until stopped, plus a last one."""

    def __init__(self, t0: datetime) -> None:
        self.now = t0 + timedelta(seconds=HOUR)  # grace 1 h counted back from here = t0
        self.reports: list[GcReport] = []
        self.stop = threading.Event()
        self.passed = threading.Condition()

    def run_once(self) -> None:
        runtime = flow_runtime.current_runtime()
        with Session(runtime.engine, expire_on_commit=False) as session:
            report = collect_garbage(
                session=session,
                store=runtime.store,
                grace_s=HOUR,
                upload_ttl_s=24 * HOUR,
                dry_run=False,
                now=self.now,
            )
        with self.passed:
            self.reports.append(report)
            self.passed.notify_all()

    def loop(self) -> None:
        while not self.stop.wait(0.05):  # back to back, leaving the CPUs to the uploads
            self.run_once()
        self.run_once()

    def wait_for_pass_after(self, count: int) -> None:
        with self.passed:
            assert self.passed.wait_for(lambda: len(self.reports) > count, timeout=120)


def _upload(
    env: FlowEnv,
    name: str,
    data: bytes,
    collector: Collector | None = None,
    stored: BlobInfo | None = None,
) -> int:
    """Create, store (unless ``stored``), attach and complete one checkpoint; with
    ``collector``, pause between storing the blob and attaching it until a collection has run."""
    runtime = flow_runtime.current_runtime()
    with Session(runtime.engine, expire_on_commit=False) as session:
        checkpoint = create_checkpoint(
            session=session, data=CheckpointCreate(name=name, kind="base")
        )
        info = stored or runtime.store.put_stream([data])
        if collector is not None:
            collector.wait_for_pass_after(len(collector.reports))
        attach_file(
            session=session,
            store=runtime.store,
            checkpoint=checkpoint,
            name="model.safetensors",
            info=info,
        )
        complete_checkpoint(
            session=session,
            store=runtime.store,
            settings=env.settings,
            checkpoint_id=checkpoint.id or 0,
        )
        return checkpoint.id or 0


def _plant(env: FlowEnv, base: int) -> tuple[list[str], dict[int, bytes]]:
    """Orphans: random blobs, a deleted checkpoint's released blob, and blobs whose content
    five of the uploads will bring back (content-addressed re-uploads)."""
    store = flow_runtime.current_runtime().store
    planted = [store.put_bytes(os.urandom(200 + i)).key for i in range(12)]
    doomed = env.register("doomed", tiny_state(99), base_id=base, task="x")
    with env.session() as session:
        released = delete_checkpoint_report(
            session=session, store=store, checkpoint_id=doomed
        ).released
    assert len(released) == 1
    revived = {i: _bytes(tiny_state(300 + i)) for i in range(5)}
    for data in revived.values():
        store.put_bytes(data)
    return planted + released, revived


def _merge_runs(inputs: list[int], base: int) -> list[int]:
    pairs = [(a, b) for i, a in enumerate(inputs) for b in inputs[i + 1 :]][:5]
    runs = []
    runtime = flow_runtime.current_runtime()
    for a, b in pairs:
        request = run_service.MergeRequest(
            method="task_arithmetic",
            base_id=base,
            inputs=[run_service.MergeInputSpec(checkpoint_id=i) for i in (a, b)],
        )
        with Session(runtime.engine, expire_on_commit=False) as session:
            run, _ = run_service.create_merge_run(session=session, request=request)
            runs.append(run.id or 0)
    return runs


def _verify_ready_checkpoints() -> int:
    """Every blob of every ready checkpoint exists and hashes to its row's sha256."""
    runtime = flow_runtime.current_runtime()
    checked = 0
    with Session(runtime.engine) as session:
        query = (
            select(Artifact).join(Checkpoint).where(Checkpoint.status == CheckpointStatus.ready)  # type: ignore[arg-type]
        )
        for row in session.exec(query).all():
            blob = stored_blob(session, row)
            assert all(runtime.store.exists(key) for key in sorted(blob.keys())), row.name
            digest = hashlib.sha256(b"".join(iter_original(runtime.store, blob))).hexdigest()
            assert digest == row.sha256, f"checkpoint {row.checkpoint_id} file '{row.name}'"
            checked += 1
    return checked


def test_gc_during_uploads_and_merges(lifecycle_env: FlowEnv) -> None:
    env = lifecycle_env
    store = flow_runtime.current_runtime().store
    base = env.register("base", tiny_state(0), kind="base")
    fine_tunes = [
        env.register(f"ft-{i}", tiny_state(i + 1), base_id=base, task=f"t{i}") for i in range(4)
    ]
    planted, revived = _plant(env, base)
    runs = _merge_runs(fine_tunes, base)
    time.sleep(1.2)  # S3's Last-Modified has whole seconds: all later writes are after t0
    collector = Collector(datetime.now(UTC))
    uploads = {f"up-{i}": _bytes(tiny_state(100 + i)) for i in range(15)}
    uploads |= {f"revived-{i}": data for i, data in revived.items()}
    paused = {"up-0", "revived-0"}  # pause between storing and attaching
    # revived-0 stores its (already stored, long orphaned) content before gc starts: a touch
    touched = store.put_stream([uploads["revived-0"]])
    cutoff = collector.now - timedelta(seconds=HOUR + 1)  # see gc.MTIME_RESOLUTION_S
    assert not touched.created and store.modified(touched.key) >= cutoff
    gc_thread = threading.Thread(target=collector.loop, name="gc")
    gc_thread.start()
    try:
        with ThreadPoolExecutor(max_workers=6) as pool:
            merged = [pool.submit(merge_checkpoints, run_id) for run_id in runs]
            uploaded = [
                pool.submit(
                    _upload,
                    env,
                    name,
                    data,
                    collector if name in paused else None,
                    touched if name == "revived-0" else None,
                )
                for name, data in uploads.items()
            ]
            outputs = [future.result(timeout=600) for future in merged]
            ids = [future.result(timeout=600) for future in uploaded]
    finally:
        collector.stop.set()
        gc_thread.join(timeout=300)
    assert len(collector.reports) >= 3 and len(ids) == 20
    assert all(output is not None for output in outputs), outputs
    with env.session() as session:
        statuses = {session.get(Checkpoint, i).status for i in [*ids, *outputs]}  # type: ignore[union-attr]
    assert statuses == {CheckpointStatus.ready}
    assert _verify_ready_checkpoints() >= 20 + 5 + 5
    deleted = {key for report in collector.reports for key in report.deleted}
    assert set(planted) <= deleted, "every orphan planted before gc started is reclaimed"
    assert not any(store.exists(key) for key in planted)
    assert all(
        store.exists(f"blobs/sha256/{hashlib.sha256(d).hexdigest()}") for d in revived.values()
    )
    # The paused uploads' blobs sat unreferenced in the store while a collection ran: only the
    # grace period (fresh write, or the touch of re-uploaded content) kept them.
    assert sum(report.young + len(report.kept_on_recheck) for report in collector.reports) >= 1
    assert touched.key not in deleted, "the touched orphan was in flight, never deleted"
