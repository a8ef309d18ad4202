"""The registry side of the merge-quality benchmark: an embedded ``ckreg serve`` and REST helpers.

``start_embedded(home)`` upgrades the database under ``home``, creates a write token straight in
it and starts ``ckreg serve`` (registry + in-process flows) as a subprocess on a free port.
``Registry`` wraps the Python client with what the benchmark needs beyond it: policies, merge
runs and waiting until the flows have finished them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench._common import ServerProcess, create_token, free_port, start_server
from registry.client import Client

TERMINAL = ("succeeded", "failed")


class MergeRunFailed(RuntimeError):
    """A merge run ended ``failed``; the message carries the run's error."""


@dataclass
class EmbeddedRegistry:
    """A ``ckreg serve`` subprocess with its URL, a write token and its log file."""

    server: ServerProcess
    token: str
    home: Path
    log_path: Path

    @property
    def url(self) -> str:
        return self.server.url

    def stop(self) -> None:
        self.server.stop()


def reset_home(home: Path) -> None:
    """Remove the registry state under ``home`` (database, store, work, MLflow); keeps the zoo."""
    for name in ("registry.db", "mlflow.db"):
        (home / name).unlink(missing_ok=True)
    for name in ("store", "work", "mlartifacts", "mlflow-outbox", "prefect"):
        shutil.rmtree(home / name, ignore_errors=True)


def _serve_command(port: int) -> list[str]:
    script = Path(sys.executable).parent / "ckreg"
    if script.is_file():
        return [str(script), "serve", "--port", str(port)]
    launcher = "from flows.cli import app; app()"
    return [sys.executable, "-c", launcher, "serve", "--port", str(port)]


def start_embedded(
    home: Path, *, timeout: float = 120.0, extra_env: dict[str, str] | None = None
) -> EmbeddedRegistry:
    """``ckreg serve`` with ``CKREG_HOME=home`` (embedded flows), ready to answer requests;
    ``extra_env`` adds variables (the LM zoo's ``CKREG_ZOO_DIR`` for its evaluator)."""
    from registry.db import upgrade_database
    from registry.settings import Settings

    home = home.resolve()
    (home / "logs").mkdir(parents=True, exist_ok=True)
    settings = Settings(home=home)
    upgrade_database(settings.database_url)
    token = create_token(settings.database_url, scopes=("write",))
    port = free_port()
    env = {
        "CKREG_HOME": str(home),
        "CKREG_DATABASE_URL": settings.database_url,
        "CKREG_STORE_URL": settings.store_url,
        "CKREG_MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
        "CKREG_PORT": str(port),
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_LOGGING_LEVEL": "WARNING",
        # The in-process Prefect API server gets 20 s to start by default; a loaded machine
        # needs more, and a flow job that misses it loses its on_register merges.
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "300",
        "PYTHONPATH": os.pathsep.join(
            p
            for p in (str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH"))
            if p
        ),
        **(extra_env or {}),
    }
    log_path = home / "logs" / "serve.log"
    server = start_server(_serve_command(port), port=port, log_path=log_path, env=env)
    registry = EmbeddedRegistry(server=server, token=token, home=home, log_path=log_path)
    try:
        wait_ready(registry.url, timeout=timeout)
    except BaseException:
        registry.stop()
        raise
    return registry


def wait_ready(url: str, *, timeout: float = 60.0) -> None:
    """Block until ``GET /readyz`` answers 200 (database and store reachable)."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/readyz", timeout=5)
            if response.status_code == 200:
                return
            last = response.text
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.2)
    raise TimeoutError(f"registry at {url} not ready within {timeout:.0f}s: {last}")


class Registry(Client):
    """The REST client plus waiting for the flows' merge runs of this benchmark."""

    def __init__(self, base_url: str, token: str | None = None, **options: Any) -> None:
        super().__init__(base_url, token, **options)
        self.url, self.token = base_url, token  # for ``ckreg register --url/--token``

    def wait_runs(
        self,
        done: Callable[[list[dict[str, Any]]], bool],
        *,
        policy_ids: Iterable[int] | None = None,
        timeout: float = 300.0,
        what: str = "merge runs",
    ) -> list[dict[str, Any]]:
        """Poll ``GET /merges`` until ``done(runs)``; a failed run or the timeout raises."""
        wanted = set(policy_ids) if policy_ids is not None else None
        deadline = time.monotonic() + timeout
        while True:
            runs = [r for r in self.merge_runs() if wanted is None or r["policy_id"] in wanted]
            failed = [r for r in runs if r["status"] == "failed"]
            if failed:
                raise MergeRunFailed("; ".join(describe_failure(r) for r in failed))
            if done(runs):
                return runs
            if time.monotonic() > deadline:
                states = {r["id"]: r["status"] for r in runs if r["status"] not in TERMINAL}
                raise TimeoutError(f"{what} not finished within {timeout:.0f}s; open: {states}")
            time.sleep(0.2)

    def wait_tracked(self, policy_ids: set[int], *, quiet_s: float = 30.0) -> tuple[int, int]:
        """Wait until the flows logged every succeeded run of the policies to MLflow, or
        ``quiet_s`` seconds pass without progress; returns (logged, succeeded)."""
        last, since = -1, time.monotonic()
        while True:
            runs = [r for r in self.merge_runs() if r["policy_id"] in policy_ids]
            done = [r for r in runs if r["status"] == "succeeded"]
            logged = sum(1 for r in done if r["mlflow_run_id"])
            if logged != last:
                last, since = logged, time.monotonic()
            if logged == len(done) or time.monotonic() - since > quiet_s:
                return logged, len(done)
            time.sleep(0.5)


def cli_register(
    registry: Registry,
    path: Path,
    *,
    name: str,
    base_id: int | None = None,
    task: str | None = None,
    tags: Iterable[str] = (),
    second_moment: Path | None = None,
) -> int:
    """``ckreg register PATH ...`` as a user runs it (a subprocess); returns the new id."""
    script = Path(sys.executable).parent / "ckreg"
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "flows.cli"]
    command += ["register", str(path), "--name", name, "--quiet"]
    command += ["--url", registry.url, "--token", registry.token or ""]
    if base_id is not None:
        command += ["--base", str(base_id)]
    if task is not None:
        command += ["--task", task]
    for tag in tags:
        command += ["--tag", tag]
    if second_moment is not None:
        command += ["--second-moment", str(second_moment)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    found = re.search(r"registered checkpoint (\d+)", done.stdout)
    if done.returncode != 0 or found is None:
        raise RuntimeError(
            f"`ckreg register {path}` failed ({done.returncode}): {done.stderr[-2000:]}"
        )
    return int(found[1])


def describe_failure(run: dict[str, Any]) -> str:
    """``merge run 7 (ota, policy 3) failed: <error>``."""
    return (
        f"merge run {run['id']} ({run['method']}, policy {run['policy_id']}) failed: "
        f"{run.get('error') or '(no error recorded)'}"
    )


def all_finished(runs: list[dict[str, Any]]) -> bool:
    """True when no run is queued or running."""
    return all(run["status"] in TERMINAL for run in runs)
