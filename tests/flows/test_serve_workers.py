"""``ckreg serve --workers 2`` (embedded): the API processes hand ready checkpoints to the one
process that runs the flows, and SIGTERM or SIGKILL of the parent leaves no process behind."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

from flows.processes import descendants, is_running
from flows.tracking.outbox import Outbox
from tests.flows.fixtures_flows import *  # noqa: F403
from tests.flows.fixtures_flows import CKREG, ckreg_env, ckreg_token, start_serving
from tests.services import free_port

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _workers(pid: int, count: int, timeout: float = 120) -> list[int]:
    """Descendants of ``pid`` once ``count`` uvicorn API workers (spawned processes) run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = descendants(pid)
        spawned = [c for c in children if b"spawn_main" in _cmdline(c)]
        if len(spawned) >= count:
            return children
        time.sleep(0.25)
    raise AssertionError(f"ckreg serve (pid {pid}) started no {count} API workers in {timeout}s")


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(is_running(pid) for pid in pids):
        time.sleep(0.1)
    return [pid for pid in pids if is_running(pid)]


def _register(url: str, token: str, name: str) -> int:
    import torch
    from safetensors.torch import save

    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        created = client.post("/api/v1/checkpoints", json={"name": name, "kind": "base"})
        checkpoint_id = int(created.json()["id"])
        url_file = f"/api/v1/checkpoints/{checkpoint_id}/files/model.safetensors"
        client.put(url_file, content=save({"w": torch.ones(4, 4)})).raise_for_status()
        done = client.post(f"/api/v1/checkpoints/{checkpoint_id}/complete", json={})
        assert done.json()["status"] == "ready", done.text
    return checkpoint_id


def _tracked(home: Path, wanted: set[int], timeout: float = 60) -> set[int]:
    """Checkpoint ids whose MLflow record waits in the outbox (MLflow is down in these tests):
    the embedded launcher's ``checkpoint_ready`` job wrote them."""
    deadline = time.monotonic() + timeout
    found: set[int] = set()
    while time.monotonic() < deadline and not wanted <= found:
        outbox = Outbox(home.resolve() / "mlflow-outbox")
        found = {e.payload["id"] for e in outbox.pending() if e.kind == "checkpoint"}
        time.sleep(0.25)
    return found


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_serve_workers_relay_and_stop(tmp_path: Path, evaluator_plugins: Path, sig: int) -> None:
    home = tmp_path / "home"
    env = ckreg_env(home, evaluator_plugins)
    env.pop("PREFECT_API_URL", None)  # embedded: the parent runs the flows
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [*CKREG, "serve", "--port", str(port), "--workers", "2"]
    server = start_serving(cmd, env, tmp_path / "serve.log", f"{url}/healthz", timeout=120)
    try:
        children = _workers(server.proc.pid, 2)
        token = ckreg_token(env)
        ids = {_register(url, token, f"w-{i}") for i in range(4)}  # spread over both workers
        assert ids <= _tracked(home, ids), server.output()
        time.sleep(1.0)  # the orphan guard polls every 0.5 s
        children = sorted(set(children) | set(descendants(server.proc.pid)))
        server.proc.send_signal(sig)  # the pid only, not the group
        server.proc.wait(timeout=60)
        left = _gone(children, timeout=20)
        assert left == [], (left, server.output())
        if sig == signal.SIGTERM:
            assert server.proc.returncode in (0, 128 + signal.SIGTERM), server.output()
    finally:
        server.kill()


def test_relay_passes_launcher_calls_and_drops_malformed_ones() -> None:
    import socket

    from flows.serving import RelayLauncher, launcher_relay

    class Recorder:
        def __init__(self) -> None:
            self.calls: list[tuple[str, int]] = []

        def checkpoint_ready(self, checkpoint_id: int) -> None:
            self.calls.append(("checkpoint_ready", checkpoint_id))

        def merge_requested(self, run_id: int) -> None:
            self.calls.append(("merge_requested", run_id))

        def search_requested(self, search_id: int) -> None:
            self.calls.append(("search_requested", search_id))

    recorder = Recorder()
    with launcher_relay(recorder) as path:
        relay = RelayLauncher(path)
        relay.checkpoint_ready(12)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as raw:
            for junk in (b"stop 1", b"merge_requested x", b"__init__ 3", b"\xff\xfe"):
                raw.sendto(junk, path)
        relay.merge_requested(5)
        relay.search_requested(7)
        deadline = time.monotonic() + 10
        while len(recorder.calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    expected = [("checkpoint_ready", 12), ("merge_requested", 5), ("search_requested", 7)]
    assert recorder.calls == expected
    assert not Path(path).exists()  # the socket and its private folder are removed
