"""Kill ``ckreg serve`` (the embedded worker) mid-merge, restart it: the run completes exactly once."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import httpx
from safetensors.torch import save

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


def _settled(api: httpx.Client, headers: dict[str, str], timeout: float) -> list[dict]:
    """Every checkpoint, once none is pending and no merge run is queued or running."""
    deadline = time.monotonic() + timeout
    while True:
        checkpoints = api.get("/api/v1/checkpoints", params={"limit": 200}, headers=headers)
        items = checkpoints.json()["items"]
        runs = api.get("/api/v1/merges", headers=headers).json()["items"]
        busy = [c["name"] for c in items if c["status"] == "pending"]
        busy += [f"run {r['id']}" for r in runs if r["status"] in {"queued", "running"}]
        if not busy:
            return list(items)
        if time.monotonic() > deadline:
            raise AssertionError(f"still pending or running after {timeout}s: {busy}")
        time.sleep(0.3)


def _verify_ready_files(api: httpx.Client, headers: dict[str, str], items: list[dict]) -> int:
    """Download every file of every ready checkpoint; its sha256 must match. Returns the count."""
    checked = 0
    for item in items:
        if item["status"] != "ready":
            continue
        detail = api.get(f"/api/v1/checkpoints/{item['id']}", headers=headers).json()
        assert detail["files"], f"ready checkpoint {item['name']} has no files"
        for file in detail["files"]:
            got = api.get(f"/api/v1/checkpoints/{item['id']}/files/{file['name']}", headers=headers)
            assert got.status_code == 200, got.text
            assert hashlib.sha256(got.content).hexdigest() == file["sha256"], file["name"]
            checked += 1
    return checked


def test_crash_at_each_registration_stage(tmp_path: Path, evaluator_plugins: Path) -> None:
    """kill -9 ``ckreg serve`` after each stage of register → complete → merge; after the last
    restart nothing stays pending or running and every ready file verifies by sha256.

    Stages: created (no file), file uploaded (not completed), a fine-tune completed (its
    on_register merge planned in memory at most). Mid-merge is the test above.
    """
    env = ckreg_env(tmp_path / "home", evaluator_plugins, CKREG_PENDING_TTL_S="1")
    headers = {"Authorization": f"Bearer {ckreg_token(env)}"}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data = save({k: v.contiguous() for k, v in tiny_state(7).items()})
    server = serve_ckreg(env, tmp_path / "serve.log", port)
    try:
        with httpx.Client(base_url=url, timeout=30, headers=headers) as api:
            base = rest_upload(api, headers, "base", tiny_state(0), kind="base")
            create_policy(
                api,
                headers,
                name="ties-on-register",
                method="task_arithmetic",
                selector={"base_id": base["id"]},
                trigger="on_register",
            )
            rest_upload(api, headers, "a", tiny_state(1), base_id=base["id"], task="a")
            rest_upload(api, headers, "b", tiny_state(2), base_id=base["id"], task="b")
            _wait_run(api, {"succeeded"}, 90)  # the first merge (a + b) is done
            body = {"name": "created-only", "kind": "finetune", "base_id": base["id"]}
            assert api.post("/api/v1/checkpoints", json=body).status_code == 201
        server.kill()  # stage 1: created, no file

        server = serve_ckreg(env, tmp_path / "serve.log", port)
        with httpx.Client(base_url=url, timeout=30, headers=headers) as api:
            body = {"name": "uploaded-only", "kind": "finetune", "base_id": base["id"]}
            created = api.post("/api/v1/checkpoints", json=body).json()
            put = api.put(
                f"/api/v1/checkpoints/{created['id']}/files/model.safetensors",
                content=data,
                headers={"Content-Type": "application/octet-stream"},
            )
            assert put.status_code == 200, put.text
        server.kill()  # stage 2: file uploaded, not completed

        server = serve_ckreg(env, tmp_path / "serve.log", port)
        with httpx.Client(base_url=url, timeout=30, headers=headers) as api:
            c = rest_upload(api, headers, "c", tiny_state(3), base_id=base["id"], task="c")
        server.kill()  # stage 3: completed; its merge at most planned

        time.sleep(1.5)  # older than CKREG_PENDING_TTL_S: the start-up sweep fails them
        server = serve_ckreg(env, tmp_path / "serve.log", port)
        with httpx.Client(base_url=url, timeout=30, headers=headers) as api:
            items = _settled(api, headers, timeout=120)
            status = {c["name"]: c["status"] for c in items}
            assert status["created-only"] == "failed"
            assert status["uploaded-only"] == "failed"
            assert status["c"] == "ready"
            runs = api.get("/api/v1/merges", headers=headers).json()["items"]
            assert all(r["status"] == "succeeded" for r in runs), runs
            merged_inputs = [{i["checkpoint_id"] for i in r["inputs"]} for r in runs]
            assert any(c["id"] in ids for ids in merged_inputs), "c's merge was lost"
            assert _verify_ready_files(api, headers, items) >= 6
    finally:
        server.kill()
