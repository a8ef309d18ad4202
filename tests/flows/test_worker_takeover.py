"""A flow whose worker died gives its run back instead of failing it (issue 18, item 8).

A real process stands in for ``ckreg worker`` and starts a real flow-run process (the same code
path as ``merge_checkpoints``: claim under a lease, ``watch_parent``, Prefect's SIGTERM bridge,
``_fail_or_release``), its stdout piped to the worker as Prefect's runner does. The worker is
SIGKILLed; the flow process must stop by itself, leave the run queued (not failed) and the
recovery sweep must re-submit it, where a failure of the merge itself still fails the run.
"""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from sqlmodel import Session

from flows.merge_flow import _fail_or_release
from flows.runtime import Runtime, configure
from registry.db import make_engine, upgrade_database
from registry.models import MergeRun, MergeRunStatus
from registry.services import leases
from registry.settings import Settings

FLOW = r"""
import signal, sys, time
from pathlib import Path
from prefect.exceptions import TerminationSignal
from flows import processes
from flows.merge_flow import _fail_or_release
from flows.runtime import Runtime
from registry.services import leases
from registry.settings import Settings

database_url, home, run_id, chatty = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
runtime = Runtime(Settings(home=home, database_url=database_url))
with runtime.session() as session:
    lease = leases.claim_merge_run(
        session=session, run_id=run_id, owner=leases.new_owner(), lease_s=60
    )
def bridge(signum, frame):  # as Prefect's flow engine turns SIGTERM into TerminationSignal
    raise TerminationSignal(signum)
signal.signal(signal.SIGTERM, bridge)
assert processes.started_by_runner()  # as merge_checkpoints checks before watching
processes.watch_parent(home / "orphaned-flows.log", poll_s=0.1)
print("claimed", lease.attempt, flush=True)
try:
    while True:  # the merge: logging to stdout (chatty) or quietly computing
        if chatty == "1":
            print("merging tensor ...", flush=True)
        time.sleep(0.02)
except BaseException as exc:
    _fail_or_release(runtime, lease, None, exc)
    raise
"""

WORKER = r"""
import os, subprocess, sys
env = {**os.environ, "PREFECT__FLOW_RUN_ID": "5e1f0000-0000-0000-0000-000000000000"}
flow = subprocess.Popen(
    [sys.executable, "-c", *sys.argv[1:]], stdout=subprocess.PIPE, text=True, env=env
)
print(flow.pid, flush=True)
for line in flow.stdout:
    sys.stdout.write(line)
    sys.stdout.flush()
"""


def _new_run(database_url: str) -> int:
    engine = make_engine(database_url)
    with Session(engine) as session:
        run = MergeRun(method="task_arithmetic", idempotency_key=uuid.uuid4().hex)
        session.add(run)
        session.commit()
        run_id = run.id or 0
    engine.dispose()
    return run_id


def _load(runtime: Runtime, run_id: int) -> MergeRun:
    with runtime.session() as session:
        run = session.get(MergeRun, run_id)
        assert run is not None
        session.expunge(run)
        return run


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.parametrize("chatty", ["1", "0"], ids=["writing-stdout", "quiet"])
def test_worker_sigkill_gives_the_run_back(database_url: str, tmp_path: Path, chatty: str) -> None:
    upgrade_database(database_url)
    run_id = _new_run(database_url)
    runtime = Runtime(Settings(home=tmp_path, database_url=database_url))
    args = [FLOW, database_url, str(tmp_path), str(run_id), chatty]
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER, *args], stdout=subprocess.PIPE, text=True
    )
    flow_pid = 0
    try:
        assert worker.stdout is not None
        flow_pid = int(worker.stdout.readline())
        assert worker.stdout.readline().startswith("claimed 1")
        assert _load(runtime, run_id).status == MergeRunStatus.running
        worker.kill()  # SIGKILL: nothing runs in the worker, its flow process is orphaned
        worker.wait(10)
        killed_at = time.monotonic()
        while _alive(flow_pid) and time.monotonic() - killed_at < 15:
            time.sleep(0.05)
        assert not _alive(flow_pid), "the orphaned flow process kept running"
        run = _load(runtime, run_id)
        assert run.status == MergeRunStatus.queued, run.error
        assert run.lease_owner is None
        assert run.error is not None and run.error.startswith("attempt 1 lost")
        with runtime.session() as session:  # the sweep re-submits it at once, not after 60 s
            assert leases.reclaim_stale_runs(session=session, claim_grace_s=60) == [run_id]
        with runtime.session() as session:
            taken = leases.claim_merge_run(
                session=session, run_id=run_id, owner="successor", lease_s=60
            )
        assert taken is not None and taken.attempt == 2
    finally:
        worker.kill()
        if flow_pid and _alive(flow_pid):
            subprocess.run(["kill", "-9", str(flow_pid)], check=False)
        runtime.close()


def test_a_failed_merge_still_fails_the_run(tmp_path: Path) -> None:
    """The SQL of both outcomes is the same on both databases: SQLite is enough here."""
    database_url = f"sqlite:///{tmp_path / 'registry.db'}"
    upgrade_database(database_url)
    run_id = _new_run(database_url)
    runtime = configure(Settings(home=tmp_path, database_url=database_url))
    try:
        with runtime.session() as session:
            lease = leases.claim_merge_run(
                session=session, run_id=run_id, owner=leases.new_owner(), lease_s=60
            )
        assert lease is not None
        _fail_or_release(runtime, lease, None, ValueError("tensor 'w' has shape (2,) not (3,)"))
        run = _load(runtime, run_id)
        assert run.status == MergeRunStatus.failed
        assert run.error == "ValueError: tensor 'w' has shape (2,) not (3,)"
        with runtime.session() as session:
            assert leases.reclaim_stale_runs(session=session, claim_grace_s=0.0) == []
    finally:
        runtime.close()
