"""``ckreg worker`` under faults, on a real Prefect server (issue 18, items 8 and 10).

* A worker killed with its whole process group (``kill -9`` of the group) while its flow holds
  the ``ckreg-merge-gpu`` slot: another worker takes the run over within lease + 10 s and
  completes it exactly once; the dead flow's slot is released at once (not after Prefect's
  60 s slot lease) and its flow run shows CRASHED, not RUNNING forever.
* SIGTERM stops a worker within 10 s, its children included, while the Prefect API refuses
  connections (a proxy in between is cut, a merge in flight) or was never reachable (the
  worker waiting for it at start).
* A worker whose Prefect API never answers gives up after ``--api-wait`` with one clear line.

The merge parks inside the GPU slot through the ``ckreg-test-slot-holder`` evaluator
(``tests.flows.slot_holder``): adamerging asks it for its objective inside the slot.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlmodel import Session, select

from flows.processes import descendants, is_running
from flows.runtime import Runtime
from registry.db import upgrade_database
from registry.models import Checkpoint, CheckpointCreate, CheckpointKind, MergeRun
from registry.services import merge_runs as run_service
from registry.services.completion import register_directory
from registry.settings import Settings
from tests.flows import slot_holder
from tests.flows.fixtures_flows import (
    Process,
    ckreg_env,
    save_state,
    start_ckreg,
    start_serving,
    tiny_state,
)
from tests.flows.tcp_proxy import TcpProxy
from tests.services import free_port

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

LEASE_S = 10.0
GPU_LIMIT = "ckreg-merge-gpu"


@dataclass
class Prefect:
    process: Process
    url: str
    env: dict[str, str]


@pytest.fixture(scope="module")
def plugins(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = slot_holder.install(tmp_path_factory.mktemp("slot-holder"))
    sys.path.insert(0, str(root))  # the registry checks the merge run's evaluator exists
    yield root
    sys.path.remove(str(root))


@pytest.fixture(scope="module")
def prefect(tmp_path_factory: pytest.TempPathFactory, plugins: Path) -> Iterator[Prefect]:
    tmp = tmp_path_factory.mktemp("prefect-faults")
    env = ckreg_env(
        tmp / "unused-home",
        plugins,
        PREFECT_HOME=str(tmp / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    process = start_serving(
        [*cmd, "--port", str(port)], env, tmp / "prefect.log", f"{url}/health", timeout=180
    )
    yield Prefect(process=process, url=url, env=env)
    process.kill()


def _worker_env(prefect: Prefect, tmp_path: Path, api_url: str) -> dict[str, str]:
    return {
        **prefect.env,
        "CKREG_HOME": str(tmp_path / "home"),
        "CKREG_MERGE_LEASE_S": str(LEASE_S),
        # A run not claimed in this time is submitted again: flow processes take a while to
        # start on a loaded machine, and duplicates only add load (the test submits the run).
        "CKREG_MERGE_CLAIM_GRACE_S": "120",
        "PREFECT_API_URL": api_url,
        slot_holder.MARKER_VAR: str(tmp_path / "slot-held"),
    }


def _runtime(tmp_path: Path) -> Runtime:
    settings = Settings(home=tmp_path / "home", task_vectors_on_complete=False)
    upgrade_database(settings.database_url)
    return Runtime(settings)


def _queue_merge(runtime: Runtime, src: Path, prefix: str) -> int:
    """Three tiny checkpoints and an adamerging run over them (queued, not submitted)."""
    ids: list[int] = []
    with Session(runtime.engine) as session:
        for k in range(3):
            kind = CheckpointKind.finetune if k else CheckpointKind.base
            fields = {"base_id": ids[0], "task": f"t{k}"} if k else {}
            checkpoint = register_directory(
                session=session,
                store=runtime.store,
                settings=runtime.settings,
                data=CheckpointCreate(name=f"{prefix}{k}", kind=kind, **fields),
                directory=save_state(src / f"{prefix}{k}", tiny_state(k)),
            )
            ids.append(checkpoint.id or 0)
        request = run_service.MergeRequest(
            method="adamerging",
            base_id=ids[0],
            inputs=[run_service.MergeInputSpec(checkpoint_id=i) for i in ids[1:]],
            params={"granularity": "task", "steps": 3, "lr": 0.05},
            evaluator="ckreg-test-slot-holder",
        )
        run, _ = run_service.create_merge_run(session=session, request=request)
    return run.id or 0


def _submit(url: str, run_id: int, workers: list[Process]) -> None:
    """Start the ``ckreg-merge`` deployment for ``run_id`` once a worker registered it."""
    deadline = time.monotonic() + 180
    while True:
        found = httpx.get(f"{url}/deployments/name/merge_checkpoints/ckreg-merge", timeout=30)
        if found.status_code == 200:
            break
        for worker in workers:
            assert worker.proc.poll() is None, f"worker exited:\n{worker.output()}"
        assert time.monotonic() < deadline, "no worker registered the ckreg-merge deployment"
        time.sleep(0.5)
    body = {"parameters": {"run_id": run_id}, "tags": [f"ckreg-merge-run-{run_id}"]}
    while True:  # a busy Prefect server answers 503 now and then
        created = httpx.post(
            f"{url}/deployments/{found.json()['id']}/create_flow_run", json=body, timeout=30
        )
        if created.status_code < 500 or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert created.status_code == 201, created.text


def _load(runtime: Runtime, run_id: int) -> MergeRun:
    with Session(runtime.engine) as session:
        run = session.get(MergeRun, run_id)
        assert run is not None
        session.expunge(run)
        return run


def _in_slot(runtime: Runtime, run_id: int, marker: Path, workers: list[Process]) -> MergeRun:
    """The run once its first attempt sits inside the GPU slot."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        for worker in workers:
            assert worker.proc.poll() is None, f"worker exited:\n{worker.output()}"
        run = _load(runtime, run_id)
        if marker.exists() and run.status == "running" and run.orchestration_run_id:
            return run
        time.sleep(0.2)
    logs = "\n".join(w.output()[-3000:] for w in workers)
    raise AssertionError(f"merge run {run_id} never reached the GPU slot:\n{logs}")


