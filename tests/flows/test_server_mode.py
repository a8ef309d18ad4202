"""Server mode: ``prefect server start`` + ``ckreg worker`` + ``ckreg serve --mode server``.

A checkpoint registered over REST emits ``ckreg.checkpoint.ready``; the worker's event-triggered
deployment merges it, and the merged checkpoint with its lineage appears within a time bound.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx
import pytest

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

MERGE_BOUND_S = 45.0


def _start_prefect_server(tmp_path: Path, env: dict[str, str]) -> tuple[Process, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1"]
    log = tmp_path / "prefect-server.log"
    server = start_serving([*cmd, "--port", str(port)], env, log, f"{url}/health", timeout=90)
    return server, url


@pytest.mark.slow
def test_server_mode_merges_on_event(tmp_path: Path, evaluator_plugins: Path) -> None:
    prefect_env = ckreg_env(
        tmp_path / "home",
        evaluator_plugins,
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
    )
    processes: list[Process] = []
    try:
        prefect, api_url = _start_prefect_server(tmp_path, prefect_env)
        processes.append(prefect)
        env = {**prefect_env, "PREFECT_API_URL": api_url, "CKREG_PREFECT_MODE": "server"}
        headers = {"Authorization": f"Bearer {ckreg_token(env)}"}
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        processes.append(serve_ckreg(env, tmp_path / "serve.log", port))
        with httpx.Client(base_url=url, timeout=30) as api:
            base = rest_upload(api, headers, "base", tiny_state(0), kind="base")
            create_policy(
                api,
                headers,
                name="auto",
                method="task_arithmetic",
                selector={"base_id": base["id"]},
                trigger="on_register",
                evaluator="ckreg-test-norm",
            )
            a = rest_upload(api, headers, "a", tiny_state(1), base_id=base["id"], task="a")
            worker = start_ckreg(["worker", "--schedule-sync", "1"], env, tmp_path / "worker.log")
            processes.append(worker)
            _wait_deployments(api_url, worker)
            started = time.monotonic()
            b = rest_upload(api, headers, "b", tiny_state(2), base_id=base["id"], task="b")
            merged = _wait_merged(api, worker, MERGE_BOUND_S)
            elapsed = time.monotonic() - started
            lineage = api.get(f"/api/v1/checkpoints/{merged['id']}/lineage").json()
            parents = {(e["parent_id"], e["role"]) for e in lineage["ancestors"] if e["depth"] == 1}
            assert parents == {(base["id"], "base"), (a["id"], "input"), (b["id"], "input")}
            metrics = api.get(f"/api/v1/checkpoints/{merged['id']}/metrics").json()
            assert {m["source"] for m in metrics} == {"evaluation"}
            # A cron policy becomes a schedule of the worker's ckreg-policy deployment.
            cron = create_policy(
                api,
                headers,
                name="nightly",
                method="task_arithmetic",
                selector={"base_id": base["id"]},
                trigger="cron",
                cron="0 3 * * *",
            )
            schedule = _wait_schedule(api_url, f"ckreg-policy-{cron['id']}", worker)
            assert schedule["parameters"] == {"policy_id": cron["id"]}
            assert schedule["schedule"]["cron"] == "0 3 * * *"
        assert elapsed < MERGE_BOUND_S
    finally:
        for process in reversed(processes):
            process.kill()


def _wait_deployments(api_url: str, worker: Process, timeout: float = 90) -> None:
    """Wait until the worker registered its deployments (and their event trigger)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if worker.proc.poll() is not None:
            raise AssertionError(f"worker exited:\n{worker.output()}")
        found = httpx.post(f"{api_url}/deployments/filter", json={}, timeout=5).json()
        if {"ckreg-merge", "ckreg-on-ready"} <= {d["name"] for d in found}:
            automations = httpx.post(f"{api_url}/automations/filter", json={}, timeout=5).json()
            if automations:
                return
        time.sleep(0.5)
    raise AssertionError(f"deployments not registered within {timeout}s:\n{worker.output()}")


def _wait_merged(api: httpx.Client, worker: Process, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items = api.get("/api/v1/checkpoints", params={"kind": "merged", "status": "ready"}).json()[
            "items"
        ]
        if items:
            return dict(items[0])
        time.sleep(0.25)
    raise AssertionError(f"no merged checkpoint within {timeout}s:\n{worker.output()}")


def _wait_schedule(api_url: str, slug: str, worker: Process, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        deployment = httpx.get(
            f"{api_url}/deployments/name/sequential_merge/ckreg-policy", timeout=5
        ).json()
        for schedule in deployment.get("schedules", []):
            if schedule.get("slug") == slug:
                return dict(schedule)
        time.sleep(0.5)
    raise AssertionError(f"no schedule {slug} within {timeout}s:\n{worker.output()}")
