"""Fixtures for the flow tests: a ckreg home per test, tiny safetensors checkpoints, and an
embedded registry app (REST + in-process flows).

Test modules import these with ``from tests.flows.fixtures_flows import *``. The session-wide
``prefect_harness`` and ``evaluator_plugins`` live in ``tests/conftest.py``: a session fixture
star-imported into many modules would be set up once per module (one Prefect server each).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file
from sqlmodel import Session

from flows import runtime as flow_runtime
from flows.launchers import EmbeddedLauncher
from registry.api.app import create_app
from registry.db import upgrade_database
from registry.models import CheckpointCreate, CheckpointKind, MergePolicyCreate
from registry.services import create_token
from registry.services import merge_runs as run_service
from registry.services import policies as policy_service
from registry.services.completion import register_directory
from registry.settings import Settings

__all__ = [
    "CKREG",
    "FlowEnv",
    "NormEvaluator",
    "Process",
    "embedded",
    "flow_env",
    "save_state",
    "tiny_state",
]

SHAPES = {
    "layers.0.weight": (8, 4),
    "layers.0.bias": (8,),
    "layers.1.weight": (4, 8),
    "layers.1.bias": (4,),
}


def tiny_state(seed: int = 0, *, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """A 2-layer model's weights (a few hundred bytes)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) * scale for k, s in SHAPES.items()}


def save_state(folder: Path, state: dict[str, torch.Tensor]) -> Path:
    """Write ``state`` as ``folder/model.safetensors``; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    return folder


class NormEvaluator:
    """A data-free evaluator for tests: norms of the state dict (entry point ``ckreg-test-norm``)."""

    name = "ckreg-test-norm"

    def evaluate(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, float]:
        flat = torch.cat([t.float().reshape(-1) for t in state_dict.values()])
        return {"l2_norm": float(flat.norm()), "mean_abs": float(flat.abs().mean())}

    def objective(self) -> Any:
        raise NotImplementedError("the norm evaluator has no objective")

    def unlabeled_objective(self) -> Any:
        """adamerging's objective here: the squared norm of the parameters (lower is better)."""
        return _SquaredNorm()

    def fisher(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: torch.ones_like(v) for k, v in state_dict.items()}


