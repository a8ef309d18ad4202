"""Many ``ckreg worker`` processes on one Prefect server: every merge run completes exactly once.

One real ``prefect server start`` serves both variants (PostgreSQL with 3 workers and 30 merges,
SQLite with 2 and 10). N on_register policies each merge the shared ``anchor`` checkpoint with
one task's checkpoint, so N registrations trigger exactly N distinct merge runs whatever the
timing. Mid-run one worker is SIGSTOPped inside a (slow) merge until another worker took its run
over, then resumed; another worker is SIGKILLed inside a merge. Afterwards: N succeeded runs, N
ready outputs, no run with two outputs, no second output per run, nothing stuck; and the
``ckreg-merge-gpu`` global concurrency limit never had two merges at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine
from sqlmodel import Session, select

from registry.db import make_engine
from registry.models import Checkpoint, CheckpointKind, MergeRun, Metric
from tests.flows.fixtures_flows import *  # noqa: F403
from tests.flows.fixtures_flows import (
    Process,
    ckreg_env,
    ckreg_token,
    create_policy,
    rest_upload,
    serve_ckreg,
    start_ckreg,
    start_serving,
    tiny_state,
)
from tests.services import free_port

# The 30 merges on PostgreSQL (production's database, 3 workers, ~6 min); 10 on SQLite
# (the embedded default, 2 workers: the same takeovers and checks, a third of the time).
# MANY_WORKERS_MERGES=8 runs fewer in both for a quick local check.
_FEWER = os.environ.get("MANY_WORKERS_MERGES")
POSTGRES_MERGES = int(_FEWER or 30)
SQLITE_MERGES = int(_FEWER or 10)
LEASE_S = 10.0
DONE_WITHIN_S = 900.0


@dataclass
class PrefectServer:
    process: Process
    api_url: str
    env: dict[str, str]


@pytest.fixture(scope="module")
def prefect_server(
    tmp_path_factory: pytest.TempPathFactory, evaluator_plugins: Path
) -> Iterator[PrefectServer]:
    tmp = tmp_path_factory.mktemp("prefect-many")
    env = ckreg_env(
        tmp / "unused-home",
        evaluator_plugins,
        PREFECT_HOME=str(tmp / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    process = start_serving(
        [*cmd, "--port", str(port)], env, tmp / "prefect-server.log", f"{url}/health", timeout=120
    )
    yield PrefectServer(process=process, api_url=url, env=env)
    process.kill()


@dataclass
class SlotSampler:
    """Samples the GPU limit's active slots on the Prefect server while merges run."""

    api_url: str
    samples: list[int] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx.Client(timeout=5) as client:
            while not self.stop.is_set():
                try:
                    limits = client.post(
                        f"{self.api_url}/v2/concurrency_limits/filter", json={}
                    ).json()
                    for limit in limits:
                        if limit["name"] == "ckreg-merge-gpu":
                            self.samples.append(int(limit["active_slots"]))
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
                self.stop.wait(0.05)


def _reset_prefect(api_url: str) -> None:
    """Forget the previous variant's unfinished flow runs and the GPU limit's slots."""
    states = {"type": {"any_": ["SCHEDULED", "PENDING", "RUNNING", "PAUSED"]}}
    with httpx.Client(base_url=api_url, timeout=10) as client:
        found = client.post("/flow_runs/filter", json={"flow_runs": {"state": states}}).json()
        for run in found:
            client.delete(f"/flow_runs/{run['id']}")
        client.delete("/v2/concurrency_limits/ckreg-merge-gpu")