def _active_slots(url: str) -> int:
    limits = httpx.post(f"{url}/v2/concurrency_limits/filter", json={}, timeout=10).json()
    return sum(int(limit["active_slots"]) for limit in limits if limit["name"] == GPU_LIMIT)


def _gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(is_running(pid) for pid in pids):
        time.sleep(0.1)
    return [pid for pid in pids if is_running(pid)]


def _stop_all(workers: list[Process]) -> None:
    for worker in workers:
        worker.kill()


@pytest.mark.timeout(900)
def test_a_group_killed_worker_s_run_is_taken_over_then_sigterm_while_prefect_is_down(
    prefect: Prefect, tmp_path: Path
) -> None:
    """Two workers reach Prefect through a proxy. The one running a merge is killed with its
    process group: recovered (dead flow run CRASHED, its slot released, the run back in the
    queue) within lease + 10 s of the kill, completed within that plus the time a flow process
    took to start here (the first attempt's: tens of seconds on a loaded 2-core machine),
    exactly once. Then the survivor runs a merge, the proxy is cut (connections refused) and
    the survivor gets SIGTERM: it exits within 10 s and leaves no process behind."""
    runtime = _runtime(tmp_path)
    proxy = TcpProxy(int(prefect.url.split(":")[2].split("/")[0]))
    env = _worker_env(prefect, tmp_path, f"http://127.0.0.1:{proxy.port}/api")
    workers = [start_ckreg(["worker"], env, tmp_path / f"worker-{n}.log") for n in range(2)]
    marker = tmp_path / "slot-held"
    try:
        run_id = _queue_merge(runtime, tmp_path / "src", "a")
        _submit(prefect.url, run_id, workers)
        submitted_at = time.monotonic()
        first = _in_slot(runtime, run_id, marker, workers)
        start_s = time.monotonic() - submitted_at
        assert _active_slots(prefect.url) == 1
        group = os.getpgid(int((first.lease_owner or "").split(":")[1]))
        survivor = next(w for w in workers if w.proc.pid != group)
        os.killpg(group, signal.SIGKILL)  # the worker and its flow process: nothing cleans up
        killed_at = time.monotonic()
        recovered_s, done_s = _watch_takeover(prefect.url, runtime, first, killed_at)
        print(
            f"\ngroup kill: recovered after {recovered_s:.1f} s, run completed after "
            f"{done_s:.1f} s (lease {LEASE_S:g} s, a flow process took {start_s:.1f} s to start)"
        )
        done = _load(runtime, run_id)
        with Session(runtime.engine) as session:
            merged = session.exec(
                select(Checkpoint).where(Checkpoint.kind == CheckpointKind.merged)
            ).all()
        slots_after = _active_slots(prefect.url)

        marker.unlink()  # the next merge parks in the slot again
        second = _queue_merge(runtime, tmp_path / "src", "b")
        _submit(prefect.url, second, [survivor])
        _in_slot(runtime, second, marker, [survivor])
        children = descendants(survivor.proc.pid)
        assert len(children) >= 2  # the watchdog and the flow run's process at least
        proxy.cut()
        time.sleep(1.0)
        took = _sigterm(survivor)
        print(f"worker stopped {took:.1f} s after SIGTERM with the Prefect API refused")
        left = _gone(children, timeout=3)
    finally:
        proxy.cut()
        _stop_all(workers)
        runtime.close()
    assert recovered_s <= LEASE_S + 10, f"recovered after {recovered_s:.1f} s"
    assert done_s <= LEASE_S + 10 + start_s, f"completed after {done_s:.1f} s"
    assert done.attempts >= 2 and done.orchestration_run_id != first.orchestration_run_id
    assert [c.id for c in merged if c.status == "ready"] == [done.output_checkpoint_id]
    assert slots_after == 0
    assert took <= 10, survivor.output()
    assert survivor.proc.returncode == 128 + signal.SIGTERM, survivor.output()
    assert left == [], left