class _SquaredNorm:
    def loss(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return sum((t.float() ** 2).sum() for t in params.values())  # type: ignore[return-value]


class SlowNormEvaluator(NormEvaluator):
    """The norm evaluator taking a few seconds, so a test can kill a merge midway."""

    name = "ckreg-test-slow"

    def evaluate(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, float]:
        time.sleep(4.0)
        return super().evaluate(state_dict)


class FlakyEvaluator(NormEvaluator):
    """Returns a NaN metric on its first call in a process (the registry refuses it), then norms."""

    name = "ckreg-test-flaky"
    calls = 0

    def evaluate(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, float]:
        FlakyEvaluator.calls += 1
        if FlakyEvaluator.calls == 1:
            return {"score": float("nan")}
        return super().evaluate(state_dict)


@dataclass
class FlowEnv:
    """A ckreg home with an upgraded database and the flows' runtime pointed at it."""

    settings: Settings
    tmp: Path

    def session(self) -> Session:
        return Session(flow_runtime.current_runtime().engine, expire_on_commit=False)

    def register(self, name: str, state: dict[str, torch.Tensor], **fields: Any) -> int:
        """Register a tiny checkpoint through the services (no launcher); returns its id."""
        runtime = flow_runtime.current_runtime()
        folder = save_state(self.tmp / "src" / name, state)
        kind = fields.pop("kind", CheckpointKind.finetune)
        with self.session() as session:
            checkpoint = register_directory(
                session=session,
                store=runtime.store,
                settings=self.settings,
                data=CheckpointCreate(name=name, kind=kind, **fields),
                directory=folder,
            )
            return checkpoint.id or 0

    def queue_run(self, method: str, base: int, inputs: list[int]) -> tuple[int, bool]:
        """Create (or find) the merge run of ``method`` over ``inputs`` through the service, as
        a request would (no launcher); returns its id and whether it must be launched."""
        request = run_service.MergeRequest(
            method=method,
            base_id=base,
            inputs=[run_service.MergeInputSpec(checkpoint_id=i) for i in inputs],
        )
        with self.session() as session:
            run, launch = run_service.create_merge_run(session=session, request=request)
        return run.id or 0, launch

    def policy(self, **fields: Any) -> int:
        """Create a policy through the service; returns its id."""
        with self.session() as session:
            return (
                policy_service.create_policy(session=session, data=MergePolicyCreate(**fields)).id
                or 0
            )


@pytest.fixture
def flow_env(tmp_path: Path, prefect_harness: None, evaluator_plugins: Path) -> Iterator[FlowEnv]:
    # MLflow at a closed port: tracking events queue in the outbox, merges are unaffected.
    settings = Settings(
        home=tmp_path / "home",
        task_vectors_on_complete=False,
        mlflow_tracking_uri="http://127.0.0.1:9",
    )
    upgrade_database(settings.database_url)
    flow_runtime.configure(settings)
    yield FlowEnv(settings=settings, tmp=tmp_path)
    flow_runtime.reset()


@dataclass
class Embedded:
    """The registry app with an embedded launcher, and a write token for its REST API."""

    env: FlowEnv
    client: TestClient
    launcher: EmbeddedLauncher
    headers: dict[str, str]

    def upload(self, name: str, state: dict[str, torch.Tensor], **fields: Any) -> dict[str, Any]:
        """Register a checkpoint over REST (create, PUT file, complete); returns its JSON."""
        return rest_upload(self.client, self.headers, name, state, **fields)

    def post_merge(self, method: str, input_ids: list[int], **extra: Any) -> Any:
        """``POST /merges`` over ``input_ids`` (see ``merge_request``); returns the response."""
        body = merge_request(method, input_ids, **extra)
        return self.client.post("/api/v1/merges", json=body, headers=self.headers)


@pytest.fixture
def embedded(flow_env: FlowEnv) -> Iterator[Embedded]:
    launcher = EmbeddedLauncher(flow_env.settings, cron=False).start()
    app = create_app(flow_env.settings, launcher=launcher)
    with flow_env.session() as session:
        _, secret = create_token(session=session, name="test", scopes=["write"])
    with TestClient(app) as client:
        yield Embedded(
            env=flow_env,
            client=client,
            launcher=launcher,
            headers={"Authorization": f"Bearer {secret}"},
        )
    launcher.stop()


# ---- a real ``ckreg`` process --------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]
CKREG = [sys.executable, "-c", "from flows.cli import app; app()"]


def ckreg_env(home: Path, plugins: Path, **extra: str) -> dict[str, str]:
    """Environment for a ckreg subprocess with its own home (MLflow pointed at a closed port)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CKREG_")}
    env.update(
        CKREG_HOME=str(home),
        CKREG_MLFLOW_TRACKING_URI="http://127.0.0.1:9",
        CKREG_TASK_VECTORS_ON_COMPLETE="false",
        PYTHONPATH=os.pathsep.join([str(REPO), str(plugins)]),
        PREFECT_LOGGING_LEVEL="WARNING",
    )
    env.update(extra)
    return env


def run_ckreg(
    args: list[str], env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess:
    """Run one ``ckreg`` command to completion."""
    return subprocess.run(
        [*CKREG, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


@dataclass
class Process:
    """A long-running ``ckreg`` command in its own process group (killed as a group)."""

    proc: subprocess.Popen
    log: Path

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-5000:]


def start_process(cmd: list[str], env: dict[str, str], log: Path) -> Process:
    """Start ``cmd`` in its own process group, its output appended to ``log``."""
    handle = log.open("ab")
    proc = subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
    )
    return Process(proc=proc, log=log)


def start_ckreg(args: list[str], env: dict[str, str], log: Path) -> Process:
    return start_process([*CKREG, *args], env, log)


def start_serving(
    cmd: list[str], env: dict[str, str], log: Path, health_url: str, timeout: float = 60
) -> Process:
    """``start_process``, returned once ``health_url`` answers (killed if it never does)."""
    server = start_process(cmd, env, log)
    try:
        wait_http(health_url, server, timeout=timeout)
    except BaseException:
        server.kill()
        raise
    return server


def serve_ckreg(env: dict[str, str], log: Path, port: int) -> Process:
    """``ckreg serve`` on ``port``, returned once ``/healthz`` answers."""
    cmd = [*CKREG, "serve", "--port", str(port)]
    return start_serving(cmd, env, log, f"http://127.0.0.1:{port}/healthz")


def ckreg_token(env: dict[str, str]) -> str:
    """A new API token (``ckreg token create --name ci``): the command's last output line."""
    return str(run_ckreg(["token", "create", "--name", "ci"], env).stdout.strip().splitlines()[-1])


def wait_http(url: str, process: Process, timeout: float = 60) -> None:
    """Wait until ``url`` answers 200, failing early (with the log) if the process died."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.proc.poll() is not None:
            raise AssertionError(f"process exited {process.proc.returncode}:\n{process.output()}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not up within {timeout}s:\n{process.output()}")


def rest_upload(
    api: Any, headers: dict[str, str], name: str, state: dict[str, torch.Tensor], **fields: Any
) -> dict[str, Any]:
    """Register a checkpoint over REST with an ``httpx.Client`` (create, PUT, complete)."""
    from safetensors.torch import save

    body = {"name": name, "kind": fields.pop("kind", "finetune"), **fields}
    created = api.post("/api/v1/checkpoints", json=body, headers=headers)
    assert created.status_code == 201, created.text
    checkpoint_id = created.json()["id"]
    data = save({k: v.contiguous() for k, v in state.items()})
    put = api.put(
        f"/api/v1/checkpoints/{checkpoint_id}/files/model.safetensors",
        content=data,
        headers={**headers, "Content-Type": "application/octet-stream"},
    )
    assert put.status_code == 200, put.text
    done = api.post(f"/api/v1/checkpoints/{checkpoint_id}/complete", json={}, headers=headers)
    assert done.status_code == 200, done.text
    return dict(done.json())


def create_policy(api: Any, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    """Create a merge policy over REST; returns its JSON."""
    created = api.post("/api/v1/policies", json=body, headers=headers)
    assert created.status_code == 201, created.text
    return dict(created.json())


def merge_request(method: str, input_ids: list[int], **extra: Any) -> dict[str, Any]:
    """A ``POST /merges`` body over the checkpoints ``input_ids`` (default weights)."""
    return {"method": method, "inputs": [{"checkpoint_id": i} for i in input_ids], **extra}
