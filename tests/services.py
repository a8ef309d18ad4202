"""Real backing services for the test session: PostgreSQL and an S3 endpoint (moto_server).

Each starter returns a handle or ``None`` when the service's binaries are missing. Outside CI a
missing service skips its tests; under ``CI=true`` it fails them, so CI cannot pass silently.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench._common import moto_command, moto_server_installed

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def require(service: str, reason: str) -> None:
    """Skip (locally) or fail (in CI) when ``service`` is unavailable."""
    message = f"{service} unavailable: {reason}"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: services must be present)")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before port {port} opened")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"port {port} did not open within {timeout}s")


def _pg_bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "pg_ctl").exists():
            return candidate
    return None


@dataclass
class Postgres:
    url: str
    datadir: Path
    bindir: Path
    as_user: list[str]

    def create_database(self, name: str) -> str:
        """Create a fresh database and return its SQLAlchemy URL."""
        import psycopg

        with psycopg.connect(self.url.replace("+psycopg", ""), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url.rsplit("/", 1)[0] + f"/{name}"

    def stop(self) -> None:
        subprocess.run(
            [
                *self.as_user,
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.datadir),
                "-m",
                "immediate",
                "stop",
            ],
            capture_output=True,
            check=False,
        )
        shutil.rmtree(self.datadir.parent, ignore_errors=True)


def start_postgres() -> Postgres | None:
    """initdb + start a throwaway cluster on a free loopback port (as user postgres when root).

    The cluster lives in its own directory under the system temp dir: pytest's tmp dirs are
    private to root, and the server refuses to run as root.
    """
    bindir = _pg_bindir()
    if bindir is None:
        return None
    workdir = Path(tempfile.mkdtemp(prefix="ckreg-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(workdir, "postgres")
    datadir = workdir / "pgdata"
    subprocess.run(
        [
            *as_user,
            str(bindir / "initdb"),
            "-D",
            str(datadir),
            "-U",
            "ckreg",
            "--auth=trust",
            "-E",
            "UTF8",
        ],
        check=True,
        capture_output=True,
    )
    port = free_port()
    subprocess.run(
        [
            *as_user,
            str(bindir / "pg_ctl"),
            "-D",
            str(datadir),
            "-l",
            str(workdir / "pg.log"),
            "-o",
            f"-p {port} -k {workdir} -c listen_addresses=127.0.0.1 -c fsync=off",
            "-w",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    return Postgres(
        url=f"postgresql+psycopg://ckreg@127.0.0.1:{port}/postgres",
        datadir=datadir,
        bindir=bindir,
        as_user=as_user,
    )


@dataclass
class S3Endpoint:
    url: str
    proc: subprocess.Popen

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start_moto(logdir: Path) -> S3Endpoint | None:
    """Start ``moto_server`` on a free loopback port: a real S3 endpoint over HTTP, with the
    thread-safety fixes of ``bench.moto_server`` (concurrent writers of one object)."""
    if not moto_server_installed():
        return None
    port = free_port()
    log = open(logdir / "moto.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(moto_command(port), stdout=log, stderr=log)
    wait_for_port(port, proc=proc)
    return S3Endpoint(url=f"http://127.0.0.1:{port}", proc=proc)
