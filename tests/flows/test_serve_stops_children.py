"""Issue 18 item 5: ``ckreg serve`` leaves no process behind (its Prefect API subprocess
included) when it gets SIGTERM or SIGINT, or is killed with SIGKILL."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

from flows.processes import descendants, is_running
from tests.flows.fixtures_flows import *  # noqa: F403
from tests.flows.fixtures_flows import ckreg_env, serve_ckreg
from tests.services import free_port

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _prefect_started(pid: int, timeout: float = 120) -> list[int]:
    """Descendants of ``pid`` once its Prefect API subprocess is up (a ``uvicorn`` child)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = descendants(pid)
        for child in children:
            try:
                command = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"prefect.server.api.server" in command:
                return children
        time.sleep(0.25)
    raise AssertionError(f"ckreg serve (pid {pid}) started no Prefect API within {timeout}s")


def _gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(is_running(pid) for pid in pids):
        time.sleep(0.1)
    return [pid for pid in pids if is_running(pid)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_serve_stops_its_prefect_api(tmp_path: Path, evaluator_plugins: Path, sig: int) -> None:
    env = ckreg_env(tmp_path / "home", evaluator_plugins)
    env.pop("PREFECT_API_URL", None)  # embedded: Prefect's own API subprocess
    port = free_port()
    server = serve_ckreg(env, tmp_path / "serve.log", port)
    try:
        children = _prefect_started(server.proc.pid)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        time.sleep(1.0)  # the guard polls every 0.5 s
        server.proc.send_signal(sig)  # the pid only, not the group
        server.proc.wait(timeout=60)
        left = _gone(children, timeout=20)
        assert left == [], (left, server.output())
        if sig == signal.SIGTERM:
            assert server.proc.returncode in (0, 128 + signal.SIGTERM), server.output()
    finally:
        server.kill()
