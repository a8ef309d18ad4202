"""Merge-run leases on SQLite and PostgreSQL: claim, heartbeat, adoption under the lease, sweep."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlmodel import Session

from registry.db import make_engine, upgrade_database
from registry.models import Checkpoint, CheckpointKind, MergeRun, MergeRunStatus
from registry.services import leases


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    upgrade_database(database_url)
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def _run(engine: Engine, **fields: object) -> int:
    with Session(engine) as session:
        run = MergeRun(method="task_arithmetic", idempotency_key=uuid.uuid4().hex, **fields)
        session.add(run)
        session.commit()
        return run.id or 0


def _load(engine: Engine, run_id: int) -> MergeRun:
    with Session(engine) as session:
        run = session.get(MergeRun, run_id)
        assert run is not None
        return run


def _claim(engine: Engine, run_id: int, owner: str, lease_s: float = 30.0) -> leases.Lease | None:
    with Session(engine, expire_on_commit=False) as session:
        return leases.claim_merge_run(session=session, run_id=run_id, owner=owner, lease_s=lease_s)


def test_claim_heartbeat_expiry_and_takeover(engine: Engine) -> None:
    run_id = _run(engine)
    first = _claim(engine, run_id, "host-a:1:x", lease_s=0.6)
    assert first is not None and first.attempt == 1
    assert _claim(engine, run_id, "host-b:2:y") is None  # held
    run = _load(engine, run_id)
    assert (run.status, run.lease_owner, run.attempts) == (MergeRunStatus.running, "host-a:1:x", 1)
    with Session(engine) as session:
        renewed = leases.renew_lease(session=session, lease=first, lease_s=0.6)
    assert renewed is not None and renewed.expires_at > first.expires_at
    time.sleep(0.8)  # no heartbeat: the lease expires and another worker takes over
    second = _claim(engine, run_id, "host-b:2:y")
    assert second is not None and second.attempt == 2
    with Session(engine) as session:
        assert leases.renew_lease(session=session, lease=first, lease_s=30) is None
        assert not leases.holds_lease(session=session, lease=first)
        assert not leases.fail_under_lease(session=session, lease=first, error="late")
        assert leases.holds_lease(session=session, lease=second)
    assert _load(engine, run_id).status == MergeRunStatus.running


def test_adoption_is_atomic_with_the_lease(engine: Engine) -> None:
    run_id = _run(engine)
    stale = _claim(engine, run_id, "host-a:1:x", lease_s=0.2)
    assert stale is not None
    time.sleep(0.3)
    fresh = _claim(engine, run_id, "host-b:2:y")
    assert fresh is not None
    outputs = []
    for lease in (stale, fresh):
        with Session(engine, expire_on_commit=False) as session:
            output = Checkpoint(name=f"out-{lease.attempt}", kind=CheckpointKind.merged)
            session.add(output)
            session.commit()
            outputs.append(output.id or 0)
            output.task = "adopted"  # the output's change rides in the lease's transaction
            session.add(output)
            try:
                leases.finish_under_lease(
                    session=session, lease=lease, output_checkpoint_id=output.id or 0
                )
            except leases.LeaseLost as exc:
                assert "attempt 1" in str(exc) and f"merge run {run_id}" in str(exc)
                continue
            session.commit()
    run = _load(engine, run_id)
    assert run.status == MergeRunStatus.succeeded
    assert run.output_checkpoint_id == outputs[1]
    with Session(engine) as session:
        tasks = [session.get(Checkpoint, i).task for i in outputs]  # type: ignore[union-attr]
    assert tasks == [None, "adopted"]  # the late worker's change was rolled back
    assert _claim(engine, run_id, "host-c:3:z") is None  # succeeded: never claimed again


def _race(engine: Engine, run_id: int, claimers: int) -> list[leases.Lease]:
    """``claimers`` threads claim ``run_id`` at the same moment; returns the leases won."""
    barrier = threading.Barrier(claimers)
    won: list[leases.Lease] = []
    errors: list[BaseException] = []

    def claimer(n: int) -> None:
        try:
            with Session(engine, expire_on_commit=False) as session:
                barrier.wait()
                lease = leases.claim_merge_run(
                    session=session, run_id=run_id, owner=f"host:{n}:c", lease_s=30
                )
            if lease is not None:
                won.append(lease)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(claimers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    return won


def test_concurrent_claimers_exactly_one_wins(engine: Engine) -> None:
    for _ in range(3):
        run_id = _run(engine)
        won = _race(engine, run_id, 6)
        assert len(won) == 1, won
        run = _load(engine, run_id)
        assert (run.lease_owner, run.attempts) == (won[0].owner, 1)


def test_sweep_requeues_stale_runs_once(engine: Engine) -> None:
    never_claimed = _run(engine)
    expired = _run(engine)
    live = _run(engine)
    assert _claim(engine, expired, "host-a:1:x", lease_s=0.2) is not None
    assert _claim(engine, live, "host-a:1:x", lease_s=60) is not None
    time.sleep(0.3)
    with Session(engine) as one, Session(engine) as two:
        first = leases.reclaim_stale_runs(session=one, claim_grace_s=0.1)
        second = leases.reclaim_stale_runs(session=two, claim_grace_s=0.1)
    assert first == [never_claimed, expired]
    assert second == []  # re-queued runs wait for a claim for the grace period
    run = _load(engine, expired)
    assert (run.status, run.lease_owner) == (MergeRunStatus.queued, None)
    assert _claim(engine, expired, "host-b:2:y") is not None  # claimable at once
    assert _load(engine, live).lease_owner == "host-a:1:x"


def test_lease_of_a_dead_local_process_is_broken_at_once(engine: Engine, tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    import socket

    dead_owner = f"{socket.gethostname()}:{gone.stdout.strip()}:x"
    assert leases.owner_is_dead(dead_owner)
    assert not leases.owner_is_dead(leases.new_owner())  # this process
    assert not leases.owner_is_dead(f"elsewhere:{gone.stdout.strip()}:x")  # judged by expiry
    run_id = _run(engine)
    assert _claim(engine, run_id, dead_owner, lease_s=600) is not None
    taken = _claim(engine, run_id, leases.new_owner())
    assert taken is not None and taken.attempt == 2