def _wait_deployments(api_url: str, workers: list[Process], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for worker in workers:
            if worker.proc.poll() is not None:
                raise AssertionError(f"worker exited:\n{worker.output()}")
        found = httpx.post(f"{api_url}/deployments/filter", json={}, timeout=5).json()
        names = {d["name"] for d in found}
        automations = httpx.post(f"{api_url}/automations/filter", json={}, timeout=5).json()
        if {"ckreg-merge", "ckreg-on-ready"} <= names and automations:
            return
        time.sleep(0.5)
    raise AssertionError(f"deployments not registered within {timeout}s")


def _diagnosis(api_url: str, engine: Engine, workers: list[Process]) -> str:
    """What a failure message needs to be understood from CI's log alone: the merge runs, the
    Prefect flow runs by flow and state, and the end of each worker's log."""
    with Session(engine) as session:
        runs = sorted((r.id, r.status, r.attempts) for r in session.exec(select(MergeRun)).all())
    try:
        with httpx.Client(base_url=api_url, timeout=10) as client:
            flows = {f["id"]: f["name"] for f in client.post("/flows/filter", json={}).json()}
            found = client.post("/flow_runs/filter", json={"limit": 200}).json()
        states: dict[str, int] = {}
        for run in found:
            key = f"{flows.get(run['flow_id'], '?')}:{(run.get('state') or {}).get('name')}"
            states[key] = states.get(key, 0) + 1
        prefect = str(dict(sorted(states.items())))
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        prefect = f"unreadable ({exc})"
    logs = "\n".join(f"--- worker {n}:\n{w.output()[-1500:]}" for n, w in enumerate(workers))
    return f"merge runs (id, status, attempts): {runs}\nPrefect flow runs: {prefect}\n{logs}"


def _worker_of(owner: str | None, workers: list[Process]) -> Process | None:
    """The worker whose process group runs the flow that holds lease ``owner``."""
    if not owner:
        return None
    try:
        group = os.getpgid(int(owner.split(":")[1]))
    except (ProcessLookupError, ValueError, IndexError):
        return None
    return next((w for w in workers if w.proc.pid == group), None)


def _mid_merge(
    engine: Engine, work: Path, workers: list[Process], api_url: str, timeout: float = 300
) -> tuple[int, Process]:
    """A run one of ``workers`` holds, inside its (4 s) evaluation; and that worker.

    Evaluating: the attempt's merged file is written (so the GPU slot is released again; a
    worker frozen inside the slot would block every merge for Prefect's 60 s minimum lease).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for worker in workers:
            if worker.proc.poll() is not None:
                raise AssertionError(f"worker exited:\n{worker.output()}")
        with Session(engine) as session:
            running = session.exec(select(MergeRun).where(MergeRun.status == "running")).all()
        for run in running:
            out = work / "attempts" / f"run-{run.id}-attempt-{run.attempts}" / f"run-{run.id}"
            worker = _worker_of(run.lease_owner, workers)
            if worker is not None and any((out / "out").glob("*.safetensors")):
                return run.id or 0, worker
        time.sleep(0.05)
    diagnosis = _diagnosis(api_url, engine, workers)
    raise AssertionError(f"no run was mid-merge within {timeout}s\n{diagnosis}")


def _wait_taken_over(
    engine: Engine, run_id: int, workers: list[Process], api_url: str, timeout: float = 300
) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with Session(engine) as session:
            run = session.get(MergeRun, run_id)
            assert run is not None
            if run.attempts >= 2:
                return run.attempts
        time.sleep(0.2)
    diagnosis = _diagnosis(api_url, engine, workers)
    raise AssertionError(f"merge run {run_id} was not taken over within {timeout}s\n{diagnosis}")


def _wait_all_done(
    engine: Engine, workers: list[Process], merges: int, api_url: str, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with Session(engine) as session:
            runs = session.exec(select(MergeRun)).all()
            pending = session.exec(
                select(Checkpoint).where(
                    Checkpoint.kind == "merged", Checkpoint.status == "pending"
                )
            ).all()
        if len(runs) == merges and all(r.status == "succeeded" for r in runs) and not pending:
            return
        time.sleep(0.5)
    diagnosis = _diagnosis(api_url, engine, workers)
    raise AssertionError(f"runs not all done within {timeout}s\n{diagnosis}")


def _counts(engine: Engine) -> dict[str, Any]:
    with Session(engine) as session:
        runs = session.exec(select(MergeRun)).all()
        merged = session.exec(
            select(Checkpoint).where(Checkpoint.kind == CheckpointKind.merged)
        ).all()
        metrics = session.exec(select(Metric)).all()
    ready = [c for c in merged if c.status == "ready"]
    per_run: dict[int, int] = {}
    for checkpoint in ready:
        run_id = int(checkpoint.meta["merge_run_id"])
        per_run[run_id] = per_run.get(run_id, 0) + 1
    outputs = [r.output_checkpoint_id for r in runs]
    return {
        "runs": len(runs),
        "succeeded": sum(r.status == "succeeded" for r in runs),
        "stuck": sum(r.status in ("queued", "running") for r in runs),
        "outputs": len({o for o in outputs if o is not None}),
        "ready_outputs": len(ready),
        "runs_with_two_outputs": sum(n > 1 for n in per_run.values()),
        "adopted_mismatch": sum(
            1 for r in runs if r.output_checkpoint_id not in {c.id for c in ready}
        ),
        "discarded": sum(c.status == "deleted" for c in merged),
        "metrics_per_output": sorted(
            {sum(m.checkpoint_id == c.id for m in metrics) for c in ready}
        ),
        "attempts": sum(r.attempts for r in runs),
    }


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize(
    ("database", "n_workers", "merges"),
    [
        pytest.param("postgresql", 3, POSTGRES_MERGES, marks=pytest.mark.postgres),
        ("sqlite", 2, SQLITE_MERGES),
    ],
)
def test_many_workers_merge_each_run_exactly_once(
    database: str,
    n_workers: int,
    merges: int,
    prefect_server: PrefectServer,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    started = time.monotonic()
    _reset_prefect(prefect_server.api_url)
    url = (
        str(request.getfixturevalue("postgres_url"))
        if database == "postgresql"
        else f"sqlite:///{tmp_path / 'home' / 'registry.db'}"
    )
    env = {
        **prefect_server.env,
        "CKREG_HOME": str(tmp_path / "home"),
        "CKREG_DATABASE_URL": url,
        "CKREG_MERGE_LEASE_S": str(LEASE_S),
        "CKREG_MERGE_CLAIM_GRACE_S": "60",
        "PREFECT_API_URL": prefect_server.api_url,
        "CKREG_PREFECT_MODE": "server",
    }
    headers = {"Authorization": f"Bearer {ckreg_token(env)}"}
    port = free_port()
    processes: list[Process] = [serve_ckreg(env, tmp_path / "serve.log", port)]
    engine = make_engine(url)
    sampler = SlotSampler(prefect_server.api_url)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as api:
            base = rest_upload(api, headers, "base", tiny_state(0), kind="base")
            anchor_args = {"base_id": base["id"], "task": "anchor"}
            rest_upload(api, headers, "anchor", tiny_state(1), **anchor_args)
            for k in range(merges):
                create_policy(
                    api,
                    headers,
                    name=f"pair-{k}",
                    method="task_arithmetic",
                    selector={"base_id": base["id"], "tasks": ["anchor", f"t{k}"]},
                    trigger="on_register",
                    evaluator="ckreg-test-slow",
                )
            workers = [
                start_ckreg(["worker", "--limit", "3"], env, tmp_path / f"worker-{n}.log")
                for n in range(n_workers)
            ]
            processes.extend(workers)
            _wait_deployments(prefect_server.api_url, workers)
            threading.Thread(target=sampler.run, daemon=True).start()
            for k in range(merges):
                rest_upload(
                    api, headers, f"ft-{k}", tiny_state(10 + k), base_id=base["id"], task=f"t{k}"
                )
        # A worker frozen past its lease inside a merge; another takes the run over.
        work = tmp_path / "home" / "work"
        api_url = prefect_server.api_url
        stopped_run, frozen = _mid_merge(engine, work, workers, api_url)
        os.killpg(frozen.proc.pid, signal.SIGSTOP)
        try:
            _wait_taken_over(engine, stopped_run, workers, api_url)
            time.sleep(1.0)
        finally:
            os.killpg(frozen.proc.pid, signal.SIGCONT)
        # A worker killed inside a merge; the survivors take its run over.
        killed_run, victim = _mid_merge(
            engine, work, [w for w in workers if w is not frozen], api_url
        )
        os.kill(victim.proc.pid, signal.SIGKILL)  # its pid only: its flow process must not fail
        _wait_all_done(engine, workers, merges, api_url, DONE_WITHIN_S)
        time.sleep(2 * LEASE_S)  # let the revived worker finish noticing it lost its run
        counts = _counts(engine)
        counts["stopped_run_attempts"] = _wait_taken_over(engine, stopped_run, workers, api_url)
        counts["killed_run_attempts"] = _wait_taken_over(engine, killed_run, workers, api_url)
    finally:
        sampler.stop.set()
        for process in reversed(processes):
            process.kill()
        engine.dispose()
    counts["max_gpu_slots"] = max(sampler.samples, default=-1)
    counts["seconds"] = round(time.monotonic() - started, 1)
    print(f"\n{database} x{n_workers} workers: {counts}")
    assert counts["runs"] == merges and counts["succeeded"] == merges and counts["stuck"] == 0
    assert counts["outputs"] == merges and counts["ready_outputs"] == merges
    assert counts["runs_with_two_outputs"] == 0 and counts["adopted_mismatch"] == 0
    assert counts["metrics_per_output"] == [2]  # each output evaluated once: no duplicate
    assert counts["stopped_run_attempts"] >= 2 and counts["killed_run_attempts"] >= 2
    assert 0 <= counts["max_gpu_slots"] <= 1, counts


def test_a_late_attempt_never_publishes_a_second_output(flow_env: Any) -> None:
    """Two attempts of one run in one process: the one whose lease was taken over stages its
    output but cannot adopt it (discarded); the holder's output is the run's only one."""
    from flows import merge_flow, outputs
    from flows.runtime import current_runtime
    from registry.services import leases
    from registry.services import merge_runs as run_service

    base = flow_env.register("base", tiny_state(0), kind="base")
    inputs = [
        flow_env.register(f"ft-{i}", tiny_state(i), base_id=base, task=f"t{i}") for i in (1, 2)
    ]
    request = run_service.MergeRequest(
        method="task_arithmetic",
        base_id=base,
        inputs=[run_service.MergeInputSpec(checkpoint_id=i) for i in inputs],
    )
    with flow_env.session() as session:
        run, _ = run_service.create_merge_run(session=session, request=request)
    run_id = run.id or 0

    def claim(owner: str, lease_s: float) -> leases.Lease:
        with flow_env.session() as session:
            lease = leases.claim_merge_run(
                session=session, run_id=run_id, owner=owner, lease_s=lease_s
            )
        assert lease is not None
        return lease

    def staged(lease: leases.Lease) -> Any:
        prepared = merge_flow.prepare_inputs.fn(run_id, lease.attempt)
        merge_flow.run_merge.fn(prepared)
        return prepared

    late = claim("elsewhere:1:late", 0.2)
    late_prepared = staged(late)
    runtime = current_runtime()
    with flow_env.session() as session:  # the late worker stages its output in time...
        pending = outputs.start_output(
            session=session,
            store=runtime.store,
            run=run_service.get_merge_run(session=session, run_id=run_id),
            spec=late_prepared.output,
            lease=late,
        )
        late_output = pending.id or 0
        outputs.upload_output(
            session=session,
            store=runtime.store,
            settings=runtime.settings,
            run=run_service.get_merge_run(session=session, run_id=run_id),
            checkpoint=pending,
            out_dir=late_prepared.out_dir,
            spec=late_prepared.output,
        )
    time.sleep(0.3)  # ...then freezes past its lease, and another worker takes the run over
    holder = claim("elsewhere:2:holder", 60)
    assert holder.attempt == 2
    with flow_env.session() as session, pytest.raises(leases.LeaseLost):
        outputs.adopt_output(
            session=session,
            store=runtime.store,
            settings=runtime.settings,
            lease=late,
            checkpoint_id=late_output,
        )
    holder_prepared = staged(holder)
    assert holder_prepared.work_dir != late_prepared.work_dir
    output_id = merge_flow.publish_output.fn(holder_prepared, holder, {})
    with pytest.raises(leases.LeaseLost):  # revived after the holder published: still nothing
        merge_flow.publish_output.fn(late_prepared, late, {})
    with Session(runtime.engine) as session:
        merged = session.exec(select(Checkpoint).where(Checkpoint.kind == "merged")).all()
        done = session.get(MergeRun, run_id)
    assert (
        done is not None and done.status == "succeeded" and done.output_checkpoint_id == output_id
    )
    statuses = {c.id: c.status for c in merged}
    assert statuses == {late_output: "deleted", output_id: "ready"}
