"""Fixtures for flow tests: a real ``mlflow server`` on loopback, and tracking records."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from flows.tracking import CheckpointRecord, MergeRecord
from tests.services import S3Endpoint, free_port, require, wait_for_port


@dataclass
class MlflowServer:
    """A running ``mlflow server`` (SQLite backend, proxied local artifacts)."""

    url: str
    proc: subprocess.Popen
    workdir: Path

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


def _mlflow_exe() -> Path | None:
    exe = Path(sys.executable).parent / "mlflow"
    return exe if exe.exists() else None


def start_mlflow_server(
    workdir: Path,
    *,
    artifacts_destination: str | None = None,
    extra_env: dict[str, str] | None = None,
    timeout: float = 90.0,
) -> MlflowServer | None:
    """``mlflow server`` on a free loopback port, ready once ``/health`` answers.

    Artifacts are proxied by the server (clients never see the store) and land in
    ``artifacts_destination`` (default: a local directory under ``workdir``).
    """
    exe = _mlflow_exe()
    if exe is None:
        return None
    port = free_port()
    log = open(workdir / "mlflow-server.log", "wb")  # noqa: SIM115 - lives as long as the server
    cmd = [
        str(exe), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{workdir / 'mlflow.db'}",
        "--artifacts-destination", artifacts_destination or str(workdir / "artifacts"),
    ]  # fmt: skip
    env = {**os.environ, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", **(extra_env or {})}
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, cwd=workdir)
    server = MlflowServer(url=f"http://127.0.0.1:{port}", proc=proc, workdir=workdir)
    try:
        wait_for_port(port, timeout=timeout, proc=proc)
        _wait_healthy(server.url, timeout=timeout, proc=proc)
    except (TimeoutError, RuntimeError):
        server.stop()
        raise
    return server


def _wait_healthy(url: str, *, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode} before {url}/health")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"mlflow server at {url} not healthy within {timeout}s")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """A real ``mlflow server`` for the session; tests isolate themselves by experiment name."""
    workdir = tmp_path_factory.mktemp("mlflow-server")
    try:
        server = start_mlflow_server(workdir)
    except (TimeoutError, RuntimeError) as exc:
        log = (workdir / "mlflow-server.log").read_text(errors="replace")[-2000:]
        pytest.fail(f"mlflow server failed to start: {exc}\n{log}")
    if server is None:
        require("mlflow server", "the mlflow executable is not in the venv")
        raise AssertionError("unreachable")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server_s3(
    tmp_path_factory: pytest.TempPathFactory, s3_server: S3Endpoint | None
) -> Iterator[tuple[MlflowServer, str]]:
    """Server mode: ``mlflow server`` whose artifact destination is a bucket on the session's
    S3 endpoint (moto_server over HTTP). Yields the server and its ``s3://bucket/prefix``."""
    if s3_server is None:
        require("S3 endpoint", "moto_server not installed (pip install 'moto[server]')")
        raise AssertionError("unreachable")
    import boto3

    bucket = f"mlflow-{uuid.uuid4().hex[:12]}"
    creds = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    boto3.client("s3", endpoint_url=s3_server.url, region_name="us-east-1", **creds).create_bucket(
        Bucket=bucket
    )
    env = {
        "MLFLOW_S3_ENDPOINT_URL": s3_server.url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
        "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
    }
    workdir = tmp_path_factory.mktemp("mlflow-server-s3")
    destination = f"s3://{bucket}/mlflow"
    try:
        server = start_mlflow_server(workdir, artifacts_destination=destination, extra_env=env)
    except (TimeoutError, RuntimeError) as exc:
        log = (workdir / "mlflow-server.log").read_text(errors="replace")[-2000:]
        pytest.fail(f"mlflow server (S3 artifacts) failed to start: {exc}\n{log}")
    if server is None:
        require("mlflow server", "the mlflow executable is not in the venv")
        raise AssertionError("unreachable")
    yield server, destination
    server.stop()


@pytest.fixture
def mlflow_experiment_name() -> str:
    """A fresh experiment name, so tests sharing the session server never see each other's runs."""
    return f"ckreg-test-{uuid.uuid4().hex[:10]}"


def _tracking_checkpoints() -> dict[str, CheckpointRecord]:
    base = CheckpointRecord(
        id=1,
        name="tiny-base",
        kind="base",
        store_uri="file:///store/blobs/sha256/aa",
        sha256="aa" * 32,
    )
    math = CheckpointRecord(
        id=2, name="tiny-math", kind="finetune", base_id=1, task="math", run="r1", step=100,
        store_uri="file:///store/blobs/sha256/bb", sha256="bb" * 32, metrics={"loss": 0.25},
    )  # fmt: skip
    code = CheckpointRecord(
        id=3, name="tiny-code", kind="finetune", base_id=1, task="code", run="r2", step=200,
        store_uri="file:///store/blobs/sha256/cc", sha256="cc" * 32,
    )  # fmt: skip
    merged = CheckpointRecord(
        id=4, name="tiny-merged", kind="merged", base_id=1,
        store_uri="file:///store/blobs/sha256/dd", sha256="dd" * 32,
    )  # fmt: skip
    return {"base": base, "math": math, "code": code, "merged": merged}


@pytest.fixture
def tracking_checkpoints() -> dict[str, CheckpointRecord]:
    """Tracking records of a base, two fine-tunes of it (math, code) and a merged output."""
    return _tracking_checkpoints()


@pytest.fixture
def make_merge_record() -> Callable[..., MergeRecord]:
    """Factory for a TIES merge record of the two fine-tunes, scored by ``accuracy``."""

    def make(
        *, run_id: int = 11, accuracy: float = 0.91, output: CheckpointRecord | None = None,
        policy: str | None = None,
    ) -> MergeRecord:  # fmt: skip
        ck = _tracking_checkpoints()
        return MergeRecord(
            run_id=run_id,
            method="ties",
            params={"density": 0.2, "lambda": 1.0, "majority": "total"},
            inputs=[(ck["math"], 0.6), (ck["code"], 0.4)],
            base=ck["base"],
            output=output or ck["merged"],
            policy_name=policy or f"policy-{uuid.uuid4().hex[:8]}",
            metrics={"accuracy": accuracy, "loss": 1.0 - accuracy},
            config_yaml="merge_method: ties\nbase_model: tiny-base\nparameters:\n  density: 0.2\n",
            lineage_edges=[("tiny-base", "tiny-math", "base"), ("tiny-base", "tiny-code", "base")],
            evaluator_metric="accuracy",
        )

    return make
