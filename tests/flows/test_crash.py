"""Kill ``ckreg serve`` (the embedded worker) mid-merge, restart it: the run completes exactly once."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tests.flows.fixtures_flows import *  # noqa: F403
from tests.flows.fixtures_flows import (
    ckreg_env,
    ckreg_token,
    create_policy,
    rest_upload,
    serve_ckreg,
    tiny_state,
)
from tests.services import free_port


def _wait_run(api: httpx.Client, status: set[str], timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items = api.get("/api/v1/merges").json()["items"]
        if items and items[0]["status"] in status:
            return items[0]
        time.sleep(0.2)
    raise AssertionError(f"no merge run reached {status} within {timeout}s: {items}")


def test_killed_worker_restarts_and_completes_once(tmp_path: Path, evaluator_plugins: Path) -> None:
    env = ckreg_env(tmp_path / "home", evaluator_plugins)
    headers = {"Authorization": f"Bearer {ckreg_token(env)}"}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = serve_ckreg(env, tmp_path / "serve-1.log", port)
    try:
        with httpx.Client(base_url=url, timeout=30) as api:
            base = rest_upload(api, headers, "base", tiny_state(0), kind="base")
            create_policy(
                api,
                headers,
                name="slow",
                method="task_arithmetic",
                selector={"base_id": base["id"]},
                trigger="on_register",
                evaluator="ckreg-test-slow",
            )
            rest_upload(api, headers, "a", tiny_state(1), base_id=base["id"], task="a")
            rest_upload(api, headers, "b", tiny_state(2), base_id=base["id"], task="b")
            _wait_run(api, {"running"}, 60)
            time.sleep(1.5)  # inside the (slow) evaluation of the merged output
        server.kill()
        server = serve_ckreg(env, tmp_path / "serve-2.log", port)
        with httpx.Client(base_url=url, timeout=30) as api:
            run = _wait_run(api, {"succeeded", "failed"}, 90)
            assert run["status"] == "succeeded", run["error"]
            runs = api.get("/api/v1/merges").json()
            assert runs["total"] == 1
            merged = api.get("/api/v1/checkpoints", params={"kind": "merged"}).json()["items"]
            ready = [c for c in merged if c["status"] == "ready"]
            assert [c["id"] for c in ready] == [run["output_checkpoint_id"]]
            metrics = api.get(f"/api/v1/checkpoints/{run['output_checkpoint_id']}/metrics").json()
            assert len(metrics) == 2  # evaluated once, not twice
    finally:
        server.kill()
