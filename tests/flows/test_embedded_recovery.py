"""Issue 18 item 3/6: the embedded launcher recovers what a crash left, at start-up and by its
periodic sweep. The crash-like state is made directly in the database: a ready fine-tune matching
an on_register policy with no run (its ready event died with the process), a pending checkpoint
older than the pending TTL, and a ready checkpoint whose ``complete`` died before compressing.
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import torch
from sqlalchemy import update
from sqlmodel import col, select

from flows import runtime as flow_runtime
from flows.launchers import EmbeddedLauncher, recovery_sweep
from registry.models import (
    Artifact,
    Checkpoint,
    CheckpointCreate,
    CheckpointKind,
    CheckpointStatus,
    MergeRun,
    MergeRunStatus,
    utcnow,
)
from registry.services.checkpoints import create_checkpoint
from registry.services.completion import register_directory
from registry.services.files import add_file_from_path
from tests.flows.fixtures_flows import *  # noqa: F403
from tests.flows.fixtures_flows import FlowEnv, save_state, tiny_state

TTL_S = 2.0


def _stale_pending(env: FlowEnv, name: str) -> int:
    """A pending checkpoint with one uploaded file, both dated an hour ago (an abandoned upload)."""
    runtime = flow_runtime.current_runtime()
    folder = save_state(env.tmp / "src" / name, tiny_state(7))
    with env.session() as session:
        checkpoint = create_checkpoint(
            session=session, data=CheckpointCreate(name=name, kind=CheckpointKind.base)
        )
        checkpoint_id = checkpoint.id or 0
        add_file_from_path(
            session=session,
            store=runtime.store,
            checkpoint_id=checkpoint_id,
            path=folder / "model.safetensors",
        )
        old = utcnow() - timedelta(hours=1)
        session.execute(
            update(Checkpoint).where(col(Checkpoint.id) == checkpoint_id).values(created_at=old)
        )
        session.execute(
            update(Artifact)
            .where(col(Artifact.checkpoint_id) == checkpoint_id)
            .values(created_at=old)
        )
        session.commit()
    return checkpoint_id


def _uncompressed(env: FlowEnv) -> int:
    """A ready fine-tune whose ``complete`` stopped before compressing (compression skipped)."""
    runtime = flow_runtime.current_runtime()
    state = {"big.weight": torch.randn(160, 128, generator=torch.Generator().manual_seed(3))}
    folder = save_state(env.tmp / "src" / "raw", state)
    with env.session() as session:
        checkpoint = register_directory(
            session=session,
            store=runtime.store,
            settings=env.settings.model_copy(update={"store_compression": "off"}),
            data=CheckpointCreate(name="raw", kind=CheckpointKind.base),
            directory=folder,
        )
    return checkpoint.id or 0


def _wait(condition, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.1)


def test_embedded_start_recovers_lost_merges_stale_pending_and_compression(
    flow_env: FlowEnv, tmp_path: Path
) -> None:
    base = flow_env.register("base", tiny_state(0), kind="base")
    policy = flow_env.policy(
        name="avg", method="linear", selector={"base_id": base}, trigger="on_register"
    )
    # Registered through the services without a launcher: the ready events are lost.
    flow_env.register("ft-a", tiny_state(1), base_id=base, task="a")
    flow_env.register("ft-b", tiny_state(2), base_id=base, task="b")
    pending = _stale_pending(flow_env, "abandoned")
    raw = _uncompressed(flow_env)
    with flow_env.session() as session:
        assert session.exec(select(MergeRun)).all() == []
    settings = flow_env.settings.model_copy(
        update={"pending_ttl_s": TTL_S, "recovery_sweep_s": 0.2}
    )
    launcher = EmbeddedLauncher(settings, cron=False).start()
    try:
        assert launcher.wait_idle(timeout=120)
        with flow_env.session() as session:
            runs = session.exec(select(MergeRun)).all()
            assert [(r.policy_id, r.status) for r in runs] == [
                (policy, MergeRunStatus.succeeded)
            ], [r.error for r in runs]
            abandoned = session.get(Checkpoint, pending)
            assert abandoned is not None and abandoned.status == CheckpointStatus.failed
            assert "CKREG_PENDING_TTL_S" in (abandoned.error or "")
            files = session.exec(select(Artifact).where(Artifact.checkpoint_id == pending)).all()
            assert files == []
            stored = session.exec(select(Artifact).where(Artifact.checkpoint_id == raw)).one()
            assert stored.codec != "raw" and stored.stored_size is not None
            assert stored.stored_size < stored.size
        # The periodic sweep: a pending checkpoint abandoned while the server runs.
        later = _stale_pending(flow_env, "abandoned-later")

        def failed() -> bool:
            with flow_env.session() as session:
                row = session.get(Checkpoint, later)
                return row is not None and row.status == CheckpointStatus.failed

        _wait(failed, timeout=30)
        assert launcher.errors == []
        # A fresh pending checkpoint (within the TTL) is left alone.
        with flow_env.session() as session:
            fresh = create_checkpoint(
                session=session, data=CheckpointCreate(name="fresh", kind=CheckpointKind.base)
            )
        time.sleep(1.0)
        with flow_env.session() as session:
            row = session.get(Checkpoint, fresh.id)
            assert row is not None and row.status == CheckpointStatus.pending
    finally:
        launcher.stop()
    # Only one run ever: a second start plans nothing new.
    again = EmbeddedLauncher(settings, cron=False).start()
    try:
        assert again.wait_idle(timeout=60)
        with flow_env.session() as session:
            assert len(session.exec(select(MergeRun)).all()) == 1
    finally:
        again.stop()


def test_start_up_sweep_leaves_the_runs_of_this_process_alone(flow_env: FlowEnv) -> None:
    """A request answered before the start-up sweep ran queued its run behind the sweep: that run
    is this process's own, not lost. Re-queued by the sweep, it ran twice, and the second run
    re-ran it after it had failed."""
    base = flow_env.register("base", tiny_state(0), kind="base")
    inputs = [flow_env.register(f"ft-{i}", tiny_state(i), base_id=base) for i in (1, 2)]
    lost, launch = flow_env.queue_run("linear", base, inputs)  # queued by the last process
    assert launch
    with flow_env.session() as session:
        old = utcnow() - timedelta(minutes=5)
        session.execute(update(MergeRun).where(col(MergeRun.id) == lost).values(created_at=old))
        session.commit()
    own, _ = flow_env.queue_run("task_arithmetic", base, inputs)  # since this process started
    runtime = flow_runtime.current_runtime()
    assert recovery_sweep(runtime, started_s_ago=60.0) == [lost]
    with flow_env.session() as session:
        row = session.get(MergeRun, own)
        assert row is not None and row.status == MergeRunStatus.queued
        assert row.lease_expires_at is None  # untouched
    # The control: with no time since start, the sweep takes this process's run as lost.
    assert own in recovery_sweep(runtime, started_s_ago=0.0)
