"""infra/local/start.sh and stop.sh, end to end, on SQLite + files: the registry answers
``/readyz``, two workers run, stop.sh waits until every process of the deployment is gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.services import free_port

ROOT = Path(__file__).resolve().parents[2]


def _ours(home: Path) -> set[int]:
    """Live processes whose environment names this deployment's CKREG_HOME."""
    wanted = f"CKREG_HOME={home}".encode()
    found = set()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if wanted in environ.read_bytes().split(b"\0"):
                stat = (environ.parent / "stat").read_text().rsplit(")", 1)[1].split()
                if stat[0] != "Z":
                    found.add(int(environ.parent.name))
        except OSError:
            continue
    return found - {os.getpid()}


def test_start_and_stop_sqlite_files(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "run").mkdir(parents=True)
    (home / "run" / "registry.log").write_text("an earlier run's line\n")
    port = free_port()
    env = {
        **os.environ,
        "CKREG_HOME": str(home),
        "CKREG_PORT": str(port),
        "PREFECT_PORT": str(free_port()),
        "PYTHON": sys.executable,
        "STOP_GRACE_S": "20",
    }
    try:
        started = subprocess.run(
            ["bash", "infra/local/start.sh", "--workers", "2"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert started.returncode == 0, started.stdout + started.stderr
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code == 200
        pids = {p.stem: int(p.read_text()) for p in (home / "run").glob("*.pid")}
        assert set(pids) == {"prefect", "registry", "worker-1", "worker-2"}
        running = _ours(home)
        assert set(pids.values()) <= running
        env_sh = (home / "run" / "env.sh").read_text()
        assert f"export CKREG_HOME={home}" in env_sh
        assert "PREFECT_API_URL=http://127.0.0.1:" in env_sh
        assert "PREFECT_SERVER_ANALYTICS_ENABLED=false" in env_sh

        t0 = time.monotonic()
        stopped = subprocess.run(
            ["bash", "infra/local/stop.sh"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert "killed" not in stopped.stdout, stopped.stdout  # all stopped by SIGTERM
        assert _ours(home) == set(), f"left after stop.sh ({time.monotonic() - t0:.1f}s)"
        assert not list((home / "run").glob("*.pid"))
        assert (home / "run" / "registry.log").read_text().startswith("an earlier run's line\n")
    finally:
        for pid in _ours(home):
            os.kill(pid, signal.SIGKILL)
