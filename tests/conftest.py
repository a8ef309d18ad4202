"""Session-wide fixtures: real PostgreSQL, a real S3 endpoint, and isolated ckreg homes."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services import Postgres, S3Endpoint, require, start_moto, start_postgres

# Keep Prefect and MLflow state out of the user's home for every test.
os.environ.setdefault(
    "PREFECT_HOME", str(Path(os.environ.get("TMPDIR", "/tmp")) / f"ckreg-prefect-{os.getpid()}")
)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres | None]:
    try:
        server = start_postgres()
    except Exception as exc:  # initdb/pg_ctl failures are reported by the tests that need it
        server = None
        os.environ["CKREG_TEST_PG_ERROR"] = str(exc)
    yield server
    if server is not None:
        server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Endpoint | None]:
    server = start_moto(tmp_path_factory.mktemp("moto"))
    yield server
    if server is not None:
        server.stop()


@pytest.fixture(scope="session")
def evaluator_plugins(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real (tiny) installed distribution declaring the test evaluator's entry point.

    Returns the folder to put on ``sys.path`` / ``PYTHONPATH`` (subprocesses need it too).
    """
    root = tmp_path_factory.mktemp("plugins")
    dist = root / "ckreg_test_plugins-0.0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: ckreg-test-plugins\nVersion: 0.0.0\n"
    )
    (dist / "entry_points.txt").write_text(
        "[ckreg.evaluators]\n"
        "ckreg-test-norm = tests.flows.fixtures_flows:NormEvaluator\n"
        "ckreg-test-slow = tests.flows.fixtures_flows:SlowNormEvaluator\n"
        "ckreg-test-flaky = tests.flows.fixtures_flows:FlakyEvaluator\n"
    )
    sys.path.insert(0, str(root))
    yield root
    sys.path.remove(str(root))


@pytest.fixture(autouse=True)
def _torch_threads_restored() -> Iterator[None]:
    """Tests that pin torch to one thread (for reproducible training) leave the next test the
    thread count it had: one such leak ran most of the suite single-threaded, hiding results
    that depended on the thread count."""
    import torch

    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """Prefect's test harness (a temporary API server), started once per session (defined here,
    not in a module that tests star-import, so there is one FixtureDef and one server)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture
def postgres_url(postgres_server: Postgres | None) -> str:
    """A fresh, empty PostgreSQL database for one test."""
    if postgres_server is None:
        require("PostgreSQL", os.environ.get("CKREG_TEST_PG_ERROR", "pg_ctl not found"))
        raise AssertionError("unreachable")
    return postgres_server.create_database(f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def s3_endpoint(s3_server: S3Endpoint | None) -> str:
    if s3_server is None:
        require("S3 endpoint", "moto_server not installed (pip install 'moto[server]')")
        raise AssertionError("unreachable")
    return s3_server.url


@pytest.fixture
def s3_store_url(s3_endpoint: str) -> str:
    """An empty bucket on the session's S3 endpoint, as a ``s3://bucket/prefix`` URL."""
    import boto3

    bucket = f"ckreg-{uuid.uuid4().hex[:12]}"
    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket=bucket)
    return f"s3://{bucket}/ckreg"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every database-backed test runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    return str(request.getfixturevalue("postgres_url"))