def _watch_takeover(
    url: str, runtime: Runtime, first: MergeRun, killed_at: float
) -> tuple[float, float]:
    """Seconds from the kill until the run was recovered (the dead flow run CRASHED, its GPU
    slot released with it; the run queued again or claimed) and until it succeeded."""
    recovered_s = done_s = None
    while done_s is None or recovered_s is None:
        elapsed = time.monotonic() - killed_at
        assert elapsed < 300, f"no takeover within {elapsed:.0f} s"
        run = _load(runtime, first.id or 0)
        dead = httpx.get(f"{url}/flow_runs/{first.orchestration_run_id}", timeout=10).json()
        if recovered_s is None and (
            dead["state"]["type"] == "CRASHED"
            and (run.attempts > first.attempts or run.status == "queued")
        ):
            recovered_s = elapsed
        if run.status == "succeeded":
            done_s = elapsed
            assert recovered_s is not None, "completed, but the dead flow run is not CRASHED"
        time.sleep(0.1)
    return recovered_s, done_s


def test_sigterm_stops_a_worker_whose_prefect_api_is_unreachable(
    tmp_path: Path, plugins: Path
) -> None:
    env = ckreg_env(
        tmp_path / "home", plugins, PREFECT_API_URL=f"http://127.0.0.1:{free_port()}/api"
    )
    worker = start_ckreg(["worker", "--api-wait", "600"], env, tmp_path / "worker.log")
    try:
        deadline = time.monotonic() + 120
        while "waiting up to 600 s" not in worker.output():  # it waits for the API to come up
            assert worker.proc.poll() is None, worker.output()
            assert time.monotonic() < deadline, worker.output()
            time.sleep(0.05)
        time.sleep(0.5)
        assert worker.proc.poll() is None, worker.output()
        children = descendants(worker.proc.pid)
        assert children, "no watchdog"
        took = _sigterm(worker)
        left = _gone(children, timeout=3)
    finally:
        worker.kill()
    assert took <= 10 and worker.proc.returncode == 128 + signal.SIGTERM, worker.output()
    assert left == [], left


def test_a_worker_gives_up_on_an_unreachable_prefect_api_with_a_clear_error(
    tmp_path: Path, plugins: Path
) -> None:
    url = f"http://127.0.0.1:{free_port()}/api"
    env = ckreg_env(tmp_path / "home", plugins, PREFECT_API_URL=url)
    worker = start_ckreg(["worker", "--api-wait", "2"], env, tmp_path / "worker.log")
    try:
        worker.proc.wait(120)
    finally:
        worker.kill()
    output = worker.output()
    assert worker.proc.returncode == 1, output
    assert f"error: the Prefect API at {url}/ did not answer within 2 s" in output, output
    assert "Traceback" not in output, output


def _sigterm(worker: Process) -> float:
    """SIGTERM to the worker's pid (not its group); seconds until it exited (at most 60)."""
    sent = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        worker.proc.wait(60)
    return time.monotonic() - sent
